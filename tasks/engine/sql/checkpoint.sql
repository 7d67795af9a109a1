-- Checkpoints: one statement per item, prepared server-side once per connection
-- (tasks.engine.checkpoint; parameters: checkpoint.checkpoint_params).
--
-- fast_checkpoint: a clean item (no failure, no ledger row) on an unbudgeted run moves
--   the batch on and adds to its pending counters; the run row is untouched.
-- fold_advance / fold_done / fold_release: the item's outcome plus the batch's pending
--   counters go to the run row, with its issue, the run lease and a NOTIFY, as the
--   batch advances, ends (its last item) or is handed back.
-- None of them writes the run's status: they read it, and the worker stops on what it reads.
-- Every one returns (lock ok, run status, budget, spent_items, spent_seconds, spent_bytes, spent_writes
-- [, notify]): status NULL means the batch is not this worker's any more and nothing was
-- written; lock ok false means another worker of the run held the try-lock: try again.

-- fragment: lock
-- The run's try-lock for this statement's transaction. Checkpoints commit without waiting
-- for the WAL flush: a Postgres crash can drop the last ~0.6 s of them, and then the batch
-- position and the counters roll back together, so those items are simply redone.
lk AS (SELECT pg_try_advisory_xact_lock(%(lock_id)s::int, %(run_key)s::int) AS ok,
              set_config('synchronous_commit', 'off', true) AS async_commit)

