"""System checks of the tasks app (``manage.py check`` and every command that checks)."""

from __future__ import annotations

from django.core.checks import Error
from django.core.management import get_commands

from tasks import registry


def task_commands_check(app_configs=None, **kwargs) -> list[Error]:
    """tasks.E001 for a definition whose declared ``command`` Django cannot find (it finds
    commands by file name, so each needs its two-line module)."""
    commands = get_commands()
    return [
        Error(
            f"Task {defn.key!r} declares the command {defn.command!r}, which manage.py does not know.",
            hint=f'Add tasks/management/commands/{defn.command}.py: Command = task_command("{defn.command}").',
            id="tasks.E001",
        )
        for defn in registry.all_definitions()
        if defn.command and defn.command not in commands
    ]
