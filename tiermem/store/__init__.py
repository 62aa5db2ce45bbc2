"""Page stores: one interface (``base``), a shared codec, and local, Redis, S3 and memory backends."""
