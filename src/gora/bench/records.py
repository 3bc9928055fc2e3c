"""Result records on disk: a JSON list per file, rewritten atomically after every finished run.

Format: ``docs/benchmark-format.md`` (a list of records, or a dict with a ``records`` list). A record is
identified by its cell key, so a resumed grid skips what is already on disk.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gora.errors import GoraDataError

Record = dict[str, Any]
CELL_FIELDS = ("method", "task", "seed", "r")
LR_RUN_FIELDS = ("method", "task", "seed", "r", "lr")


def cell_key(record: Record, fields: Iterable[str] = CELL_FIELDS) -> tuple:
    return tuple(record.get(f) for f in fields)


def load_records(path: str | os.PathLike) -> list[Record]:
    """Records of a results file; an absent file has none.

    Raises:
        GoraDataError: the file is not a JSON list of records (nor a dict holding one under ``records``).
    """
    path = Path(path)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GoraDataError(f"{path} is not valid JSON ({err}); move it away or fix it.") from None
    if isinstance(data, dict):
        data = data.get("records")
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise GoraDataError(f"{path} is not a JSON list of result records; move it away or fix it.")
    return data


def _clean(value: Any) -> Any:
    # JSON has no NaN: store non-finite floats as null so any JSON reader can read the file.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def save_records(path: str | os.PathLike, records: list[Record]) -> None:
    """Write all records atomically (temporary file, fsync, rename): a crash leaves the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump([_clean(r) for r in records], f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_record(path: str | os.PathLike, record: Record) -> None:
    """Add one record to the file and flush it to disk."""
    save_records(path, [*load_records(path), record])
