"""Supervised fine-tuning records: one JSON object per line with a `problem` and its worked `solution`."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_sft_records(path: str | os.PathLike) -> list[dict]:
    """The records of an SFT JSONL file (`problem` + worked `solution` per line, as the demo task writes them)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: {str(path)!r} does not exist")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc})") from None
            for field in ("problem", "solution"):
                if not isinstance(record.get(field), str) or not record[field].strip():
                    raise ValueError(f"{path}:{number}: field {field!r} is missing or empty (SFT data needs the "
                                     "problem and its worked solution)")
            records.append(record)
    return records
