"""Model backends: each turns a ``ModelConfig`` into a ``DiffusionModel`` (see ``base``)."""
from __future__ import annotations

from .base import DiffusionModel, RequestError

MODEL_KINDS = ("builtin",)


def load_model(cfg) -> DiffusionModel:
    """Load the model a ``ModelConfig`` names (weights are read here, inside the actor)."""
    if cfg.kind == "builtin":
        from .builtin import BuiltinDigits
        return BuiltinDigits.load(cfg)
    raise ValueError(f"model.kind: unknown model kind {cfg.kind!r}; allowed: {list(MODEL_KINDS)}")


def model_class(kind: str) -> type[DiffusionModel]:
    """The backend class, for request checks on the driver without loading weights."""
    if kind == "builtin":
        from .builtin import BuiltinDigits
        return BuiltinDigits
    raise ValueError(f"model.kind: unknown model kind {kind!r}; allowed: {list(MODEL_KINDS)}")
