"""Erasure on request (GDPR): ``python -m extractor.forget`` removes photos' rows from a run's
outputs (and their vectors from the state) under the run locks. Uses the storage and results
layers; the job never imports it."""
