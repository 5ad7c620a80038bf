"""What a faster path does to the vectors: the same images through two configurations of the
job's own decode + model (bfloat16 against float32, draft against full-size decoding), per-image
cosine similarity of the 4096-d vectors and what the PCA makes of each. Used by bench.py."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from extractor.dev.local_s3 import REPO


def vectors_worker(precision: str, decode: str, image_dir: str, out_path: str, model: str = "vgg16") -> None:
    """fc2 vectors of every file in ``image_dir`` (sorted), saved as .npy; decoded as the job does."""
    import numpy as np

    from extractor.driver.weights import load_weights
    from extractor.executor.images import decode_image
    from extractor.executor.models import get_spec
    from extractor.executor.worker import cached_model

    spec = get_spec(model)

    class Weights:
        value = load_weights(spec, "random").arrays

    forward = cached_model(spec, "bench", Weights, os.cpu_count() or 1, precision)
    files = sorted(Path(image_dir).iterdir())
    batch = np.stack([decode_image(f.read_bytes(), spec.input_size, draft=decode == "draft") for f in files])
    vectors = np.concatenate([forward(spec.preprocess(batch[i:i + 32])) for i in range(0, len(batch), 32)])
    np.save(out_path, vectors)


def compare(images: dict[str, bytes], reference: tuple[str, str], candidate: tuple[str, str], count: int = 96,
            model: str = "vgg16") -> dict:
    """(precision, decode) ``candidate`` against ``reference`` on the first ``count`` images:
    per-image cosine similarity, and the PCA (k at 95 %, and how much of each reference
    component the candidate's span keeps)."""
    import numpy as np

    from extractor.results.pca import fit_pca

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "images")
        folder.mkdir()
        for index, body in enumerate(list(images.values())[:count]):
            (folder / f"{index:05d}.img").write_bytes(body)
        # Both at once: each worker's vectors depend on its own settings, not on what else runs,
        # and half of each one's time is TensorFlow's import on a single core.
        outs = [Path(tmp, f"{precision}-{decode}.npy") for precision, decode in (reference, candidate)]
        workers = [subprocess.Popen([sys.executable, "-m", "extractor.dev.bench", "--vectors-worker", precision, decode,
                                     str(folder), str(out), model], cwd=REPO,
                                    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
                   for (precision, decode), out in zip((reference, candidate), outs)]
        codes = [worker.wait() for worker in workers]
        if any(codes):
            raise SystemExit(f"bench: a --vectors-worker failed (exit {codes})")
        vectors = [np.load(out).astype(np.float64) for out in outs]
    a, b = vectors
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    pca_a, pca_b = fit_pca(a, variance=0.95), fit_pca(b, variance=0.95)
    k = min(pca_a.k, pca_b.k, 10)
    # |cos| of each reference component with its projection on the candidate's first k+2 components.
    kept = np.linalg.norm(pca_a.components[:k] @ pca_b.components[:k + 2].T, axis=1)
    return {"images": len(a), "reference": list(reference), "candidate": list(candidate),
            "cosine_min": float(cosine.min()), "cosine_median": float(np.median(cosine)),
            "relative_l2_median": float(np.median(np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1))),
            "pca_k95": [pca_a.k, pca_b.k],
            "explained_variance_at_k": [pca_a.cumulative_ratio, pca_b.cumulative_ratio],
            "explained_variance_top10": [float(pca_a.explained_variance_ratio[:10].sum()),
                                         float(pca_b.explained_variance_ratio[:10].sum())],
            "top_components_kept_min": float(kept.min()), "top_components_compared": k}


def describe(name: str, f: dict) -> str:
    ref, cand = "/".join(f["reference"]), "/".join(f["candidate"])
    return (f"{name}: {cand} vs {ref} on {f['images']} images: cosine similarity median {f['cosine_median']:.5f}, "
            f"min {f['cosine_min']:.5f}; relative L2 error median {f['relative_l2_median']:.4f}; PCA k at 95 %: "
            f"{f['pca_k95'][0]} vs {f['pca_k95'][1]}; variance of the first 10 components "
            f"{f['explained_variance_top10'][0]:.4f} vs {f['explained_variance_top10'][1]:.4f}; each of the top "
            f"{f['top_components_compared']} reference components keeps >= {f['top_components_kept_min']:.3f} "
            f"of its length in the candidate's span")
