"""Kernel backends: the uapi, the backend interface, the real uffd and rwp backends, the host probe and selection."""
