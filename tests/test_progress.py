"""Progress lines, log shipping during a stage, the terminal bar: without Spark, on a fake clock."""

import io
import logging
import re

import pytest

from extractor.driver.logs import FORMAT, ConsoleHandler, LogShipper
from extractor.driver.progress import ProgressReporter, Tracked, format_eta, progress_line
from extractor.storage.s3 import S3Location, S3Settings

from conftest import REGION, unique_bucket

LINE = re.compile(r"featurize: ([\d,]+) / ([\d,]+) images")


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Counter:
    def __init__(self):
        self.value = 0


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)

    @property
    def messages(self):
        return [r.getMessage() for r in self.records]


def make_logger(name, *handlers):
    logger = logging.getLogger(name)
    logger.handlers[:] = list(handlers)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


class RecordingShipper:
    def __init__(self):
        self.calls = []

    def ship(self, only_if_changed=False):
        self.calls.append(only_if_changed)
        return True


def test_progress_lines_rise_to_the_total_with_rate_eta_and_tasks():
    clock, done, failed, lines = Clock(), Counter(), Counter(), Lines()
    logger = make_logger("test.progress.lines", lines)
    reporter = ProgressReporter(logger, interval=10, ship_interval=0, clock=clock,
                                tasks=lambda group: (3, 2, 10) if group == "g" else None)
    tracked = Tracked("featurize", 1000, lambda: done.value, failed=lambda: failed.value, group="g")
    with reporter.track(tracked):
        for step in range(1, 10):
            clock.now = 5.0 * step            # lines are due at t = 10, 20, 30, 40
            done.value, failed.value = 100 * step, step
            reporter.poll(clock.now)
        clock.now, done.value, failed.value = 47.0, 1000, 12
    counts = [int(LINE.match(m)[1].replace(",", "")) for m in lines.messages]
    assert counts == [200, 400, 600, 800, 1000]       # four due lines and the stage's last
    assert lines.messages[0] == ("featurize: 200 / 1,000 images (20.0 %), 2 failed, 20.0 images/s over the last "
                                 "10 s, ETA 00:00:40; tasks 3 / 10 done, 2 running")
    assert lines.messages[-1].startswith("featurize: 1,000 / 1,000 images (100.0 %), 12 failed, ")
    assert "ETA 00:00:00" in lines.messages[-1]
    assert all(getattr(r, "progress", False) for r in lines.records)
    assert reporter.lines == 5


def test_a_task_counted_twice_never_shows_more_than_the_total():
    clock, done, lines = Clock(), Counter(), Lines()
    reporter = ProgressReporter(make_logger("test.progress.clamp", lines), interval=1, ship_interval=0, clock=clock)
    with reporter.track(Tracked("featurize", 50, lambda: done.value)):
        clock.now, done.value = 1.0, 70      # a retried task's accumulator updates land twice
        reporter.poll(clock.now)
    assert all(LINE.match(m)[1] == "50" for m in lines.messages)
    assert "ETA" in lines.messages[0] and "failed" not in lines.messages[0]


def test_eta_and_line_format():
    assert format_eta(None) == "unknown"
    assert format_eta(1802.4) == "00:30:02"
    assert format_eta(3 * 3600 + 61) == "03:01:01"
    line = progress_line(Tracked("assemble", 9, lambda: 0, unit="files"), 0, None, 0.0, 30, None, None)
    assert line == "assemble: 0 / 9 files (0.0 %), 0.0 files/s over the last 30 s, ETA unknown"


def test_interval_zero_reports_nothing_but_still_ships():
    clock, done, lines, shipper = Clock(), Counter(), Lines(), RecordingShipper()
    reporter = ProgressReporter(make_logger("test.progress.off", lines), interval=0, shipper=shipper,
                                ship_interval=60, clock=clock)
    with reporter.track(Tracked("featurize", 10, lambda: done.value)):
        for t in range(0, 200, 5):
            clock.now = float(t)
            reporter.poll(clock.now)
    assert lines.messages == []
    assert shipper.calls == [True, True, True]          # t = 60, 120, 180: only when the log grew


