"""Named model configs. The CPU-sized ones use the byte-level vocabulary (256) of the embedded corpus;
the paper-sized ones use GPT-2's BPE vocabulary (50257) and its 1024-token context."""

from __future__ import annotations

from depthgrow.errors import DepthgrowError
from depthgrow.models import ModelConfig
from depthgrow.models.gpt2 import GPT2Config

PRESETS: dict[str, ModelConfig] = {
    # a few thousand parameters per block: for tests and smoke runs
    "gpt2-test": GPT2Config(n_layer=2, n_embd=32, n_head=2, block_size=32, vocab_size=256),
    # the embedded-default demo: four blocks of width 128 on bytes, trains in minutes on 2 CPU cores
    "gpt2-tiny": GPT2Config(n_layer=4, n_embd=128, n_head=4, block_size=128, vocab_size=256),
    "gpt2-mini": GPT2Config(n_layer=8, n_embd=256, n_head=8, block_size=256, vocab_size=256),
    # the paper's models
    "gpt2-124m": GPT2Config(n_layer=12, n_embd=768, n_head=12),
    "gpt2-350m": GPT2Config(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-7b": GPT2Config(n_layer=60, n_embd=3072, n_head=24),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise DepthgrowError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
