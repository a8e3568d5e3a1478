"""Pipeline stages: typed config in, files out. MLflow is reached only through tasks.tracking."""
