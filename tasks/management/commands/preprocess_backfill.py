"""manage.py preprocess_backfill: the preprocess-images task, with a flag per scope field (its definition
declares the command's name and help; see ``tasks.cli`` for the behaviour and exit codes)."""

from tasks.cli import task_command

Command = task_command("preprocess_backfill")
