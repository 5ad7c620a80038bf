"""Tools for people, not for the cluster: the demo, the benchmarks, the prototype they compare
against, and the generated test images. Left out of extractor.zip (see extractor.driver.package)."""
