"""The EC2 instance types a cluster is built from: what YARN gets of each, their GPUs, how the
executors fill them, and what an image costs on them. Standard library only (create_cluster.sh
runs it with any python3).

    python -m extractor.deploy.instances layout --core-type m5.4xlarge --core-count 2 \\
        [--task-type g5.xlarge --task-count 4 --spot] [--executor-cores 4] [--driver-memory 10g]
    python -m extractor.deploy.instances cost-table          # the README's cost per million images

Prices are estimates kept here, in one place (US_EAST_1_USD; the VGG16 rates are rates.RATES): the
development machine has no internet to read the AWS price list, and no GPU was lent to measure one.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass

from extractor.errors import OneLineParser
from extractor.executor.rates import RATES

# vCPUs per size; GiB of memory per vCPU per family; GPUs per size of the GPU families.
_SIZES = {"large": 2, "xlarge": 4, "2xlarge": 8, "4xlarge": 16, "8xlarge": 32, "12xlarge": 48,
          "16xlarge": 64, "24xlarge": 96, "48xlarge": 192}
_GIB_PER_VCPU = {"m5": 4, "m6i": 4, "m7i": 4, "c5": 2, "c6i": 2, "c7i": 2, "r5": 8, "r6i": 8, "r7i": 8,
                 "g4dn": 4, "g5": 4, "g6": 4}
_GPU_MODEL = {"g4dn": ("T4", (7, 5)), "g5": ("A10G", (8, 6)), "g6": ("L4", (8, 9))}  # (model, compute capability)
_GPUS = {"12xlarge": 4, "24xlarge": 4, "48xlarge": 8}                     # other sizes: 1
_AMX = ("m7i", "c7i", "r7i")  # Sapphire Rapids: AMX bf16 tiles
_NOT_SUPPORTED = {"g4ad": "AMD GPUs (no CUDA)", "g5g": "Arm CPUs (the pins are x86_64 wheels)"}

EUR_PER_USD = 0.86          # assumed exchange rate for the € columns
EMR_MIN_ALLOCATION_MB = 32  # YARN rounds every container up to a multiple of this (EMR default)
MIN_OVERHEAD_MB = 3584      # one Python worker with TensorFlow and a VGG16 peaks at 2.7 GB
MIN_HEAP_MB = 2048          # the JVM holds the 537 MB broadcast and the partition's records
# Python workers (tasks) sharing each GPU: one worker's GIL caps its S3 GETs + small-JPEG decodes
# at ~390 images/s (extractor.executor.feeding), below what a GPU forwards; two feed ~780.
TASKS_PER_GPU = 2


@dataclass(frozen=True)
class InstanceType:
    name: str
    vcpus: int
    memory_gib: int
    gpus: int = 0
    gpu_model: str = ""
    compute_capability: tuple[int, int] | None = None
    amx: bool = False

    @property
    def yarn_mb(self) -> int:
        """YARN's memory on the node (EMR's yarn.nodemanager.resource.memory-mb): EMR's per-type
        defaults leave min(25 %, 8 GiB) to the OS and daemons (m5.xlarge 12288, m5.4xlarge 57344)."""
        return (self.memory_gib - min(self.memory_gib // 4, 8)) * 1024


def instance_type(name: str) -> InstanceType:
    """The known shape of ``name``; ValueError for a type this module cannot size."""
    match = re.fullmatch(r"([a-z]+[0-9][a-z]*)\.([0-9]*x?large)", name)
    if not match or match[1] not in _GIB_PER_VCPU or match[2] not in _SIZES:
        family = name.split(".")[0]
        why = _NOT_SUPPORTED.get(family, "add its family to extractor/deploy/instances.py")
        raise ValueError(f"instance type {name!r} is not supported here ({why})")
    family, size = match[1], match[2]
    vcpus = _SIZES[size]
    model, capability = _GPU_MODEL.get(family, ("", None))
    return InstanceType(name, vcpus, vcpus * _GIB_PER_VCPU[family], gpus=_GPUS.get(size, 1) if model else 0,
                        gpu_model=model, compute_capability=capability, amx=family in _AMX)


def parse_memory_mb(value: str) -> int:
    """'10g' / '4096m' / '4096' (MiB) -> MiB, as Spark reads memory sizes."""
    match = re.fullmatch(r"([0-9]+)([gGmM]?)", value.strip())
    if not match:
        raise ValueError(f"memory size must look like 10g or 4096m, got {value!r}")
    return int(match[1]) * (1024 if match[2].lower() == "g" else 1)


def container_mb(memory_mb: int) -> int:
    """YARN's container for a JVM of ``memory_mb`` with Spark's default overhead (10 %, >= 384 MiB)."""
    total = memory_mb + max(384, memory_mb // 10)
    return math.ceil(total / EMR_MIN_ALLOCATION_MB) * EMR_MIN_ALLOCATION_MB


@dataclass(frozen=True)
class Group:
    role: str          # CORE or TASK
    type: InstanceType
    count: int
    spot: bool = False


@dataclass
class Layout:
    """How executors fill the cluster: ``per_node[i]`` executors on each node of ``groups[i]``
    but the core node that holds the driver, which has ``on_driver_node``."""

    gpu: bool
    executor_cores: int
    executor_memory_mb: int
    executor_overhead_mb: int
    groups: list[Group]
    on_driver_node: int     # executors beside the driver on its core node
    per_node: list[int]     # executors per node of each group, the driver's node aside
    primary: InstanceType

    def busy_nodes(self, group: Group, per_node: int) -> float:
        """How many of ``group``'s nodes featurize, the driver's node counting by its share of executors."""
        if not per_node:
            return 0.0
        if group.role != "CORE":
            return float(group.count)
        return group.count - 1 + self.on_driver_node / per_node

    def working_units(self) -> tuple[int, int]:
        """(featurizing, paid) vCPUs, or GPUs in a GPU cluster: the arithmetic of the README."""
        unit = (lambda t: t.gpus) if self.gpu else (lambda t: t.vcpus)
        per_executor = 1 if self.gpu else self.executor_cores
        working, paid = 0, unit(self.primary)
        for group, per_node in zip(self.groups, self.per_node):
            paid += unit(group.type) * group.count
            working += round(per_executor * per_node * self.busy_nodes(group, per_node))
        return working, paid


def plan(primary: str, core_type: str, core_count: int, task_type: str | None = None, task_count: int = 0,
         spot: bool = False, executor_cores: int | None = None, driver_memory: str = "10g") -> Layout:
    """Size executors so they fill every executor node exactly, the driver's node included when
    it can be done without overfilling the others; ValueError on a cluster that cannot work."""
    if core_count < 1 or task_count < 0:
        raise ValueError(f"need at least one core node and no negative task count, got {core_count}, {task_count}")
    if spot and task_count == 0:
        raise ValueError("--spot puts task nodes on Spot; core nodes hold the driver and stay on-demand: "
                         "add --task-count N (and --task-type)")
    groups = [Group("CORE", instance_type(core_type), core_count)]
    if task_count:
        groups.append(Group("TASK", instance_type(task_type or core_type), task_count, spot))
    gpu = any(g.type.gpus for g in groups)
    executor_groups = [g for g in groups if g.type.gpus] if gpu else groups
    if gpu and groups[-1].type.gpus == 0:
        raise ValueError(f"GPU core nodes ({core_type}) with CPU task nodes ({task_type}): every executor asks "
                         f"for a GPU, so the task nodes would never run one; use GPU task nodes")
    if gpu and len({g.type.gpus and g.type.vcpus // g.type.gpus for g in executor_groups}) > 1:
        raise ValueError("core and task GPU types differ in vCPUs per GPU; use one GPU type")
    driver_mb = container_mb(parse_memory_mb(driver_memory))
    slots = []  # (group, executors per node, cores per executor)
    for g in executor_groups:
        cores = g.type.vcpus // g.type.gpus if gpu else (executor_cores or 4)
        if cores > g.type.vcpus:
            raise ValueError(f"--executor-cores {cores} is more than {g.type.name}'s {g.type.vcpus} vCPUs")
        per_node = g.type.gpus if gpu else g.type.vcpus // cores
        slots.append((g, per_node, cores))
    cores = slots[0][2]
    # One executor size for the whole cluster: the largest that fills every executor node by vCPUs.
    size = min(_round_down(g.type.yarn_mb // n) for g, n, _ in slots)
    core = groups[0]
    per_role = {g.role: n for g, n, _ in slots}
    if core in executor_groups:
        n = per_role["CORE"]
        shrunk = _round_down((core.type.yarn_mb - driver_mb) // n)
        # Shrunk so that the driver's node holds n executors too, unless n + 1 would then fit elsewhere.
        if shrunk >= MIN_HEAP_MB + MIN_OVERHEAD_MB and all((m + 1) * shrunk > g.type.yarn_mb for g, m, _ in slots):
            size = min(size, shrunk)
    if size < MIN_HEAP_MB + MIN_OVERHEAD_MB:
        raise ValueError(f"an executor would get {size} MiB of YARN memory, below the "
                         f"{MIN_HEAP_MB + MIN_OVERHEAD_MB} MiB one VGG16 worker needs; use larger nodes")
    heap = min(4096, max(MIN_HEAP_MB, _round_down(size // 3)))
    per_node = [per_role.get(g.role, 0) for g in groups]
    beside = 0
    if core in executor_groups:
        beside = min(per_node[0], max(0, core.type.yarn_mb - driver_mb) // size)
    return Layout(gpu, cores, heap, size - heap, groups, beside, per_node, instance_type(primary))


def _round_down(mb: int) -> int:
    return mb // EMR_MIN_ALLOCATION_MB * EMR_MIN_ALLOCATION_MB


# ---- what an image costs -------------------------------------------------------------------

# On-demand EC2 Linux prices in us-east-1 (USD/h, AWS price list as remembered at the time of
# writing: the best-known reference), turned into eu-west-3 by Paris' premium on m5.xlarge
# (0.224 / 0.192). EMR's fee is a quarter of the us-east-1 EC2 price for these types, on any
# market. Spot: 60 % off on-demand, typical of the Spot Instance Advisor for them; it moves.
US_EAST_1_USD = {"m5.xlarge": 0.192, "m5.4xlarge": 0.768, "m7i.xlarge": 0.2016, "g4dn.xlarge": 0.526,
                 "g5.xlarge": 1.006, "g6.xlarge": 0.8048}
PARIS_PREMIUM = 0.224 / 0.192
EMR_FEE_SHARE = 0.25
SPOT_SHARE = 0.40


def price_usd(name: str, spot: bool = False) -> float | None:
    """EC2 + EMR per instance-hour in eu-west-3 (estimate), None for a type without a price here."""
    base = US_EAST_1_USD.get(name)
    if base is None:
        return None
    ec2 = base * PARIS_PREMIUM * (SPOT_SHARE if spot else 1.0)
    return ec2 + base * EMR_FEE_SHARE


PROTOTYPE_EUR_PER_MILLION = 11.0


def eur_per_million(usd_per_hour: float, images_s: float) -> float:
    """€ per million images = price per hour / (3600 x images/s) x 10^6."""
    return usd_per_hour * EUR_PER_USD / (3600 * images_s) * 1e6


def cost_table() -> list[str]:
    """The README's table, as markdown lines."""
    lines = ["| instance | precision | images/s | source | USD/h on-demand | € / M images | USD/h Spot "
             "| € / M images Spot |", "|---|---|---|---|---|---|---|---|"]
    for (name, precision), rate in RATES.items():
        od, sp = price_usd(name), price_usd(name, spot=True)
        lines.append(f"| {name} | {precision} | {rate.images_s:g} | {rate.source} | {od:.3f} | "
                     f"{eur_per_million(od, rate.images_s):.2f} | {sp:.3f} | {eur_per_million(sp, rate.images_s):.2f} |")
    return lines


