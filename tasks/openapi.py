"""The OpenAPI 3.0 document served at ``GET /api/v1/schema``.

Written by hand, next to the code it describes: ``tasks.api`` (routes, errors),
``tasks.serializers`` (shapes) and ``gallery.api`` (``POST /api/v1/images``). The
per-task scope parameters come from each definition's ``scope_fields`` so a new
scope field cannot be forgotten here. ``tests/test_schemathesis.py`` checks the
live API against it.
"""

from __future__ import annotations

from typing import Any

from tasks import registry
from tasks.models import ItemState, RunStatus

MAX_BIGINT = 2**63 - 1
MAX_EXPLICIT_IDS = 500

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    if "$ref" in schema:
        return {"allOf": [schema], "nullable": True}
    return {**schema, "nullable": True}


DATETIME: Schema = {"type": "string", "format": "date-time"}

ERROR_RESPONSES: dict[str, str] = {
    "400": "Malformed JSON, wrong types, unknown keys or parameters (details.field names the culprit).",
    "401": "Not authenticated (no or revoked bearer token, no session), or the token has expired (code token_expired).",
    "403": "Authenticated but not active staff (forbidden), missing the route's Django permission (permission_denied, "
    "details.permission), a token without the route's scope (insufficient_scope), or a session request that failed "
    "the CSRF check (csrf_failed).",
    "404": "No such run for this task.",
    "405": "Method not allowed (the Allow header lists the allowed ones).",
    "409": "Another run of this task is active, or the transition is not allowed in the run's state.",
    "413": "The request body is too large.",
    "422": "The scope matches nothing, or variant storage is not configured.",
    "429": "Too many open event streams for this user or server (code too_many_streams; see Retry-After).",
    "503": "The originals storage could not store the upload (code storage_unavailable); nothing was saved.",
}


def _error(status: str) -> Schema:
    return {"description": ERROR_RESPONSES[status], "content": {"application/json": {"schema": _ref("Error")}}}


