"""The packed environment (extractor.deploy.packed_env): the real cluster pins, built once, unpacked and
imported by a Python 3.11 that is not this venv with nothing but PYTHONPATH, as spark.archives
and PYTHONPATH=./pyenv/site-packages give it on EMR."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from extractor.deploy import packed_env
from extractor.deploy.packed_env import FIXED_MTIME, MANIFEST, archive_name, build, layout, read_pins, sha256, site_path

from conftest import REPO

BOOTSTRAP = REPO / "bootstrap" / "install_packages.sh"


def cluster_pins() -> list[str]:
    result = subprocess.run([str(BOOTSTRAP), "--print-requirements", str(REPO / "requirements.txt")],
                            capture_output=True, text=True, check=True)
    return result.stdout.split()


def pins_file(folder: Path, pins: list[str]) -> Path:
    path = folder / "pins.txt"
    path.write_text("\n".join(pins) + "\n")
    return path


def small_pins() -> list[str]:
    """Three cluster pins (two with native code and bundled .libs, one pure): the build's code
    path at a fraction of the full set's minute."""
    return [pin for pin in cluster_pins() if pin.split("==")[0] in ("numpy", "pillow", "tqdm")]


def extract(archive: Path, folder: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(folder, filter="data")
        else:  # Python < 3.11.4
            tar.extractall(folder)
        return tar.getmembers()


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """One wheel cache for the module: later builds find their wheels already downloaded."""
    return tmp_path_factory.mktemp("wheels")


@pytest.fixture(scope="module")
def cluster_env(tmp_path_factory, wheels):
    """The archive of every cluster pin, and its extracted tree (removed afterwards: ~2 GB)."""
    folder = tmp_path_factory.mktemp("cluster-env")
    started = time.monotonic()
    archive = build(pins_file(folder, cluster_pins()), folder / "out", wheels, label="cpu")
    seconds = time.monotonic() - started
    members = extract(archive, folder / "tree")
    sys.stderr.write(f"\n{archive.name}: {archive.stat().st_size / 1e6:.0f} MB, built in {seconds:.0f} s\n")
    yield archive, folder / "tree", members
    shutil.rmtree(folder, ignore_errors=True)


def bare_python311() -> str:
    """The path of a CPython 3.11 other than this venv's (EMR's own path first), or a skip."""
    for candidate in ("/usr/bin/python3.11", shutil.which("python3.11"), str(Path(sys.base_prefix, "bin", "python3.11"))):
        if not candidate or not Path(candidate).exists():
            continue
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 11)); "
                                "print(sys.prefix); print(sys.executable)"], capture_output=True, text=True)
        lines = probe.stdout.splitlines()
        if probe.returncode == 0 and lines[0] == "True" and Path(lines[1]).resolve() != Path(sys.prefix).resolve():
            return lines[2]
    pytest.skip("no Python 3.11 outside this venv")


IMPORT_AND_COMPUTE = r"""
import importlib.metadata, io, json, os, sys, sysconfig
import boto3, keras, numpy, PIL, PIL.Image, pyarrow, pyarrow.compute, tensorflow
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

site, pins = sys.argv[1], json.loads(sys.argv[2])
stdlib = (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"])
modules = {"tensorflow": tensorflow, "keras": keras, "numpy": numpy, "PIL": PIL, "boto3": boto3, "pyarrow": pyarrow}
png = io.BytesIO()
PIL.Image.new("RGB", (4, 4), "red").save(png, "PNG")
figure = plt.figure(figsize=(1, 1))
plt.plot([0, 1], [1, 0])
figure.savefig(io.BytesIO(), format="png")
print(json.dumps({
    "files": {name: module.__file__ for name, module in modules.items()},
    "versions": {name: module.__version__ for name, module in modules.items()},
    "metadata": {name: importlib.metadata.version(name) for name in pins},
    "located": {name: str(importlib.metadata.distribution(name).locate_file("")) for name in pins},
    # Every loaded module comes from the archive or the standard library: nothing leaked in.
    "elsewhere": sorted(f for f in (getattr(m, "__file__", None) for m in list(sys.modules.values()))
                        if f and not os.path.abspath(f).startswith((site,) + stdlib)),
    "backend": keras.backend.backend(),
    "matmul": (numpy.arange(6.0).reshape(2, 3) @ numpy.ones((3, 2))).tolist(),
    "dense": numpy.asarray(keras.layers.Dense(2, kernel_initializer="ones")(numpy.ones((1, 3), "float32"))).tolist(),
    "tf_sum": float(tensorflow.reduce_sum(tensorflow.ones((3, 4)))),
    "arrow_sum": pyarrow.compute.sum(pyarrow.array([1, 2, 3])).as_py(),
    "png": png.getvalue()[:4].hex(),
    "s3": boto3.session.Session(region_name="eu-west-3").client("s3").meta.region_name,
}))
"""


