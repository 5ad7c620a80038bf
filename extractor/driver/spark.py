"""What the job asks of Spark itself: its own reading of a memory setting, and a failed Spark
job told in one line from Py4J's structured exception rather than from its text.

Nothing here imports pyspark at import time; every function takes the SparkContext.
"""

from __future__ import annotations

import secrets
from contextlib import contextmanager

from extractor.errors import JobError

_PYTHON_EXCEPTION = "org.apache.spark.api.python.PythonException"
_MAX_LINE = 500


def memory_bytes(sc, value: str, bare: str = "MiB") -> int:
    """Bytes of a Spark memory setting as Spark reads it: a number without a unit is MiB for
    spark.driver.memory (``bare="MiB"``), bytes for spark.driver.maxResultSize (``bare="bytes"``).
    ValueError (naming the value) for what Spark refuses."""
    if bare not in ("MiB", "bytes"):
        raise ValueError(f"bare must be 'MiB' or 'bytes', got {bare!r}")
    utils = sc._jvm.org.apache.spark.network.util.JavaUtils
    try:
        # The parsers behind every Spark memory setting (spark.driver.memory, executor memory...).
        if bare == "MiB":
            return int(utils.byteStringAsMb(value)) * 2**20
        return int(utils.byteStringAsBytes(value))
    except Exception as exc:
        if not is_spark_error(exc):
            raise
        # Py4JJavaError, or PySpark's converted NumberFormatException once a SparkSession exists.
        java = getattr(exc, "java_exception", None)
        message = java.getMessage() if java is not None else str(exc)
        raise ValueError(f"Spark cannot read the memory size {value!r}: {_first_line(str(message))}") from None


def driver_memory(sc) -> tuple[str, int]:
    """``spark.driver.memory`` as set (Spark's default 1g when unset) and in bytes."""
    text = sc.getConf().get("spark.driver.memory", "1g")
    return text, memory_bytes(sc, text)


def max_result_size(sc) -> tuple[str, int]:
    """``spark.driver.maxResultSize`` as set (Spark's default 1g when unset) and in bytes; 0 is
    no limit. Spark fails an action whose tasks' results add up to more, after they ran."""
    text = sc.getConf().get("spark.driver.maxResultSize", "1g")
    return text, memory_bytes(sc, text, bare="bytes")


def failure_summary(exc: BaseException) -> str:
    """One line for a failed Spark job: the Python exception a task raised (``RuntimeError:
    ...``) when there is one in the Java exception's chain of causes, else the innermost Java
    cause (``org.apache.spark.SparkException: Job aborted ...``), else the exception itself."""
    java = getattr(exc, "java_exception", None)
    if java is None:
        return _first_line(f"{type(exc).__name__}: {exc}")
    innermost = java
    while java is not None:
        if java.getClass().getName() == _PYTHON_EXCEPTION:
            return _first_line(python_exception_line(str(java.getMessage() or "")))
        innermost, java = java, java.getCause()
    return _first_line(f"{innermost.getClass().getName()}: {innermost.getMessage()}")


def python_exception_line(traceback_text: str) -> str:
    """The exception line of a Python traceback as ``traceback.format_exception`` writes it
    (the first line after the last frame's source lines); the whole text if it has no frame."""
    lines = traceback_text.splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith('  File "')]
    if not frames:
        return traceback_text.strip()
    rest = lines[frames[-1] + 1:]
    while rest and rest[0].startswith("    "):  # the frame's source line and its ^^^ markers
        rest = rest[1:]
    return rest[0] if rest else traceback_text.strip()


def _first_line(text: str) -> str:
    stripped = text.strip()
    return (stripped.splitlines()[0] if stripped else text)[:_MAX_LINE]


def is_spark_error(exc: BaseException) -> bool:
    """Raised by Py4J or PySpark: a Spark job (or the JVM) failed."""
    return type(exc).__module__.startswith(("py4j", "pyspark"))


@contextmanager
def failed_job_as_error(spark_errors_only: bool = False):
    """Turn a failure inside the block into a JobError of one line ("Spark job failed: ...");
    with ``spark_errors_only``, only failures raised by Py4J or PySpark. JobErrors pass as they are."""
    try:
        yield
    except JobError:
        raise
    except Exception as exc:
        if spark_errors_only and not is_spark_error(exc):
            raise
        raise JobError(f"Spark job failed: {failure_summary(exc)}") from exc


@contextmanager
def job_group(sc, name: str, description: str):
    """Every Spark job started in the block (from this thread) carries ``description`` in the
    Spark UI and the history server, under a job group unique to this call. Yields the group."""
    group = f"fruits-{name}-{secrets.token_hex(4)}"  # unique: one SparkContext may serve many runs
    sc.setJobGroup(group, description, interruptOnCancel=False)
    try:
        yield group
    finally:
        for prop in ("spark.jobGroup.id", "spark.job.description", "spark.job.interruptOnCancel"):
            sc.setLocalProperty(prop, None)


def task_counts(sc):
    """A function: job group -> (tasks done, running, total) over the stages of the group's jobs
    that have started (a skipped stage would count tasks that never run), or None before any."""
    tracker = sc.statusTracker()

    def counts(group: str):
        done = running = total = 0
        started = False
        for job_id in tracker.getJobIdsForGroup(group):
            job = tracker.getJobInfo(job_id)
            for stage_id in job.stageIds if job is not None else ():
                stage = tracker.getStageInfo(stage_id)
                if stage is None or not (stage.numCompletedTasks or stage.numActiveTasks):
                    continue
                started = True
                done += stage.numCompletedTasks
                running += stage.numActiveTasks
                total += stage.numTasks
        return (done, running, total) if started else None

    return counts
