-- Advisory locks (transaction-scoped: released at commit or rollback) and NOTIFY.
-- Key spaces: (task lock id, 0) is task-wide (create, retry_failed); (task lock id,
-- run key) is one run's (claims, checkpoints, cancel, pause, finish). common.run_key
-- keeps a run's key in 1..2**31-1, so the two never meet.

-- name: lock_task
SELECT pg_advisory_xact_lock(%(lock_id)s, 0)

-- name: lock_run
SELECT pg_advisory_xact_lock(%(lock_id)s, %(run_key)s)

-- name: try_lock_run
SELECT pg_try_advisory_xact_lock(%(lock_id)s, %(run_key)s)

-- name: notify
-- Delivered to listeners (SSE streams on any host) when the transaction commits.
SELECT pg_notify(%(channel)s, %(body)s)
