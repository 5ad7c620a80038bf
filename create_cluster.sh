#!/usr/bin/env bash
# Create an EMR cluster for the Fruits! feature extraction and run the job on it; or submit
# the job to a running cluster; or terminate one. Every setting below can be changed by its
# environment variable or by its flag (see --help).
set -euo pipefail

# ---- settings ------------------------------------------------------------------------------
REGION="${REGION:-eu-west-3}"                # Paris: the photos may be personal data (GDPR)
RELEASE="${RELEASE:-emr-7.5.0}"              # EMR 7.x = Spark 3.5; Python 3.11 from EMR 7.1
INSTANCE_TYPE="${INSTANCE_TYPE:-m5.xlarge}"  # the primary node
CORE_TYPE="${CORE_TYPE:-m5.4xlarge}"         # core nodes: on-demand, hold the driver and executors
CORE_COUNT="${CORE_COUNT:-2}"                # core nodes, beside 1 primary node
TASK_TYPE="${TASK_TYPE:-}"                   # task nodes (executors only); default: CORE_TYPE
TASK_COUNT="${TASK_COUNT:-0}"
SPOT="${SPOT:-false}"                        # task nodes on Spot
PACKED_ENV="${PACKED_ENV:-false}"            # ship every package in one archive: no PyPI at start
ENV_PREFIX="${ENV_PREFIX:-}"                 # where archives go; default s3://$BUCKET/fruits-code/env/
PACKED_ENV_CACHE="${PACKED_ENV_CACHE:-}"     # local folder of built archives; default ./.packed-env/
CLUSTER_NAME="${CLUSTER_NAME:-fruits-features}"
BUCKET="${BUCKET:-}"                         # bucket for code and EMR logs (if not given below)
CODE_PREFIX="${CODE_PREFIX:-}"               # default s3://$BUCKET/fruits-code/<UTC time>/
LOG_URI="${LOG_URI:-}"                       # EMR's own logs; default s3://$BUCKET/emr-logs/
INPUT="${INPUT:-}"                           # s3://bucket/prefix/ of the photos
OUTPUT="${OUTPUT:-}"                         # s3://bucket/prefix/ for the results
WEIGHTS="${WEIGHTS:-imagenet}"               # imagenet | random | local .h5 | s3://....h5
IDLE_TIMEOUT="${IDLE_TIMEOUT:-3600}"         # seconds idle before EMR terminates the cluster
AUTO_TERMINATE="${AUTO_TERMINATE:-false}"    # terminate as soon as the step ends
DRIVER_MEMORY="${DRIVER_MEMORY:-10g}"
EXECUTOR_MEMORY="${EXECUTOR_MEMORY:-}"       # default: sized to fill the nodes (extractor.deploy.instances)
EXECUTOR_OVERHEAD="${EXECUTOR_OVERHEAD:-}"   # Python workers: TensorFlow + one VGG16 each
EXECUTOR_CORES="${EXECUTOR_CORES:-}"         # default 4; on GPU nodes the vCPUs per GPU
SERVICE_ROLE="${SERVICE_ROLE:-EMR_DefaultRole}"
INSTANCE_PROFILE="${INSTANCE_PROFILE:-EMR_EC2_DefaultRole}"
SUBNET_ID="${SUBNET_ID:-}"
SECURITY_CONFIGURATION="${SECURITY_CONFIGURATION:-}"
SSE_KMS_KEY_ID="${SSE_KMS_KEY_ID:-}"         # empty: SSE-S3 (AES256) on every object written
ENDPOINT_URL="${ENDPOINT_URL:-}"             # another AWS endpoint (tests: a local moto server)
ALLOW_NON_EU_REGION="${ALLOW_NON_EU_REGION:-false}"
DRY_RUN="${DRY_RUN:-false}"
WAIT="${WAIT:-false}"
AWS_CLI="${AWS_CLI:-aws}"
PYTHON="${PYTHON:-}"
# ---------------------------------------------------------------------------------------------

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROG="$(basename "$0")"
MODE="create"
CLUSTER_ID=""
DRIVER_EXTRA=()