@pytest.mark.slow
def test_every_cluster_pin_imports_and_computes_from_the_archive_alone(cluster_env, tmp_path):
    _, tree, _ = cluster_env
    site = os.path.realpath(tree / "site-packages")
    pins = dict(pin.split("==") for pin in cluster_pins())
    # A bare environment, and -S besides -s: the interpreter's own site-packages stay out too (with
    # only -s, Debian's python3.11 gave botocore pyOpenSSL from /usr/lib/python3/dist-packages).
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": site, "TF_CPP_MIN_LOG_LEVEL": "2",
           "MPLCONFIGDIR": str(tmp_path / "mpl"), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    result = subprocess.run([bare_python311(), "-s", "-S", "-c", IMPORT_AND_COMPUTE, site, json.dumps(sorted(pins))],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    for name, path in seen["files"].items():
        assert os.path.realpath(path).startswith(site + os.sep), (name, path)
    assert seen["elsewhere"] == []
    distribution = {"tensorflow": "tensorflow-cpu", "PIL": "pillow"}
    assert seen["versions"] == {name: pins[distribution.get(name, name)] for name in seen["versions"]}
    assert seen["metadata"] == pins  # the .dist-info folders came along
    assert all(os.path.realpath(path) == site for path in seen["located"].values()), seen["located"]
    assert seen["backend"] == "tensorflow"
    assert seen["matmul"] == [[3.0, 3.0], [12.0, 12.0]]
    assert seen["dense"] == [[3.0, 3.0]]
    assert seen["tf_sum"] == 12.0 and seen["arrow_sum"] == 6
    assert seen["png"] == "89504e47" and seen["s3"] == "eu-west-3"


@pytest.mark.slow
def test_archive_layout_manifest_and_normalized_headers(cluster_env, wheels):
    archive, tree, members = cluster_env
    head = archive.read_bytes()[:10]
    assert head[3] == 0 and head[4:8] == b"\0\0\0\0"  # gzip: no FNAME flag, mtime 0
    names = [m.name for m in members]
    assert names == sorted(names)
    assert {name.split("/")[0] for name in names} == {MANIFEST, "site-packages"}
    assert all(m.uid == m.gid == 0 and m.uname == m.gname == "" and m.mtime == FIXED_MTIME for m in members)
    assert all(m.mode == 0o755 for m in members if m.isdir())
    assert {m.mode for m in members if m.isfile()} == {0o644, 0o755}
    assert all(m.isdir() or m.isfile() for m in members)

    manifest = json.loads((tree / MANIFEST).read_text())
    hashes = {w["file"]: w["sha256"] for w in manifest["wheels"]}
    assert hashes == {name: sha256(wheels / name) for name in hashes}
    assert archive.name == archive_name(hashes, "cpu")
    pinned = {pin.split("==")[0].replace("-", "_") + "-" + pin.split("==")[1] for pin in cluster_pins()}
    assert pinned <= {"-".join(name.split("-")[:2]) for name in hashes}
    # What a CPU node would install resolves to wheels for EMR 7's CPython 3.11 on manylinux
    # x86_64 (the GPU nodes' set: test_deploy's resolve).
    assert manifest["pip_target"] == packed_env.PIP_TARGET
    for name in hashes:
        python, abi, platform = name[:-len(".whl")].split("-")[-3:]
        assert "cp311" in python.split(".") or abi == "abi3" or python.startswith(("py3", "py2.py3")), name
        assert platform == "any" or all(p.startswith("manylinux") and p.endswith("_x86_64")
                                        for p in platform.split(".")), name
    site = tree / "site-packages"
    assert not [p for p in site.iterdir() if p.name.endswith(".data")]  # merged or left out
    # The only .pth of the cluster pins: setuptools' distutils shim, which nothing above needed.
    assert manifest["pth_files"] == sorted(p.name for p in site.glob("*.pth")) == ["distutils-precedence.pth"]
    assert manifest["conflicts"] == []


def fake_wheel(folder: Path, name: str, files: dict, executable=()) -> Path:
    path = folder / name
    with zipfile.ZipFile(path, "w") as archive:
        for member, body in files.items():
            info = zipfile.ZipInfo(member)
            info.external_attr = (0o755 if member in executable else 0o644) << 16
            archive.writestr(info, body)
    return path


def test_unpacks_as_pip_installs_and_reports_conflicts_and_pth_files(tmp_path, monkeypatch, capsys):
    a = fake_wheel(tmp_path, "a-1.0-py3-none-any.whl", {
        "a/__init__.py": b"", "a-1.0.dist-info/METADATA": b"Name: a\nVersion: 1.0\n",
        "a-1.0.data/purelib/a_pure.py": b"", "a-1.0.data/platlib/a_native.so": b"\x7fELF",
        "a-1.0.data/scripts/a-tool": b"#!python", "a-1.0.data/headers/a.h": b"", "a-1.0.data/data/share/a.txt": b"",
        "shared/same.txt": b"same", "shared/clash.txt": b"from a", "a.pth": b"import a\n"},
        executable=["a-1.0.data/platlib/a_native.so"])
    b = fake_wheel(tmp_path, "b-1.0-py3-none-any.whl", {"b/__init__.py": b"", "shared/same.txt": b"same",
                                                         "shared/clash.txt": b"from b"})
    files, conflicts = layout([b, a])
    assert sorted(files) == ["a-1.0.dist-info/METADATA", "a.pth", "a/__init__.py", "a_native.so", "a_pure.py",
                             "b/__init__.py", "shared/clash.txt", "shared/same.txt"]
    assert conflicts == [f"shared/clash.txt: {a.name} replaced by {b.name}"]

    monkeypatch.setattr(packed_env, "download_wheels", lambda pins, folder: [a, b])
    archive = build(pins_file(tmp_path, ["a==1.0", "b==1.0"]), tmp_path / "out")
    assert "conflict: shared/clash.txt" in capsys.readouterr().err
    members = {m.name: m for m in extract(archive, tmp_path / "tree")}
    assert (tmp_path / "tree" / "site-packages" / "shared" / "clash.txt").read_bytes() == b"from b"
    assert members["site-packages/a_native.so"].mode == 0o755 and members["site-packages/a_pure.py"].mode == 0o644
    manifest = json.loads((tmp_path / "tree" / MANIFEST).read_text())
    assert manifest["pth_files"] == ["a.pth"] and len(manifest["conflicts"]) == 1
    with pytest.raises(ValueError, match="outside site-packages"):
        site_path("../../etc/passwd")


@pytest.mark.slow
def test_same_wheels_give_the_same_bytes(tmp_path, wheels):
    """Two builds at different times into different folders, on a small pin subset (numpy,
    pillow, tqdm at the cluster's versions; same code path as the full set)."""
    pins = pins_file(tmp_path, small_pins())
    first = build(pins, tmp_path / "one", wheels)
    for wheel in wheels.iterdir():
        os.utime(wheel)
    time.sleep(1.1)
    second = build(pins, tmp_path / "two", wheels)
    assert first.name == second.name and first.parent != second.parent
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first, "r:gz") as tar:  # the manifest comes first: readable without extracting
        entry = tar.next()
        manifest = json.load(io.TextIOWrapper(tar.extractfile(entry)))
    assert entry.name == MANIFEST
    assert {w["file"].split("-")[0] for w in manifest["wheels"]} == {"numpy", "pillow", "tqdm"}


