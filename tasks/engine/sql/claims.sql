-- Claims and leases (tasks.engine.claims).

-- name: adopt_expired_batch
-- Take over the oldest batch whose lease ran out (its worker died or handed it back).
UPDATE tasks_admintaskbatch SET lease_owner = %(owner)s, lease_expires_at = %(expires)s
 WHERE id = (
       SELECT id FROM tasks_admintaskbatch
        WHERE run_id = %(run)s AND lease_expires_at <= %(now)s
        ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id, item_ids, position, is_retry

-- name: held_items
-- Items handed to batches of the run and not yet checkpointed.
SELECT coalesce(sum(jsonb_array_length(item_ids) - position), 0)
  FROM tasks_admintaskbatch WHERE run_id = %(run)s

-- name: renew_leases
-- The heartbeat: every batch this worker holds (of any run: a worker serves batch runs
-- between its own). A released batch has no owner, so it is never renewed by mistake.
UPDATE tasks_admintaskbatch SET lease_expires_at = now() + make_interval(secs => %(lease)s)
 WHERE lease_owner = %(owner)s
