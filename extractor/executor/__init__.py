"""What runs inside the executors' Python workers: decoding, the models and their per-process
cache, feeding (batch sizes, threads), GPU pinning, and the task functions Spark pickles.
Imports nothing driver-only (no SparkContext, no driver module), so a task stays small to
pickle and a worker imports only what it runs."""
