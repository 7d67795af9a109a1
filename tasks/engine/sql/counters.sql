-- Counters: a run's own plus what its batches hold pending (tasks.engine.counters).
-- The pending_* columns of a batch fold into the run like this (counters.PENDING_INTO_RUN):
--   pending_processed -> processed, spent_items      pending_seconds -> spent_seconds, busy_seconds
--   pending_succeeded -> succeeded                   pending_bytes   -> spent_bytes
--   pending_skipped   -> skipped                     pending_writes  -> spent_writes

-- name: live_counters
-- One statement, so one snapshot: a fold in between can be neither missed nor counted twice.
SELECT r.processed + coalesce(sum(b.pending_processed), 0),
       r.succeeded + coalesce(sum(b.pending_succeeded), 0),
       r.skipped + coalesce(sum(b.pending_skipped), 0),
       r.failed,
       r.spent_items + coalesce(sum(b.pending_processed), 0),
       r.spent_seconds + coalesce(sum(b.pending_seconds), 0),
       (r.spent_bytes + coalesce(sum(b.pending_bytes), 0))::bigint,
       r.spent_writes + coalesce(sum(b.pending_writes), 0)
  FROM tasks_admintaskrun r LEFT JOIN tasks_admintaskbatch b ON b.run_id = r.id
 WHERE r.id = %(run)s GROUP BY r.id

-- name: end_batches
-- A run ends: every batch's pending counters are returned (the caller folds them into the
-- run row it saves) and the batches end. Retry batches, and with park false every batch,
-- are deleted; with park true fresh batches stay, with no owner and an expired lease.
WITH gone AS (
    DELETE FROM tasks_admintaskbatch WHERE run_id = %(run)s AND (is_retry OR NOT %(park)s)
    RETURNING pending_processed, pending_succeeded, pending_skipped, pending_seconds, pending_bytes, pending_writes
), parked AS (
    UPDATE tasks_admintaskbatch AS nb
       SET lease_owner = '', lease_expires_at = now() - interval '1 second',
           pending_processed = 0, pending_succeeded = 0, pending_skipped = 0,
           pending_seconds = 0, pending_bytes = 0, pending_writes = 0
      FROM (SELECT id, pending_processed, pending_succeeded, pending_skipped, pending_seconds, pending_bytes, pending_writes
              FROM tasks_admintaskbatch
             WHERE run_id = %(run)s AND NOT is_retry AND %(park)s FOR UPDATE) AS ob
     WHERE nb.id = ob.id
    RETURNING ob.pending_processed, ob.pending_succeeded, ob.pending_skipped, ob.pending_seconds, ob.pending_bytes, ob.pending_writes
)
SELECT * FROM gone UNION ALL SELECT * FROM parked
