#!/usr/bin/env bash
# EMR bootstrap action: runs on every node before Spark starts.
#
# Installs, for the Python 3.11 that PySpark uses on the cluster, exactly the pinned packages
# of requirements.txt that are not marked "local-only", and optionally copies a weights file
# from S3 to local disk so that no node needs the internet. Any failure fails the bootstrap,
# and with it the cluster start: better than a job dying later on a missing import.
#
#   install_packages.sh --requirements s3://bucket/code/requirements.txt \
#                       [--weights s3://bucket/code/weights/vgg16.h5] [--weights-dir /mnt/fruits/weights]
#   install_packages.sh --print-requirements FILE    # the pins a node installs (used by the tests)
set -euo pipefail

PYTHON="${PYTHON:-python3.11}"
REQUIREMENTS_URI=""
WEIGHTS_URI=""
WEIGHTS_DIR="${WEIGHTS_DIR:-/mnt/fruits/weights}"

log() { echo "[fruits-bootstrap $(date -u +%Y-%m-%dT%H:%M:%SZ)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# requirements.txt minus comments, blank lines and lines marked local-only.
cluster_requirements() {
    grep -v 'local-only' "$1" | sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d'
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --requirements) REQUIREMENTS_URI="${2:?--requirements needs an s3:// URI}"; shift 2 ;;
        --weights) WEIGHTS_URI="${2:?--weights needs an s3:// URI}"; shift 2 ;;
        --weights-dir) WEIGHTS_DIR="${2:?--weights-dir needs a folder}"; shift 2 ;;
        --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
        --print-requirements) cluster_requirements "${2:?--print-requirements needs a file}"; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
[[ -n "$REQUIREMENTS_URI" ]] || die "--requirements s3://.../requirements.txt is required"

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
cluster_requirements "$workdir/requirements.txt" > "$workdir/cluster-requirements.txt"
log "installing for $("$PYTHON" --version 2>&1): $(tr '\n' ' ' < "$workdir/cluster-requirements.txt")"
# Wheels only: a source build on a node would be slow and could differ from what was tested.
sudo "$PYTHON" -m pip install --quiet --no-cache-dir --only-binary=:all: \
    -r "$workdir/cluster-requirements.txt" || die "pip install failed"
"$PYTHON" -c "import tensorflow, keras, numpy, PIL, boto3, botocore, matplotlib" \
    || die "the installed packages do not import"

if [[ -n "$WEIGHTS_URI" ]]; then
    sudo mkdir -p "$WEIGHTS_DIR"
    sudo aws s3 cp --only-show-errors "$WEIGHTS_URI" "$WEIGHTS_DIR/" || die "cannot copy $WEIGHTS_URI"
    sudo chmod -R a+rX "$WEIGHTS_DIR"
    log "weights staged in $WEIGHTS_DIR/$(basename "$WEIGHTS_URI")"
fi
log "done"
