"""BN-NAS pipeline stages: supernet training, search, retraining, on Ray."""
