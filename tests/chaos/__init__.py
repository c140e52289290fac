"""Faults under load on a multi-host cluster made of network namespaces (see `python -m tests.chaos`)."""
