"""The storage layer: S3 calls and their retries, every output and staging name, the listing of
the photos, the run locks, and the incremental state. Imports only the shared basics
(``extractor.errors``, ``extractor.records``); used by every other part, on the driver and in the
executors alike."""
