"""Gallery data: one row per original photo.

Ids are bigint auto-increment (never UUIDs): the task engine pages by ``id > cursor``
and a row inserted during a run always lands after the cursor instead of behind it.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q


class ImageQuerySet(models.QuerySet):
    def alive(self) -> ImageQuerySet:
        return self.filter(deleted_at__isnull=True)

    def needing_variants(self, *, recipe_version: str) -> ImageQuerySet:
        """Not deleted, and either not fully ready or made with another recipe."""
        # "<" or ">" instead of "!=" so Postgres can answer from the btree index.
        return self.alive().filter(
            Q(variants_ready=False)
            | Q(variants_recipe__lt=recipe_version)
            | Q(variants_recipe__gt=recipe_version)
        )


class Image(models.Model):
    original = models.FileField(upload_to="originals/%Y/%m/", max_length=255)
    title = models.CharField(max_length=255, blank=True)
    # Content address: "variants/" + first 32 hex chars of sha256(original bytes).
    image_key = models.CharField(max_length=64, unique=True)
    original_bytes = models.BigIntegerField(default=0)
    mime_type = models.CharField(max_length=40, blank=True)

    # Dimensions after EXIF orientation.
    width = models.PositiveIntegerField(default=0)
    height = models.PositiveIntegerField(default=0)
    blurhash = models.CharField(max_length=64, blank=True)

    # EXIF metadata (refreshed by the metadata-refresh task).
    taken_at = models.DateTimeField(null=True, blank=True)
    camera_make = models.CharField(max_length=120, blank=True)
    camera_model = models.CharField(max_length=120, blank=True)
    lens = models.CharField(max_length=160, blank=True)
    gps_latitude = models.FloatField(null=True, blank=True)
    gps_longitude = models.FloatField(null=True, blank=True)

    # The variant set the gallery serves (None: nothing yet, placeholder only). Every
    # srcset, src, thumbnail and API URL is built from it, never from current settings.
    serving_set = models.ForeignKey(
        "VariantSet", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Mirrors of the serving set, kept in the same UPDATE, for indexed scopes and filters:
    # ready_max_width names a tier of it whose every format is stored; variants_ready is
    # "complete"; variants_recipe its recipe version (stale when not the current one).
    variants_ready = models.BooleanField(default=False)
    ready_max_width = models.PositiveIntegerField(default=0)
    variants_recipe = models.CharField(max_length=32, blank=True)
    variants_error = models.TextField(blank=True)
    variants_attempts = models.PositiveSmallIntegerField(default=0)
    variants_bytes = models.BigIntegerField(default=0)

    # Short claim so an upload's task and a backfill never encode one image at once.
    processing_token = models.CharField(max_length=40, blank=True)
    processing_until = models.DateTimeField(null=True, blank=True)

    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    deleted_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ImageQuerySet.as_manager()

    class Meta:
        ordering = ["-id"]
        indexes = [
            # The backfill scope ("missing or stale"), walked by id keyset.
            models.Index(
                fields=["id"],
                name="image_pending_variants_idx",
                condition=Q(deleted_at__isnull=True, variants_ready=False),
            ),
            models.Index(fields=["variants_recipe", "id"], name="image_recipe_id_idx",
                         condition=Q(deleted_at__isnull=True)),
            # Public grid: newest first among live images.
            models.Index(fields=["-id"], name="image_alive_id_desc_idx", condition=Q(deleted_at__isnull=True)),
        ]

    def __str__(self) -> str:
        return self.title or self.image_key

    @property
    def aspect_ratio(self) -> float:
        return self.width / self.height if self.height else 1.0


class VariantSetState(models.TextChoices):
    """serving: advertised (tiers up to ready_max_width); candidate: built beside the serving
    set, never advertised until it is complete and switched in; superseded: replaced, still
    answering for cached pages until the garbage collector's grace has passed; reclaiming:
    the collector is deleting its objects."""

    CANDIDATE = "candidate", "Candidate"
    SERVING = "serving", "Serving"
    SUPERSEDED = "superseded", "Superseded"
    RECLAIMING = "reclaiming", "Reclaiming"


class VariantSet(models.Model):
    """One immutable set of an image's variant objects, addressed by its key version.

    Every object key carries ``key_version`` (a hash of what changes the bytes or the tier
    list, and of where they live), so a new recipe, per-image parameter, storage or folder
    is a new set and never overwrites an object a page or a CDN may hold. ``""`` is the
    legacy set adopted from unversioned keys. The row is committed before its first object
    is stored, so the garbage collector never mistakes a set being written for an orphan.
    """

    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="variant_sets")
    state = models.CharField(max_length=16, choices=VariantSetState.choices)
    recipe_version = models.CharField(max_length=32)  # what the settings asked for
    key_version = models.CharField(max_length=16, blank=True)  # in every key; "" = legacy
    storage_kind = models.CharField(max_length=16)  # "local" | "s3"
    folder = models.CharField(max_length=255, blank=True)
    widths = models.JSONField(default=list)  # the tiers of this set, ascending
    formats = models.JSONField(default=list)  # e.g. ["avif", "webp"]
    # Tiers up to this width have every format stored (smallest first).
    ready_max_width = models.PositiveIntegerField(default=0)
    bytes = models.BigIntegerField(default=0)
    params = models.JSONField(default=dict, blank=True)  # per-image parameters in the key version
    created_at = models.DateTimeField(auto_now_add=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    superseded_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["image", "key_version"], name="one_set_per_key_version")]
        indexes = [
            models.Index(
                fields=["superseded_at"], name="variantset_superseded_idx", condition=Q(state="superseded")
            )
        ]

    def __str__(self) -> str:
        return f"set {self.key_version or 'legacy'} of image {self.image_id} ({self.state})"

    @property
    def is_complete(self) -> bool:
        return bool(self.widths) and self.ready_max_width >= self.widths[-1]

    @property
    def ready_widths(self) -> list[int]:
        return [w for w in self.widths if w <= self.ready_max_width]


class StorageHealth(models.Model):
    """Whether a storage (variant bucket, originals) is down: one row per storage, shared by
    every worker, job and web process, so an outage is recognised across batches, runs and
    hosts instead of by one worker's local count. Written by ``gallery.storage_health``."""

    name = models.CharField(max_length=16, primary_key=True)  # "variants" | "originals"
    consecutive_failures = models.PositiveIntegerField(default=0)
    down_since = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    # While down: when the next probe may run, and how many probes failed so far (backoff).
    next_probe_at = models.DateTimeField(null=True, blank=True)
    failed_probes = models.PositiveIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "storage health"

    def __str__(self) -> str:
        return f"{self.name}: {'down since ' + str(self.down_since) if self.down_since else 'up'}"
