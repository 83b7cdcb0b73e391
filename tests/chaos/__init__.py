"""Fault injection against the local stack (``rise.stack``): every job must end, whatever
breaks while it runs.

- ``faults``: each fault shape of the issue as a function over a running ``Stack``
  (SIGKILL of the worker's pool child or of its whole process group then a restart,
  SIGSTOP/SIGCONT of Redis, Redis stopped and started again, Redis killed with its data
  lost, S3 stopped and started again, the gateway restarted, CancelJob then DeleteIndex).
  A restart reuses the recorded command, ports, data folder and environment.
- ``measure``: what a trial records: the job's end, the index bytes against an undisturbed
  reference run, indexes lost, orphan objects in the bucket.
- ``run``: the trials (``python -m tests.chaos.run [--quick]`` from the repository root,
  ``make chaos`` / ``make chaos-quick``) and the report (``chaos.json``, ``chaos.md``).
- ``test_chaos_quick``: one trial of each kind, for CI.
"""
