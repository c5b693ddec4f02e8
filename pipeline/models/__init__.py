"""Model backends: each turns a ``ModelConfig`` into a ``DiffusionModel`` (see ``base``)."""
from __future__ import annotations

from ..errors import ConfigError
from .base import DiffusionModel

MODEL_KINDS = ("builtin", "diffusers")


def load_model(cfg) -> DiffusionModel:
    """Load the model a ``ModelConfig`` names (weights are read here, inside the actor)."""
    if cfg.kind == "builtin":
        from .builtin import BuiltinDigits
        return BuiltinDigits.load(cfg)
    if cfg.kind == "diffusers":
        from .diffusers_backend import DiffusersModel
        return DiffusersModel.load(cfg)
    raise ConfigError("model.kind", f"unknown model kind {cfg.kind!r}; allowed: {list(MODEL_KINDS)}")


def model_class(kind) -> type[DiffusionModel]:
    """The backend class, for request checks on the driver without loading weights.

    ``kind`` is a kind name, or a ``ModelConfig``: then the class knows the model's layout
    from its config files (diffusers: the pixel multiple, DiT's class labels), and a missing
    path or an unsupported pipeline raises ``ConfigError`` naming ``model.path``.
    """
    cfg = None if isinstance(kind, str) else kind
    name = kind if cfg is None else cfg.kind
    if name == "builtin":
        from .builtin import BuiltinDigits
        return BuiltinDigits
    if name == "diffusers":
        from .diffusers_backend import DiffusersModel
        return DiffusersModel if cfg is None else DiffusersModel.for_config(cfg)
    raise ConfigError("model.kind", f"unknown model kind {name!r}; allowed: {list(MODEL_KINDS)}")
