from django.apps import AppConfig
from django.core import checks
from django.db.models.signals import post_migrate


class TasksConfig(AppConfig):
    name = "tasks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Importing the definitions registers them.
        from tasks import definitions  # noqa: F401
        from tasks.checks import task_commands_check

        checks.register(task_commands_check)

        # Every deployment that migrates gets the tick schedule (adopts dead workers' batches).
        post_migrate.connect(_ensure_tick_schedule, sender=self)


def _ensure_tick_schedule(sender, using: str = "default", **kwargs) -> None:
    from tasks.jobs import ensure_tick_schedule

    ensure_tick_schedule()
