"""The package shipped to the cluster: only what runs there, and shipped by the driver itself
when spark-submit was given no --py-files (a real spark-submit started where nothing provides
the package: test_e2e.py::test_end_to_end_every_output)."""

import ast
import subprocess
import sys
import zipfile

import pytest

from extractor import MAY_IMPORT
from extractor.driver.package import PACKAGE, build_zip, ship_to_workers


def test_the_zip_leaves_out_the_dev_tools_the_deployment_and_erasure_and_every_module_in_it_imports_from_it(tmp_path):
    archive = build_zip(tmp_path / "dist")
    names = zipfile.ZipFile(archive).namelist()
    shipped = sorted(str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
                     if not {"dev", "deploy", "forget", "__pycache__"} & set(p.relative_to(PACKAGE).parts[:-1]))
    assert names == shipped and "extractor/driver/job.py" in names
    assert not [n for n in names if n.startswith(("extractor/dev/", "extractor/deploy/", "extractor/forget/"))]
    assert (PACKAGE / "dev" / "demo.py").is_file() and (PACKAGE / "deploy" / "emr.py").is_file() \
        and (PACKAGE / "forget" / "command.py").is_file()
    modules = [n[:-3].replace("/", ".") for n in names if not n.endswith(("__init__.py", "__main__.py"))]
    # Only the zip provides the package: a shipped module importing a dev one would fail here.
    code = (f"import sys; sys.path.insert(0, {str(archive)!r}); import importlib\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "import extractor; assert extractor.__file__.startswith(sys.path[0]), extractor.__file__\n"
            "for folder in ('dev', 'deploy', 'forget'):\n"
            "    try:\n        importlib.import_module('extractor.' + folder)\n"
            "    except ModuleNotFoundError:\n        print('no', folder)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:3] == ["no dev", "no deploy", "no forget"]


def imports_of(source: str, module: str) -> list[tuple[int, str]]:
    """``(line, imported name)`` of every import statement in ``source`` (lazy ones too), relative
    ones resolved from ``module``'s package; ``from a import b`` gives ``a`` and ``a.b``."""
    package = module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found += [(node.lineno, target)] + [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def part_of(name: str) -> str | None:
    """The part (``MAY_IMPORT``'s key) a module of the package belongs to; None outside it.
    ``extractor.errors`` and the package itself are the top's (""); so is ``extractor.X`` when
    X is a name the top module defines (``from extractor import __version__``)."""
    parts = name.split(".")
    if parts[0] != "extractor":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in MAY_IMPORT else ""


def rule_breaks(source: str, module: str) -> list[str]:
    """The imports of ``module`` (source given) against the import rule, as ``line: name``: a part
    it may not import, or pyspark beyond ``TaskContext`` outside the driver and the dev tools."""
    own = part_of(module)
    allowed = {own, *MAY_IMPORT[own]}
    breaks = []
    for line, name in imports_of(source, module):
        target = part_of(name)
        if target is not None and target not in allowed:
            breaks.append(f"{line}: {name}")
        elif name.split(".")[0] == "pyspark" and own not in ("driver", "dev") \
                and name not in ("pyspark", "pyspark.TaskContext"):
            breaks.append(f"{line}: {name}")
    return breaks


def test_every_import_follows_the_package_rule():
    """extractor.MAY_IMPORT, read from every module of every part: the executors' code imports
    nothing of the driver, nothing shipped imports deploy or dev (so the zip can leave them out)."""
    modules = {".".join(("extractor", *path.relative_to(PACKAGE).with_suffix("").parts)): path
               for path in sorted(PACKAGE.rglob("*.py"))}
    folders = {path.relative_to(PACKAGE).parts[0] for path in modules.values() if path.parent != PACKAGE}
    assert folders | {""} == set(MAY_IMPORT)   # no folder outside the rule, no rule for a folder gone
    offenders = {name: rule_breaks(path.read_text(), name) for name, path in modules.items()}
    assert {name: lines for name, lines in offenders.items() if lines} == {}


@pytest.mark.parametrize("module, source, breaks", [
    ("extractor.executor.models", "from extractor.driver.spark import job_group",
     ["1: extractor.driver.spark", "1: extractor.driver.spark.job_group"]),
    ("extractor.executor.featurize", "def f():\n    from extractor.driver import job",
     ["2: extractor.driver", "2: extractor.driver.job"]),
    ("extractor.storage.s3", "from ..results import pca", ["1: extractor.results", "1: extractor.results.pca"]),
    ("extractor.driver.job", "import extractor.deploy.iam", ["1: extractor.deploy.iam"]),
    ("extractor.results.pca", "from pyspark import SparkContext", ["1: pyspark.SparkContext"]),
    ("extractor.executor.gpu", "from pyspark import TaskContext", []),
    ("extractor.driver.job", "from extractor.executor import featurize\nfrom pyspark import SparkContext", []),
    ("extractor.errors", "from extractor.storage import s3", ["1: extractor.storage", "1: extractor.storage.s3"]),
])
def test_the_rule_check_finds_an_import_against_it(module, source, breaks):
    assert rule_breaks(source, module) == breaks


class RecordingContext:
    def __init__(self, submitted: str | None = None):
        self.py_files = []
        self.conf = {"spark.submit.pyFiles": submitted} if submitted is not None else {}

    def addPyFile(self, path):
        self.py_files.append(path)

    def getConf(self):
        return self

    def get(self, key, default=None):
        return self.conf.get(key, default)


def test_a_driver_run_from_the_sources_ships_the_same_zip(tmp_path):
    sc = RecordingContext()
    shipped = ship_to_workers(sc)
    assert sc.py_files == [str(shipped)]
    assert shipped.read_bytes() == build_zip(tmp_path).read_bytes()


def test_a_zip_given_with_py_files_is_not_shipped_twice():
    """Spark refuses a second file of the same name; the one spark-submit ships is the package."""
    sc = RecordingContext("file:/opt/deps.zip,s3://code-bucket/fruits-code/20261202T000000Z/extractor.zip")
    assert ship_to_workers(sc) is None and sc.py_files == []
    other = RecordingContext("file:/opt/deps.zip")  # other dependencies only: the package still travels
    assert ship_to_workers(other) is not None and len(other.py_files) == 1


def test_a_driver_run_from_the_zip_ships_nothing(tmp_path):
    archive = build_zip(tmp_path / "dist")
    code = (f"import sys; sys.path.insert(0, {str(archive)!r})\n"
            "from extractor.driver.package import ship_to_workers\n"
            "class Context:\n    def addPyFile(self, path): raise AssertionError(path)\n"
            "print(ship_to_workers(Context()))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "None"
