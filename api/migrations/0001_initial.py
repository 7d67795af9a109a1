"""ApiToken and PushSignatureUse move here from the ``picsite`` app, rows and all.

State only: picsite.0001-0003 created the tables (``picsite_apitoken``,
``picsite_pushsignatureuse``) and they keep their names (``Meta.db_table``), so a
database that has them migrates without touching a row, and web processes of the
previous release keep working while it does. picsite.0004 removes the models from the
``picsite`` state. The content types follow (``picsite.apitoken`` becomes
``api.apitoken``), so granted permissions (``api.add_apitoken`` now) and admin history
stay attached.
"""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

import api.models

MOVED_MODELS = ("apitoken", "pushsignatureuse")


def _content_types_move(apps, schema_editor, *, old_label: str, new_label: str) -> None:
    ContentType = apps.get_model("contenttypes", "ContentType")
    content_types = ContentType.objects.using(schema_editor.connection.alias)
    for model in MOVED_MODELS:
        # A content type already under the new label (created by hand, say) is left as it is.
        if not content_types.filter(app_label=new_label, model=model).exists():
            content_types.filter(app_label=old_label, model=model).update(app_label=new_label)
    ContentType.objects.clear_cache()


def content_types_to_api(apps, schema_editor) -> None:
    _content_types_move(apps, schema_editor, old_label="picsite", new_label="api")


def content_types_to_picsite(apps, schema_editor) -> None:
    _content_types_move(apps, schema_editor, old_label="api", new_label="picsite")


class Migration(migrations.Migration):

    initial = True

    dependencies = [
        ("picsite", "0003_push_signature_use"),
        ("contenttypes", "0002_remove_content_type_name"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="PushSignatureUse",
                    fields=[
                        ("digest", models.CharField(max_length=64, primary_key=True, serialize=False)),
                        ("expires_at", models.DateTimeField(db_index=True)),
                    ],
                    options={
                        "verbose_name": "used push signature",
                        "db_table": "picsite_pushsignatureuse",
                    },
                ),
                migrations.CreateModel(
                    name="ApiToken",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                        ("name", models.CharField(max_length=100)),
                        ("prefix", models.CharField(editable=False, max_length=8)),
                        ("token_hash", models.CharField(editable=False, max_length=64, unique=True)),
                        ("scopes", models.CharField(default="read,write", max_length=32, validators=[api.models.validate_token_scopes])),
                        ("expires_at", models.DateTimeField(blank=True, help_text="After this the token is refused (401 token_expired). Empty: never.", null=True)),
                        ("created_at", models.DateTimeField(auto_now_add=True)),
                        ("last_used_at", models.DateTimeField(blank=True, editable=False, null=True)),
                        ("revoked_at", models.DateTimeField(blank=True, editable=False, null=True)),
                        ("user", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="api_tokens", to=settings.AUTH_USER_MODEL)),
                    ],
                    options={
                        "verbose_name": "API token",
                        "db_table": "picsite_apitoken",
                        "ordering": ["-id"],
                        "constraints": [
                            models.CheckConstraint(
                                condition=models.Q(("scopes__regex", "^(read|write|tick)(,(read|write|tick))*$")),
                                name="api_token_known_scopes",
                            )
                        ],
                    },
                ),
            ],
            database_operations=[],
        ),
        migrations.RunPython(content_types_to_api, content_types_to_picsite),
    ]
