"""System checks of the gallery app, run by ``manage.py check`` and by every management
command that checks (``migrate``, ``qcluster``, ``runserver``...)."""

from __future__ import annotations

from django.core.checks import Error

from gallery.imaging import encoder_problems


def encoders_check(app_configs=None, **kwargs) -> list[Error]:
    """gallery.E001 for each variant format (AVIF, WebP) this Pillow cannot encode."""
    return [
        Error(
            problem,
            hint="Install a Pillow built with libavif and libwebp (the official wheels are).",
            id="gallery.E001",
        )
        for problem in encoder_problems()
    ]
