"""Pure PyTorch modules and losses. Never imports prefect, mlflow or dvc."""
