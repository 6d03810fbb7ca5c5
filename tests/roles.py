"""Two real PostgreSQL roles on a database of their own: the owner, who migrates, and a
runtime role that only reads and writes rows (deploy/README.md, Running with least privilege)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg

from .conftest import gateway_main


@dataclass(frozen=True)
class Roles:
    owner: str
    runtime: str
    password: str          # both roles'; must never be printed
    owner_dsn: str
    runtime_dsn: str


def dsn_for(base: str, database: str, user: str, password: str) -> str:
    """The test server's DSN for another database and role."""
    parts = urlsplit(base)
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:{password}@{host}", path=f"/{database}").geturl()


@contextlib.asynccontextmanager
async def two_roles(database_url: str) -> AsyncIterator[Roles]:
    """A fresh database owned by a new owner role, and a new runtime LOGIN role with no
    rights in it yet; all three dropped afterwards."""
    tag = uuid.uuid4().hex[:10]
    owner, runtime, database = f"gw_owner_{tag}", f"gw_runtime_{tag}", f"roles_{tag}"
    password = "pw-" + secrets.token_hex(12)
    admin = await asyncpg.connect(database_url)
    try:
        for role in (owner, runtime):
            await admin.execute(f"create role \"{role}\" login password '{password}'")
        await admin.execute(f'create database "{database}" owner "{owner}"')
        yield Roles(owner, runtime, password, dsn_for(database_url, database, owner, password),
                    dsn_for(database_url, database, runtime, password))
    finally:
        await admin.execute(f'drop database if exists "{database}" with (force)')
        for role in (runtime, owner):
            await admin.execute(f'drop role if exists "{role}"')
        await admin.close()


@dataclass(frozen=True)
class Done:
    returncode: int
    stdout: str
    stderr: str


async def gateway_cli(*args: str, env: dict[str, str], timeout: float = 120) -> Done:
    """Run `python -m gateway ARGS` to its end without blocking the loop (the test backends
    answer on it); its exit code and output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return Done(proc.returncode, out.decode(), err.decode())


async def gateway_run(*args: str, env: dict[str, str]) -> Done:
    """`gateway ARGS` run in this process (conftest.gateway_main, in a thread: the test
    backends answer on this loop) with env's GATEWAY_* variables as its only ones: what
    gateway_cli gives, without starting Python and importing the gateway again (~0.5 s a
    command). Not for `serve` or a process whose environment is the point (a faked clock):
    those, and one test per command family, go through gateway_cli."""
    done = await asyncio.to_thread(gateway_main, *args, env={
        k: v for k, v in env.items() if k.startswith("GATEWAY_")})
    return Done(done.returncode, done.stdout, done.stderr)


def as_role(dsn: str, **env: str) -> dict[str, str]:
    """The environment of a gateway command connecting with this DSN."""
    return {"GATEWAY_DATABASE_URL": dsn, **env}


async def migrated_with_grants(roles: Roles, *, process: bool = False) -> None:
    """`gateway migrate` and `gateway grant` as the owner, as an operator would run them:
    in this process (gateway_run), or with process=True each as a process of its own (one
    test does, for both commands)."""
    run = gateway_cli if process else gateway_run
    for args in (("migrate",), ("grant", "--role", roles.runtime)):
        done = await run(*args, env=as_role(roles.owner_dsn))
        assert done.returncode == 0, f"gateway {' '.join(args)}: {done.stdout}{done.stderr}"


async def drop_last_migration(roles: Roles) -> str:
    """Forget the newest migration, as if the schema were a release behind; its name."""
    owner = await asyncpg.connect(roles.owner_dsn)
    try:
        return await owner.fetchval("delete from schema_migrations where version = "
                                    "(select max(version) from schema_migrations) returning name")
    finally:
        await owner.close()