def _json(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _responses(success: tuple[str, str, Schema], *errors: str) -> Schema:
    status, description, schema = success
    out: Schema = {status: _json(description, schema)}
    for code in ("401", "403", "405", *errors):
        out[code] = _error(code)
    out["default"] = {"description": "Any other error.", "content": {"application/json": {"schema": _ref("Error")}}}
    return out


# --- components ----------------------------------------------------------------------------


def _components(scope_schemas: dict[str, Schema]) -> Schema:
    count: Schema = {"type": "integer", "minimum": 0}
    budget_value = {
        "items": {"type": "integer", "minimum": 1, "nullable": True},
        "seconds": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "nullable": True},
        "bytes": {"type": "integer", "minimum": 1, "nullable": True},
    }
    schemas: Schema = {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message", "details"],
                    "properties": {
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                        "details": {"description": "Extra facts; {\"field\": name} for 400s about one field."},
                    },
                }
            },
        },
        "Budget": {
            "type": "object",
            "description": "Caps for the run; the run pauses (reason budget) before exceeding one.",
            "additionalProperties": False,
            "properties": budget_value,
        },
        "Progress": {
            "type": "object",
            "required": ["elapsed_seconds", "items_per_second", "eta_seconds", "percent"],
            "properties": {
                "elapsed_seconds": {"type": "number"},
                "items_per_second": {"type": "number"},
                "eta_seconds": {"type": "number", "nullable": True},
                "percent": {"type": "number"},
            },
        },
        "Run": {
            "type": "object",
            "required": [
                "id", "task_key", "status", "pause_reason", "scope", "budget", "spent", "counters",
                "cursor", "lease", "last_error", "recent_issues", "created_by", "created_at",
                "started_at", "finished_at", "updated_at", "progress",
            ],
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "task_key": {"type": "string"},
                "status": {"type": "string", "enum": list(RunStatus.values)},
                "pause_reason": {"type": "string"},
                "scope": {"type": "object", "description": "The normalized scope (mode and ids)."},
                "budget": {"type": "object", "properties": budget_value},
                "spent": {
                    "type": "object",
                    "required": ["items", "seconds", "bytes", "writes"],
                    "properties": {
                        "items": count,
                        "seconds": {"type": "number", "minimum": 0},
                        "bytes": count,
                        "writes": count,
                    },
                },
                "counters": {
                    "type": "object",
                    "required": ["total", "processed", "succeeded", "skipped", "failed"],
                    "properties": {k: count for k in ("total", "processed", "succeeded", "skipped", "failed")},
                },
                "cursor": {"type": "integer"},
                "lease": {
                    "type": "object",
                    "required": ["owner", "expires_at"],
                    "properties": {"owner": {"type": "string"}, "expires_at": _nullable(DATETIME)},
                },
                "last_error": {"type": "string"},
                "recent_issues": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "item_id": {"type": "integer"},
                            "stage": {"type": "string"},
                            "code": {"type": "string"},
                            "message": {"type": "string"},
                            "attempt": {"type": "integer"},
                            "final": {"type": "boolean"},
                            "at": {"type": "string"},
                        },
                    },
                },
                "created_by": {"type": "string", "nullable": True},
                "created_at": DATETIME,
                "started_at": _nullable(DATETIME),
                "finished_at": _nullable(DATETIME),
                "updated_at": DATETIME,
                "progress": _ref("Progress"),
            },
        },
        "FailedItem": {
            "type": "object",
            "required": [
                "item_id", "state", "attempts", "next_attempt_at", "code", "stage", "message", "thumbnail_url",
            ],
            "properties": {
                "item_id": {"type": "integer"},
                "state": {"type": "string", "enum": [ItemState.RETRYING.value, ItemState.FAILED.value]},
                "attempts": count,
                "next_attempt_at": _nullable(DATETIME),
                "code": {"type": "string"},
                "stage": {"type": "string"},
                "message": {"type": "string"},
                "thumbnail_url": {"type": "string", "nullable": True},
            },
        },
        "RunDetail": {
            "allOf": [
                _ref("Run"),
                {
                    "type": "object",
                    "required": ["failed_items", "timeline"],
                    "properties": {
                        "failed_items": {
                            "type": "array",
                            "description": "Items retrying or out of attempts (up to 200).",
                            "items": _ref("FailedItem"),
                        },
                        "timeline": {
                            "type": "array",
                            "description": "[unix time, processed] samples for a throughput chart.",
                            "items": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "number"}},
                        },
                    },
                },
            ]
        },
        "RunList": {
            "type": "object",
            "required": ["active", "recent"],
            "properties": {
                "active": _nullable(_ref("Run")),
                "recent": {"type": "array", "maxItems": 10, "items": _ref("Run")},
            },
        },
        "TickResult": {
            "type": "object",
            "required": ["run"],
            "properties": {"run": _nullable(_ref("Run"))},
        },
        "Preview": {
            "type": "object",
            "required": ["task_key", "scope", "count", "estimate", "details"],
            "properties": {
                "task_key": {"type": "string"},
                "scope": {"type": "object"},
                "count": count,
                "estimate": {
                    "type": "object",
                    "required": ["cpu_seconds", "bytes", "object_writes", "basis"],
                    "properties": {
                        "cpu_seconds": {"type": "number"},
                        "bytes": {"type": "integer"},
                        "object_writes": {"type": "integer"},
                        "basis": {"type": "string", "enum": ["history", "default"]},
                        "money": {"type": "number"},
                    },
                },
                "details": {
                    "type": "object",
                    "nullable": True,
                    "description": "Task-specific figures, null for tasks without them. variants-gc: objects and "
                    "bytes to reclaim (superseded_sets, deleted_images, orphans, their totals objects and bytes, "
                    "orphans_counted false when the storage listing was skipped or stopped at its time limit, "
                    "and a one-line summary).",
                },
            },
        },
        "VariantSet": _variant_set_schema(),
        "ImageUploadResult": {
            "type": "object",
            "required": ["images", "rejected"],
            "properties": {
                "images": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id", "image_key", "title", "width", "height", "created"],
                        "properties": {
                            "id": {"type": "integer"},
                            "image_key": {"type": "string"},
                            "title": {"type": "string"},
                            "width": {"type": "integer"},
                            "height": {"type": "integer"},
                            "created": {"type": "boolean", "description": "False: the same file existed already."},
                        },
                    },
                },
                "rejected": {"type": "array", "items": _ref("RejectedFile")},
            },
        },
        "RejectedFile": {
            "type": "object",
            "required": ["file", "code", "message"],
            "properties": {"file": {"type": "string"}, "code": {"type": "string"}, "message": {"type": "string"}},
        },
        **scope_schemas,
    }
    return {
        "schemas": schemas,
        "securitySchemes": {
            "bearerAuth": {
                "type": "http",
                "scheme": "bearer",
                "description": "An API token (pst_...) from the admin or `manage.py create_api_token`. No CSRF. "
                "Scopes: read (GET routes), write (state-changing routes, tick included), tick (only POST .../tick); "
                "the token's user also needs the route's permission: tasks.view_admintaskrun to read runs, "
                "tasks.run_tasks to change them, gallery.add_image to upload.",
            },
            "cookieAuth": {
                "type": "apiKey",
                "in": "cookie",
                "name": "sessionid",
                "description": "A staff session; unsafe methods also need the X-CSRFToken header.",
            },
        },
    }


