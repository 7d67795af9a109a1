"""Granting Django permissions to test users by their dotted names."""

from __future__ import annotations

from django.contrib.auth.base_user import AbstractBaseUser


def grant(user: AbstractBaseUser, *permissions: str) -> AbstractBaseUser:
    """Give ``user`` the permissions named "app_label.codename" (fails on an unknown name)."""
    from django.contrib.auth.models import Permission

    found = []
    for name in permissions:
        app_label, codename = name.split(".")
        found.append(Permission.objects.get(content_type__app_label=app_label, codename=codename))
    user.user_permissions.add(*found)
    for cache in ("_perm_cache", "_user_perm_cache", "_group_perm_cache"):
        user.__dict__.pop(cache, None)  # has_perm caches per instance
    return user
