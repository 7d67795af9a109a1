"""Registered task definitions; importing this package registers them all."""

from tasks.definitions import metadata_refresh, preprocess_images  # noqa: F401
