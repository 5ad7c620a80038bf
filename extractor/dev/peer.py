"""The peer: what a Spark user would write instead of this job, after Databricks' reference
"featurization for transfer learning" (binaryFile source, iterator pandas UDF, Parquet), with
VGG16's fc2 in place of its ResNet50.

    spark-submit --master 'local[2]' extractor/dev/peer.py --input DIR --output DIR

Built from that description, not tuned: the driver builds Keras' VGG16 and broadcasts the
fc2 sub-model's weights; each Python worker builds the model once (a module global: the
reference rebuilds it per task) and sets them; every Arrow batch of up to 1,024 images is
decoded with PIL (``Image.open(...).resize((224, 224))``, Keras' ``img_to_array`` and
``preprocess_input``) and predicted with ``model.predict`` (batches of 32); vectors go to
Parquet. TensorFlow keeps its own thread defaults, as a user's would. Only the benchmark runs
it (extractor.dev.bench); it is not part of the job.
"""

import argparse
import io
import json
import time
from typing import Iterator

from extractor.dev.bench_model import BENCH_MODELS, fc2_model

_MODEL = None  # this Python worker's model, built on its first batch


def _worker_model(weights, name: str):
    global _MODEL
    if _MODEL is None:
        _MODEL = fc2_model(name)
        _MODEL.set_weights(weights.value)
    return _MODEL


def _preprocess(content: bytes):
    import numpy as np
    from keras.applications.vgg16 import preprocess_input
    from keras.utils import img_to_array
    from PIL import Image

    image = Image.open(io.BytesIO(content)).convert("RGB").resize((224, 224))
    return preprocess_input(np.asarray(img_to_array(image)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peer.py", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="local folder, one subfolder of JPEGs per fruit")
    parser.add_argument("--output", required=True, help="local folder for the Parquet output")
    parser.add_argument("--model", default="vgg16", choices=BENCH_MODELS)
    args = parser.parse_args(argv)

    import numpy as np
    import pandas as pd
    from pyspark.sql import SparkSession
    from pyspark.sql.functions import col, pandas_udf

    started = time.time()
    spark = SparkSession.builder.appName("fruits-peer").getOrCreate()
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "1024")
    weights = spark.sparkContext.broadcast(fc2_model(args.model).get_weights())
    model_name = args.model

    from extractor.dev import (
        peer,  # by reference: one model per Python worker, not per task
    )

    @pandas_udf("array<float>")
    def featurize(contents: Iterator[pd.Series]) -> Iterator[pd.Series]:
        model = peer._worker_model(weights, model_name)
        for batch in contents:
            inputs = np.stack(batch.map(peer._preprocess))
            yield pd.Series(list(model.predict(inputs, batch_size=32, verbose=0).astype(np.float32)))

    images = (spark.read.format("binaryFile").option("pathGlobFilter", "*.jpg")
              .option("recursiveFileLookup", "true").load(args.input))
    images.select(col("path"), featurize(col("content")).alias("features")).write.mode("overwrite").parquet(args.output)
    rows = spark.read.parquet(args.output).count()
    spark.stop()
    print(json.dumps({"rows": rows, "seconds": round(time.time() - started, 3)}))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