def cluster_cost(layout: Layout, precision: str) -> tuple[float, float, float] | None:
    """(USD per cluster-hour, of which on featurizing nodes, images/s of the whole cluster) where
    prices and rates are known."""
    usd = price_usd(layout.primary.name)
    busy_usd = rate = 0.0
    for group, per_node in zip(layout.groups, layout.per_node):
        node_price = price_usd(group.type.name, group.spot)
        node_rate = RATES.get((group.type.name, precision))
        if usd is None or node_price is None or (per_node and node_rate is None):
            return None
        usd += node_price * group.count
        busy = layout.busy_nodes(group, per_node)
        busy_usd += node_price * busy
        rate += node_rate.images_s * busy if busy else 0.0
    return (usd, busy_usd, rate) if rate else None


def describe(layout: Layout, precision: str) -> list[str]:
    """The plan in a few lines for the operator: executors, the share of paid units that featurize, cost."""
    unit = "GPUs" if layout.gpu else "vCPUs"
    working, paid = layout.working_units()
    lines = [f"executors: {layout.executor_cores} cores, {layout.executor_memory_mb}m heap + "
             f"{layout.executor_overhead_mb}m overhead"
             + (f", 1 GPU each shared by {TASKS_PER_GPU} tasks" if layout.gpu else "")]
    for group, per_node in zip(layout.groups, layout.per_node):
        market = "Spot" if group.spot else "on-demand"
        where = f"{per_node} per node" if per_node else "none (driver only)"
        if group.role == "CORE" and per_node:
            where += f", {layout.on_driver_node} beside the driver"
        lines.append(f"{group.role.lower()}: {group.count} x {group.type.name} ({market}): executors {where}")
    lines.append(f"featurizing: {working} of {paid} paid {unit} ({100 * working / paid:.0f} %)")
    if layout.gpu and layout.groups[0].type.gpus and not layout.on_driver_node:
        lines.append("warning: the driver's container leaves no room for an executor on its core node: its "
                     "GPU idles (a small CPU core node for the driver and GPU task nodes avoid that)")
    cost = cluster_cost(layout, precision)
    if cost:
        usd, busy_usd, rate = cost
        lines.append(f"estimate: {usd:.2f} USD per cluster-hour, {100 * busy_usd / usd:.0f} % of it on "
                     f"featurizing nodes; {rate:g} images/s ({precision}): "
                     f"{eur_per_million(usd, rate):.2f} € per million images (prototype: "
                     f"{PROTOTYPE_EUR_PER_MILLION:g} €)")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m extractor.deploy.instances")
    commands = parser.add_subparsers(dest="command", required=True)
    lay = commands.add_parser("layout", help="executor sizes and the featurizing share of a cluster")
    lay.add_argument("--primary-type", default="m5.xlarge")
    lay.add_argument("--core-type", required=True)
    lay.add_argument("--core-count", type=int, required=True)
    lay.add_argument("--task-type")
    lay.add_argument("--task-count", type=int, default=0)
    lay.add_argument("--spot", action="store_true")
    lay.add_argument("--executor-cores", type=int)
    lay.add_argument("--driver-memory", default="10g")
    lay.add_argument("--precision", default="float32")
    commands.add_parser("cost-table", help="the README's cost per million images")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "cost-table":
        print("\n".join(cost_table()))
        return 0
    try:
        layout = plan(args.primary_type, args.core_type, args.core_count, args.task_type, args.task_count,
                      args.spot, args.executor_cores, args.driver_memory)
    except ValueError as exc:
        parser.error(str(exc))
    print("\n".join(describe(layout, args.precision)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
