"""The audit log's schema is ready to be distributed by chain_id (Citus; docs/scale.md):
checked on the schema the migrations make (the `gateway` fixture's database, migrated as
the gateway starts), so a migration cannot quietly break it."""

from __future__ import annotations

# distributed by chain_id, co-located: a chain's rows, head, checkpoints and Merkle runs
DISTRIBUTED = ("audit_log", "audit_chain_heads", "audit_checkpoints", "audit_merkle_nodes",
               "audit_merkle_runs", "audit_verified")
# small tables every node holds a copy of
REFERENCE = ("audit_signing_keys",)


async def test_every_key_of_a_distributed_table_holds_chain_id(gateway, db):
    """A primary or unique key without the distribution column cannot be enforced across
    shards (Citus refuses to distribute such a table)."""
    keys = await db.fetch("""
        select c.relname as tbl, i.relname as key,
               array(select a.attname from unnest(x.indkey) k
                     join pg_attribute a on a.attrelid = x.indrelid and a.attnum = k) as cols
          from pg_index x
          join pg_class c on c.oid = x.indrelid
          join pg_class i on i.oid = x.indexrelid
         where (x.indisunique or x.indisprimary) and c.relname = any($1::text[])
           and c.relnamespace = current_schema()::regnamespace""", list(DISTRIBUTED))
    assert keys, "the distributed tables have keys"
    missing = [(k["tbl"], k["key"]) for k in keys if "chain_id" not in k["cols"]]
    assert not missing, f"keys without chain_id: {missing}"
    checkpoints = {frozenset(k["cols"]) for k in keys if k["tbl"] == "audit_checkpoints"}
    assert {"chain_id", "id"} in checkpoints


async def test_a_distributed_table_refers_only_to_reference_tables_or_its_own_chain(gateway, db):
    """A foreign key from a distributed table must lead to a reference table, or to a
    co-located table through chain_id."""
    fks = await db.fetch("""
        select c.relname as tbl, r.relname as target,
               array(select a.attname from unnest(f.conkey) k
                     join pg_attribute a on a.attrelid = f.conrelid and a.attnum = k) as cols
          from pg_constraint f
          join pg_class c on c.oid = f.conrelid
          join pg_class r on r.oid = f.confrelid
         where f.contype = 'f' and c.relname = any($1::text[])""", list(DISTRIBUTED))
    for fk in fks:
        assert fk["target"] in REFERENCE or (fk["target"] in DISTRIBUTED and "chain_id" in fk["cols"]), fk


async def test_a_batch_is_appended_by_one_function_of_its_chain(gateway, db):
    """The writer's batch is one call of audit_append(batch, chain, ...): a function Citus
    can run on the chain's shard (distributed by its `chain` argument)."""
    args = await db.fetchval("""
        select pg_get_function_identity_arguments(p.oid) from pg_proc p
         where p.proname = 'audit_append' and p.pronamespace = current_schema()::regnamespace""")
    assert args is not None and "chain uuid" in args
