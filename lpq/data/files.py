"""Reading the user's data files (calibration text and prompts, training corpora, caption lists): one way
to refuse a file that cannot be read, in one line naming the recipe key, the file and the line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_user_text(path: str | Path, key: str) -> tuple[Path, str]:
    """The file's path and its UTF-8 text; missing, a folder or not UTF-8 is refused naming `key`."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{key}: {p} is a folder, not a file")
    if not p.is_file():
        raise FileNotFoundError(f"{key}: {p} not found")
    try:
        return p, p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{key}: {p} is not UTF-8 text (byte {e.start})") from None


def json_records(path: Path, text: str, jsonl: bool | None = None) -> list[tuple[int, Any]]:
    """(line number, record) of a JSON list (numbered by position) or of JSON lines (by line); `jsonl`
    None: JSON lines unless the file name ends in .json."""
    if jsonl is None:
        jsonl = path.suffix != ".json"
    if not jsonl:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return list(enumerate(data, 1))
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}, column {e.colno})") from None
    return out
