import csv
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from extractor.results.formats import CSV, FORMATS, PARQUET, get_format, read_table
from extractor.results.outputs import format_rows

HOSTILE = ['Kiwi, "gold"', "Pêche été", "猕猴桃", "line\nbreak", "tab\there", "'single'", "🍓 emoji", "a\r\nb", ""]


def rows(n, d, seed=0):
    rng = np.random.default_rng(seed)
    paths = [f"s3://b/in/{HOSTILE[i % len(HOSTILE)]}/{i}.jpg" for i in range(n)]
    labels = [HOSTILE[i % len(HOSTILE)] for i in range(n)]
    # Magnitudes from 1e-8 to 1e8, so %.9g has to use exponents and keep all digits.
    matrix = (rng.normal(size=(n, d)) * 10.0 ** rng.integers(-8, 8, size=(n, d))).astype(np.float32)
    return paths, labels, matrix


def parts_of(fmt, paths, labels, matrix, prefix, cuts):
    """The rows split at ``cuts`` (consecutive, possibly empty slices), one part per slice."""
    bounds = [0, *cuts, len(paths)]
    return [fmt.part(paths[a:b], labels[a:b], matrix[a:b], prefix) for a, b in zip(bounds, bounds[1:])]


def assembled(fmt, parts, prefix, dim):
    sink = io.BytesIO()
    fmt.assemble(iter(parts), sink, prefix, dim)
    return sink.getvalue()


def assert_same_rows(actual, paths, labels, matrix):
    got_paths, got_labels, got_matrix = actual
    assert got_paths == list(paths) and got_labels == list(labels)
    assert got_matrix.dtype == np.float32 and got_matrix.shape == matrix.shape
    # Bit for bit: catches -0.0 vs 0.0 and any last-digit rounding.
    np.testing.assert_array_equal(got_matrix.view(np.uint32), matrix.view(np.uint32))


def test_registry_and_lookup():
    assert set(FORMATS) == {"csv", "parquet"}
    assert (get_format("csv").extension, get_format("parquet").extension) == (".csv", ".parquet")
    assert get_format("csv").content_type == "text/csv"
    assert all(get_format(name).name == name for name in FORMATS)
    for bad in ["CSV", "json", "", None]:
        with pytest.raises(ValueError, match=repr(bad).replace("(", r"\(")):
            get_format(bad)


def test_csv_encode_is_format_rows():
    paths, labels, matrix = rows(7, 5)
    assert CSV.encode(paths, labels, matrix, "pc_") == format_rows(paths, labels, matrix, "pc_")


SPLITS = [[], [0], [7], [3], [1, 2, 3, 4, 5, 6], [0, 0, 4, 4, 7], [2, 5]]


@pytest.mark.parametrize("cuts", SPLITS)
def test_csv_parts_assemble_to_the_whole_file_byte_for_byte(cuts):
    paths, labels, matrix = rows(7, 6)
    whole = CSV.encode(paths, labels, matrix, "dim_")
    assert assembled(CSV, parts_of(CSV, paths, labels, matrix, "dim_", cuts), "dim_", 6) == whole


@pytest.mark.parametrize("cuts", SPLITS)
def test_parquet_parts_assemble_to_the_same_rows_one_row_group_per_part(cuts):
    paths, labels, matrix = rows(7, 6)
    parts = parts_of(PARQUET, paths, labels, matrix, "pc_", cuts)
    data = assembled(PARQUET, parts, "pc_", 6)
    assert_same_rows(read_table(data, "parquet"), paths, labels, matrix)
    assert pq.ParquetFile(pa.BufferReader(data)).num_row_groups == len(parts)
    whole = pq.read_table(pa.BufferReader(PARQUET.encode(paths, labels, matrix, "pc_")))
    assert pq.read_table(pa.BufferReader(data)).equals(whole, check_metadata=True)


@pytest.mark.parametrize("fmt", [CSV, PARQUET], ids=lambda f: f.name)
def test_assemble_reads_one_part_at_a_time(fmt):
    """Each part reaches the sink before the next one is asked for."""
    paths, labels, matrix = rows(40, 8)
    sink = io.BytesIO()
    sizes = []

    def parts():
        for start in range(0, 40, 10):
            sizes.append(sink.tell())
            yield fmt.part(paths[start:start + 10], labels[start:start + 10], matrix[start:start + 10], "dim_")

    fmt.assemble(parts(), sink, "dim_", 8)
    assert len(sizes) == 4 and sizes == sorted(set(sizes)), sizes  # strictly growing
    assert_same_rows(read_table(sink.getvalue(), fmt), paths, labels, matrix)


