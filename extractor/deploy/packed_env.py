"""Every cluster pin in one ``.tar.gz`` for ``spark.archives``, so a cluster starts without PyPI
(no pip install at bootstrap; works from a private subnet).

    python -m extractor.deploy.packed_env --pins FILE --out DIR [--wheels DIR] [--label cpu|gpu]
    # prints DIR/fruits-env[-LABEL]-<16 hex>.tar.gz; progress on stderr

Unpacked wheels rather than venv-pack: ``pip download --platform/--python-version`` fetches the
CPython 3.11 manylinux x86_64 wheels of EMR 7 from any machine, the tree holds no interpreter and
no absolute path, and it can be byte-reproducible. With ``spark.archives=s3://.../NAME#pyenv``
and ``PYTHONPATH=./pyenv/site-packages``, driver and executors import from it. Layout:

    fruits-env.json   each wheel's file name and sha256, the pip target, conflicts, .pth files
    site-packages/    the wheels as pip installs them: ``*.data/purelib`` and ``platlib`` merged
                      in, other ``*.data`` (scripts, headers, data) left out, ``.dist-info`` kept

Python never reads the ``.pth`` files of a PYTHONPATH folder: they stay, inert, and are listed.
Of the cluster pins only setuptools has one (its distutils shim), which no import needs.
Entries sorted, fixed mtime, uid/gid 0, modes 0o755 or 0o644, gzip mtime 0 without a file name:
the same wheels (and zlib) give the same bytes, and the name hashes the wheels, so an archive
already in DIR is reused.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

FORMAT = 1  # hashed into the name: bump on a layout change, or old archives would be reused
# zlib level 1: 79 MB/s against 30 MB/s at level 6 on TensorFlow's largest library, for an archive
# 10 % larger (ratio 0.232 against 0.210; measured 2026-12-06). The build is on the operator's
# clock; the extra megabytes cross a region's network in a second.
GZIP_LEVEL = 1
PIP_TARGET = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
              "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
              "--platform", "manylinux_2_28_x86_64"]
FIXED_MTIME = 1577836800  # 2020-01-01T00:00:00Z, as extractor.zip's FIXED_TIME
MANIFEST = "fruits-env.json"
SITE = "site-packages"
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[A-Za-z0-9._,-]+\])?==([A-Za-z0-9.!+_-]+)")
# pip's own lines for a wheel it fetched or found in -d: the only record of which cached files
# belong to this pin set (``pip download`` has no --report).
PIP_WHEEL = re.compile(r"(?:Saved|File was already downloaded) (.+\.whl)")


def log(message: str) -> None:
    print(f"[packed-env] {message}", file=sys.stderr, flush=True)


def canonical(name: str) -> str:
    """A distribution name as pins and wheel file names compare (PEP 503, ``_`` separators)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def read_pins(path: Path) -> list[str]:
    """The ``name==version`` lines of ``path`` in file order; comments and blank lines ignored."""
    pins, names = [], set()
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.fullmatch(line)
        if not match:
            raise ValueError(f"{path}:{number}: expected name==version, got {raw.strip()!r}")
        if canonical(match[1]) in names:
            raise ValueError(f"{path}:{number}: {match[1]} is pinned twice")
        names.add(canonical(match[1]))
        pins.append(line)
    if not pins:
        raise ValueError(f"{path}: no name==version line")
    return pins


def download_wheels(pins: Path, wheels: Path) -> list[Path]:
    """``pip download`` of ``pins`` and their dependencies for PIP_TARGET into ``wheels``, a cache
    (a file already there is not fetched again); the wheels of this pin set, sorted by name."""
    wanted = {canonical(PIN.fullmatch(pin)[1]) for pin in read_pins(pins)}
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--progress-bar", "off", *PIP_TARGET,
               "-d", str(wheels), "-r", str(pins)]
    named = set()
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as pip:
        for line in pip.stdout:
            sys.stderr.write(line)
            said = PIP_WHEEL.fullmatch(line.strip())
            if said:
                named.add(Path(said[1]).name)
    if pip.returncode:
        raise RuntimeError(f"pip download failed (exit {pip.returncode}): {' '.join(command)}")
    found = sorted(wheels / name for name in named)
    distributions = [canonical(w.name.split("-")[0]) for w in found]
    if len(set(distributions)) != len(distributions) or not wanted <= set(distributions):
        raise RuntimeError(f"pip's output does not name one wheel per pin of {pins}: {sorted(named)}")
    return found


