"""Reading text files (CSV, TSV, JSONL rows; plain text; lines) with one clear error per problem."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

READERS = (".csv", ".tsv", ".jsonl", ".json")


def read_rows(path: str | Path, columns: list[str]) -> list[dict]:
    """Rows of ``path`` as dicts; the file must exist and every row must have a non-empty value in ``columns``.

    A row that does not fit (a CSV row with more or fewer fields than the header, as an unquoted
    comma in a text makes; a missing or empty value) is an error naming the file, line and content.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise ValueError(f"data file {path}: unknown format {suffix!r}; use one of {', '.join(READERS)}")
    text = _utf8_text(path)
    if suffix in (".jsonl", ".json") and text.lstrip().startswith("["):
        raise ValueError(f"data file {path} is one JSON array; {suffix} files are read as JSON Lines, one object "
                         'a line ({"text": ..., "label": ...}): write each object on a line of its own')
    if suffix in (".jsonl", ".json"):
        rows = [(number, _json_line(line, path, number)) for number, line in enumerate(_lines(text), 1)
                if line.strip()]
    else:
        rows = _csv_rows(text, path, delimiter="\t" if suffix == ".tsv" else ",")
    if not rows:
        raise ValueError(f"data file {path} has no rows")
    missing = [c for c in columns if c not in rows[0][1]]
    if missing:
        raise ValueError(f"data file {path} has no column {missing[0]!r}; its columns are: {', '.join(rows[0][1])}")
    lines = _lines(text) if suffix in (".jsonl", ".json") else _table_lines(text)
    for number, row in rows:
        empty = next((c for c in columns if row.get(c) is None or str(row[c]).strip() == ""), None)
        if empty is not None:
            raise ValueError(f"data file {path}, line {number}: no {empty!r} value in {_shown(lines, number)}")
        nested = next((c for c in columns if isinstance(row[c], (list, dict))), None)
        if nested is not None:
            raise ValueError(f"data file {path}, line {number}: the {nested!r} value is a JSON "
                             f"{'list' if isinstance(row[nested], list) else 'object'} ({json.dumps(row[nested])}); "
                             "give a text or a number")
    return [row for _, row in rows]


def _lines(text: str) -> list[str]:
    """The lines of ``text`` split at line breaks only (str.splitlines also splits at U+2028 inside JSON strings)."""
    return text.replace("\r\n", "\n").split("\n")


def _table_lines(text: str) -> list[str]:
    """The lines of a CSV or TSV text as the csv reader counts them (a lone CR ends a line there too)."""
    return [line.rstrip("\r\n") for line in io.StringIO(text, newline="").readlines()]


def _utf8_text(path: Path) -> str:
    """The file's text; a UTF-8 byte-order mark (as spreadsheet programs write) is dropped."""
    return _decoded(path.read_bytes(), f"data file {path}")


def _decoded(raw: bytes, source: str) -> str:
    """``raw`` as UTF-8 text (a byte-order mark dropped), or one line naming ``source``'s line that is not."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ValueError(f"{source}, line {line}: not UTF-8 text (byte {raw[err.start]:#04x}); save it as "
                         "UTF-8") from None


def _csv_rows(text: str, path: Path, delimiter: str) -> list[tuple[int, dict]]:
    """``(line, row)`` for each CSV record; a record with another number of fields than the header, or a quote
    left open (which would swallow the next lines into one text), is an error."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # a long text is a text, not an error
    tsv = delimiter == "\t"  # a tab-separated text holds no tab: its quote marks are text, as in most TSV files
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=not tsv,
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    lines = _table_lines(text)
    records = _records(reader, path, lines)
    header = next(records, (0, None))[1]
    if header is None:
        return []
    header = [name.strip() for name in header]  # "text, label" names the column 'label
    twice = next((name for i, name in enumerate(header) if name and name in header[:i]), None)  # "a,b,," is fine
    if twice is not None:
        raise ValueError(f"data file {path}, line 1: the header names column {twice!r} twice; name each column once")
    rows, spans = [], []
    for start, fields in records:
        if not fields:
            continue  # a blank line
        if reader.line_num > start:
            spans.append((start, reader.line_num))
        if len(fields) != len(header):
            _check_no_rows_swallowed(lines, start, reader.line_num, len(header), path, delimiter)
            raise ValueError(f"data file {path}, line {reader.line_num}: {len(fields)} fields where the header has "
                             f"{len(header)} in {_shown(lines, reader.line_num)}; quote a text that holds a "
                             f"{'tab' if delimiter == chr(9) else 'comma'}")
        rows.append((reader.line_num, dict(zip(header, fields, strict=True))))
    values = [{str(row[name]).strip() for _, row in rows} for name in header]  # a label column's: its classes
    for start, end in spans:
        _check_no_rows_swallowed(lines, start, end, len(header), path, delimiter, values)
    return rows


_LABEL_LIKE = re.compile(r"[-+]?[\w.]*\w")  # one word or number (pos, 0, 4.5): a label, not a piece of text


