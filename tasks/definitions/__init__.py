"""Registered task definitions; importing this package registers them all."""

from tasks.definitions import metadata_refresh, preprocess_images, variants_gc  # noqa: F401