usage() {
    cat <<EOF
Usage:
  $PROG --input S3_URI --output S3_URI --bucket BUCKET [options] [-- driver.py options]
        create a cluster, upload the code, run the job as a step
  $PROG --submit CLUSTER_ID --input S3_URI --output S3_URI --bucket BUCKET [options]
        upload the code and add the job as a step to a running cluster
  $PROG --terminate CLUSTER_ID [--region R] [--wait]
  $PROG --print-policy --input S3_URI --output S3_URI --bucket BUCKET [options]
        print the least-privilege IAM policy for the cluster's instance profile

Options (environment variable in brackets, default after =):
  --region R               [REGION=$REGION] refused outside the EU without --allow-non-eu-region
  --release LABEL          [RELEASE=$RELEASE]
  --instance-type T        [INSTANCE_TYPE=$INSTANCE_TYPE] the primary node
  --core-type T            [CORE_TYPE=$CORE_TYPE] core nodes (on-demand; the driver runs on one);
                           a GPU type (g4dn, g5, g6) gives one GPU per executor
  --core-count N           [CORE_COUNT=$CORE_COUNT]
  --task-type T            [TASK_TYPE=core type] task nodes: executors only (GPU types too)
  --task-count N           [TASK_COUNT=$TASK_COUNT]
  --spot                   [SPOT=$SPOT] task nodes on Spot (the driver stays on on-demand nodes)
  --packed-env             [PACKED_ENV=$PACKED_ENV] build (once, locally) an archive of every cluster
                           pin, upload it and use it through spark.archives: nodes need no PyPI
  --env-prefix S3_URI      [ENV_PREFIX=s3://BUCKET/fruits-code/env/] where archives are uploaded
  --name NAME              [CLUSTER_NAME=$CLUSTER_NAME]
  --bucket B               [BUCKET] for code and EMR logs
  --code-prefix S3_URI     [CODE_PREFIX=s3://BUCKET/fruits-code/<UTC time>/]
  --log-uri S3_URI         [LOG_URI=s3://BUCKET/emr-logs/] EMR's logs; the job's log goes to OUTPUT/logs/ or -- --log-uri
  --input S3_URI           [INPUT] the photos, one folder per fruit
  --output S3_URI          [OUTPUT] the results
  --weights W              [WEIGHTS=$WEIGHTS] imagenet (nodes need internet), random,
                           a local .h5 file (uploaded) or s3://....h5; files are staged on every node
  --idle-timeout SECONDS   [IDLE_TIMEOUT=$IDLE_TIMEOUT] auto-termination when idle (60-604800)
  --auto-terminate         [AUTO_TERMINATE=$AUTO_TERMINATE] terminate when the step ends
  --driver-memory M        [DRIVER_MEMORY=$DRIVER_MEMORY]
  --executor-memory M      [EXECUTOR_MEMORY] with --executor-overhead; default: sized to fill the nodes
  --executor-overhead M    [EXECUTOR_OVERHEAD]
  --executor-cores N       [EXECUTOR_CORES=4] on GPU nodes: the vCPUs per GPU
  --service-role R         [SERVICE_ROLE=$SERVICE_ROLE]
  --instance-profile P     [INSTANCE_PROFILE=$INSTANCE_PROFILE] attach the --print-policy policy to its role
  --subnet-id S            [SUBNET_ID]
  --security-configuration NAME  [SECURITY_CONFIGURATION] EMR at-rest/in-transit encryption settings
  --sse-kms-key-id K       [SSE_KMS_KEY_ID] SSE-KMS instead of SSE-S3 for every object written
  --endpoint-url URL       [ENDPOINT_URL] another AWS endpoint (e.g. a local moto server)
  --allow-non-eu-region    [ALLOW_NON_EU_REGION=false]
  --wait                   [WAIT=false] wait with the AWS CLI waiters for the step (or termination)
  --dry-run                [DRY_RUN=false] print every AWS command instead of running it, and
                           show the documents they name (kept in a folder under $TMPDIR it names)
  -h, --help

Options after -- go to driver.py unchanged (e.g. -- --collect never --incremental --state S3_URI);
--print-policy covers the job's --state, --log-uri and --inventory given there. --input, --output, --weights
and --sse-kms-key-id are this script's own: give them before --.
EOF
}

die_usage() { echo "$PROG: error: $* (see --help)" >&2; exit 2; }
die() { echo "$PROG: error: $*" >&2; exit 1; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || die_usage "$1 needs a value"; }
# Run a Python module of this repository: its stdout is the step's output, its stderr passes
# through (it is never mixed into what the caller evaluates). Its usage error (exit 2, one line)
# becomes this script's own usage error: the rules it owns read as the script's refusals, and
# its "see --help" would point at the module.
python_step() {  # python_step WHAT MODULE ARGS...
    local what="$1" out errors rc=0 last
    shift
    errors="$(mktemp)"
    out="$(cd "$HERE" && "$PYTHON" -m "$@" 2>"$errors")" || rc=$?
    last="$(tail -n 1 "$errors")"
    if (( rc == 0 )); then
        cat "$errors" >&2
    fi
    rm -f "$errors"
    if (( rc == 2 )); then
        last="${last#*: error: }"
        die_usage "${last% (see --help)}"
    elif (( rc != 0 )); then
        die "$what: ${last:-$(tail -n 1 <<<"$out")}"
    fi
    printf '%s\n' "$out"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --region) need_value "$@"; REGION="$2"; shift 2 ;;
        --release) need_value "$@"; RELEASE="$2"; shift 2 ;;
        --instance-type) need_value "$@"; INSTANCE_TYPE="$2"; shift 2 ;;
        --core-type) need_value "$@"; CORE_TYPE="$2"; shift 2 ;;
        --core-count) need_value "$@"; CORE_COUNT="$2"; shift 2 ;;
        --task-type) need_value "$@"; TASK_TYPE="$2"; shift 2 ;;
        --task-count) need_value "$@"; TASK_COUNT="$2"; shift 2 ;;
        --spot) SPOT=true; shift ;;
        --packed-env) PACKED_ENV=true; shift ;;
        --env-prefix) need_value "$@"; ENV_PREFIX="$2"; shift 2 ;;
        --name) need_value "$@"; CLUSTER_NAME="$2"; shift 2 ;;
        --bucket) need_value "$@"; BUCKET="$2"; shift 2 ;;
        --code-prefix) need_value "$@"; CODE_PREFIX="$2"; shift 2 ;;
        --log-uri) need_value "$@"; LOG_URI="$2"; shift 2 ;;
        --input) need_value "$@"; INPUT="$2"; shift 2 ;;
        --output) need_value "$@"; OUTPUT="$2"; shift 2 ;;
        --weights) need_value "$@"; WEIGHTS="$2"; shift 2 ;;
        --idle-timeout) need_value "$@"; IDLE_TIMEOUT="$2"; shift 2 ;;
        --auto-terminate) AUTO_TERMINATE=true; shift ;;
        --driver-memory) need_value "$@"; DRIVER_MEMORY="$2"; shift 2 ;;
        --executor-memory) need_value "$@"; EXECUTOR_MEMORY="$2"; shift 2 ;;
        --executor-overhead) need_value "$@"; EXECUTOR_OVERHEAD="$2"; shift 2 ;;
        --executor-cores) need_value "$@"; EXECUTOR_CORES="$2"; shift 2 ;;
        --service-role) need_value "$@"; SERVICE_ROLE="$2"; shift 2 ;;
        --instance-profile) need_value "$@"; INSTANCE_PROFILE="$2"; shift 2 ;;
        --subnet-id) need_value "$@"; SUBNET_ID="$2"; shift 2 ;;
        --security-configuration) need_value "$@"; SECURITY_CONFIGURATION="$2"; shift 2 ;;
        --sse-kms-key-id) need_value "$@"; SSE_KMS_KEY_ID="$2"; shift 2 ;;
        --endpoint-url) need_value "$@"; ENDPOINT_URL="$2"; shift 2 ;;
        --allow-non-eu-region) ALLOW_NON_EU_REGION=true; shift ;;
        --wait) WAIT=true; shift ;;
        --dry-run) DRY_RUN=true; shift ;;
        --submit) need_value "$@"; MODE="submit"; CLUSTER_ID="$2"; shift 2 ;;
        --terminate) need_value "$@"; MODE="terminate"; CLUSTER_ID="$2"; shift 2 ;;
        --print-policy) MODE="policy"; shift ;;
        --) shift; DRIVER_EXTRA=("$@"); break ;;
        *) die_usage "unknown option '$1'" ;;
    esac
