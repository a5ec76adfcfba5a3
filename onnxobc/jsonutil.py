"""Strict JSON for reports: non-finite floats become the strings "inf", "-inf" and "nan"."""
from __future__ import annotations

import json
import math
from typing import Any


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by a string (json.dumps(allow_nan=False) accepts it)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)
