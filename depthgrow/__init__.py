"""depthgrow: progressive depth expansion for PyTorch.

Train a zero- or one-layer model for most of the run, grow it once to full depth with :func:`grow`,
and finish as good as a model trained at full depth all along, for a fraction of the compute.
"""

from depthgrow.config import RunConfig, load_config
from depthgrow.errors import DepthgrowError
from depthgrow.growth import INITS, GrowthConfig, grow
from depthgrow.models import GPT2, GPT2Config, Llama, LlamaConfig, MoE, MoEConfig, ResNet, ResNetConfig, build_model
from depthgrow.optim import NormalizedSGD, OptimConfig, OptimizerChain, build_optimizer
from depthgrow.presets import PRESETS, preset
from depthgrow.schedule import GrowthPlan, ScheduleConfig, growth_plan, lr_multiplier
from depthgrow.train import RunResult, train

__all__ = [
    "GPT2",
    "INITS",
    "PRESETS",
    "DepthgrowError",
    "GPT2Config",
    "Llama",
    "LlamaConfig",
    "MoE",
    "MoEConfig",
    "GrowthConfig",
    "GrowthPlan",
    "NormalizedSGD",
    "OptimConfig",
    "OptimizerChain",
    "ResNet",
    "ResNetConfig",
    "RunConfig",
    "RunResult",
    "ScheduleConfig",
    "build_model",
    "build_optimizer",
    "grow",
    "growth_plan",
    "load_config",
    "lr_multiplier",
    "preset",
    "train",
]
