"""Engine bookkeeping and admin reads as the image table grows: 10k, 100k, 1M rows.

    python bench/bench_scale.py [--sizes 10000,100000,1000000] [--repeats 2]

Each size gets its own ``gallery_image`` table in its own schema (``scale_10k``, ...; created
``LIKE public.gallery_image INCLUDING ALL``, so with the same partial indexes), filled with
one ``INSERT ... SELECT generate_series``; the engine's tables stay in ``public`` and the
connection's ``search_path`` picks the size. That lets the kicks of the three sizes run
interleaved (10k, 100k, 1m, 10k, ...), so the WAL-flush latency of a shared disk, which drifts
by 10x within minutes, hits every size alike. At every size only the LAST 3000 ids are not
ready, so a run of the bench no-op task (bench_engine.py's, scope
``Image.objects.alive().filter(variants_ready=False)``) has 3000 items whatever the table size:
its rate stays flat only if the scope and keyset queries are index-served. Everything older
is ready with the current recipe (0.5% soft-deleted).

Writes the "scale" key of bench/results.json: ``items_per_s_10k/100k/1m`` (median of
``--repeats`` interleaved kicks; all samples are kept), ``within_20pct``; at 1M ``preview_ms_1m``
(engine.preview_count for preprocess-images' default scope, median of 5), ``runs_ms_1m``
(the work of GET runs: engine.list_runs + serializing 11 runs to JSON, median of 5), the
EXPLAIN (ANALYZE, BUFFERS) text of the preview count query, of the engine's next-batch
keyset query (captured from a kick of the no-op task) and of the same keyset query for
preprocess-images' default scope (plus its median time, ``next_batch_preprocess_ms_1m``, and
the time and plan of the same query as a plain primary-key walk, for comparison), and
``seq_scan_on_image`` (must be false).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repo on sys.path)

NOT_READY = 3000
DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
LABELS = {10_000: "10k", 100_000: "100k", 1_000_000: "1m"}
TARGET_MS = 50
PREVIEW_TASK = "preprocess-images"


def _label(n: int) -> str:
    return LABELS.get(n, str(n))


# --- building the table ---------------------------------------------------------------------


def _insert_sql(recipe_version: str) -> tuple[str, dict]:
    """INSERT ... SELECT over generate_series(%(lo)s, %(hi)s) for every concrete column."""
    from gallery.models import Image

    overrides = {
        "original": "'originals/bench/' || g || '.jpg'",
        "title": "'img ' || g",
        "image_key": "'variants/bench' || lpad(g::text, 12, '0')",
        "original_bytes": "1000000 + (g %% 5000000)",
        "mime_type": "'image/jpeg'",
        "width": "4000",
        "height": "3000",
        "variants_ready": "(g <= %(ready_upto)s)",
        "ready_max_width": "CASE WHEN g <= %(ready_upto)s THEN 2560 ELSE 0 END",
        "variants_recipe": "CASE WHEN g <= %(ready_upto)s THEN %(recipe)s ELSE '' END",
        "variants_bytes": "CASE WHEN g <= %(ready_upto)s THEN 600000 ELSE 0 END",
        "deleted_at": "CASE WHEN g <= %(ready_upto)s AND g %% 200 = 0 THEN now() END",
        "created_at": "now()",
        "updated_at": "now()",
    }
    columns, exprs, params = [], [], {"recipe": recipe_version}
    for field in Image._meta.concrete_fields:
        if field.primary_key:
            continue
        columns.append(f'"{field.column}"')
        if field.name in overrides:
            exprs.append(overrides[field.name])
        elif field.null:
            exprs.append("NULL")
        else:
            key = f"d_{field.column}"
            params[key] = field.get_default()
            exprs.append(f"%({key})s")
    sql = (
        f"INSERT INTO gallery_image ({', '.join(columns)}) "
        f"SELECT {', '.join(exprs)} FROM generate_series(%(lo)s, %(hi)s) AS g"
    )
    return sql, params


def schema_for(size: int) -> str:
    return f"scale_{_label(size)}"


def use_size(size: int | None) -> None:
    """Point the connection's unqualified table names at one size's gallery_image."""
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(f"SET search_path TO {schema_for(size)}, public" if size else "SET search_path TO public")


def _rename_indexes_like_public(cur, schema: str) -> None:
    """LIKE ... INCLUDING ALL names the copied indexes itself; give them the model's names
    (index names are per schema) so the EXPLAIN output reads as it would in production."""

    def by_definition(namespace: str) -> dict[str, str]:
        cur.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = 'gallery_image'",
            [namespace],
        )
        return {d.split(f" ON {namespace}.gallery_image ", 1)[1]: n for n, d in cur.fetchall()}

    public = by_definition("public")
    for definition, name in by_definition(schema).items():
        wanted = public.get(definition)
        if wanted and wanted != name:
            cur.execute(f'ALTER INDEX {schema}."{name}" RENAME TO "{wanted}"')


def build_size(size: int) -> float:
    """A ``gallery_image`` of ``size`` rows in its own schema; returns seconds taken."""
    from django.db import connection

    from gallery.services import variant_recipe_current

    schema = schema_for(size)
    started = time.perf_counter()
    sql, params = _insert_sql(variant_recipe_current().version)
    params.update(lo=1, hi=size, ready_upto=size - NOT_READY)
    with connection.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")
        cur.execute(f"CREATE TABLE {schema}.gallery_image (LIKE public.gallery_image INCLUDING ALL)")
        _rename_indexes_like_public(cur, schema)
    use_size(size)
    with connection.cursor() as cur:
        cur.execute(sql, params)
        cur.execute("VACUUM (ANALYZE) gallery_image")
    use_size(None)
    return time.perf_counter() - started


# --- measurements -----------------------------------------------------------------------------


class Capture:
    """Record (sql, params) of every statement run on the default connection."""

    def __init__(self) -> None:
        self.queries: list[tuple[str, object]] = []

    def __call__(self, execute, sql, params, many, context):
        self.queries.append((sql, params))
        return execute(sql, params, many, context)


def explain(sql: str, params) -> str:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
        return "\n".join(row[0] for row in cur.fetchall())


def noop_rate() -> float:
    import bench_engine

    seconds, items, _ = bench_engine.noop_kick()
    if items != NOT_READY:
        raise RuntimeError(f"expected {NOT_READY} items, the run had {items}")
    return round(items / seconds, 1)


def timed_ms(sql: str, params, repeat: int = 3) -> float:
    from django.db import connection

    def once():
        with connection.cursor() as cur:
            cur.execute(sql, params)
            cur.fetchall()

    return _common.median_ms(once, repeat=repeat)


def captured_next_batch_query() -> tuple[str, object]:
    """The keyset query exactly as the engine sends it (first batch of a fresh no-op run)."""
    import bench_engine
    from django.db import connection

    from tasks import engine

    bench_engine.noop_definition()
    run = engine.create(task_key=bench_engine.NOOP_KEY, scope={})
    capture = Capture()
    with connection.execute_wrapper(capture):
        engine.kick(run_id=run.pk, max_batches=1)
    engine.cancel(run_id=run.pk)
    for sql, params in capture.queries:
        if 'FROM "gallery_image"' in sql and "ORDER BY" in sql and "LIMIT" in sql:
            return sql, params
    raise RuntimeError("the engine's keyset query was not seen")


def preprocess_next_batch_query(*, naive: bool = False) -> tuple[str, object]:
    """The keyset query the engine builds for preprocess-images' default scope (cursor 0),
    with the engine's own ordering choice (``engine._keyset_order``: ``id + 0`` for a sparse
    scope, so Postgres combines the partial indexes and sorts the few matches).

    ``naive``: the same query walking the primary key in order, for comparison.
    """
    from django.db import connection

    from tasks import engine, registry

    defn = registry.get(PREVIEW_TASK)
    scope = engine.normalize_scope(task_key=PREVIEW_TASK, scope={})
    qs = defn.scope_queryset(scope)
    max_id = qs.order_by("-pk").values_list("pk", flat=True).first() or 0
    if naive:
        ordering = "pk"  # a plain primary-key walk, kept for comparison
    else:
        from tasks.models import AdminTaskRun

        # What the engine itself chooses for a fresh run of this scope.
        ordering = engine._keyset_order(AdminTaskRun(total=qs.count(), processed=0, cursor=0, max_item_id=max_id))
    keyset = qs.filter(pk__gt=0, pk__lte=max_id).order_by(ordering).values_list("pk", flat=True)
    return keyset[: defn.batch_size].query.get_compiler(connection=connection).as_sql()


def preview_query() -> tuple[str, object]:
    from django.db import connection

    from tasks import engine

    capture = Capture()
    with connection.execute_wrapper(capture):
        engine.preview_count(task_key=PREVIEW_TASK, scope={})
    for sql, params in capture.queries:
        if "COUNT(" in sql.upper() and '"gallery_image"' in sql:
            return sql, params
    raise RuntimeError("the preview count query was not seen")


def make_runs_history() -> None:
    """Ten finished preprocess-images runs and one active one, with full-size JSON fields."""
    from django.utils import timezone

    from tasks.models import AdminTaskRun

    now = timezone.now()
    rng = random.Random(7)
    timeline = [[time.time() - 3600 + 5 * i, i * 4] for i in range(720)]
    issues = [
        {"at": now.isoformat(), "item_id": rng.randint(1, 10**6), "stage": "encode",
         "code": "variant_generation_failed", "message": "avif 2560px: encoder error " + "x" * 200,
         "attempt": 3, "final": True}
        for _ in range(20)
    ]
    runs = [
        AdminTaskRun(
            task_key=PREVIEW_TASK, status="succeeded" if i < 10 else "running", scope={"mode": "missing"},
            total=3000, processed=3000 if i < 10 else 1200, succeeded=2980 if i < 10 else 1190,
            failed=20 if i < 10 else 10, cursor=10**6, max_item_id=10**6, spent_items=3000,
            spent_seconds=5400.0, busy_seconds=5400.0, spent_bytes=1_800_000_000, spent_writes=48000,
            timeline=timeline, recent_issues=issues, started_at=now,
            finished_at=now if i < 10 else None,
        )
        for i in range(11)
    ]
    AdminTaskRun.objects.bulk_create(runs)


def runs_work() -> int:
    from tasks import engine

    listing = engine.list_runs(task_key=PREVIEW_TASK, limit=10)
    try:
        from api.tasks.schemas import run_list_out

        def run_list_to_dict(*, active, recent):
            return run_list_out(active=active, recent=recent).model_dump(mode="json", exclude_unset=True)
    except ImportError:  # the API's schemas not there yet: the same fields by hand
        def run_list_to_dict(*, active, recent):
            fields = [f.attname for f in type(recent[0])._meta.concrete_fields] if recent else []

            def one(run):
                return {name: getattr(run, name) for name in fields} | {"progress": engine.progress(run)}

            return {"active": one(active) if active else None, "recent": [one(r) for r in recent]}
    if "active_runs" in listing:  # every active run (batches too), as GET runs lists them
        body = json.dumps(run_list_to_dict(active=listing["active_runs"], recent=listing["recent"]), default=str)
        count = len(listing["recent"]) + len(listing["active_runs"])
    else:
        body = json.dumps(run_list_to_dict(active=listing["active"], recent=listing["recent"]), default=str)
        count = len(listing["recent"]) + (1 if listing["active"] is not None else 0)
    if count != 11:
        raise RuntimeError(f"expected 11 runs serialized, got {count}")
    return len(body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(str(n) for n in DEFAULT_SIZES))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))

    result: dict = {"not_ready_items": NOT_READY, "repeats": args.repeats, "build_seconds": {}, "samples": {}}
    with _common.temp_media(), _common.bench_database():
        import bench_engine

        bench_engine.noop_definition()
        for size in sizes:
            built = build_size(size)
            result["build_seconds"][_label(size)] = round(built, 2)
            result["samples"][_label(size)] = []
            _common.log(f"[scale] {size} rows built in {built:.1f}s")
        result["cpu_busy_before_start"] = _common.wait_for_quiet()
        for _round in range(args.repeats):
            for size in sizes:
                use_size(size)
                result["samples"][_label(size)].append(noop_rate())
            _common.log(f"[scale] round {_round + 1}: {result['samples']}")
        for size in sizes:
            result[f"items_per_s_{_label(size)}"] = round(statistics.median(result["samples"][_label(size)]), 1)
        rates = [result[f"items_per_s_{_label(n)}"] for n in sizes]
        result["within_20pct"] = min(rates) >= 0.8 * max(rates)

        top = sizes[-1]
        label = _label(top)
        use_size(top)
        make_runs_history()
        from tasks import engine

        result[f"preview_count_{label}"] = engine.preview_count(task_key=PREVIEW_TASK, scope={}).count
        result[f"preview_ms_{label}"] = _common.median_ms(
            lambda: engine.preview_count(task_key=PREVIEW_TASK, scope={}), repeat=5
        )
        result[f"runs_ms_{label}"] = _common.median_ms(runs_work, repeat=5)
        result[f"runs_json_bytes_{label}"] = runs_work()

        preprocess_keyset = preprocess_next_batch_query()
        naive_keyset = preprocess_next_batch_query(naive=True)
        result[f"next_batch_preprocess_ms_{label}"] = timed_ms(*preprocess_keyset)
        result[f"next_batch_preprocess_ms_{label}_naive_pk_walk"] = timed_ms(*naive_keyset)
        plans = {
            "explain_preview_count": explain(*preview_query()),
            "explain_next_batch": explain(*captured_next_batch_query()),
            "explain_next_batch_preprocess": explain(*preprocess_keyset),
            "explain_next_batch_preprocess_naive_pk_walk": explain(*naive_keyset),
        }
        result.update(plans)
        result["seq_scan_on_image"] = any("Seq Scan on gallery_image" in text for text in plans.values())
        result["targets"] = {"within_20pct": True, "preview_ms": TARGET_MS, "runs_ms": TARGET_MS,
                             "seq_scan_on_image": False}
        use_size(None)
    _common.merge_result("scale", result)
    for name, text in plans.items():
        _common.log(f"--- {name}\n{text}")
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("explain_")}, indent=2))


if __name__ == "__main__":
    main()