def _check_no_rows_swallowed(lines: list[str], start: int, end: int, fields: int, path: Path, delimiter: str,
                             labels: list[set[str]] | None = None) -> None:
    """Refuse a quoted text running from line ``start`` to ``end`` over lines that look like rows of their own.

    A quote left open reads on to the next text that ends in a quote mark, taking the rows between
    into one text; a text that really spans lines seldom has lines of the table's shape. Where the
    table's rows are known (``labels``: the values of each column), a line of that shape looks
    like a row only if one of its fields is a value its column holds or one word or number (a
    class), so a paragraph with a comma is text.
    """
    inner = range(start + 1, end)  # the last line holds the closing quote and the record's other fields

    def row_like(line: str) -> bool:
        parts = line.split(delimiter)
        return len(parts) == fields and (labels is None or any(
            part.strip() in known or _LABEL_LIKE.fullmatch(part.strip()) for part, known in zip(parts, labels,
                                                                                             strict=True)))

    swallowed = [number for number in inner if row_like(lines[number - 1])]
    if swallowed:
        raise ValueError(f"data file {path}, line {start}: a quote opened here runs on to line {end}, taking in "
                         f"{len(swallowed)} line(s) that look like rows of their own, such as line {swallowed[0]} "
                         f"{_shown(lines, swallowed[0])}; close the quote, or double a quote mark inside a text (\"\")")


def _records(reader: Any, path: Path, lines: list[str]) -> Iterator[tuple[int, list[str]]]:
    """``(first line, fields)`` of each record, or a one-line error naming the line where a bad record starts."""
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise ValueError(f"data file {path}, line {start}: {err} in {_shown(lines, start)}; quote a text that "
                             'holds a quote mark whole, with its quote marks doubled ("")') from None
        yield start, fields


def _json_line(line: str, path: Path, number: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"data file {path}, line {number}: not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"data file {path}, line {number}: expected a JSON object")
    return row


def _shown(lines: list[str], number: int, limit: int = 80) -> str:
    line = lines[number - 1] if 0 < number <= len(lines) else ""
    return repr(line if len(line) <= limit else line[:limit] + "...")


def check_data_arguments(source: str | None, sources: dict, split_files: dict[str, str | None],
                         predict_file: str | None, val_fraction: float) -> None:
    """One clear error for bad data arguments: an unknown source, a source and files, no data, a bad val_fraction."""
    given = {name: file for name, file in split_files.items() if file is not None}
    if source is not None and source not in sources:
        raise ValueError(f"unknown source {source!r}; built-in sources: {', '.join(sources)}")
    if source is not None and given:
        named = ", ".join(f"{name}={file}" for name, file in given.items())
        raise ValueError(f"give a built-in source or data files, not both: source={source!r} would be read and "
                         f"{named} ignored; set source to null to read the files")
    if source is None and not given and predict_file is None:
        raise ValueError("give a built-in source or a train_file, test_file or predict_file")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def check_enough_to_hold_out(rows: int, unit: str, val_fraction: float) -> None:
    """Refuse training data too small to hold out ``val_fraction`` for validation and still train on something."""
    if rows < 2:
        raise ValueError(f"the training data has {rows} {unit}{'' if rows == 1 else 's'}: too few to hold out "
                         f"val_fraction {val_fraction} for validation; give more, a val_file, or val_fraction 0")


def read_text(path: str | Path) -> str:
    """The whole text of a UTF-8 file, which must exist and hold more than whitespace."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    text = _utf8_text(path)
    if not text.strip():
        raise ValueError(f"data file {path} is empty")
    return text


def read_lines(path: str | Path, column: str | None = None, keep_spaces: bool = False) -> list[str]:
    """Non-empty lines of a text file, or of standard input when ``path`` is ``-``.

    A CSV, TSV or JSONL file (by its suffix) gives its ``column``'s values, its header and other
    columns left out; without a ``column`` (``NAME<TAB>text`` lines) a TSV file is lines, and a CSV
    or JSONL table is refused rather than read as lines. The spaces around each text go, unless
    ``keep_spaces`` (a prompt ending in a space or a line break, as it was trained).
    """
    if column is not None and Path(str(path)).suffix.lower() in READERS:
        return [str(row[column]) if keep_spaces else str(row[column]).strip() for row in read_rows(path, [column])]
    return [text for _, text in numbered_lines(path, keep_spaces)]


def numbered_lines(path: str | Path, keep_spaces: bool = False) -> list[tuple[int, str]]:
    """The non-empty lines of a text file (standard input for ``-``), each with its line number, counting from 1."""
    if Path(str(path)).suffix.lower() in (".csv", ".jsonl", ".json"):
        raise ValueError(f"predict file {path}: here each line is one input (NAME<TAB>text), so give a plain text "
                         "or .tsv file, not a CSV or JSONL table")
    if str(path) == "-":
        lines = _lines(_decoded(sys.stdin.buffer.read(), "standard input"))
    else:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"predict file {path} does not exist")
        lines = _lines(_utf8_text(path))
    source = "standard input" if str(path) == "-" else path
    texts = [(number, line if keep_spaces else line.strip()) for number, line in enumerate(lines, 1) if line.strip()]
    if not texts:
        raise ValueError(f"no texts to predict in {source}")
    _warn_of_blank_lines(lines, source)
    return texts


def _warn_of_blank_lines(lines: list[str], source: object) -> None:
    """Say which blank lines are skipped, so nobody pairs predictions with input lines one to one by mistake."""
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    blank = [number for number, line in enumerate(lines, 1) if not line.strip()]
    if blank:
        shown = ", ".join(map(str, blank[:5])) + (", ..." if len(blank) > 5 else "")
        warnings.warn(f"{source}: {len(blank)} blank line(s) skipped (line {shown}); there is one prediction "
                      "per non-blank line", stacklevel=2)