def sha256(path: Path) -> str:
    """The file's sha256, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def archive_name(hashes: dict[str, str], label: str | None = None) -> str:
    """``fruits-env[-label]-<16 hex>.tar.gz`` from {wheel file name: sha256} (and FORMAT)."""
    listing = f"format {FORMAT}\n" + "".join(f"{name} {hashes[name]}\n" for name in sorted(hashes))
    return f"fruits-env{f'-{label}' if label else ''}-{hashlib.sha256(listing.encode()).hexdigest()[:16]}.tar.gz"


def site_path(member: str) -> str | None:
    """Where a wheel member lands under site-packages/ as pip installs it; None if left out."""
    parts = member.split("/")
    if member.startswith("/") or ".." in parts:
        raise ValueError(f"wheel member outside site-packages: {member!r}")
    if member.endswith("/"):
        return None  # folders follow from the files
    if parts[0].endswith(".data"):
        return "/".join(parts[2:]) if len(parts) > 2 and parts[1] in ("purelib", "platlib") else None
    return member


def layout(wheels: list[Path]) -> tuple[dict[str, tuple[Path, str]], list[str]]:
    """{path under site-packages/: (wheel, member)} over ``wheels`` in sorted order, and the
    conflicts: paths two wheels fill with different bytes, where the later wheel wins."""
    files: dict[str, tuple[Path, str]] = {}
    conflicts = []
    for wheel in sorted(wheels, key=lambda p: p.name):
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                path = site_path(info.filename)
                if path is None:
                    continue
                if path in files:
                    first, member = files[path]
                    with zipfile.ZipFile(first) as earlier:
                        if earlier.read(member) != archive.read(info):
                            conflicts.append(f"{path}: {first.name} replaced by {wheel.name}")
                files[path] = (wheel, info.filename)
    return files, conflicts


def tar_entry(name: str, mode: int, size: int = 0, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    """A header with nothing of the build machine: fixed mtime; uid/gid 0 and no owner names
    are TarInfo's defaults. ``size`` in bytes."""
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.mtime = kind, mode, size, FIXED_MTIME
    return info


def write_archive(files: dict[str, tuple[Path, str]], manifest: dict, target: Path) -> Path:
    """Write ``target``: MANIFEST (``manifest`` as JSON), then site-packages/ holding ``files``,
    entries sorted. Written beside and renamed: a build cut short leaves nothing to reuse."""
    entries: dict[str, tuple[Path, str] | None] = {SITE: None}
    for path, source in files.items():
        parts = path.split("/")
        entries.update({"/".join([SITE, *parts[:i]]): None for i in range(1, len(parts))})
        entries[f"{SITE}/{path}"] = source
    body = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    opened: dict[Path, zipfile.ZipFile] = {}
    try:
        # The gzip header would otherwise hold the file name and the time of writing.
        with open(partial, "wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=GZIP_LEVEL) as packed, \
                tarfile.open(fileobj=packed, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(tar_entry(MANIFEST, 0o644, len(body)), io.BytesIO(body))
            for name in sorted(entries):
                if entries[name] is None:
                    tar.addfile(tar_entry(name, 0o755, kind=tarfile.DIRTYPE))
                    continue
                wheel, member = entries[name]
                if wheel not in opened:
                    opened[wheel] = zipfile.ZipFile(wheel)
                info = opened[wheel].getinfo(member)
                mode = 0o755 if (info.external_attr >> 16) & 0o111 else 0o644
                with opened[wheel].open(info) as stream:
                    tar.addfile(tar_entry(name, mode, info.file_size), stream)
        os.replace(partial, target)
    finally:
        for archive in opened.values():
            archive.close()
        partial.unlink(missing_ok=True)
    return target


def build(pins: Path, out: Path, wheels: Path | None = None, label: str | None = None) -> Path:
    """The archive of ``pins`` in folder ``out``, built unless already there (same wheels, same
    name); ``wheels`` keeps the downloads between builds (a temporary folder when None)."""
    if label is not None and not re.fullmatch(r"[a-z0-9]+", label):
        raise ValueError(f"label must be lowercase letters and digits, got {label!r}")
    read_pins(pins)  # a bad file fails before pip runs
    with tempfile.TemporaryDirectory(prefix="fruits-wheels-") as scratch:
        found = download_wheels(Path(pins), Path(wheels) if wheels else Path(scratch))
        hashes = {wheel.name: sha256(wheel) for wheel in found}
        target = Path(out) / archive_name(hashes, label)
        if target.exists():
            log(f"reusing {target}")
            return target
        log(f"unpacking {len(found)} wheels")
        files, conflicts = layout(found)
        pth = sorted(path for path in files if "/" not in path and path.endswith(".pth"))
        for line in conflicts:
            log(f"conflict: {line}")
        if pth:
            log(f"inert under PYTHONPATH (never read): {', '.join(pth)}")
        manifest = {"format": FORMAT, "pip_target": PIP_TARGET, "conflicts": conflicts, "pth_files": pth,
                    "wheels": [{"file": name, "sha256": hashes[name]} for name in sorted(hashes)]}
        Path(out).mkdir(parents=True, exist_ok=True)
        write_archive(files, manifest, target)
    log(f"wrote {target} ({target.stat().st_size / 1e6:.0f} MB, {len(files)} files)")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m extractor.deploy.packed_env", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pins", required=True, type=Path, help="name==version lines")
    parser.add_argument("--out", required=True, type=Path, help="folder of the archive")
    parser.add_argument("--wheels", type=Path, help="wheel cache kept between builds")
    parser.add_argument("--label", choices=["cpu", "gpu"], help="part of the archive's name")
    args = parser.parse_args(argv)
    try:
        print(build(args.pins, args.out, args.wheels, args.label))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # RuntimeError: pip's side
        print(f"packed_env: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, RuntimeError) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
