"""Where everything lives: the names under ``--output`` and ``--state``, and the rules that keep
the photos, the outputs, the state and the logs apart.

The one owner of these names and rules: the job, ``forget``, ``iam`` and (through
``python -m extractor.storage.layout``) ``create_cluster.sh`` all ask here, so renaming a folder is one
edit. Standard library only: the deployment tools run it on a machine without the job's packages.

Under ``--output`` (a prefix, never a whole bucket)::

    features/<fruit>.csv|.parquet   pca/<fruit>.csv|.parquet   errors.csv
    pca_model.npz   explained_variance.png   pca_scatter.png   pca_scatter.csv (the points drawn)
    report.html   manifest.json   _SUCCESS (written last)
    _lock.json              the run lock (extractor.storage.lock): who writes here now; kept by re-runs
    logs/<run>.log          the job's log (default --log-uri); kept by re-runs
    audit/erasures.jsonl    forget's audit trail; kept by re-runs
    _staging/<run>/...      parts the executors write in the distributed mode; removed after
    _staging/<run>/listing/ the run's listing snapshot (--listing distributed, --inventory): each
                            featurize partition's keys; removed before _SUCCESS

Under ``--state``::

    state.json              the current version, its fingerprint and its parts
    v-<version>/part-NNNNN.npz
    _lock.json              the run lock of incremental runs and ``forget --state``; kept by commits

    python -m extractor.storage.layout --input S3_URI --output S3_URI [--state S3_URI] [--log-uri S3_URI]
        [--emr-log-uri S3_URI]

checks the locations as the job will and prints ``name=s3://...`` lines (input, output,
job_log, staging, state); a refused layout is one line on stderr and exit 2.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

from extractor.errors import OneLineParser
from extractor.storage.s3 import S3Location, parse_s3_uri

# --- under --output ---------------------------------------------------------------------------
FEATURES = "features"                 # folders of per-fruit vector files: features/<fruit><ext>
PCA = "pca"
VECTOR_FOLDERS = (FEATURES, PCA)
ERRORS_FILE = "errors.csv"
PCA_MODEL_FILE = "pca_model.npz"
VARIANCE_PLOT_FILE = "explained_variance.png"
SCATTER_PLOT_FILE = "pca_scatter.png"
SCATTER_POINTS_FILE = "pca_scatter.csv"
REPORT_FILE = "report.html"
MANIFEST_FILE = "manifest.json"
SUCCESS_FILE = "_SUCCESS"
LOG_FOLDER = "logs/"
AUDIT_FOLDER = "audit/"
AUDIT_LOG_FILE = "erasures.jsonl"
STAGING_FOLDER = "_staging/"
ERRORS_PARTS = "errors"               # the staged parts of errors.csv, beside features/ and pca/
LOCK_FILE = "_lock.json"              # under --output and under --state: extractor.storage.lock's object
_WRITE_PROBE = ".write-check-{run}"

# The files that name input photos in their first column: vector files, errors.csv, the scatter's
# points. (report.html names some too: ``forget`` rebuilds it, and the scatter, from these.)
_PHOTO_FILE = re.compile(rf"(?P<kind>{'|'.join(VECTOR_FOLDERS)})/[^/]+\.(?P<ext>csv|parquet)"
                         rf"|{re.escape(ERRORS_FILE)}|{re.escape(SCATTER_POINTS_FILE)}")

# --- under --state ----------------------------------------------------------------------------
STATE_FILE = "state.json"


def vectors_file(kind: str, stem: str, extension: str) -> str:
    """``features/Apple.csv``: a fruit's vector file, relative to the output prefix."""
    if kind not in VECTOR_FOLDERS:
        raise ValueError(f"kind must be one of {VECTOR_FOLDERS}, got {kind!r}")
    return f"{kind}/{stem}{extension}"


def photo_file(relative: str) -> dict | None:
    """For an output file that names input photos (vector files, errors.csv): ``{"kind":
    'features'|'pca'|None, "ext": 'csv'|'parquet'|None}``; None for any other file."""
    match = _PHOTO_FILE.fullmatch(relative)
    return match.groupdict() if match else None


def default_log_location(output: S3Location) -> S3Location:
    return S3Location(output.bucket, output.prefix + LOG_FOLDER)


def audit_log(output: S3Location) -> S3Location:
    """The default audit log object (its key in ``prefix``)."""
    return S3Location(output.bucket, output.prefix + AUDIT_FOLDER + AUDIT_LOG_FILE)


def staging(output: S3Location, run_id: str = "") -> S3Location:
    """Where one run's executors stage their parts; with no run id, every run's staging."""
    return S3Location(output.bucket, output.prefix + STAGING_FOLDER + (f"{run_id}/" if run_id else ""))


def run_staging(output: S3Location, run_id: str) -> S3Location:
    """One run's staging folder (a run called without an id, as tests do, is "run")."""
    return staging(output, _run_name(run_id))


def staged_part(staging_prefix: str, kind: str, name: str | None, partition: int) -> str:
    """The key of one partition's part of one output file, under a run's staging folder:
    ``<kind>/<file name>/part-NNNNN`` (kind ``features``, ``pca`` or ``ERRORS_PARTS`` for
    errors.csv, whose parts have no fruit: ``_``)."""
    return f"{staging_prefix}{kind}/{name if name is not None else '_'}/part-{partition:05d}"


