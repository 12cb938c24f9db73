"""Model families: name -> (config class, model class), and building a model from its config."""

from __future__ import annotations

import torch
from torch import nn

from depthgrow.models.base import GrowableModel, ModelConfig
from depthgrow.models.gpt2 import GPT2, GPT2Config
from depthgrow.models.llama import Llama, LlamaConfig
from depthgrow.models.moe import MoE, MoEConfig
from depthgrow.models.resnet import ResNet, ResNetConfig

FAMILIES: dict[str, tuple[type[ModelConfig], type[nn.Module]]] = {
    GPT2Config.family: (GPT2Config, GPT2),
    LlamaConfig.family: (LlamaConfig, Llama),
    MoEConfig.family: (MoEConfig, MoE),
    ResNetConfig.family: (ResNetConfig, ResNet),
}


def build_model(config: ModelConfig, *, seed: int, device: str | torch.device = "cpu") -> nn.Module:
    """Build on the meta device (no memory for weights that are overwritten anyway), allocate on
    ``device``, then initialise every parameter with ``init_weights(seed)``."""
    _, model_class = FAMILIES[config.family]
    with torch.device("meta"):
        model = model_class(config)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


__all__ = [
    "FAMILIES",
    "GPT2",
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
]
