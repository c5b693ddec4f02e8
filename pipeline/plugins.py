"""Code named in a config: ``module:attribute`` strings (rewards, model hooks) imported by path."""
from __future__ import annotations

import importlib
from typing import Any


def import_object(path: str) -> Any:
    """The attribute ``path`` (``"module:attribute"``) names; ``ImportError`` naming it if that fails."""
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ImportError(f"{path!r} is not 'module:attribute'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"cannot import {path!r} ({type(e).__name__}: {e})") from None
