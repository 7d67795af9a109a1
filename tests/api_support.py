"""What every test of the JSON API checks on an error answer."""

from __future__ import annotations


def assert_api_error(response, status: int, code: str | None = None, field: str | None = None) -> dict:
    """The answer is ``status`` with ``{"error": {"code", "message", "details"}}`` (a message
    always, and ``code``/``details.field`` when given); returns the error object."""
    assert response.status_code == status, (response.status_code, response.content[:400])
    assert response["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert error["message"], error
    if code is not None:
        assert error["code"] == code, error
    if field is not None:
        assert error["details"]["field"] == field, error
    return error
