"""Task start (extractor.zipimports): an archive on the path is read again only when it changed."""

import importlib
import sys
import zipfile
import zipimport

import pytest

import extractor  # noqa: F401 - installs the cache, as in every Python worker that runs our tasks


@pytest.fixture
def counted_reads(monkeypatch):
    """archive path -> how many times zipimport read its directory since the fixture started."""
    reads: dict[str, int] = {}
    original = zipimport._read_directory

    def counting(archive):
        reads[archive] = reads.get(archive, 0) + 1
        return original(archive)

    monkeypatch.setattr(zipimport, "_read_directory", counting)
    return reads


def write_package(path, modules):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("zipcache_pkg/__init__.py", "")
        for name in modules:
            archive.writestr(f"zipcache_pkg/{name}.py", f"NAME = {name!r}\n")


def test_an_unchanged_archive_is_not_read_again_and_a_changed_one_is(tmp_path, monkeypatch, counted_reads):
    path = tmp_path / "shipped.zip"
    write_package(path, ["one"])
    monkeypatch.syspath_prepend(str(path))
    monkeypatch.setattr(sys, "path_importer_cache", dict(sys.path_importer_cache))
    for name in ("zipcache_pkg", "zipcache_pkg.one", "zipcache_pkg.two"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert importlib.import_module("zipcache_pkg.one").NAME == "one"
    importers = [v for k, v in sys.path_importer_cache.items() if k.startswith(str(path))]
    assert len(importers) == 2  # the archive's root and its package: each used to read it all

    importlib.invalidate_caches()  # a first call reads once per importer, as before
    counted_reads.clear()
    for _ in range(3):
        importlib.invalidate_caches()
    assert counted_reads.get(str(path), 0) == 0

    # The archive replaced in place (what invalidate_caches exists for): read again, and the
    # module added to it imports.
    write_package(path, ["one", "two"])
    importlib.invalidate_caches()
    assert counted_reads[str(path)] == 2
    assert importlib.import_module("zipcache_pkg.two").NAME == "two"


def test_install_is_idempotent_and_leaves_a_python_without_the_method_alone(monkeypatch):
    from extractor.zipimports import install

    installed = zipimport.zipimporter.invalidate_caches
    install()
    assert zipimport.zipimporter.invalidate_caches is installed  # not wrapped twice
    monkeypatch.delattr(zipimport.zipimporter, "invalidate_caches")  # as on Python 3.9
    install()
    assert not hasattr(zipimport.zipimporter, "invalidate_caches")


def test_a_workers_task_start_reads_no_archive_again(spark):
    """In the suite's real Python workers (Spark's jar, pyspark.zip and py4j on their path): once
    a task of ours ran, invalidate_caches, which PySpark calls at every task start, reads nothing."""

    def task(_):
        import importlib
        import sys
        import zipimport

        import extractor  # noqa: F401,F811 - as unpickling any of our tasks does

        importlib.invalidate_caches()
        reads = []
        original = zipimport._read_directory
        zipimport._read_directory = lambda archive: reads.append(archive) or original(archive)
        try:
            importlib.invalidate_caches()
        finally:
            zipimport._read_directory = original
        archives = sorted({v.archive for v in sys.path_importer_cache.values() if isinstance(v, zipimport.zipimporter)})
        yield archives, reads

    for archives, reads in spark.sparkContext.parallelize([0, 1], 2).mapPartitions(task).collect():
        assert any(a.endswith(".jar") for a in archives) and any(a.endswith("pyspark.zip") for a in archives), archives
        assert reads == []
