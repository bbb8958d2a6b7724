"""The control plane: the Unix-socket API, model operations, persisted desired state."""