# --- per-task paths ---------------------------------------------------------------------------


def _scope_property(field: registry.ScopeField) -> Schema:
    if field.type == "bool":
        return {"type": "boolean", "description": field.help}
    if field.type == "int_list":
        return {
            "type": "array",
            "description": field.help,
            "minItems": 1,
            "maxItems": MAX_EXPLICIT_IDS,
            "items": {"type": "integer", "minimum": 1, "maximum": MAX_BIGINT},
        }
    return {"type": "string", "enum": list(field.choices), "description": field.help}


def _query_parameter(field: registry.ScopeField) -> Schema:
    if field.type == "bool":
        schema: Schema = {"type": "string", "enum": ["true", "false", "1", "0"]}
    elif field.type == "int_list":
        schema = {"type": "string", "pattern": "^[1-9][0-9]{0,17}(,[1-9][0-9]{0,17}){0,499}$"}
    else:
        schema = {"type": "string", "enum": list(field.choices)}
    return {"name": field.name, "in": "query", "required": False, "description": field.help, "schema": schema}


def _scope_schema_name(task_key: str) -> str:
    return "Scope_" + task_key.replace("-", "_")


def _scope_schema(defn: registry.TaskDefinition) -> Schema:
    return {
        "type": "object",
        "description": (
            f"Scope of a {defn.key} run; {{}} is the default scope. At most one mode may be chosen; "
            "a conflict is a 400 naming the field."
        ),
        "additionalProperties": False,
        "properties": {f.name: _scope_property(f) for f in defn.scope_fields},
    }


RUN_ID = {
    "name": "run_id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "format": "int64", "minimum": 1, "maximum": MAX_BIGINT},
}


