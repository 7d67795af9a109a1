"""API tokens in the admin: listed, revocable, and created with the raw token shown once.

A non-superuser sees, creates and revokes only their own tokens. The raw token is
rendered in the response to the add form itself (no redirect), never put in a
message: Django keeps messages in a cookie (or the session), which would store it.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers

from api.auth import api_token_create, api_token_revoke
from api.models import DEFAULT_SCOPES, ApiToken, TokenScope, token_scopes_normalize


class ApiTokenAddForm(forms.ModelForm):
    scopes = forms.MultipleChoiceField(
        choices=TokenScope.choices,
        initial=DEFAULT_SCOPES.split(","),
        widget=forms.CheckboxSelectMultiple,
        help_text="What the token may do; its user's permissions apply on top.",
    )

    class Meta:
        model = ApiToken
        fields = ("user", "name", "scopes", "expires_at")

    def clean_expires_at(self):
        expires_at = self.cleaned_data.get("expires_at")
        if expires_at is not None and expires_at <= timezone.now():
            raise forms.ValidationError("Pick a time in the future (or leave empty: never expires).")
        return expires_at

    def clean_scopes(self) -> str:
        try:
            return token_scopes_normalize(self.cleaned_data["scopes"])
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("name", "user", "prefix", "scopes", "expires_at", "created_at", "last_used_at", "revoked_at", "active")
    list_filter = ("revoked_at",)
    search_fields = ("name", "prefix", "user__username")
    list_select_related = ("user",)
    actions = ("revoke_tokens",)
    token_created_template = "admin/api/apitoken/created.html"

    def get_queryset(self, request: HttpRequest) -> QuerySet[ApiToken]:
        tokens = super().get_queryset(request)
        return tokens if request.user.is_superuser else tokens.filter(user=request.user)

    def get_form(self, request: HttpRequest, obj: ApiToken | None = None, change: bool = False, **kwargs):
        if obj is None:
            kwargs["form"] = ApiTokenAddForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fields(self, request: HttpRequest, obj: ApiToken | None = None):
        if obj is None:
            return ("user", "name", "scopes", "expires_at")
        return ("user", "name", "prefix", "scopes", "expires_at", "created_at", "last_used_at", "revoked_at")

    def get_readonly_fields(self, request: HttpRequest, obj: ApiToken | None = None):
        if obj is None:
            return ()
        # A token's authority is fixed when it is minted: mint a new one to change it.
        return ("user", "prefix", "scopes", "expires_at", "created_at", "last_used_at", "revoked_at")

    def formfield_for_foreignkey(self, db_field, request: HttpRequest, **kwargs):
        if db_field.name == "user":
            kwargs["initial"] = request.user.pk
            if not request.user.is_superuser:
                # The only choice is oneself: a forged POST for someone else fails validation.
                kwargs["queryset"] = get_user_model().objects.filter(pk=request.user.pk)
                kwargs["empty_label"] = None
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    @admin.display(boolean=True, description="Active")
    def active(self, obj: ApiToken) -> bool:
        return obj.revoked_at is None and not obj.is_expired()

    def save_model(self, request: HttpRequest, obj: ApiToken, form, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        token, raw = api_token_create(
            user=obj.user, name=obj.name, scopes=obj.scopes.split(","), expires_at=obj.expires_at, minted_by=request.user
        )
        obj.pk = token.pk
        obj.refresh_from_db()
        obj.raw_token = raw  # for response_add only; never stored

    def response_add(self, request: HttpRequest, obj: ApiToken, post_url_continue=None) -> HttpResponse:
        context = {
            **self.admin_site.each_context(request),
            "title": "API token created",
            "opts": self.opts,
            "token": obj,
            "raw_token": obj.raw_token,
        }
        response = TemplateResponse(request, self.token_created_template, context)
        add_never_cache_headers(response)  # no-store: not kept by the browser or a proxy
        return response

    @admin.action(description="Revoke selected tokens", permissions=["change"])
    def revoke_tokens(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        count = 0
        for token in queryset.filter(revoked_at__isnull=True):
            api_token_revoke(token=token)
            count += 1
        self.message_user(request, f"Revoked {count} token(s).", level=messages.SUCCESS)