done

# ---- checks: before anything is uploaded or created -----------------------------------------
if [[ "$MODE" == submit || "$MODE" == terminate ]]; then
    [[ "$CLUSTER_ID" =~ ^j-[A-Z0-9]+$ ]] || die_usage "cluster id must look like j-XXXXXXXX, got '$CLUSTER_ID'"
fi
PACKED_ENV_CACHE="${PACKED_ENV_CACHE:-$HERE/.packed-env}"
if [[ -z "$PYTHON" ]]; then
    if [[ -x "$HERE/.venv/bin/python" ]]; then PYTHON="$HERE/.venv/bin/python"; else PYTHON="python3"; fi
fi
# Set by extractor.deploy.plan, which checks every other setting (the EU region, counts, the
# release, the weights, the job's S3 locations by the rules the job applies at its start) and
# works out the rest: a setting the cluster or the job would refuse is refused before anything
# is uploaded or created. Terminating needs none of it, nor a working Python.
JOB_LOG="" WEIGHTS_S3=""
DRIVER_ARGS=() POLICY_ARGS=() CLUSTER_ARGS=()
if [[ "$MODE" != terminate ]]; then
    PLAN_ARGS=(--mode "$MODE" --prog "$PROG" --region "$REGION" --release "$RELEASE"
               --instance-type "$INSTANCE_TYPE" --core-type "$CORE_TYPE" --core-count "$CORE_COUNT"
               --task-type "$TASK_TYPE" --task-count "$TASK_COUNT" --idle-timeout "$IDLE_TIMEOUT"
               --driver-memory "$DRIVER_MEMORY" --executor-memory "$EXECUTOR_MEMORY"
               --executor-overhead "$EXECUTOR_OVERHEAD" --executor-cores "$EXECUTOR_CORES"
               --bucket "$BUCKET" --code-prefix "$CODE_PREFIX" --log-uri "$LOG_URI"
               --env-prefix "$ENV_PREFIX" --input "$INPUT" --output "$OUTPUT" --weights "$WEIGHTS"
               --sse-kms-key-id "$SSE_KMS_KEY_ID")
    [[ "$ALLOW_NON_EU_REGION" == true ]] && PLAN_ARGS+=(--allow-non-eu-region)
    [[ "$SPOT" == true ]] && PLAN_ARGS+=(--spot)
    [[ "$PACKED_ENV" == true ]] && PLAN_ARGS+=(--packed-env)
    [[ "$AUTO_TERMINATE" == true ]] && PLAN_ARGS+=(--auto-terminate)
    PLAN="$(python_step "could not check the settings with $PYTHON -m extractor.deploy.plan" \
        extractor.deploy.plan "${PLAN_ARGS[@]}" -- "${DRIVER_EXTRA[@]+"${DRIVER_EXTRA[@]}"}")"
    eval "$PLAN"  # shell assignments, each value quoted by Python's shlex.quote
