"""Pydantic pieces every API route shares: the error body, timestamps, and how a route
declares its answers (``responses``) so the OpenAPI document lists each one."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, Field, PlainSerializer, WithJsonSchema

MAX_BIGINT = 2**63 - 1
M = TypeVar("M", bound=BaseModel)

# Timestamps as Python writes them (``isoformat``), documented as date-time.
IsoDateTime = Annotated[
    datetime,
    PlainSerializer(datetime.isoformat, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = Field(description='Extra facts; {"field": name} for 400s about one field.')


class Error(BaseModel):
    """Every refusal: ``{"error": {"code", "message", "details"}}``."""

    error: ErrorBody


def from_object(model: type[M], obj: object, **values: Any) -> M:
    """``model`` from ``obj``'s attributes of the same names; ``values`` give the others."""
    fields = {name: getattr(obj, name) for name in model.model_fields if name not in values}
    return model(**fields, **values)


ALWAYS = (401, 403, 405)  # every route may answer these


def responses(success: int, model: type[BaseModel] | None, errors: dict[int, str], *statuses: int) -> dict[str, Any]:
    """``response=`` and ``openapi_extra=`` of a route: its success and each error status
    it may answer (described by ``errors``), every error an ``Error``, and a default."""
    codes = sorted({*ALWAYS, *statuses})
    documented: dict[Any, Any] = {code: {"description": errors[code]} for code in codes}
    documented["default"] = {
        "description": "Any other error.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    return {"response": {success: model, **{code: Error for code in codes}}, "openapi_extra": {"responses": documented}}
