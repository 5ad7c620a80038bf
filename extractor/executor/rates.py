"""VGG16 fc2 throughput (224x224 images/s) per EC2 instance type and precision, each with its
source (measured here, or estimated and how): read by the run (feeding sizes a GPU's feed from
it) and by the deployment's cost table (instances). Plain data, standard library only."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rate:
    images_s: float  # VGG16 fc2, 224x224, per instance
    source: str


_V100_FP16 = "PaddlePaddle's float16 benchmark: VGG16 on a V100, 1,063 images/s at batch 64 in float16"
RATES = {
    ("m5.xlarge", "float32"): Rate(7.3, "assumed equal to the development machine's measured ceiling (7.29 "
                                         "images/s, 2 vCPU EPYC, AVX-512, 2026-11-21): 4 m5 vCPUs = 2 cores"),
    ("m5.4xlarge", "float32"): Rate(29.2, "4 x m5.xlarge (4 executors of 4 vCPUs)"),
    ("m7i.xlarge", "float32"): Rate(8.0, "estimate: m5.xlarge + 10 % (newer core, same AVX-512)"),
    ("m7i.xlarge", "bfloat16"): Rate(29.0, "estimate: AMX bf16 tiles ~4x AVX-512 fp32 on convolutions "
                                            "(not measured: the development CPU has no AMX)"),
    ("g4dn.xlarge", "float16"): Rate(350.0, f"estimate from {_V100_FP16}, x 1/3 (T4: 65 vs 125 peak "
                                             f"fp16 tensor TFLOPS, 70 W clocks)"),
    ("g5.xlarge", "float16"): Rate(700.0, f"estimate from {_V100_FP16}, x 2/3 (A10G)"),
    ("g6.xlarge", "float16"): Rate(550.0, f"estimate from {_V100_FP16}, x 0.5 (L4: 72 W, 300 GB/s)"),
}
