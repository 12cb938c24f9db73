"""Named model configs. The CPU-sized ones read the embedded corpus as bytes (vocabulary 256) or, the
``-bpe`` ones, through a BPE vocabulary of 1024 tokens trained on it, which makes the embedding about a
third of the model, as in GPT-2 124M; the paper-sized ones use the vocabulary of the model they stand for
(GPT-2's 50257 BPE tokens with a 1024-token context, LLaMA-3's 128256, Qwen3's 151936, Mixtral's 32000 or
DeepSeek-V3's 129280 with a 2048-token context). The ResNets classify images: scikit-learn's 8x8 digits on
the CPU, CIFAR-10 for the paper's. Each family declares its presets beside its model (its ``FAMILY``)."""

from __future__ import annotations

from depthgrow.errors import DepthgrowError
from depthgrow.models import FAMILIES, ModelConfig


def _all_presets() -> dict[str, ModelConfig]:
    """Every family's presets (declared beside its model); a name is one config across all families."""
    presets: dict[str, ModelConfig] = {}
    for family in FAMILIES.values():
        for name, config in family.presets.items():
            if name in presets:
                raise RuntimeError(f"the model preset {name!r} is declared twice")
            presets[name] = config
    return presets


PRESETS = _all_presets()


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise DepthgrowError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
