"""The one reader of the environment for settings: environs, eager, so the first value
that does not parse stops start-up with ``EnvValidationError`` naming its variable
(``Environment variable "PICSITE_X" invalid: ['Not a valid integer.']``).

Nothing is read from a ``.env`` file: only the process environment counts.
"""

from __future__ import annotations

from typing import Any

import marshmallow
from environs import Env


class Flag(marshmallow.fields.Boolean):
    """A boolean in the words settings have always taken, any case, spaces ignored:
    1/true/yes/on, and 0/false/no/off or empty. Anything else ("t", "enabled", a typo)
    is refused rather than read as false."""

    truthy = {"1", "true", "yes", "on"}
    falsy = {"0", "false", "no", "off", ""}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if isinstance(value, str):
            value = value.strip().lower()
        return super()._deserialize(value, attr, data, **kwargs)


env = Env()
# env.flag(NAME, default): the project's booleans (environs' own env.bool also takes
# "t"/"y", which settings used to read as false).
env.add_parser_from_field("flag", Flag)
