"""Machine-readable output that is always valid JSON: non-finite floats become null."""

from __future__ import annotations

import json
import math
from typing import Any


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None (recursively through dicts,
    lists and tuples)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_dumps(obj: Any, **kwargs: Any) -> str:
    """`json.dumps` of `json_safe(obj)`, refusing anything that is not standard JSON."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)
