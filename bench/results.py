"""Where a harness leaves its figures: <out>/<name>-<time>.json."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def save(out: Path, name: str, result: dict[str, Any]) -> Path:
    """Writes result as <out>/<name>-YYYYmmdd-HHMMSS.json and returns the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path
