"""Replica processes: lifecycle, restart policy, the parent shim, process trees, logs."""
