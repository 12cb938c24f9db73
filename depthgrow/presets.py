"""Named model configs. The CPU-sized ones read the embedded corpus as bytes (vocabulary 256) or, the
``-bpe`` ones, through a BPE vocabulary of 1024 tokens trained on it, which makes the embedding about a
third of the model, as in GPT-2 124M; the paper-sized ones use the vocabulary of the model they stand for
(GPT-2's 50257 BPE tokens with a 1024-token context, LLaMA-3's 128256 or DeepSeek-V3's 129280 with a
2048-token context). The ResNets classify images: scikit-learn's 8x8 digits on the CPU, CIFAR-10 for the
paper's."""

from __future__ import annotations

from depthgrow.errors import DepthgrowError
from depthgrow.models import ModelConfig
from depthgrow.models.gpt2 import GPT2Config
from depthgrow.models.llama import LlamaConfig
from depthgrow.models.moe import MoEConfig
from depthgrow.models.resnet import ResNetConfig

PRESETS: dict[str, ModelConfig] = {
    # a few thousand parameters per block: for tests and smoke runs
    "gpt2-test": GPT2Config(n_layer=2, n_embd=32, n_head=2, block_size=32, vocab_size=256),
    # the byte-level demo (the embedded default before the faithful recipe): four blocks of width 64, context 64
    "gpt2-micro": GPT2Config(n_layer=4, n_embd=64, n_head=2, block_size=64, vocab_size=256),
    # the embedded-default demo since the faithful recipe: four blocks of width 48 over a 1024-token BPE
    # vocabulary; the token and position embeddings are 31.6 % of its 165K parameters (GPT-2 124M: 31.7 %)
    "gpt2-micro-bpe": GPT2Config(n_layer=4, n_embd=48, n_head=2, block_size=64, vocab_size=1024),
    "gpt2-tiny": GPT2Config(n_layer=4, n_embd=128, n_head=4, block_size=128, vocab_size=256),
    "gpt2-mini": GPT2Config(n_layer=8, n_embd=256, n_head=8, block_size=256, vocab_size=256),
    # the paper's models
    "gpt2-124m": GPT2Config(n_layer=12, n_embd=768, n_head=12),
    "gpt2-350m": GPT2Config(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-7b": GPT2Config(n_layer=60, n_embd=3072, n_head=24),
    # LLaMA-3 style (RMSNorm, RoPE, SwiGLU, grouped-query attention); the CPU ones match gpt2-test/-tiny
    "llama-test": LlamaConfig(
        n_layer=2, n_embd=32, n_head=4, n_kv_head=2, ffn_hidden=96, block_size=32, vocab_size=256
    ),
    "llama-micro": LlamaConfig(  # the compare recipe's size (gpt2-micro)
        n_layer=4, n_embd=64, n_head=2, n_kv_head=1, ffn_hidden=176, block_size=64, vocab_size=256
    ),
    "llama-micro-bpe": LlamaConfig(  # gpt2-micro-bpe's size: the tied embedding 33 % of 151K parameters
        n_layer=4,
        n_embd=48,
        n_head=2,
        n_kv_head=1,
        ffn_hidden=128,
        block_size=64,
        vocab_size=1024,
        tie_embeddings=True,
    ),  # fmt: skip
    "llama-tiny": LlamaConfig(  # 0.80M parameters (gpt2-tiny: 0.83M)
        n_layer=4, n_embd=128, n_head=4, n_kv_head=2, ffn_hidden=352, block_size=128, vocab_size=256
    ),
    # the paper's dense scaling-law sizes, embeddings tied as in LLaMA-3.2 1B/3B (an untied 128256 x d head
    # would be most of the small ones); total parameters, and of the zero-layer model:
    "llama3-250m": LlamaConfig(  # 249.5M, zero-layer 98.5M
        n_layer=24, n_embd=768, n_head=12, n_kv_head=4, ffn_hidden=2048, tie_embeddings=True
    ),
    "llama3-500m": LlamaConfig(  # 492.1M, zero-layer 131.3M
        n_layer=32, n_embd=1024, n_head=16, n_kv_head=4, ffn_hidden=2816, tie_embeddings=True
    ),
    "llama3-1b": LlamaConfig(  # 1002.4M, zero-layer 197.0M
        n_layer=32, n_embd=1536, n_head=12, n_kv_head=4, ffn_hidden=4096, tie_embeddings=True
    ),
    "llama3-2b": LlamaConfig(  # 2024.4M, zero-layer 262.7M (LLaMA-3.2 1B's blocks, 28 of them)
        n_layer=28, n_embd=2048, n_head=16, n_kv_head=8, ffn_hidden=8192, tie_embeddings=True
    ),
    # DeepSeek-V3 style mixture of experts (sigmoid top-k routing, shared experts, bias balancing)
    "moe-test": MoEConfig(
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_kv_head=2,
        n_expert=4,
        top_k=2,
        n_shared_expert=1,
        expert_hidden=32,
        block_size=32,
        vocab_size=256,
    ),
    "moe-micro": MoEConfig(  # the compare recipe's size: active parameters near gpt2-micro's
        n_layer=4,
        n_embd=64,
        n_head=2,
        n_kv_head=1,
        n_expert=8,
        top_k=2,
        n_shared_expert=1,
        expert_hidden=64,
        block_size=64,
        vocab_size=256,
    ),
    "moe-micro-bpe": MoEConfig(  # gpt2-micro-bpe's active size: the tied embedding 30 % of the active parameters
        n_layer=4,
        n_embd=48,
        n_head=2,
        n_kv_head=1,
        n_expert=8,
        top_k=2,
        n_shared_expert=1,
        expert_hidden=48,
        block_size=64,
        vocab_size=1024,
    ),
    "moe-tiny": MoEConfig(  # 2.04M parameters, 0.86M active
        n_layer=4,
        n_embd=128,
        n_head=4,
        n_kv_head=2,
        n_expert=8,
        top_k=2,
        n_shared_expert=1,
        expert_hidden=128,
        block_size=128,
        vocab_size=256,
    ),
    # the paper's MoE sizes, named by active parameters; 64 routed experts, 6 active, 2 shared, as
    # DeepSeek-V2-Lite; embeddings tied (an untied head alone would be 0.1B of the 0.2B active):
    "deepseek-v3-200m": MoEConfig(  # 203.7M active, 819.5M total, zero-layer 99.3M
        n_layer=12, n_embd=768, n_head=12, n_kv_head=4, n_expert=64, top_k=6, n_shared_expert=2, expert_hidden=384
    ),
    "deepseek-v3-500m": MoEConfig(  # 498.9M active, 2688.3M total, zero-layer 132.4M
        n_layer=24, n_embd=1024, n_head=16, n_kv_head=4, n_expert=64, top_k=6, n_shared_expert=2, expert_hidden=512
    ),
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
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise DepthgrowError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
