"""The batch dependence of the job's own forward pass is float32 rounding, and nothing more.

The suite's cross-run comparisons rely on it (rounding.py): byte identity where the images met
the same batches, the stated tolerance where they did not. A TensorFlow, oneDNN or CPU change
that moved an image's vector by more than rounding with its batch would fail here, by name,
instead of as a mismatch in some CSV of an end-to-end test."""

import numpy as np
import pytest

from extractor.executor.images import decode_image
from extractor.executor.models import get_spec
from extractor.driver.weights import load_weights
from extractor.dev.synthetic import fruit_dataset

from rounding import assert_within_rounding


@pytest.fixture(scope="module")
def photos():
    """(4, 224, 224, 3) uint8: four different fruit photos, decoded as the job decodes them (four
    show every case: alone, in a batch, at another position, the short last batch; VGG16's
    forward is most of this test's time)."""
    bodies = list(fruit_dataset(2, ["Lemon", "Lime"]).values())
    return np.stack([decode_image(body, (224, 224)) for body in bodies])


@pytest.mark.parametrize("name", ["vgg16", "tiny"])
def test_an_images_vector_depends_on_its_batch_only_within_rounding(name, photos, monkeypatch):
    from extractor.executor import worker

    monkeypatch.setattr(worker, "_MODELS", {})  # this test's model only, released after it
    spec = get_spec(name)

    class Broadcast:  # stands in for the driver's broadcast
        value = load_weights(spec, "random").arrays

    forward = worker.cached_model(spec, f"rounding-{name}", Broadcast, threads=2)
    x = spec.preprocess(photos)
    batched = forward(x)
    assert batched.shape == (4, spec.output_dim) and np.abs(batched).max() > 0
    assert len({row.tobytes() for row in batched}) == 4  # four photos, four vectors

    # The same batch again: the very same bits (what every byte-identity promise rests on).
    assert forward(x).tobytes() == batched.tobytes()
    # Each image alone, in batches of 3 + 1, and at another position (the batch reversed).
    alone = np.concatenate([forward(x[i:i + 1]) for i in range(4)])
    split = np.concatenate([forward(x[i:i + 3]) for i in range(0, 4, 3)])
    reversed_ = forward(x[::-1])[::-1]
    for what, other in (("one at a time", alone), ("3 + 1", split), ("reversed", reversed_)):
        assert_within_rounding(other, batched, f"{name}, {what} vs one batch of 4")