fi

# ---- helpers ----------------------------------------------------------------------------------
AWS_GLOBAL=(--region "$REGION")
[[ -n "$ENDPOINT_URL" ]] && AWS_GLOBAL+=(--endpoint-url "$ENDPOINT_URL")

# Run an AWS CLI command, or only print it with --dry-run.
aws_run() {
    if [[ "$DRY_RUN" == true ]]; then
        printf '+ %s' "$AWS_CLI" >&2
        printf ' %q' "${AWS_GLOBAL[@]}" "$@" >&2
        printf '\n' >&2
        return 0
    fi
    "$AWS_CLI" "${AWS_GLOBAL[@]}" "$@"
}

SSE_ARGS=(--sse AES256)
[[ -n "$SSE_KMS_KEY_ID" ]] && SSE_ARGS=(--sse aws:kms --sse-kms-key-id "$SSE_KMS_KEY_ID")

upload() {  # upload FILE S3_URI, encrypted
    aws_run s3 cp --only-show-errors "${SSE_ARGS[@]}" "$1" "$2"
}

# ---- terminate ---------------------------------------------------------------------------------
if [[ "$MODE" == terminate ]]; then
    aws_run emr terminate-clusters --cluster-ids "$CLUSTER_ID"
    echo "termination requested for $CLUSTER_ID ($REGION)"
    if [[ "$WAIT" == true ]]; then
        aws_run emr wait cluster-terminated --cluster-id "$CLUSTER_ID"
        echo "$CLUSTER_ID terminated"
    fi
    exit 0
