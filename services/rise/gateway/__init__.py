"""The gRPC gateway: authenticates, validates, enqueues, reports job state, fans scoring out
to the scorer replicas and merges.  It never loads a model."""
