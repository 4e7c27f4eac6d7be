"""MLflow: the store and its client, the one writer (a trial logged from its DVC outputs), and the replay
of what MLflow lacks (`lth sync-mlflow`)."""
