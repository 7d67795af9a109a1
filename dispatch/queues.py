"""Named queues (django-q2 "clusters"). Uploads never wait behind a backfill drain."""

UPLOADS_QUEUE = "picsite"  # Q_CLUSTER["name"]; explicit, since Q_CLUSTER_NAME changes the default
BACKFILL_QUEUE = "backfill"
