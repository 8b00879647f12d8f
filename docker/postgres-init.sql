-- Runs once, when the Postgres volume is created (docker-entrypoint-initdb.d):
-- POSTGRES_DB creates the MLflow database; the Prefect server gets its own.
CREATE DATABASE prefect;
