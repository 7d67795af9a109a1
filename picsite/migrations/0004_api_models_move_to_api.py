"""ApiToken and PushSignatureUse now belong to the ``api`` app (api.0001): they leave
this app's state only; their tables and rows stay as they are."""

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ("picsite", "0003_push_signature_use"),
        ("api", "0001_initial"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.DeleteModel(name="ApiToken"),
                migrations.DeleteModel(name="PushSignatureUse"),
            ],
            database_operations=[],
        ),
    ]
