-- Run once by the postgres image on an empty data directory (/docker-entrypoint-initdb.d),
-- as the image's superuser, in the database POSTGRES_DB. Creates the two roles the gateway
-- uses; neither is a superuser:
--   gateway_owner    owns the database and so every table the migrations create
--                    (`gateway migrate`, `gateway audit maintain`);
--   gateway_runtime  owns nothing; `gateway serve --no-migrate` connects as it, with only
--                    what sql/runtime_grants.sql grants it after the migrations.
-- The passwords come from the container's environment (psql's \getenv, PostgreSQL 15+), so
-- none is written here.
\set ON_ERROR_STOP on
\getenv owner_password GATEWAY_OWNER_PASSWORD
\getenv runtime_password GATEWAY_RUNTIME_PASSWORD

create role gateway_owner login password :'owner_password';
create role gateway_runtime login password :'runtime_password';

-- From PostgreSQL 15 the public schema belongs to the database's owner, so owning the
-- database is enough to migrate it.
alter database :"DBNAME" owner to gateway_owner;
revoke all on database :"DBNAME" from public;
grant connect on database :"DBNAME" to gateway_runtime;