fi

if [[ "$MODE" == policy ]]; then
    (cd "$HERE" && "$PYTHON" -m extractor.deploy.iam "${POLICY_ARGS[@]}")
    exit 0
fi

# ---- package and upload --------------------------------------------------------------------------
if [[ "$DRY_RUN" == true ]]; then
    # Kept: the commands printed name these documents, and whoever reviews a cluster before
    # paying for it (instance groups, Spot, node labels, executor sizes, bootstrap) reads them.
    DIST="$(mktemp -d "${TMPDIR:-/tmp}/fruits-dry-run.XXXXXX")"
else
    DIST="$(mktemp -d)"
    trap 'rm -rf "$DIST"' EXIT
fi
(cd "$HERE" && "$PYTHON" -m extractor.driver.package "$DIST" >/dev/null) || die "could not build extractor.zip"
# extractor.deploy.emr (with extractor.deploy.instances) owns the cluster rules (GPU with CPU task nodes, Spot
# without task nodes, float16 on CPUs...): its one-line refusal becomes this script's.
python_step "could not write the EMR documents" extractor.deploy.emr "$DIST" --code-prefix "$CODE_PREFIX" \
    "${CLUSTER_ARGS[@]}" -- "${DRIVER_ARGS[@]}" >&2
NODE_KIND="$(cat "$DIST/node-kind")"  # gpu or cpu: what the executors run on

PACKED_ENV_URI=""
if [[ "$PACKED_ENV" == true ]]; then
    PIN_ARGS=(--print-requirements "$HERE/requirements.txt")
    [[ "$NODE_KIND" == gpu ]] && PIN_ARGS+=(--gpu)  # the CUDA build runs on the CPU nodes too
    "$HERE/bootstrap/install_packages.sh" "${PIN_ARGS[@]}" > "$DIST/cluster-pins.txt"
    if [[ "$DRY_RUN" == true ]]; then
        echo "dry run: the packed environment ($NODE_KIND) is not built" >&2
        PACKED_ENV_URI="${ENV_PREFIX}fruits-env-DRY-RUN.tar.gz"
    else
        echo "building (or reusing) the packed environment in $PACKED_ENV_CACHE" >&2
        ARCHIVE="$(cd "$HERE" && "$PYTHON" -m extractor.deploy.packed_env --pins "$DIST/cluster-pins.txt" \
            --out "$PACKED_ENV_CACHE" --wheels "$PACKED_ENV_CACHE/wheels" --label "$NODE_KIND")" \
            || die "could not build the packed environment"
        PACKED_ENV_URI="${ENV_PREFIX}$(basename "$ARCHIVE")"
    fi
    # Written again, now with the archive (the first pass checked the cluster before the build).
    python_step "could not write the EMR documents" extractor.deploy.emr "$DIST" --code-prefix "$CODE_PREFIX" \
        "${CLUSTER_ARGS[@]}" --packed-env-uri "$PACKED_ENV_URI" -- "${DRIVER_ARGS[@]}" >/dev/null
fi

