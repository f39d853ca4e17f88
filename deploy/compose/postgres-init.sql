-- Run once by the postgres image, as the superuser, when its data volume is first initialised
-- (/docker-entrypoint-initdb.d). Weir's CDC connector needs a role that may use logical replication
-- (REPLICATION) and owns the tables it captures: it creates a publication for them, sets REPLICA IDENTITY
-- FULL on each and keeps its snapshot state in a table of its own (streams/cdc.py). The fraud shop example
-- creates its tables as this role (`weir up` prepares them), so it owns them; for tables of your own, make
-- this role their owner or adapt the grants.
\getenv weir_password PG_WEIR_PASSWORD
CREATE ROLE weir WITH LOGIN REPLICATION PASSWORD :'weir_password';
-- the role owns the database, and so may create in its public schema (PostgreSQL 15+)
CREATE DATABASE shop OWNER weir;
