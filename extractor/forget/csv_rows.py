"""Rows taken out of a CSV file byte for byte: every other byte, the header and a quoted field
holding commas or newlines left as they were (``forget`` must change nothing else)."""

from __future__ import annotations

import csv
import io


def records(text: str):
    """Yield the CSV records of ``text`` with their line endings ('' + ... == text). A record ends
    at a newline where the count of '"' in it so far is even, so a quoted field may hold newlines;
    splitting on '\\n' and counting quotes per piece keeps the work in C (rows are tens of kB)."""
    pieces = text.split("\n")
    record, quotes = [], 0
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        record.append(piece if last else piece + "\n")
        quotes += piece.count('"')
        if quotes % 2 == 0 or last:
            joined = "".join(record)
            if joined:
                yield joined
            record, quotes = [], 0


def first_field(record: str) -> str:
    """The unquoted value of the record's first field."""
    if not record.startswith('"'):
        return record.split(",", 1)[0].rstrip("\r\n")
    parts, start = [], 1
    while True:
        end = record.find('"', start)
        if end == -1:  # unterminated quote: take what there is, it will match no path
            parts.append(record[start:])
            return "".join(parts)
        if record.startswith('""', end):
            parts.append(record[start:end] + '"')
            start = end + 2
        else:
            parts.append(record[start:end])
            return "".join(parts)


def split_out(text: str, paths: set[str]) -> tuple[str, list[str]]:
    """(text without the records whose first field equals one of ``paths``, the removed records);
    every other byte is kept, the first record (the header) always."""
    kept, removed = [], []
    for index, record in enumerate(records(text)):
        (removed if index > 0 and first_field(record) in paths else kept).append(record)
    return "".join(kept), removed


def label_of(record: str) -> str | None:
    """The second field (label) of one CSV record, or None if it has none."""
    fields = next(csv.reader(io.StringIO(record)), [])
    return fields[1] if len(fields) > 1 else None
