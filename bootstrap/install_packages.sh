#!/usr/bin/env bash
# EMR bootstrap action: runs on every node before Spark starts.
#
# Installs, for the Python 3.11 that PySpark uses on the cluster, exactly the pinned packages
# of requirements.txt that are not marked "local-only" (on a GPU node, the CUDA build of the
# same TensorFlow version instead of tensorflow-cpu), prepares a GPU node for YARN's GPU
# isolation, and optionally copies a weights file from S3 to local disk so that no node needs
# the internet. With --no-install (a packed environment ships the packages through
# spark.archives) nothing comes from PyPI. Any failure fails the bootstrap, and with it the
# cluster start: better than a job dying later on a missing import.
#
#   install_packages.sh --requirements s3://bucket/code/requirements.txt | --no-install \
#                       [--weights s3://bucket/code/weights/vgg16.h5] [--weights-dir /mnt/fruits/weights]
#   install_packages.sh --print-requirements FILE [--gpu]   # the pins a node installs (tests, packing)
set -euo pipefail

PYTHON="${PYTHON:-python3.11}"
NVIDIA_SMI="${NVIDIA_SMI:-nvidia-smi}"
GPU_CGROUP="${GPU_CGROUP:-/spark-rapids-cgroup}"  # yarn-site's cgroups mount-path (extractor/deploy/emr.py)
REQUIREMENTS_URI=""
INSTALL=true
PRINT_FROM=""
GPU=""
WEIGHTS_URI=""
WEIGHTS_DIR="${WEIGHTS_DIR:-/mnt/fruits/weights}"

log() { echo "[fruits-bootstrap $(date -u +%Y-%m-%dT%H:%M:%SZ)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# requirements.txt minus comments, blank lines and lines marked local-only; with "gpu" as
# second argument, TensorFlow's CUDA build at the very version pinned for tensorflow-cpu.
cluster_requirements() {
    local sed_gpu=()
    [[ "${2:-}" == gpu ]] && sed_gpu=(-e 's/^tensorflow-cpu==/tensorflow[and-cuda]==/')
    grep -v 'local-only' "$1" | sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' "${sed_gpu[@]+"${sed_gpu[@]}"}"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --requirements) REQUIREMENTS_URI="${2:?--requirements needs an s3:// URI}"; shift 2 ;;
        --no-install) INSTALL=false; shift ;;
        --weights) WEIGHTS_URI="${2:?--weights needs an s3:// URI}"; shift 2 ;;
        --weights-dir) WEIGHTS_DIR="${2:?--weights-dir needs a folder}"; shift 2 ;;
        --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
        --print-requirements) PRINT_FROM="${2:?--print-requirements needs a file}"; shift 2 ;;
        --gpu) GPU=gpu; shift ;;
        *) die "unknown argument: $1" ;;
    esac
done
if [[ -n "$PRINT_FROM" ]]; then
    cluster_requirements "$PRINT_FROM" "$GPU"
    exit 0
fi
[[ -n "$REQUIREMENTS_URI" || "$INSTALL" == false ]] \
    || die "--requirements s3://.../requirements.txt (or --no-install) is required"

# A GPU node: YARN isolates GPUs through the cgroup v1 devices controller, which Amazon Linux
# 2023 (cgroup v2) does not mount; the NodeManager expects it under yarn-site's mount path.
if "$NVIDIA_SMI" -L >/dev/null 2>&1; then
    GPU=gpu
    log "GPU node: $("$NVIDIA_SMI" -L | head -n 1)"
    sudo mkdir -p "$GPU_CGROUP/devices"
    mountpoint -q "$GPU_CGROUP/devices" \
        || sudo mount -t cgroup -o devices cgroupv1-devices "$GPU_CGROUP/devices" \
        || die "cannot mount the cgroup devices controller on $GPU_CGROUP/devices"
    sudo chmod a+rwx -R "$GPU_CGROUP"
fi

if [[ "$INSTALL" == true ]]; then
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        log "installing $PYTHON from the OS packages"
        sudo dnf install -y -q python3.11 python3.11-pip >/dev/null || die "cannot install $PYTHON"
    fi
    "$PYTHON" -m pip --version >/dev/null 2>&1 || sudo "$PYTHON" -m ensurepip --upgrade >/dev/null \
        || die "no pip for $PYTHON"
    workdir="$(mktemp -d)"
    trap 'rm -rf "$workdir"' EXIT
    aws s3 cp --only-show-errors "$REQUIREMENTS_URI" "$workdir/requirements.txt" \
        || die "cannot read $REQUIREMENTS_URI"
    cluster_requirements "$workdir/requirements.txt" "$GPU" > "$workdir/cluster-requirements.txt"
    log "installing for $("$PYTHON" --version 2>&1): $(tr '\n' ' ' < "$workdir/cluster-requirements.txt")"
    # Wheels only: a source build on a node would be slow and could differ from what was tested.
    sudo "$PYTHON" -m pip install --quiet --no-cache-dir --only-binary=:all: \
        -r "$workdir/cluster-requirements.txt" || die "pip install failed"
    "$PYTHON" -c "import tensorflow, keras, numpy, PIL, boto3, botocore, matplotlib" \
        || die "the installed packages do not import"
else
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (EMR 7.1+ ships it)"
fi

if [[ -n "$WEIGHTS_URI" ]]; then
    sudo mkdir -p "$WEIGHTS_DIR"
    sudo aws s3 cp --only-show-errors "$WEIGHTS_URI" "$WEIGHTS_DIR/" || die "cannot copy $WEIGHTS_URI"
    sudo chmod -R a+rX "$WEIGHTS_DIR"
    log "weights staged in $WEIGHTS_DIR/$(basename "$WEIGHTS_URI")"
fi
log "done"
