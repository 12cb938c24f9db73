"""Compute accounting: FLOPs of a run whose depth follows a growth plan, fixed vs progressive.

The per-unit cost (per token, per image) of each family is derived in its config's ``flops_per_token`` or
``flops_per_unit`` docstring. Two
countings: ``DEPTHGROW`` (the default) counts the matrix multiplies a step really does, attention
scores included; ``PAPER`` is the paper's 6·N with N every parameter, embeddings included, which is how
it calls a zero-layer GPT-2 124M "39M" and gets 80 % savings for the 7B model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from depthgrow.models import ModelConfig
from depthgrow.schedule import GrowthPlan


@dataclass(frozen=True)
class FlopCounting:
    name: str
    count_embeddings: bool
    count_attention: bool

    def per_unit(self, config: ModelConfig) -> float:
        return config.flops_per_unit(count_embeddings=self.count_embeddings, count_attention=self.count_attention)


DEPTHGROW = FlopCounting("depthgrow", count_embeddings=False, count_attention=True)
PAPER = FlopCounting("paper", count_embeddings=True, count_attention=False)


def plan_flops(
    config: ModelConfig, plan: GrowthPlan, *, total_steps: int, units_per_step: int, counting: FlopCounting
) -> float:
    """Training FLOPs of ``total_steps`` steps whose depth follows ``plan``."""
    bounds = [0, *plan.steps, total_steps]
    return sum(
        (end - start) * units_per_step * counting.per_unit(config.with_depth(depth))
        for depth, start, end in zip(plan.depths, bounds[:-1], bounds[1:], strict=True)
    )


@dataclass(frozen=True)
class ComputeComparison:
    counting: str
    params_small: int  # every parameter used per token (active ones for mixtures of experts)
    params_large: int
    flops_fixed: float
    flops_progressive: float

    @property
    def fraction(self) -> float:
        return self.flops_progressive / self.flops_fixed

    @property
    def speedup(self) -> float:
        return self.flops_fixed / self.flops_progressive


def compare_compute(
    config: ModelConfig, plan: GrowthPlan, *, total_steps: int, units_per_step: int, counting: FlopCounting
) -> ComputeComparison:
    """The progressive run of ``plan`` against a run at the target depth throughout."""
    fixed = GrowthPlan(depths=(plan.target_depth,), steps=())
    return ComputeComparison(
        counting=counting.name,
        params_small=config.with_depth(plan.initial_depth).num_active_params(),
        params_large=config.with_depth(plan.target_depth).num_active_params(),
        flops_fixed=plan_flops(
            config, fixed, total_steps=total_steps, units_per_step=units_per_step, counting=counting
        ),
        flops_progressive=plan_flops(
            config, plan, total_steps=total_steps, units_per_step=units_per_step, counting=counting
        ),
    )


# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched against the device name
# in this order (H100 PCIe and NVL before the SXM figure that a bare "H100" gets, L40S and L40 before L4)
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)


def peak_tflops(device: torch.device, configured: float | None, precision: str) -> float | None:
    """The peak that model FLOPs utilisation (MFU) is measured against: ``configured`` if given, else the
    bf16 peak of a known GPU when training in bf16 (``precision`` auto or bf16 on CUDA), else None (no
    MFU shown: a CPU's peak is not known here)."""
    if configured is not None:
        return configured
    if device.type != "cuda" or precision == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)
