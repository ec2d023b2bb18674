"""The project's error base classes. Standard library only: every layer may import this module
(rollout/, learner/, models/ included), and the CLI recognises a user error with one
``isinstance`` check — also when it was raised inside a Ray actor, whose wrapper exception
subclasses the original class.

``UserError``: something the user can fix (a config key, a file, a model folder, a resource
setting); the CLI prints its message alone, no traceback. Anything else is a bug or an
environment failure and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message says what was wrong and what to do."""


class EngineError(UserError, RuntimeError):
    """An inference engine could not start or failed a request; the message names the model
    and why (raised by rollout.engine and rollout.weight_transfer)."""
