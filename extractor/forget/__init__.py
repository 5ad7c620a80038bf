"""Erasure on request (GDPR): ``python -m extractor.forget`` removes photos' rows from a run's
outputs (and their vectors from the state) under the run locks. Uses the storage and results
layers; nothing shipped imports it, and the zip sent to the cluster leaves it out (it deletes
photos: it runs with a role that may, not with the cluster's instance profile)."""
