"""MLflow: the store, the runs of each variant, the registry (runs), and the team tracking
server (server: PostgreSQL + mlflow server). May import core and runtime."""
