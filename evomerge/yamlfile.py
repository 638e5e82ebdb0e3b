"""Reading the YAML files users write (recipes, objectives, job specs) with errors that name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml(path: str | Path, error: type[Exception], what: str) -> tuple[Any, Path]:
    """(parsed data, absolute path). A missing file or a syntax error raises `error` naming the file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise error(f"{p}: no such {what} file")
    try:
        return yaml.safe_load(p.read_text()), p.resolve()
    except yaml.YAMLError as e:
        raise error(f"{p}: not valid YAML ({e})") from None
