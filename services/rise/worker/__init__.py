"""The Celery workers: ingest planning, shard sketching, manifest commits, compaction and
query sketching.  ``rise.worker.app`` builds the Celery app (no torch); ``rise.worker.tasks``
holds the thin tasks, the real work staying in the domain modules."""
