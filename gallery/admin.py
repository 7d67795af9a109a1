"""Admin for photos: list with thumbnails, multi-file upload, soft delete.

Adapters only: uploads go through ``gallery.importer.ingest_uploads`` and deletes
through ``gallery.services.image_soft_delete``.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.defaultfilters import truncatechars
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.safestring import mark_safe

from gallery.imaging import output_formats
from gallery.importer import IngestSource, ingest_uploads
from gallery.models import Image, VariantSet
from gallery.selectors import VariantStores, image_thumbnail_url
from gallery.services import image_soft_delete

# --- multi-file upload form (Django docs pattern) ----------------------------------------


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("widget", MultipleFileInput(attrs={"accept": "image/*"}))
        super().__init__(*args, **kwargs)

    def clean(self, data, initial=None):
        single_file_clean = super().clean
        if isinstance(data, list | tuple):
            return [single_file_clean(d, initial) for d in data]
        return [single_file_clean(data, initial)]


class ImageUploadForm(forms.Form):
    # Empty files are let through: image_ingest rejects them like any other bad file,
    # so the user gets one "name: reason" line per file instead of a generic error.
    files = MultipleFileField(label="Photos", allow_empty_file=True)


# --- list filter -------------------------------------------------------------------------


class LifecycleFilter(admin.SimpleListFilter):
    """Live photos unless asked otherwise: soft-deleted ones are hidden by default."""

    title = "status"
    parameter_name = "status"
    default = "live"

    def lookups(self, request, model_admin):
        return [("live", "Live"), ("deleted", "Deleted"), ("all", "All")]

    def _current(self) -> str:
        return self.value() or self.default

    def choices(self, changelist):
        for lookup, label in self.lookup_choices:
            yield {
                "selected": self._current() == lookup,
                "query_string": changelist.get_query_string({self.parameter_name: lookup}),
                "display": label,
            }

    def queryset(self, request, queryset):
        current = self._current()
        if current == "live":
            return queryset.filter(deleted_at__isnull=True)
        if current == "deleted":
            return queryset.filter(deleted_at__isnull=False)
        return queryset


# --- admin ---------------------------------------------------------------------------------


def _chosen_qualities(vset: VariantSet) -> str:
    """" · quality AVIF q52, WebP q71": what an "auto" recipe chose for the set ("" if fixed)."""
    chosen = (vset.params or {}).get("quality") or {}
    if not chosen:
        return ""
    labels = {fmt.name: fmt.label for fmt in output_formats()}
    return " · quality " + ", ".join(f"{labels.get(name, name)} q{q}" for name, q in chosen.items())


@admin.register(Image)
class ImageAdmin(admin.ModelAdmin):
    change_list_template = "admin/gallery/image/change_list.html"
    list_display = (
        "thumbnail",
        "title",
        "dimensions",
        "variants_ready",
        "ready_max_width",
        "variants_error_short",
        "created_at",
    )
    list_display_links = ("thumbnail", "title")
    list_filter = (LifecycleFilter, "variants_ready", "mime_type")
    search_fields = ("title", "image_key", "camera_make", "camera_model", "lens")
    date_hierarchy = "created_at"
    list_per_page = 50
    list_select_related = ("serving_set",)  # thumbnails come from each row's serving set
    actions = ("soft_delete_selected",)
    fields = (
        "preview",
        "title",
        "image_key",
        "original",
        "mime_type",
        "original_bytes",
        "width",
        "height",
        "blurhash",
        "taken_at",
        "camera_make",
        "camera_model",
        "lens",
        "gps_latitude",
        "gps_longitude",
        "variants_ready",
        "ready_max_width",
        "variants_recipe",
        "variant_sets_summary",
        "variants_attempts",
        "variants_bytes",
        "variants_error",
        "uploaded_by",
        "deleted_at",
        "created_at",
        "updated_at",
    )
    # Only the title is edited by hand; everything else comes from the pipeline.
    readonly_fields = tuple(f for f in fields if f != "title")

    # -- urls / upload view -------------------------------------------------------------

    def get_urls(self):
        upload = path(
            "upload/",
            self.admin_site.admin_view(self.upload_view),
            name="gallery_image_upload",
        )
        return [upload, *super().get_urls()]

    def add_view(self, request, form_url="", extra_context=None):
        # A row is only ever made by ingest (validation, content address, storage).
        return HttpResponseRedirect(reverse("admin:gallery_image_upload"))

    def upload_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = ImageUploadForm(request.POST or None, request.FILES or None)
        if request.method == "POST" and form.is_valid():
            report = ingest_uploads(
                sources=[IngestSource(name=f.name, read=f.read, size=f.size) for f in form.cleaned_data["files"]],
                uploaded_by=request.user,
            )
            for item in report.rejected:
                form.add_error("files", f"{item.name}: {item.message}")
            summary = (
                f"{len(report.imported)} uploaded, {len(report.duplicates)} already in the gallery, "
                f"{len(report.rejected)} rejected."
            )
            if not report.rejected:
                self.message_user(request, summary, messages.SUCCESS)
                return HttpResponseRedirect(reverse("admin:gallery_image_changelist"))
            self.message_user(request, summary, messages.WARNING if report.accepted else messages.ERROR)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Upload photos",
            "form": form,
            "media": self.media + form.media,
            "has_view_permission": self.has_view_permission(request),
        }
        return TemplateResponse(request, "admin/gallery/image/upload.html", context)

    # -- changelist thumbnails ------------------------------------------------------------

    def get_changelist_instance(self, request):
        # Resolve the variant store once per page (an S3 store builds a boto3 client),
        # not once per row, and stash each row's thumbnail URL on it.
        changelist = super().get_changelist_instance(request)
        stores = VariantStores()
        for image in changelist.result_list:
            image._thumb_url = image_thumbnail_url(image=image, stores=stores)
        return changelist

    @admin.display(description="")
    def thumbnail(self, obj: Image) -> str:
        url = getattr(obj, "_thumb_url", "")
        if not url:
            return mark_safe('<span title="no variant ready yet">—</span>')
        return format_html('<img src="{}" alt="" loading="lazy" style="height: 48px; width: auto; display: block">', url)

    @admin.display(description="preview")
    def preview(self, obj: Image) -> str:
        url = image_thumbnail_url(image=obj, stores=VariantStores())
        if not url:
            return "no variant ready yet"
        return format_html('<img src="{}" alt="" style="max-width: 320px; height: auto">', url)

    @admin.display(description="variant sets")
    def variant_sets_summary(self, obj: Image) -> str:
        rows = [
            format_html(
                "<li><b>{}</b>{} — key {} · recipe {}{} · {} · ready {} of {}</li>",
                vset.state,
                " (served)" if vset.pk == obj.serving_set_id else "",
                vset.key_version or "legacy",
                vset.recipe_version,
                _chosen_qualities(vset),
                f"{vset.storage_kind}:{vset.folder}",
                ", ".join(map(str, vset.ready_widths)) or "none",
                ", ".join(map(str, vset.widths)),
            )
            for vset in obj.variant_sets.order_by("-id")
        ]
        return format_html("<ul>{}</ul>", mark_safe("".join(rows))) if rows else "none"

    @admin.display(description="size", ordering="width")
    def dimensions(self, obj: Image) -> str:
        return f"{obj.width}×{obj.height}"

    @admin.display(description="variants error")
    def variants_error_short(self, obj: Image) -> str:
        return truncatechars(obj.variants_error, 60)

    # -- actions -------------------------------------------------------------------------

    def delete_model(self, request: HttpRequest, obj: Image) -> None:
        # The change form's Delete is the same soft delete: a hard delete would orphan the
        # original (it may carry GPS) and every public variant. Purging comes later.
        if obj.deleted_at is None:
            image_soft_delete(image=obj)

    def delete_queryset(self, request: HttpRequest, queryset) -> None:
        for image in queryset.filter(deleted_at__isnull=True):
            image_soft_delete(image=image)

    def get_actions(self, request):
        # A hard delete would orphan the original and variant files; soft delete cleans up.
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    @admin.action(description="Delete selected photos (soft: hide and drop variants)", permissions=["delete"])
    def soft_delete_selected(self, request: HttpRequest, queryset) -> None:
        images = list(queryset.filter(deleted_at__isnull=True))
        for image in images:
            image_soft_delete(image=image)
        self.message_user(request, f"Deleted {len(images)} photo(s).", messages.SUCCESS)
