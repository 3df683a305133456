"""Reading text files (CSV, TSV, JSONL rows; plain text; lines) with one clear error per problem."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

READERS = (".csv", ".tsv", ".jsonl", ".json")


def read_rows(path: str | Path, columns: list[str]) -> list[dict]:
    """Rows of ``path`` as dicts; the file must exist, be non-empty and have ``columns``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise ValueError(f"data file {path}: unknown format {suffix!r}; use one of {', '.join(READERS)}")
    with path.open(encoding="utf-8", newline="") as f:
        if suffix in (".jsonl", ".json"):
            rows = [_json_line(line, path, number) for number, line in enumerate(f, 1) if line.strip()]
        else:
            rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if not rows:
        raise ValueError(f"data file {path} has no rows")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise ValueError(f"data file {path} has no column {missing[0]!r}; its columns are: {', '.join(rows[0])}")
    return rows


def _json_line(line: str, path: Path, number: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"data file {path}, line {number}: not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"data file {path}, line {number}: expected a JSON object")
    return row


def check_data_arguments(source: str | None, sources: dict, files: list[str | None], val_fraction: float) -> None:
    """One clear error for a data module's arguments: an unknown source, no data at all, a bad val_fraction."""
    if source is not None and source not in sources:
        raise ValueError(f"unknown source {source!r}; built-in sources: {', '.join(sources)}")
    if source is None and all(file is None for file in files):
        raise ValueError("give a built-in source or a train_file, test_file or predict_file")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def read_text(path: str | Path) -> str:
    """The whole text of a UTF-8 file, which must exist and hold more than whitespace."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"data file {path} is empty")
    return text


def read_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a text file, or of standard input when ``path`` is ``-``."""
    if str(path) == "-":
        lines = sys.stdin.read().splitlines()
    else:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"predict file {path} does not exist")
        lines = path.read_text(encoding="utf-8").splitlines()
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise ValueError(f"no texts to predict in {'standard input' if str(path) == '-' else path}")
    return texts