-- fragment: mine
-- This worker still owns the batch at this position (and holds the run's try-lock).
tasks_admintaskbatch.id = %(batch)s::bigint AND tasks_admintaskbatch.lease_owner = %(owner)s::text
AND tasks_admintaskbatch.position = %(position)s::int AND (SELECT ok FROM lk)

-- fragment: take_pending
-- The end of an UPDATE of this worker's batch (AS nb ... SET ...,): zero its pending
-- counters and return what they held. The old values come from a locking read (FOR UPDATE
-- re-reads the row's latest version once it holds it), not from a self-join, which would
-- return the statement's snapshot and zero anything committed after it.
       pending_processed = 0, pending_succeeded = 0, pending_skipped = 0,
       pending_seconds = 0, pending_bytes = 0, pending_writes = 0
  FROM (SELECT id, pending_processed, pending_succeeded, pending_skipped, pending_seconds, pending_bytes, pending_writes
          FROM tasks_admintaskbatch WHERE {mine} FOR UPDATE) AS ob
 WHERE nb.id = ob.id
RETURNING ob.pending_processed AS p_processed, ob.pending_succeeded AS p_succeeded, ob.pending_skipped AS p_skipped,
          ob.pending_seconds AS p_seconds, ob.pending_bytes AS p_bytes, ob.pending_writes AS p_writes

-- fragment: advance_batch
-- Move the batch on (renewing its lease when due).
UPDATE tasks_admintaskbatch AS nb
   SET position = nb.position + 1,
       lease_expires_at = CASE WHEN %(renew)s::bool THEN now() + make_interval(secs => %(lease)s::float8)
                          ELSE nb.lease_expires_at END,
{take_pending}

-- fragment: delete_batch
-- The batch's last item: the batch row goes (DELETE returns its latest version).
DELETE FROM tasks_admintaskbatch WHERE {mine}
RETURNING pending_processed AS p_processed, pending_succeeded AS p_succeeded, pending_skipped AS p_skipped,
          pending_seconds AS p_seconds, pending_bytes AS p_bytes, pending_writes AS p_writes

-- fragment: release_batch
-- Stopping early: hand the rest back with an expired lease (the next kick adopts it).
UPDATE tasks_admintaskbatch AS nb
   SET lease_owner = '', lease_expires_at = now() - interval '1 second',
{take_pending}

-- fragment: fold_into_run
-- r: the item's outcome and what b took off the batch, into the run row.
-- o: FOR SHARE, the other batches as they are now (a fold committed after this
--    statement's snapshot has moved their counters into r already), so the NOTIFY's
--    counters include what they still hold.
r AS (
    UPDATE tasks_admintaskrun AS run SET
        processed = run.processed + %(processed)s::int + b.p_processed,
        succeeded = run.succeeded + %(succeeded)s::int + b.p_succeeded,
        skipped = run.skipped + %(skipped)s::int + b.p_skipped,
        failed = run.failed + %(failed)s::int,
        spent_items = run.spent_items + %(items)s::int + b.p_processed,
        spent_seconds = run.spent_seconds + %(seconds)s::float8 + b.p_seconds,
        busy_seconds = run.busy_seconds + %(seconds)s::float8 + b.p_seconds,
        spent_bytes = run.spent_bytes + %(bytes)s::bigint + b.p_bytes,
        spent_writes = run.spent_writes + %(writes)s::int + b.p_writes,
        lease_owner = %(owner)s::text,
        lease_expires_at = CASE WHEN %(renew)s::bool THEN now() + make_interval(secs => %(lease)s::float8)
                           ELSE run.lease_expires_at END,
        last_progress_at = now(),
        updated_at = now(),
        recent_issues = CASE WHEN %(issue)s::jsonb IS NULL THEN run.recent_issues ELSE (
            SELECT coalesce(jsonb_agg(e ORDER BY n), '[]'::jsonb)
              FROM jsonb_array_elements(jsonb_build_array(%(issue)s::jsonb) || run.recent_issues)
                   WITH ORDINALITY AS t(e, n)
             WHERE n <= %(max_issues)s::int) END
      FROM b
     WHERE run.id = %(run)s::bigint
    RETURNING run.status, run.budget, run.spent_items, run.spent_seconds, run.spent_bytes, run.spent_writes,
              run.processed, run.succeeded, run.skipped, run.failed, run.total
),
o AS (
    SELECT coalesce(sum(pending_processed), 0) AS processed, coalesce(sum(pending_succeeded), 0) AS succeeded,
           coalesce(sum(pending_skipped), 0) AS skipped
      FROM (SELECT pending_processed, pending_succeeded, pending_skipped FROM tasks_admintaskbatch
             WHERE run_id = %(run)s::bigint AND id <> %(batch)s::bigint FOR SHARE) AS others
)
SELECT lk.ok, r.status, r.budget, r.spent_items, r.spent_seconds, r.spent_bytes, r.spent_writes,
       CASE WHEN r.status IS NULL THEN NULL ELSE pg_notify(%(channel)s::text, json_build_object(
           'run', %(run)s::bigint, 'event', 'progress', 'item_id', %(item_id)s::bigint, 'outcome', %(outcome)s::text,
           'code', %(code)s::text, 'status', r.status, 'counters', json_build_object(
               'processed', r.processed + o.processed, 'succeeded', r.succeeded + o.succeeded,
               'skipped', r.skipped + o.skipped, 'failed', r.failed, 'total', r.total))::text) END
  FROM lk CROSS JOIN o LEFT JOIN r ON true

-- name: fast_checkpoint
-- One small-row UPDATE instead of two, and the run's status read back.
WITH {lock},
b AS (
    UPDATE tasks_admintaskbatch SET
        position = position + 1,
        pending_processed = pending_processed + 1,
        pending_succeeded = pending_succeeded + %(succeeded)s::int,
        pending_skipped = pending_skipped + %(skipped)s::int,
        pending_seconds = pending_seconds + %(seconds)s::float8,
        pending_bytes = pending_bytes + %(bytes)s::bigint,
        pending_writes = pending_writes + %(writes)s::int
     WHERE {mine}
    RETURNING id
)
SELECT lk.ok, r.status, r.budget, r.spent_items, r.spent_seconds, r.spent_bytes, r.spent_writes
  FROM lk LEFT JOIN tasks_admintaskrun r ON r.id = %(run)s::bigint AND EXISTS (SELECT 1 FROM b)

-- name: fold_advance
WITH {lock},
b AS ({advance_batch}),
{fold_into_run}

-- name: fold_done
WITH {lock},
b AS ({delete_batch}),
{fold_into_run}

-- name: fold_release
WITH {lock},
b AS ({release_batch}),
{fold_into_run}

-- name: deallocate_all
-- Drops this connection's prepared statements (psycopg forgets its own on DEALLOCATE ALL).
DEALLOCATE ALL
