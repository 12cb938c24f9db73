"""Model families: every module here that declares ``FAMILY`` (a :class:`~depthgrow.models.base.Family`),
found by name, and building a model from its config. A new family is a new module: nothing here changes."""

from __future__ import annotations

import importlib
import pkgutil

import torch

from depthgrow.models.base import Family, GrowableModel, ModelConfig
from depthgrow.models.gpt2 import GPT2, GPT2Config
from depthgrow.models.llama import Llama, LlamaConfig
from depthgrow.models.moe import MoE, MoEConfig
from depthgrow.models.resnet import ResNet, ResNetConfig


def _declared_families() -> dict[str, Family]:
    """Every ``FAMILY`` of a module of this package, by family name, in module-name order."""
    families: dict[str, Family] = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        family = getattr(importlib.import_module(f"{__name__}.{module_info.name}"), "FAMILY", None)
        if isinstance(family, Family):
            if family.name in families:
                raise RuntimeError(f"two modules declare the model family {family.name!r}")
            families[family.name] = family
    return families


FAMILIES: dict[str, Family] = _declared_families()


def skeleton(config: ModelConfig) -> GrowableModel:
    """The model on the meta device: its structure, no memory and no values."""
    with torch.device("meta"):
        return FAMILIES[config.family].model(config)


def build_model(config: ModelConfig, *, seed: int, device: str | torch.device = "cpu") -> GrowableModel:
    """Build on the meta device (no memory for weights that are overwritten anyway), allocate on
    ``device``, then initialise every parameter with ``init_weights(seed)``."""
    model = skeleton(config)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


__all__ = [
    "FAMILIES",
    "GPT2",
    "Family",
    "GPT2Config",
    "GrowableModel",
    "Llama",
    "LlamaConfig",
    "MoE",
    "MoEConfig",
    "ModelConfig",
    "ResNet",
    "ResNetConfig",
    "build_model",
    "skeleton",
]
