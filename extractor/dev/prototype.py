"""The prototype this job replaced, re-implemented faithfully as the benchmark's baseline.

What made it slow, kept on purpose: an RDD ``map`` over keys, a new boto3 resource for every
image, Keras ``load_img`` and one ``model.predict`` per image, everything collected, and one
CSV built row by row and uploaded by the driver. Its model was broadcast as weights and built
lazily per Python worker (the fix for its "can't pickle" errors), so model building is not
what the comparison measures. Not part of the job.

    spark-submit extractor/prototype.py --input s3://b/in/ --output s3://b/proto/ [--weights random]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

if __package__ in (None, ""):  # run as a script by spark-submit: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from extractor.dev.bench_model import BENCH_MODELS, fc2_model  # noqa: E402 (after the path fix)

_MODEL = {}


def featurize_one(key_label, bucket, endpoint_url, weights_broadcast, model_name="vgg16"):
    """One image, the prototype's way: fresh resource, load_img, predict on a batch of one."""
    import boto3
    import keras
    import numpy as np
    from keras.applications import vgg16

    key, label = key_label
    s3 = boto3.resource("s3", endpoint_url=endpoint_url)  # per image, as the prototype did
    data = s3.Object(bucket, key).get()["Body"].read()
    if "model" not in _MODEL:
        model = fc2_model(model_name)
        model.set_weights(weights_broadcast.value)
        _MODEL["model"] = model
    img = keras.utils.load_img(io.BytesIO(data), target_size=(224, 224))
    x = vgg16.preprocess_input(np.expand_dims(keras.utils.img_to_array(img), 0))
    vector = _MODEL["model"].predict(x, verbose=0)[0]
    return f"s3://{bucket}/{key}", label, vector.tolist()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="prototype.py")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--weights", default="random")
    parser.add_argument("--model", default="vgg16", choices=BENCH_MODELS)
    parser.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"))
    args = parser.parse_args(argv)

    import boto3
    from pyspark import SparkConf, SparkContext

    from extractor.driver.weights import load_weights
    from extractor.executor.models import get_spec
    from extractor.storage.listing import list_images
    from extractor.storage.s3 import S3Settings, parse_s3_uri

    started = time.time()
    source, target = parse_s3_uri(args.input), parse_s3_uri(args.output)
    client = S3Settings(endpoint_url=args.endpoint_url).client()
    refs = [(r.key, r.label) for r in list_images(client, source).images]
    SparkContext._ensure_initialized()
    conf = SparkConf().setIfMissing("spark.master", "local[*]").set("spark.driver.maxResultSize", "0")
    sc = SparkContext.getOrCreate(conf)
    sc.setLogLevel("WARN")
    spec = get_spec(args.model)
    weights = sc.broadcast(load_weights(spec, args.weights).arrays)
    model_name = args.model
    rows = sc.parallelize(refs).map(
        lambda ref: featurize_one(ref, source.bucket, args.endpoint_url, weights, model_name)).collect()
    out = io.StringIO()
    out.write("path,label," + ",".join(f"dim_{i}" for i in range(spec.output_dim)) + "\n")
    for path, label, vector in rows:
        out.write(f"{path},{label}," + ",".join(str(v) for v in vector) + "\n")
    boto3.resource("s3", endpoint_url=args.endpoint_url).Object(
        target.bucket, target.key("features.csv")).put(Body=out.getvalue().encode())
    sc.stop()
    print(f"prototype: {len(rows)} images in {time.time() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
