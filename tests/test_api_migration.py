"""ApiToken and PushSignatureUse moved from the ``picsite`` app to ``api`` (picsite.0004,
api.0001): a database migrated to the state before the move, with a token, a used push
signature and a permission granted on tokens, migrates forward with every row kept, the
token still authenticating and the permission still held under its new name.

The test database is taken back to that state (``api`` unapplied, ``picsite`` at 0003)
with Django's own MigrationExecutor, the rows are written through the historical
``picsite`` models, then everything is migrated forward again.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.recorder import MigrationRecorder
from django.test import RequestFactory
from django.utils import timezone

from api.auth import api_token_create, api_user, token_hash
from api.models import ApiToken, PushSignatureUse

BEFORE_MOVE = [("picsite", "0003_push_signature_use"), ("api", None)]
RAW_TOKEN = "pst_" + "m" * 43


def migrate(targets=None):
    """Migrate the test database to ``targets`` (default: every app's latest)."""
    executor = MigrationExecutor(connection)
    executor.migrate(targets or executor.loader.graph.leaf_nodes())
    ContentType.objects.clear_cache()  # the migrations renamed rows the cache may hold


@pytest.mark.django_db(transaction=True)
def test_tokens_move_to_the_api_app_keeping_rows_auth_and_permissions(django_user_model):
    user = django_user_model.objects.create_user("deployer", password="pw-deploy-123", is_staff=True)
    expires_at = timezone.now() + timedelta(days=30)
    try:
        migrate(BEFORE_MOVE)
        old = MigrationExecutor(connection).loader.project_state([("picsite", "0003_push_signature_use")]).apps
        assert ("api", "0001_initial") not in MigrationRecorder(connection).applied_migrations()

        # Today's database: rows written through the picsite models, a grant on picsite.apitoken.
        OldToken = old.get_model("picsite", "ApiToken")
        old_token = OldToken.objects.create(
            user_id=user.pk,
            name="deploy",
            prefix=RAW_TOKEN[:8],
            token_hash=token_hash(RAW_TOKEN),
            scopes="read,tick",
            expires_at=expires_at,
        )
        old.get_model("picsite", "PushSignatureUse").objects.create(digest="ab" * 32, expires_at=expires_at)
        old_type, _ = ContentType.objects.get_or_create(app_label="picsite", model="apitoken")
        add_token, _ = Permission.objects.get_or_create(
            content_type=old_type, codename="add_apitoken", defaults={"name": "Can add API token"}
        )
        user.user_permissions.add(add_token)

        migrate()
    finally:
        migrate()  # leave the database as every other test expects it

    applied = MigrationRecorder(connection).applied_migrations()
    assert ("api", "0001_initial") in applied and ("picsite", "0004_api_models_move_to_api") in applied

    token = ApiToken.objects.get(pk=old_token.pk)
    assert (token.user_id, token.name, token.prefix, token.scopes, token.expires_at) == (
        user.pk, "deploy", RAW_TOKEN[:8], "read,tick", expires_at
    )
    assert PushSignatureUse.objects.filter(digest="ab" * 32, expires_at=expires_at).exists()

    # The token still authenticates its user.
    request = RequestFactory().get("/api/v1/tasks/runs", HTTP_AUTHORIZATION=f"Bearer {RAW_TOKEN}")
    assert api_user(request) == user and request.api_token.pk == old_token.pk

    # The grant moved with the content type: same permission row, now api.add_apitoken.
    assert ContentType.objects.get_for_id(old_type.pk).app_label == "api"
    assert not ContentType.objects.filter(app_label="picsite").exists()
    assert django_user_model.objects.get(pk=user.pk).has_perm("api.add_apitoken")

    # New tokens go on in the same table after the old ones.
    new_token, _ = api_token_create(user=user, name="after-the-move")
    assert new_token.pk > old_token.pk
    assert ApiToken.objects.count() == 2