def listing_snapshot(output: S3Location, run_id: str) -> S3Location:
    """Where a run's listing snapshot lives: each featurize partition's keys (extractor.storage.snapshot)."""
    return S3Location(output.bucket, run_staging(output, run_id).prefix + "listing/")


def _run_name(run_id: str) -> str:
    return run_id or "run"


def lock_key(location: S3Location) -> str:
    """The key of the run lock object of a prefix (``--output`` or ``--state``)."""
    return location.key(LOCK_FILE)


def write_probe(output: S3Location, run_id: str) -> str:
    """The key of the empty object the preflight writes and deletes."""
    return output.key(_WRITE_PROBE.format(run=_run_name(run_id)))


def state_part(version: str, index: int) -> str:
    """A state part's name relative to ``--state``."""
    return f"v-{version}/part-{index:05d}.npz"


def kept_by_reruns(output: S3Location, log_location: S3Location, state: S3Location | None) -> tuple[str, ...]:
    """Key prefixes under the output that a re-run's stale-file clean-up must leave: the run
    lock, the audit trail, and the logs and the state when they live inside the output."""
    keep = [lock_key(output), output.key(AUDIT_FOLDER)]
    for location in (log_location, state):
        if location is not None and location.bucket == output.bucket:
            keep.append(location.prefix)
    return tuple(keep)


def check_locations(source: S3Location, output: S3Location, *, state: S3Location | None = None,
                    written: Sequence[tuple[str, S3Location]] = ()) -> None:
    """Refuse a layout where a write could land among the photos or a clean-up delete what it
    must not. ``written``: further (option, location) pairs the job or the cluster writes to
    (logs). ValueError names the options and the values."""
    if not output.prefix:
        raise ValueError(f"--output needs a prefix, not a whole bucket (a re-run replaces "
                         f"everything under it), got {output.uri!r}")
    if source.contains(output) or output.contains(source):
        raise ValueError(f"--output {output.uri} and --input {source.uri} overlap; "
                         f"outputs must not land among the inputs")
    if state is not None:
        if not state.prefix:
            raise ValueError(f"--state needs a prefix, not a whole bucket (each run deletes the older "
                             f"versions under it), got {state.uri!r}")
        if source.contains(state) or state.contains(source):
            raise ValueError(f"--state {state.uri} and --input {source.uri} overlap")
        if state.contains(output):
            # Each state commit deletes what is under --state but its current version.
            raise ValueError(f"--output {output.uri} is inside --state {state.uri}; keep them apart")
    for option, location in written:
        if source.contains(location) or location.contains(source):
            raise ValueError(f"{option} {location.uri} and --input {source.uri} overlap")


def check_audit_log(output: S3Location, audit: S3Location) -> None:
    """Only ``<output>audit/`` survives a re-run of the job: an audit log elsewhere would be deleted."""
    folder = output.prefix + AUDIT_FOLDER
    if audit.bucket != output.bucket or not audit.prefix.startswith(folder) or audit.prefix.endswith("/"):
        raise ValueError(f"--audit-log must be an object under s3://{output.bucket}/{folder} "
                         f"(kept by re-runs of the job), got {audit.uri!r}")


def job_locations(input_uri: str, output_uri: str, state_uri: str | None = None, log_uri: str | None = None,
                  emr_log_uri: str | None = None) -> dict[str, str]:
    """The job's S3 locations checked together (``check_locations``), as ``{name: URI}``: input,
    output, job_log (where the job will log), staging and, when given, state. ValueError naming
    the option at fault; an empty URI counts as missing."""
    missing = [option for option, uri in (("--input", input_uri), ("--output", output_uri)) if not uri]
    if missing:
        raise ValueError(f"the following arguments are required: {', '.join(missing)}")

    def location(option: str, uri: str | None) -> S3Location | None:
        try:
            return parse_s3_uri(uri) if uri else None
        except ValueError as exc:
            raise ValueError(f"{option}: {exc}") from None

    source, output = location("--input", input_uri), location("--output", output_uri)
    state = location("--state", state_uri)
    log = location("--log-uri", log_uri) or default_log_location(output)
    written = [("--log-uri", log)]
    if emr_log_uri:
        written.append(("--emr-log-uri", location("--emr-log-uri", emr_log_uri)))
    check_locations(source, output, state=state, written=written)
    lines = {"input": source.uri, "output": output.uri, "job_log": log.uri, "staging": staging(output).uri}
    if state is not None:
        lines["state"] = state.uri
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m extractor.storage.layout",
                           description="Check the job's S3 locations and print where it will write.")
    for option in ("--input", "--output"):
        parser.add_argument(option, required=True, metavar="S3_URI")
    for option in ("--state", "--log-uri", "--emr-log-uri"):
        parser.add_argument(option, default=None, metavar="S3_URI")
    args = parser.parse_args(argv)
    try:
        lines = job_locations(args.input, args.output, args.state, args.log_uri, args.emr_log_uri)
    except ValueError as exc:
        parser.error(str(exc))
    print("\n".join(f"{name}={uri}" for name, uri in lines.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
