"""depthgrow: progressive depth expansion for PyTorch.

Train a zero- or one-layer model for most of the run, grow it once to full depth with :func:`grow`,
and finish as good as a model trained at full depth all along, for a fraction of the compute.

The names below are imported on first use, so that ``import depthgrow`` (and the ``depthgrow`` command's
start, which handles Ctrl-C before torch is loaded) costs nothing until one is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RunConfig": "depthgrow.config",
    "load_config": "depthgrow.config",
    "DepthgrowError": "depthgrow.errors",
    "INITS": "depthgrow.growth",
    "METHODS": "depthgrow.growth",
    "GrowthConfig": "depthgrow.growth",
    "grow": "depthgrow.growth",
    "GPT2": "depthgrow.models",
    "GPT2Config": "depthgrow.models",
    "Llama": "depthgrow.models",
    "LlamaConfig": "depthgrow.models",
    "MoE": "depthgrow.models",
    "MoEConfig": "depthgrow.models",
    "ResNet": "depthgrow.models",
    "ResNetConfig": "depthgrow.models",
    "build_model": "depthgrow.models",
    "method_plan": "depthgrow.methods",
    "NormalizedSGD": "depthgrow.optim",
    "OptimConfig": "depthgrow.optim",
    "OptimizerChain": "depthgrow.optim",
    "build_optimizer": "depthgrow.optim",
    "PRESETS": "depthgrow.presets",
    "preset": "depthgrow.presets",
    "GrowthPlan": "depthgrow.schedule",
    "ScheduleConfig": "depthgrow.schedule",
    "growth_plan": "depthgrow.schedule",
    "lr_multiplier": "depthgrow.schedule",
    "LoadedRun": "depthgrow.sampling",
    "generate": "depthgrow.sampling",
    "load_run": "depthgrow.sampling",
    "Display": "depthgrow.trainer",
    "RunResult": "depthgrow.trainer",
    "Trainer": "depthgrow.trainer",
    "train": "depthgrow.trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'depthgrow' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
