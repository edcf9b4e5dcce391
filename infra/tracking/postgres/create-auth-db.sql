-- Runs once, when the postgres volume is first initialised: the user database of MLflow's
-- basic-auth app, kept apart from the tracking store (database `mlflow`).
CREATE DATABASE mlflow_auth;
