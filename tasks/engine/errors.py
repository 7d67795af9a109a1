"""The engine's refusals: one type each, carrying the API's error code and HTTP status
(``api.errors`` maps them to ``{"error": {"code", "message", "details"}}``)."""

from __future__ import annotations


class EngineError(Exception):
    code = "engine_error"
    http_status = 400

    def __init__(self, message: str, *, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}


class RunAlreadyActive(EngineError):
    code, http_status = "run_active", 409


class EmptyScope(EngineError):
    code, http_status = "empty_scope", 422


class StorageNotConfigured(EngineError):
    code, http_status = "storage_not_configured", 422


class InvalidScope(EngineError):
    code, http_status = "invalid_scope", 400


class InvalidBudget(EngineError):
    code, http_status = "invalid_budget", 400


class RunNotFound(EngineError):
    code, http_status = "run_not_found", 404


class UnknownTaskKey(EngineError):
    code, http_status = "unknown_task", 404


class InvalidTransition(EngineError):
    """Refused (cancel a finished run, retry with nothing failed), or a status write the
    lifecycle's transition table does not allow: an engine bug, raised loudly."""

    code, http_status = "invalid_transition", 409
