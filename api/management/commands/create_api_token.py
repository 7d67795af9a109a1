"""``manage.py create_api_token USERNAME [--name NAME] [--scope S ...] [--expires-in DAYS]``:
print a new raw API token.

Run on the server, so it may mint a token for any user (the admin lets a
non-superuser mint only for themselves). The token acts with its user's permissions,
narrowed to its scopes.
"""

from __future__ import annotations

from argparse import ArgumentTypeError
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from api.auth import api_token_create
from api.models import SCOPE_ORDER


def _positive_days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        days = 0
    if days <= 0:
        raise ArgumentTypeError(f"a whole number of days above 0, not {text!r}")
    return days


class Command(BaseCommand):
    help = "Create an API token for USERNAME and print it (shown once; only its hash is stored)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--name", default="cli", help="a label to tell tokens apart (default: cli)")
        parser.add_argument(
            "--scope",
            action="append",
            choices=SCOPE_ORDER,
            dest="scopes",
            help="repeat to allow several: read (GET routes), write (changes, uploads, ticks), "
            "tick (only POST .../tick). Default: read and write.",
        )
        parser.add_argument(
            "--expires-in", type=_positive_days, metavar="DAYS", help="refuse the token after DAYS days (default: never)"
        )

    def handle(self, *args, username: str, name: str, scopes: list[str] | None, expires_in: int | None, **options) -> None:
        User = get_user_model()
        try:
            user = User.objects.get(**{User.USERNAME_FIELD: username})
        except User.DoesNotExist:
            raise CommandError(f"no user named {username!r}") from None
        if not user.is_staff:
            self.stderr.write(f"warning: {username} is not staff; the API will answer 403")
        expires_at = timezone.now() + timedelta(days=expires_in) if expires_in else None
        token, raw = api_token_create(user=user, name=name, scopes=scopes, expires_at=expires_at)
        # Only the token goes to stdout (scripts capture it); the rest is for the person.
        self.stderr.write(
            f"scopes: {', '.join(token.scope_list)}; expires: {token.expires_at.isoformat() if token.expires_at else 'never'}"
        )
        self.stdout.write(raw)
