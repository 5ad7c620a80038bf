"""The results: PCA, the output files and their formats, the scatter plot, the report and the
manifest. Pure functions of vectors and records (no SparkContext); the executors run some of
them (PCA moments, file parts) in the distributed mode."""
