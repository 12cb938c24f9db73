"""CIFAR-style ResNet (He et al. 2016, section 4.2) at any number of residual blocks per stage, 0 included.

The network is a stem (conv3x3 + BatchNorm + ReLU at ``width`` channels), ``n_stage`` stages and a classifier
on globally average-pooled features. Stage i works at ``width · 2**i`` channels. The original ResNet folds
each stage's downsampling into its first block; here it is a separate, fixed *transition* that exists at
every depth (absent in stage 0): by default He et al.'s parameter-free option-A shortcut (every other
pixel, channels zero-padded to the stage's width), or with ``transition="conv"`` a conv3x3 stride 2 +
BatchNorm + ReLU. Every residual block is then the same BasicBlock at constant width and stride 1 with an
identity shortcut, so a stage can hold any number of blocks, and a zero-layer ResNet is the stem, the
pooling and the classifier: the paper's zero-layer ResNet. ``n_layer`` counts the blocks of each stage;
growth sets every stage to the same depth.

Parameter names: ``stem.conv``/``stem.bn``, ``stages.{i}.transition.conv``/``.bn`` (conv transitions,
i >= 1), ``stages.{i}.blocks.{j}.conv1``/``bn1``/``conv2``/``bn2``, ``classifier``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from depthgrow.docfield import doc_field
from depthgrow.models.base import (
    EMBEDDING_STREAM,
    Family,
    GrowableModel,
    ModelConfig,
    block_generator,
    materialize,
    normal_,
)
from depthgrow.seeding import derived_generator

CLASSIFIER_STD = 0.01


@dataclass(kw_only=True, frozen=True)
class ResNetConfig(ModelConfig):
    family: ClassVar[str] = "resnet"
    task: ClassVar[str] = "image"
    unit: ClassVar[str] = "image"
    n_layer: int = doc_field(3, "residual blocks per stage: the depth that growth changes")
    width: int = doc_field(16, "channels of stage 0; stage i has width * 2**i")
    n_stage: int = doc_field(3, "stages, each halving the feature maps' side after the first")
    in_channels: int = doc_field(3, "channels of the input images (3: RGB, 1: grey)")
    num_classes: int = doc_field(10, "classes the classifier tells apart")
    image_size: int = doc_field(32, "side of the square input images (the layers work at any size; FLOPs depend on it)")
    transition: Literal["shortcut", "conv"] = doc_field(
        "shortcut", "between stages: shortcut, parameter-free (He et al.'s option A), or conv, a conv3x3 stride 2"
    )
    zero_init_residual: bool = doc_field(
        False, "each block's last BatchNorm gain starts at 0 (the block starts as identity)"
    )

    def problems(self) -> list[str]:
        found = super().problems()
        for name in ("width", "n_stage", "in_channels", "num_classes", "image_size"):
            if getattr(self, name) < 1:
                found.append(f"model.{name} must be >= 1, got {getattr(self, name)}")
        return found

    def units_per_example(self) -> int:
        return 1

    def stage_widths(self) -> list[int]:
        return [self.width * 2**i for i in range(self.n_stage)]

    def stage_sizes(self) -> list[int]:
        """Side of each stage's feature maps: a 3x3 conv with stride 2 and padding 1 maps s to ceil(s / 2)."""
        sizes = [self.image_size]
        for _ in range(1, self.n_stage):
            sizes.append(-(-sizes[-1] // 2))
        return sizes

    def num_params(self, *, embeddings: bool = True) -> int:
        """Every parameter; a ResNet has no embedding, so ``embeddings`` changes nothing."""
        widths = self.stage_widths()
        # conv3x3 weights 9·c_in·c_out (no biases), BatchNorm gain and bias 2·c
        stem = 9 * self.in_channels * widths[0] + 2 * widths[0]
        transitions = 0
        if self.transition == "conv":
            transitions = sum(9 * c_in * c_out + 2 * c_out for c_in, c_out in pairwise(widths))
        blocks = self.n_layer * sum(18 * c * c + 4 * c for c in widths)
        classifier = widths[-1] * self.num_classes + self.num_classes
        return stem + transitions + blocks + classifier

    def flops_per_unit(self, *, count_embeddings: bool = False, count_attention: bool = True) -> float:
        """Training FLOPs (forward + backward) per image.

        A k x k convolution from C_in to C_out channels with an H x W output costs 2·k²·C_in·C_out·H·W FLOPs
        forward. Backward computes the input gradient and the weight gradient, each a convolution as large,
        so training costs 3x forward - except for the stem, whose input (the image) needs no gradient: its
        backward is the weight gradient only, 2x forward in all. With stage i at width c_i = width·2**i and
        side s_i (s_0 = image_size, s_i = ceil(s_{i-1} / 2)), C the image channels and K the classes:

        ==================  ====================================
        stem                2 · 2·9·C·c_0·s_0²
        conv transition     3 · 2·9·c_{i-1}·c_i·s_i² (i >= 1; a shortcut transition is free)
        each block          3 · 2 · 2·9·c_i²·s_i² (two convs)
        classifier          3 · 2·c_last·K
        ==================  ====================================

        BatchNorm, ReLU, the residual additions and the pooling are not counted (neither does
        ``torch.utils.flop_counter``, which this matches exactly). The paper's 6·N counting has no
        meaning for a network whose weights are applied at many positions, so ``count_embeddings=True``
        gives the same number; ``count_attention`` is ignored (there is no attention).
        """
        widths, sizes = self.stage_widths(), self.stage_sizes()
        conv = lambda c_in, c_out, side: 2 * 9 * c_in * c_out * side * side  # noqa: E731
        flops = 2 * conv(self.in_channels, widths[0], sizes[0])
        if self.transition == "conv":
            flops += sum(3 * conv(widths[i - 1], widths[i], sizes[i]) for i in range(1, self.n_stage))
        flops += self.n_layer * sum(3 * 2 * conv(c, c, s) for c, s in zip(widths, sizes, strict=True))
        flops += 3 * 2 * widths[-1] * self.num_classes
        return float(flops)


class ConvBN(nn.Module):
    """conv3x3 (no bias: BatchNorm's bias replaces it) + BatchNorm + ReLU: the stem and the transitions."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class Shortcut(nn.Module):
    """He et al.'s option A between stages: every other pixel, channels zero-padded; no parameters."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.pad = c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, self.pad))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, added to the input, then ReLU; constant width, stride 1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        # x is a ReLU output (>= 0), so a branch zeroed by growth gives relu(x + 0) = x exactly
        return F.relu(x + branch)


class Stage(nn.Module):
    def __init__(self, c_in: int, c_out: int, n_block: int, *, first: bool, transition: str) -> None:
        super().__init__()
        if first:
            self.transition = nn.Identity()
        else:
            self.transition = Shortcut(c_in, c_out) if transition == "shortcut" else ConvBN(c_in, c_out, stride=2)
        self.blocks = nn.ModuleList(BasicBlock(c_out) for _ in range(n_block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transition(x)
        for block in self.blocks:
            x = block(x)
        return x


class ResNet(GrowableModel):
    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        widths = config.stage_widths()
        self.stem = ConvBN(config.in_channels, widths[0], stride=1)
        self.stages = nn.ModuleList(
            Stage(widths[max(i - 1, 0)], widths[i], config.n_layer, first=i == 0, transition=config.transition)
            for i in range(config.n_stage)
        )
        self.classifier = nn.Linear(widths[-1], config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes)."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.classifier(x.mean(dim=(2, 3)))

    # --- what growth needs (see depthgrow.models.base.GrowableModel) ---

    def block_stacks(self) -> dict[str, nn.ModuleList]:
        return {f"stages.{i}.blocks": stage.blocks for i, stage in enumerate(self.stages)}

    def make_block(self, stack: str) -> nn.Module:
        channels = self.config.stage_widths()[_stage_index(stack)]
        return materialize(lambda: BasicBlock(channels), like=self.stem.conv.weight)

    def residual_projections(self, block: nn.Module) -> list[nn.Module]:
        # with bn2's gain and bias at 0 the branch outputs exactly 0, whatever the convs hold
        return [block.bn2]

    def init_block(self, stack: str, index: int, block: nn.Module, seed: int) -> None:
        zero_gains = [block.bn2] if self.config.zero_init_residual else []
        _he_init(block, self.config, block_generator(seed, stack, index), zero_gains=zero_gains)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise every parameter and buffer:

        ==============================  ===================================================
        parameter / buffer              initialisation
        ==============================  ===================================================
        conv weights                    N(0, 2 / fan_out), fan_out = C_out·3·3 (He et al.
                                        2015, mode fan_out, as torchvision's ResNet); with
                                        ``weight_init="spectral"`` N(0, s(C_out, C_in·3·3)²)
        BatchNorm gain / bias           1 / 0; ``bn2`` gain 0 with ``zero_init_residual``
        BatchNorm running mean / var    0 / 1, ``num_batches_tracked`` 0
        classifier weight / bias        N(0, 0.01²), spectral N(0, s(K, C)²) / 0
        ==============================  ===================================================

        s is :func:`~depthgrow.models.base.spectral_std`.

        The stem, the transitions and the classifier draw, in that order, from one generator derived from
        (seed, EMBEDDING_STREAM), so they do not depend on the depth; each block draws from its own
        generator, derived from (seed, stage, block index), on the CPU: block j of stage i of a model grown
        to depth L is initialised bit for bit as in a fresh depth-L model with the same seed, on any device.
        """
        generator = derived_generator(seed, EMBEDDING_STREAM)
        _he_init(self.stem, self.config, generator)
        for stage in self.stages:
            _he_init(stage.transition, self.config, generator)
        classifier_std = self.config.matrix_std(*self.classifier.weight.shape, CLASSIFIER_STD)
        normal_(self.classifier.weight, classifier_std, generator)
        self.classifier.bias.zero_()
        for stack, blocks in self.block_stacks().items():
            for index, block in enumerate(blocks):
                self.init_block(stack, index, block, seed)


def _stage_index(stack: str) -> int:
    """``"stages.2.blocks"`` -> 2."""
    return int(stack.split(".")[1])


@torch.no_grad()
def _he_init(
    module: nn.Module, config: ResNetConfig, generator: torch.Generator, *, zero_gains: Sequence[nn.Module] = ()
) -> None:
    """Conv weights N(0, 2 / fan_out) (or spectral, see ``init_weights``) in module order, BatchNorm gains 1 (0
    for ``zero_gains``), biases 0 and running statistics reset (the model was allocated with ``to_empty``, so
    the buffers hold garbage)."""
    zero_ids = {id(m) for m in zero_gains}
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            normal_(m.weight, config.matrix_std(m.out_channels, fan_in, math.sqrt(2.0 / fan_out)), generator)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.fill_(0.0 if id(m) in zero_ids else 1.0)
            m.bias.zero_()
            m.reset_running_stats()


FAMILY = Family(
    config=ResNetConfig,
    model=ResNet,
    presets={
        # CIFAR-style ResNets with parameter-free transitions; n_layer is blocks per stage (3 stages). Total
        # parameters, and of the zero-layer model (stem and classifier):
        "resnet-test": ResNetConfig(n_layer=1, width=4, in_channels=1, image_size=8),  # 6.4K, zero-layer 0.2K
        # the embedded-default demo on scikit-learn's 8x8 digits, trains in minutes on 2 CPU cores
        "resnet-digits": ResNetConfig(n_layer=4, width=16, in_channels=1, image_size=8),  # 389.7K, zero-layer 0.8K
        # He et al.'s CIFAR-10 depths 6n + 2; the first block of each later stage works at the stage's full
        # width (the original's is a stride-2 block from half the width), hence 0.29M rather than 0.27M
        "resnet20": ResNetConfig(n_layer=3),  # 292.8K, zero-layer 1.1K
        "resnet56": ResNetConfig(n_layer=9),  # 876.1K, zero-layer 1.1K
        "resnet110": ResNetConfig(n_layer=18),  # 1751.0K, zero-layer 1.1K
    },
)