echo "uploading the code to $CODE_PREFIX" >&2
# A folder shaped like the code prefix (links to the files), uploaded by one CLI call: every
# start of the AWS CLI costs ~0.7 s, and there were four or five of them here.
CODE_DIR="$DIST/code"
mkdir -p "$CODE_DIR/bootstrap"
ln -s "$HERE/driver.py" "$CODE_DIR/driver.py"
ln -s "$DIST/extractor.zip" "$CODE_DIR/extractor.zip"
ln -s "$HERE/requirements.txt" "$CODE_DIR/requirements.txt"
ln -s "$HERE/bootstrap/install_packages.sh" "$CODE_DIR/bootstrap/install_packages.sh"
if [[ -n "$WEIGHTS_S3" && "$WEIGHTS" != s3://* ]]; then
    mkdir -p "$CODE_DIR/weights"
    ln -s "$(realpath "$WEIGHTS")" "$CODE_DIR/weights/$(basename "$WEIGHTS_S3")"
fi
aws_run s3 cp --recursive --follow-symlinks --only-show-errors "${SSE_ARGS[@]}" "$CODE_DIR/" "$CODE_PREFIX"
if [[ -n "$PACKED_ENV_URI" ]]; then
    # Named by its content: an archive already there is the same bytes, not uploaded again.
    ENV_LOCATION="${PACKED_ENV_URI#s3://}"
    if [[ "$DRY_RUN" != true ]] && "$AWS_CLI" "${AWS_GLOBAL[@]}" s3api head-object \
            --bucket "${ENV_LOCATION%%/*}" --key "${ENV_LOCATION#*/}" >/dev/null 2>&1; then
        echo "packed environment already in $PACKED_ENV_URI" >&2
    else
        upload "${ARCHIVE:-$PACKED_ENV_CACHE/$(basename "$PACKED_ENV_URI")}" "$PACKED_ENV_URI"
    fi
fi

# ---- create, or submit -----------------------------------------------------------------------------
if [[ "$MODE" == submit ]]; then
    STEP_ID="$(aws_run emr add-steps --cluster-id "$CLUSTER_ID" --steps "file://$DIST/steps.json" \
        --query 'StepIds[0]' --output text)"
else
    EC2_ATTRIBUTES="InstanceProfile=$INSTANCE_PROFILE"
    [[ -n "$SUBNET_ID" ]] && EC2_ATTRIBUTES+=",SubnetId=$SUBNET_ID"
    CREATE_ARGS=(emr create-cluster
        --name "$CLUSTER_NAME"
        --release-label "$RELEASE"
        --applications Name=Spark
        --instance-groups "file://$DIST/instance-groups.json"
        --service-role "$SERVICE_ROLE"
        --ec2-attributes "$EC2_ATTRIBUTES"
        --log-uri "$LOG_URI"
        --bootstrap-actions "file://$DIST/bootstrap-actions.json"
        --configurations "file://$DIST/configurations.json"
        --steps "file://$DIST/steps.json"
        --auto-termination-policy "IdleTimeout=$IDLE_TIMEOUT"
        --tags "project=fruits-features" "data=personal-photos"
        --query ClusterId --output text)
    [[ -n "$SECURITY_CONFIGURATION" ]] && CREATE_ARGS+=(--security-configuration "$SECURITY_CONFIGURATION")
    if [[ "$AUTO_TERMINATE" == true ]]; then CREATE_ARGS+=(--auto-terminate); else CREATE_ARGS+=(--no-auto-terminate); fi
    CLUSTER_ID="$(aws_run "${CREATE_ARGS[@]}")"
    STEP_ID="$(aws_run emr list-steps --cluster-id "${CLUSTER_ID:-j-DRYRUN}" --query 'Steps[0].Id' --output text)"
fi

if [[ "$DRY_RUN" == true ]]; then
    echo "dry run: nothing was uploaded or created; the documents the commands above name are kept in $DIST/:" >&2
    for document in "$DIST"/*.json; do
        echo "--- file://$document" >&2
        cat "$document" >&2
        echo >&2
    done
    exit 0
fi

ENDPOINT_HINT=""
[[ -n "$ENDPOINT_URL" ]] && ENDPOINT_HINT=" --endpoint-url $ENDPOINT_URL"
cat <<EOF
cluster:   $CLUSTER_ID ($REGION, $RELEASE, 1 x $INSTANCE_TYPE + $CORE_COUNT x $CORE_TYPE$( (( TASK_COUNT > 0 )) && printf ' + %s x %s task' "$TASK_COUNT" "${TASK_TYPE:-$CORE_TYPE}")$( [[ "$SPOT" == true ]] && printf ' (Spot)'))
step:      $STEP_ID
follow:    aws emr describe-step --region $REGION$ENDPOINT_HINT --cluster-id $CLUSTER_ID --step-id $STEP_ID --query Step.Status
wait:      aws emr wait step-complete --region $REGION$ENDPOINT_HINT --cluster-id $CLUSTER_ID --step-id $STEP_ID
outputs:   $OUTPUT (manifest.json and _SUCCESS when done)
job log:   $JOB_LOG
EMR logs:  ${LOG_URI%/}/$CLUSTER_ID/
terminate: $PROG --terminate $CLUSTER_ID --region $REGION
EOF
if [[ "$WAIT" == true ]]; then
    aws_run emr wait step-complete --cluster-id "$CLUSTER_ID" --step-id "$STEP_ID"
    echo "step $STEP_ID completed"
fi