@pytest.mark.parametrize("fmt", [CSV, PARQUET], ids=lambda f: f.name)
def test_no_rows(fmt):
    empty = np.zeros((0, 5), dtype=np.float32)
    for data in (fmt.encode([], [], empty, "pc_"), assembled(fmt, [], "pc_", 5),
                 assembled(fmt, [fmt.part([], [], empty, "pc_")], "pc_", 5)):
        assert_same_rows(read_table(data, fmt.name), [], [], empty)
    assert CSV.encode([], [], empty, "pc_") == b"path,label,pc_0,pc_1,pc_2,pc_3,pc_4\n"


def test_empty_parquet_file_still_has_the_schema():
    table = pq.read_table(pa.BufferReader(assembled(PARQUET, [], "pc_", 5)))
    assert table.num_rows == 0
    assert table.schema.names == ["path", "label", "vector"]
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 5)
    assert table.schema.metadata[b"column_prefix"] == b"pc_"


def test_parquet_schema_and_prefix_metadata():
    paths, labels, matrix = rows(3, 4)
    for prefix in ("dim_", "pc_"):
        table = pq.read_table(pa.BufferReader(PARQUET.encode(paths, labels, matrix, prefix)))
        assert table.schema.field("path").type == pa.string() and table.schema.field("label").type == pa.string()
        assert table.schema.field("vector").type == pa.list_(pa.float32(), 4)
        assert table.schema.metadata[b"column_prefix"] == prefix.encode()


@pytest.mark.parametrize("fmt", [CSV, PARQUET], ids=lambda f: f.name)
def test_4096_float32_values_round_trip_exactly(fmt):
    paths, labels, matrix = rows(4, 4096, seed=1)
    info = np.finfo(np.float32)
    matrix[0, :8] = [0.0, -0.0, info.max, -info.max, info.tiny, info.smallest_subnormal, np.inf, -np.inf]
    matrix[1] = np.nextafter(np.float32(1), np.float32(2), dtype=np.float32) * np.arange(4096, dtype=np.float32)
    assert_same_rows(read_table(fmt.encode(paths, labels, matrix, "dim_"), fmt), paths, labels, matrix)


def test_float64_input_is_written_as_float32():
    values = np.array([[0.1, 1 / 3]])
    for fmt in FORMATS.values():
        _, _, matrix = read_table(fmt.encode(["p"], ["l"], values, "dim_"), fmt)
        np.testing.assert_array_equal(matrix, values.astype(np.float32))


def test_hostile_text_round_trips_through_the_csv_module():
    paths, labels, matrix = rows(len(HOSTILE), 3)
    data = assembled(CSV, parts_of(CSV, paths, labels, matrix, "dim_", [4]), "dim_", 3)
    parsed = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    assert [r[:2] for r in parsed[1:]] == [[p, l] for p, l in zip(paths, labels)]
    assert_same_rows(read_table(data, "csv"), paths, labels, matrix)


def test_hostile_text_round_trips_through_pyarrow():
    paths, labels, matrix = rows(len(HOSTILE), 3)
    data = assembled(PARQUET, parts_of(PARQUET, paths, labels, matrix, "dim_", [4]), "dim_", 3)
    table = pq.read_table(pa.BufferReader(data))
    assert table.column("path").to_pylist() == paths and table.column("label").to_pylist() == labels


@pytest.mark.parametrize("fmt", [CSV, PARQUET], ids=lambda f: f.name)
def test_bad_arguments_are_refused(fmt):
    paths, labels, matrix = rows(3, 4)
    with pytest.raises(ValueError, match="2 paths, 3 labels for 3 rows"):
        fmt.encode(paths[:2], labels, matrix, "dim_")
    with pytest.raises(ValueError, match=r"got shape \(4,\)"):
        fmt.part(paths[:1], labels[:1], matrix[0], "dim_")
    with pytest.raises(ValueError, match="column_prefix .* got 'a,b'"):
        fmt.encode(paths, labels, matrix, "a,b")
    for dim in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"got {dim!r}"):
            fmt.assemble([], io.BytesIO(), "dim_", dim)


def test_parquet_assemble_refuses_a_part_of_another_width_or_prefix():
    paths, labels, matrix = rows(3, 4)
    with pytest.raises(ValueError, match="part 1 .* expected vectors of width 4"):
        assembled(PARQUET, [PARQUET.part(paths, labels, matrix, "dim_"),
                            PARQUET.part(paths, labels, matrix[:, :3], "dim_")], "dim_", 4)
    with pytest.raises(ValueError, match="column prefix 'pc_'"):
        assembled(PARQUET, [PARQUET.part(paths, labels, matrix, "pc_")], "dim_", 4)


def test_read_table_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="'xml'"):
        read_table(b"", "xml")
    with pytest.raises(ValueError, match="header starts"):
        read_table(b"a,b,c\n1,2,3\n", "csv")
    with pytest.raises(ValueError, match="line 3: 4 fields"):
        read_table(b"path,label,x0\np,l,1\np,l,1,2\n", CSV)