def _task_paths(prefix: str, task_key: str) -> dict[str, Schema]:
    defn = registry.get(task_key)
    base = f"/api/v1/{prefix}"
    op = prefix.replace("-", "_")
    tag = [defn.title]
    run = ("200", "The run.", _ref("Run"))
    post_run_ids = {"parameters": [RUN_ID]}

    def run_action(name: str, summary: str, *errors: str) -> Schema:
        return {
            "post": {
                "operationId": f"{op}_run_{name.replace('-', '_')}",
                "tags": tag,
                "summary": summary,
                "responses": _responses(run, "404", *errors),
            },
            **post_run_ids,
        }

    return {
        f"{base}/preview-count": {
            "get": {
                "operationId": f"{op}_preview_count",
                "tags": tag,
                "summary": f"How many items a {task_key} run with this scope would process, and its cost.",
                "parameters": [_query_parameter(f) for f in defn.scope_fields],
                "responses": _responses(("200", "Count and estimate.", _ref("Preview")), "400"),
            }
        },
        f"{base}/runs": {
            "get": {
                "operationId": f"{op}_runs_list",
                "tags": tag,
                "summary": "The active run (if any) and the 10 most recent runs.",
                "responses": _responses(("200", "Runs.", _ref("RunList"))),
            },
            "post": {
                "operationId": f"{op}_runs_create",
                "tags": tag,
                "summary": "Start a run (queued; django-q2 workers or kicks drive it).",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["scope"],
                                "additionalProperties": False,
                                "properties": {
                                    "scope": _ref(_scope_schema_name(task_key)),
                                    "budget": _ref("Budget"),
                                },
                            }
                        }
                    },
                },
                "responses": _responses(("201", "The new run.", _ref("Run")), "400", "409", "413", "422"),
            },
        },
        f"{base}/runs/{{run_id}}": {
            "get": {
                "operationId": f"{op}_run_detail",
                "tags": tag,
                "summary": "One run with its failed items and throughput timeline.",
                "responses": _responses(("200", "The run.", _ref("RunDetail")), "404"),
            },
            **post_run_ids,
        },
        f"{base}/runs/{{run_id}}/kick": run_action(
            "kick", "Work on the run for a few seconds now (or enqueue workers); a finished run is returned as is."
        ),
        f"{base}/runs/{{run_id}}/cancel": run_action("cancel", "Cancel the run.", "409"),
        f"{base}/runs/{{run_id}}/retry-failed": run_action(
            "retry-failed", "Re-arm the items that ran out of attempts.", "409"
        ),
        f"{base}/runs/{{run_id}}/budget": {
            "post": {
                "operationId": f"{op}_run_budget",
                "tags": tag,
                "summary": "Replace the budget; a run paused by its budget resumes if the new one allows.",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["budget"],
                                "additionalProperties": False,
                                "properties": {"budget": _ref("Budget")},
                            }
                        }
                    },
                },
                "responses": _responses(run, "400", "404", "413"),
            },
            **post_run_ids,
        },
        f"{base}/runs/{{run_id}}/events": {
            "get": {
                "operationId": f"{op}_run_events",
                "tags": tag,
                "summary": "Live progress as Server-Sent Events.",
                "description": (
                    "`event: snapshot` (the full run) first, then `event: progress` (counters, the last item's "
                    "id and outcome; as workers on any host fold their checkpoints into the run: each failure, "
                    "each batch end, at least every 0.5 s) and `event: status`, a fresh snapshot at most every 0.5 s, "
                    "`: keepalive` comments every 15 s. Ends after the run finishes (final snapshot) or "
                    "after 10 minutes; clients reconnect, or poll GET runs/{run_id}."
                ),
                "responses": {
                    "200": {
                        "description": "An event stream.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "401": _error("401"),
                    "403": _error("403"),
                    "404": _error("404"),
                    "405": _error("405"),
                    "429": _error("429"),
                    "503": {
                        "description": "Live events are unavailable (code events_unavailable): poll GET runs/{run_id}.",
                        "content": {"application/json": {"schema": _ref("Error")}},
                    },
                },
            },
            **post_run_ids,
        },
        f"{base}/tick": {
            "post": {
                "operationId": f"{op}_tick",
                "tags": tag,
                "summary": "Kick the oldest runnable run for a while (cron / push driver).",
                "description": (
                    "Staff (bearer token, or session + CSRF) or an HMAC-signed request: "
                    "X-Picsite-Signature = sha256=hex(HMAC-SHA256(secret, "
                    "\"{timestamp}\\n{METHOD}\\n{path}\\n\" + body)), timestamp within 300 s, secret "
                    "PICSITE_PUSH_SECRET or PICSITE_PUSH_SECRET_NEXT; each signature is accepted once (a copy: "
                    "401 replayed_signature). Overlapping deliveries are harmless."
                ),
                "security": [{"bearerAuth": []}, {"cookieAuth": []}, {}],
                "parameters": [
                    {
                        "name": "X-Picsite-Timestamp",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"},
                    },
                    {
                        "name": "X-Picsite-Signature",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "pattern": "^sha256=[0-9a-f]{64}$"},
                    },
                ],
                "responses": _responses(("200", "The run kicked, or null if none was runnable.", _ref("TickResult"))),
            }
        },
    }


def _images_path() -> dict[str, Schema]:
    binary = {"type": "string", "format": "binary"}
    return {
        "/api/v1/images": {
            "post": {
                "operationId": "images_create",
                "tags": ["Gallery"],
                "summary": "Upload one or many photos (multipart field file or files).",
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "properties": {"file": binary, "files": {"type": "array", "items": binary}},
                            }
                        }
                    },
                },
                "responses": {
                    "201": _json("Accepted images (and the files rejected).", _ref("ImageUploadResult")),
                    "400": _error("400"),
                    "401": _error("401"),
                    "403": _error("403"),
                    "405": _error("405"),
                    "413": _error("413"),
                    "503": _error("503"),
                    "default": {"description": "Any other error.", "content": {"application/json": {"schema": _ref("Error")}}},
                },
            }
        }
    }