@pytest.mark.parametrize("line", ["numpy>=2.1", "numpy", "-r other.txt", "numpy==2.1.3 ; python_version < '3.12'",
                                  "https://example.com/numpy.whl"])
def test_a_pin_line_without_name_equals_version_fails_before_pip(tmp_path, monkeypatch, capsys, line):
    pins = tmp_path / "pins.txt"
    pins.write_text(f"# cluster\n\nsix==1.17.0  # fine\n{line}\n")
    with pytest.raises(ValueError, match=re.escape(f"pins.txt:4: expected name==version, got {line!r}")):
        read_pins(pins)
    monkeypatch.setattr(packed_env.subprocess, "Popen", None)  # pip must not run
    assert packed_env.main(["--pins", str(pins), "--out", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "expected name==version" in err


def test_empty_or_twice_pinned_files_and_the_cli_exit_status(tmp_path):
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    (tmp_path / "twice.txt").write_text("six==1.17.0\nSix==1.16.0\n")
    with pytest.raises(ValueError, match="no name==version line"):
        read_pins(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="twice.txt:2: Six is pinned twice"):
        read_pins(tmp_path / "twice.txt")
    result = subprocess.run([sys.executable, "-m", "extractor.deploy.packed_env", "--pins", str(tmp_path / "twice.txt"),
                             "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"packed_env: error: {tmp_path / 'twice.txt'}:2: Six is pinned twice\n"


@pytest.mark.slow
def test_cli_prints_the_archive_and_reuses_it(tmp_path, wheels, monkeypatch, capsys):
    pins = pins_file(tmp_path, small_pins())
    command = ["--pins", str(pins), "--out", str(tmp_path / "out"), "--wheels", str(wheels), "--label", "cpu"]
    result = subprocess.run([sys.executable, "-m", "extractor.deploy.packed_env", *command], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    archive = Path(result.stdout.strip())
    assert result.stdout == f"{archive}\n" and archive.parent == tmp_path / "out"
    assert archive.name.startswith("fruits-env-cpu-") and archive.name.endswith(".tar.gz")
    assert [p.name for p in archive.parent.iterdir()] == [archive.name]  # no partial file left
    os.utime(archive, ns=(10**18, 10**18))

    def no_rebuild(*args):
        raise AssertionError("rebuilt an existing archive")

    monkeypatch.setattr(packed_env, "write_archive", no_rebuild)
    assert packed_env.main(command) == 0
    out, err = capsys.readouterr()
    assert out == f"{archive}\n" and f"reusing {archive}" in err
    assert archive.stat().st_mtime_ns == 10**18


def test_module_needs_only_the_standard_library():
    """create_cluster.sh runs it with whatever python3 the operator has."""
    code = ("import sys; import extractor.deploy.packed_env; "
            "print(sorted(m for m in ('numpy', 'PIL', 'boto3', 'tensorflow', 'pyspark') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
