"""Output file formats (CSV, Parquet) for per-fruit vectors: whole files, parts, and assembly.

Every format writes rows of (path, label, vector of d float32). ``encode`` makes a whole file in
memory; ``part`` + ``assemble`` make the same file from consecutive slices of rows, holding one
slice at a time, so a large output can stream into a sink such as ``multipart.MultipartWriter``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from extractor.results.outputs import format_rows

# Readers (read_table, people opening the file) tell features ("dim_") from PCA projections ("pc_") by it.
PREFIX_METADATA_KEY = "column_prefix"


def _check_prefix(column_prefix) -> str:
    # The CSV header is written unquoted, so the prefix must not need quoting.
    if not isinstance(column_prefix, str) or not column_prefix or any(c in column_prefix for c in ',"\r\n'):
        raise ValueError(f"column_prefix must be a non-empty string without , \" or newlines, got {column_prefix!r}")
    return column_prefix


def _check_dim(dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    return int(dim)


def _check_rows(paths: Sequence[str], labels: Sequence[str], matrix, column_prefix: str) -> np.ndarray:
    """The matrix as (n, d) float32, after checking it matches ``paths`` and ``labels``."""
    _check_prefix(column_prefix)
    values = np.asarray(matrix)
    if values.ndim != 2 or values.shape[1] < 1:
        raise ValueError(f"matrix must be 2-D (n, d) with d >= 1, got shape {values.shape}")
    if len(paths) != values.shape[0] or len(labels) != values.shape[0]:
        raise ValueError(f"need one path and one label per row: got {len(paths)} paths, {len(labels)} labels "
                         f"for {values.shape[0]} rows")
    return values.astype(np.float32, copy=False)


@dataclass(frozen=True)
class OutputFormat:
    """How one file format writes and reads rows of (path, label, d float32 values).

    encode(paths, labels, matrix, column_prefix) -> bytes: a whole file.
    part(paths, labels, matrix, column_prefix) -> bytes: a fragment for ``assemble``.
    assemble(parts, sink, column_prefix, dim): the whole file onto ``sink`` (has write()),
        one part in memory at a time; same rows as ``encode`` of the parts' rows in order.
    read(data) -> (paths, labels, (n, d) float32).
    """

    name: str
    extension: str
    content_type: str
    encode: Callable[[Sequence[str], Sequence[str], np.ndarray, str], bytes]
    part: Callable[[Sequence[str], Sequence[str], np.ndarray, str], bytes]
    assemble: Callable[[Iterable[bytes], object, str, int], None]
    read: Callable[[bytes], tuple[list[str], list[str], np.ndarray]]


# --- CSV: header "path,label,<prefix>0..", one row per line, floats with %.9g (outputs.format_rows).

def _csv_encode(paths, labels, matrix, column_prefix: str) -> bytes:
    return format_rows(paths, labels, _check_rows(paths, labels, matrix, column_prefix), column_prefix)


def _csv_header(column_prefix: str, dim: int) -> bytes:
    """The header line, newline included, exactly as format_rows writes it."""
    return format_rows([], [], np.zeros((0, dim), dtype=np.float32), column_prefix)


def _csv_part(paths, labels, matrix, column_prefix: str) -> bytes:
    data = _csv_encode(paths, labels, matrix, column_prefix)
    # The header is one line: the prefix was checked to need no quoting.
    return data[data.index(b"\n") + 1:]


def _csv_assemble(parts: Iterable[bytes], sink, column_prefix: str, dim: int) -> None:
    sink.write(_csv_header(_check_prefix(column_prefix), _check_dim(dim)))
    for number, data in enumerate(parts):
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"CSV part {number} must be bytes, got {type(data).__name__}")
        sink.write(data)


def _csv_read(data: bytes) -> tuple[list[str], list[str], np.ndarray]:
    rows = csv.reader(io.StringIO(data.decode("utf-8"), newline=""))
    header = next(rows, None)
    if not header or header[:2] != ["path", "label"] or len(header) < 3:
        raise ValueError(f"not a vectors CSV: header starts {(header or [])[:3]!r}")
    dim = len(header) - 2
    paths, labels, values = [], [], []
    for number, row in enumerate(rows, start=2):
        if len(row) != dim + 2:
            raise ValueError(f"CSV line {number}: {len(row)} fields, the header has {dim + 2}")
        paths.append(row[0])
        labels.append(row[1])
        values.append(row[2:])
    # float64 first, then float32: the 9 significant digits format_rows writes round-trip exactly this way.
    matrix = np.array(values, dtype=np.float64).reshape(len(values), dim).astype(np.float32)
    return paths, labels, matrix


# --- Parquet: columns path (string), label (string), vector (fixed_size_list<float32>[d]).

# zstd over byte-stream-split floats: ~15 % smaller than plain on random floats, more on ReLU
# features, and faster to write than the default (which first tries dictionary-encoding every float).
_PARQUET_OPTIONS = {
    "compression": "zstd",
    "use_dictionary": ["label"],
    "column_encoding": {"vector.list.element": "BYTE_STREAM_SPLIT"},
}


def _parquet_schema(column_prefix: str, dim: int):
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("label", pa.string()), ("vector", pa.list_(pa.float32(), dim))],
                     metadata={PREFIX_METADATA_KEY: column_prefix})


def _parquet_table(paths, labels, matrix, column_prefix: str):
    import pyarrow as pa

    values = _check_rows(paths, labels, matrix, column_prefix)
    dim = values.shape[1]
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), dim)
    return pa.Table.from_arrays([pa.array(list(paths), pa.string()), pa.array(list(labels), pa.string()), vectors],
                                schema=_parquet_schema(column_prefix, dim))


def _parquet_encode(paths, labels, matrix, column_prefix: str) -> bytes:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(_parquet_table(paths, labels, matrix, column_prefix), buffer, **_PARQUET_OPTIONS)
    return buffer.getvalue()


def _parquet_assemble(parts: Iterable[bytes], sink, column_prefix: str, dim: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _parquet_schema(_check_prefix(column_prefix), _check_dim(dim))
    writer = pq.ParquetWriter(sink, schema, **_PARQUET_OPTIONS)
    for number, data in enumerate(parts):
        table = pq.read_table(pa.BufferReader(data))
        prefix = (table.schema.metadata or {}).get(PREFIX_METADATA_KEY.encode(), b"").decode()
        if not table.schema.equals(schema, check_metadata=False) or prefix != column_prefix:
            raise ValueError(f"Parquet part {number} has schema {table.schema.to_string(show_schema_metadata=False)!r} "
                             f"and column prefix {prefix!r}, expected vectors of width {dim} and {column_prefix!r}")
        writer.write_table(table)  # one row group per part
    # Closed only on success: closing writes the footer, which would make a partial file look whole.
    writer.close()


def _parquet_read(data: bytes) -> tuple[list[str], list[str], np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(data))
    vector_type = table.schema.field("vector").type
    if not pa.types.is_fixed_size_list(vector_type) or vector_type.value_type != pa.float32():
        raise ValueError(f"not a vectors Parquet file: column 'vector' is {vector_type}")
    dim = vector_type.list_size
    vectors = table.column("vector").combine_chunks()
    # flatten() honours slicing, unlike .values.
    matrix = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(vectors), dim)
    return table.column("path").to_pylist(), table.column("label").to_pylist(), matrix


CSV = OutputFormat(name="csv", extension=".csv", content_type="text/csv",
                   encode=_csv_encode, part=_csv_part, assemble=_csv_assemble, read=_csv_read)
# A complete small Parquet file is a part: assemble re-reads it and writes it as one row group.
PARQUET = OutputFormat(name="parquet", extension=".parquet", content_type="application/vnd.apache.parquet",
                       encode=_parquet_encode, part=_parquet_encode, assemble=_parquet_assemble,
                       read=_parquet_read)

FORMATS = {"csv": CSV, "parquet": PARQUET}


def get_format(name: str) -> OutputFormat:
    """The format called ``name`` ('csv' or 'parquet')."""
    if not isinstance(name, str) or name not in FORMATS:
        raise ValueError(f"unknown output format {name!r}; expected one of {', '.join(FORMATS)}")
    return FORMATS[name]


def read_table(data: bytes, fmt: str | OutputFormat) -> tuple[list[str], list[str], np.ndarray]:
    """Rows of a file written by ``fmt`` (a name or an OutputFormat): paths, labels, (n, d) float32."""
    if not isinstance(fmt, OutputFormat):
        fmt = get_format(fmt)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"data must be bytes, got {type(data).__name__}")
    return fmt.read(bytes(data))