def _variant_set_schema() -> Schema:
    tiers = {"type": "object", "description": "Width (as a string) -> URL, ready tiers only.", "additionalProperties": {"type": "string"}}
    stamp = {"type": "string", "format": "date-time"}
    return {
        "type": "object",
        "required": ["id", "state", "recipe_version", "key_version", "storage", "folder", "widths", "ready_widths", "formats", "complete", "bytes", "created_at", "completed_at", "superseded_at", "urls"],
        "properties": {
            "id": {"type": "integer"},
            "state": {"type": "string", "enum": ["serving", "candidate", "superseded"]},
            "recipe_version": {"type": "string"},
            "key_version": {"type": "string", "description": "In every object key; empty for the legacy (unversioned) set."},
            "storage": {"type": "string", "enum": ["local", "s3"]},
            "folder": {"type": "string"},
            "widths": {"type": "array", "items": {"type": "integer"}},
            "ready_widths": {"type": "array", "items": {"type": "integer"}},
            "formats": {"type": "array", "items": {"type": "string"}},
            "complete": {"type": "boolean"},
            "bytes": {"type": "integer"},
            "created_at": stamp,
            "completed_at": _nullable(stamp),
            "superseded_at": _nullable(stamp),
            "urls": {"type": "object", "additionalProperties": tiers},
        },
    }


def _image_path() -> dict[str, Schema]:
    stamp = {"type": "string", "format": "date-time"}
    image = {
        "type": "object",
        "required": ["id", "title", "image_key", "mime_type", "width", "height", "blurhash", "created_at", "deleted_at", "variants"],
        "properties": {
            "id": {"type": "integer"},
            "title": {"type": "string"},
            "image_key": {"type": "string"},
            "mime_type": {"type": "string"},
            "width": {"type": "integer"},
            "height": {"type": "integer"},
            "blurhash": {"type": "string"},
            "created_at": stamp,
            "deleted_at": _nullable(stamp),
            "variants": {
                "type": "object",
                "required": ["ready", "ready_max_width", "recipe_version", "current_recipe_version", "stale", "error", "serving", "candidates", "superseded"],
                "properties": {
                    "ready": {"type": "boolean"},
                    "ready_max_width": {"type": "integer"},
                    "recipe_version": {"type": "string"},
                    "current_recipe_version": {"type": "string"},
                    "stale": {"type": "boolean", "description": "The serving set was made with another recipe."},
                    "error": {"type": "string"},
                    "serving": _nullable(_ref("VariantSet")),
                    "candidates": {"type": "array", "items": _ref("VariantSet")},
                    "superseded": {"type": "array", "items": _ref("VariantSet")},
                },
            },
        },
    }
    return {
        "/api/v1/images/{image_id}": {
            "get": {
                "operationId": "image_detail",
                "tags": ["Gallery"],
                "summary": "One image: its variant state, serving set, candidates and superseded sets.",
                "parameters": [{"name": "image_id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}],
                "responses": {
                    "200": _json("The image.", image),
                    "401": _error("401"),
                    "403": _error("403"),
                    "404": _error("404"),
                    "405": _error("405"),
                    "default": {"description": "Any other error.", "content": {"application/json": {"schema": _ref("Error")}}},
                },
            }
        }
    }


def openapi_document() -> dict[str, Any]:
    paths: dict[str, Schema] = {
        "/api/v1/schema": {
            "get": {
                "operationId": "schema",
                "tags": ["Meta"],
                "summary": "This document.",
                "security": [],
                "responses": {"200": _json("OpenAPI 3.0 document.", {"type": "object"})},
            }
        },
        **_images_path(),
        **_image_path(),
    }
    scope_schemas: dict[str, Schema] = {}
    listed = [d for d in registry.all_definitions() if d.listed]
    for defn in listed:
        paths.update(_task_paths(defn.api_prefix, defn.key))
        scope_schemas[_scope_schema_name(defn.key)] = _scope_schema(defn)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "picsite API",
            "version": "1",
            "description": (
                "Photo uploads and the resumable task runs behind /admin/tasks/. Errors are always "
                '{"error": {"code", "message", "details"}}.'
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}, {"cookieAuth": []}],
        "tags": [{"name": defn.title} for defn in listed]
        + [{"name": "Gallery"}, {"name": "Meta"}],
        "paths": paths,
        "components": _components(scope_schemas),
    }
