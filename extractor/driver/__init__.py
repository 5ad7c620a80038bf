"""What runs on the driver: the options, the stages of a run (listing, featurize, write), the
Spark calls, the weights loaded once and broadcast, the progress and log shipping, and the zip
sent to the workers. The only part that holds a SparkContext."""
