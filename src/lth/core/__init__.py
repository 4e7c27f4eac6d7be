"""The science, independent of DVC and MLflow: hyperparameters and their identity, datasets, models,
pruning, and the training loop with its collaborators (evaluation, checkpoints, sparse kernels)."""
