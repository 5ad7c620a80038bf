"""The package shipped to the cluster: only what runs there, and shipped by the driver itself
when spark-submit was given no --py-files (a real spark-submit started where nothing provides
the package: test_e2e.py::test_end_to_end_every_output)."""

import subprocess
import sys
import zipfile

from extractor.driver.package import PACKAGE, build_zip, ship_to_workers


def test_the_zip_leaves_out_the_dev_tools_and_the_deployment_and_every_module_in_it_imports_from_it(tmp_path):
    archive = build_zip(tmp_path / "dist")
    names = zipfile.ZipFile(archive).namelist()
    shipped = sorted(str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
                     if not {"dev", "deploy", "__pycache__"} & set(p.relative_to(PACKAGE).parts[:-1]))
    assert names == shipped and "extractor/driver/job.py" in names
    assert not [n for n in names if n.startswith(("extractor/dev/", "extractor/deploy/"))]
    assert (PACKAGE / "dev" / "demo.py").is_file() and (PACKAGE / "deploy" / "emr.py").is_file()
    modules = [n[:-3].replace("/", ".") for n in names if not n.endswith(("__init__.py", "__main__.py"))]
    # Only the zip provides the package: a shipped module importing a dev one would fail here.
    code = (f"import sys; sys.path.insert(0, {str(archive)!r}); import importlib\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "import extractor; assert extractor.__file__.startswith(sys.path[0]), extractor.__file__\n"
            "for folder in ('dev', 'deploy'):\n"
            "    try:\n        importlib.import_module('extractor.' + folder)\n"
            "    except ModuleNotFoundError:\n        print('no', folder)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:2] == ["no dev", "no deploy"]


def test_only_the_deployment_and_the_dev_tools_import_the_deployment():
    """The import rule of extractor.deploy (its package docstring): the job never imports it, so
    the zip can leave it out. Every import statement of every module is read, lazy ones too."""
    import ast

    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = path.relative_to(PACKAGE).parts[0]
        if part in ("deploy", "dev"):
            continue
        package = ["extractor", *path.relative_to(PACKAGE).parts[:-1]]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if any(name == "extractor.deploy" or name.startswith("extractor.deploy.") for name in names):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []
    assert (PACKAGE / "executor" / "feeding.py").read_text().count("from extractor.executor.rates import") == 1   # the rule's last crossing, gone


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