def test_the_log_is_shipped_at_most_every_interval():
    clock, shipper = Clock(), RecordingShipper()
    reporter = ProgressReporter(make_logger("test.progress.ship", Lines()), interval=1, shipper=shipper,
                                ship_interval=10, clock=clock)
    for t in range(1, 36):
        clock.now = float(t)
        reporter.poll(clock.now)
    assert len(shipper.calls) == 3                      # t = 10, 20, 30
    assert ProgressReporter(make_logger("test.progress.noship", Lines()), shipper=shipper,
                            ship_interval=0).shipper is None


def test_log_shipper_uploads_only_what_grew_and_counts_failures(s3_mock, tmp_path):
    bucket = unique_bucket()
    path = tmp_path / "run.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger = make_logger("test.progress.shipper", handler)
    logger.info("first line")
    shipper = LogShipper(s3_mock, S3Settings(region=REGION, max_attempts=1), S3Location(bucket, "logs/"),
                         str(path), logger)
    assert shipper.ship() is False                      # no such bucket yet: counted, never raised
    assert (shipper.uploads, shipper.failures) == (0, 1)
    s3_mock.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    assert shipper.ship(only_if_changed=True) is True   # the failed upload is tried again
    uploaded = s3_mock.get_object(Bucket=bucket, Key="logs/run.log")["Body"].read().decode()
    assert "first line" in uploaded and "could not upload the log" in uploaded
    assert shipper.ship(only_if_changed=True) is True   # nothing new: no upload
    assert shipper.uploads == 1
    logger.info("second line")
    shipper.ship(only_if_changed=True)
    assert shipper.uploads == 2
    assert "second line" in s3_mock.get_object(Bucket=bucket, Key="logs/run.log")["Body"].read().decode()
    assert shipper.as_manifest() == {"uri": f"s3://{bucket}/logs/run.log", "uploads": 2, "upload_failures": 1}


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_bar_and_the_file_gets_the_lines(tmp_path):
    terminal, lines = Terminal(), Lines()
    console = ConsoleHandler(terminal)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger = make_logger("test.progress.bar", console, lines)
    clock, done = Clock(), Counter()
    reporter = ProgressReporter(logger, interval=1, ship_interval=0, clock=clock)
    assert reporter.bar_enabled
    with reporter.track(Tracked("featurize", 40, lambda: done.value)):
        for step in range(1, 5):
            clock.now, done.value = float(step), 10 * step
            reporter.poll(clock.now)
        logger.warning("an ordinary line while the bar is drawn")
    shown = terminal.getvalue()
    assert "40/40" in shown and "images" in shown       # tqdm's bar, closed at the total
    assert "images/s over the last" not in shown          # the progress lines are the bar's
    assert "an ordinary line while the bar is drawn" in shown
    assert sum(1 for m in lines.messages if LINE.match(m)) == 5    # the log file still has them all
    assert console.bar is None


def test_no_bar_when_the_console_is_not_a_terminal():
    console = ConsoleHandler(io.StringIO())
    reporter = ProgressReporter(make_logger("test.progress.nobar", console), interval=1)
    assert not reporter.bar_enabled
    assert not ProgressReporter(make_logger("test.progress.nohandler", Lines()), interval=1).bar_enabled


def test_the_thread_starts_only_when_it_has_work_and_stops():
    logger = make_logger("test.progress.thread", Lines())
    idle = ProgressReporter(logger, interval=0, ship_interval=0).start()
    assert idle._thread is None
    with ProgressReporter(logger, interval=30) as busy:
        assert busy._thread.is_alive()
    assert not busy._thread.is_alive()


@pytest.mark.parametrize("option", ["--progress-interval", "--log-ship-interval"])
@pytest.mark.parametrize("value", ["-1", "nan"])
def test_negative_intervals_are_refused(option, value, capsys):
    from extractor.driver.config import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--input", "s3://b/in/", "--output", "s3://b/out/", option, value])
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err
