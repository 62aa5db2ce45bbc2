"""Kernel backends: the uapi, the backend interface, the sim, uffd and rwp backends, and the host probe."""
