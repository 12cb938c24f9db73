import dataclasses
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from depthgrow import GPT2Config, build_model, preset
from depthgrow.distributed import draw_in_pieces
from depthgrow.models import FAMILIES, skeleton
from depthgrow.trainer import loss_fn

CONFIGS = [
    GPT2Config(n_layer=0, n_embd=32, n_head=2, block_size=16, vocab_size=256),
    GPT2Config(n_layer=3, n_embd=32, n_head=4, block_size=16, vocab_size=300),
    GPT2Config(n_layer=2, n_embd=48, n_head=3, block_size=8, vocab_size=256, bias=False),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"L{c.n_layer}-bias{c.bias}")
def test_parameter_count_formula_matches_the_model(config):
    model = build_model(config, seed=0)
    assert config.num_params() == sum(p.numel() for p in model.parameters())
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    assert config.num_params(embeddings=False) == config.num_params() - embeddings


def test_paper_sizes():
    # the paper's counts: GPT-2 124M, its zero-layer model 39M and one-layer model 46M; 7B at 60 layers
    assert round(preset("gpt2-124m").num_params() / 1e6, 2) == 124.44
    assert round(preset("gpt2-124m").with_depth(0).num_params() / 1e6) == 39
    assert round(preset("gpt2-124m").with_depth(1).num_params() / 1e6) == 46
    assert round(preset("gpt2-7b").num_params() / 1e9, 2) == 6.95


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"L{c.n_layer}-bias{c.bias}")
def test_flops_per_token_matches_torch_flop_counter(config):
    model = build_model(config, seed=0)
    batch, T = 2, config.block_size
    idx = torch.randint(0, config.vocab_size, (batch, T))
    # the math backend runs attention as matmuls, which the counter sees (the fused CPU kernel it does not)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_fn(model(idx), idx).backward()
    assert counter.get_total_flops() == config.flops_per_token() * batch * T


def test_paper_counting_is_six_times_all_parameters():
    config = preset("gpt2-124m")
    assert config.flops_per_token(count_embeddings=True, count_attention=False) == 6 * config.num_params()


def test_zero_layer_model_is_embeddings_norm_and_tied_head():
    model = build_model(GPT2Config(n_layer=0, n_embd=16, n_head=2, block_size=8, vocab_size=256), seed=0)
    assert {name for name, _ in model.named_parameters()} == {
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
    }
    idx = torch.randint(0, 256, (3, 8))
    x = model.transformer.ln_f(model.transformer.wte(idx) + model.transformer.wpe(torch.arange(8)))
    torch.testing.assert_close(model(idx), x @ model.transformer.wte.weight.T)


def test_parameter_names_follow_hugging_face_gpt2():
    model = build_model(CONFIGS[1], seed=0)
    names = {name for name, _ in model.named_parameters()}
    for suffix in (
        "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
        "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
        "mlp.c_proj.weight", "mlp.c_proj.bias",
    ):  # fmt: skip
        assert f"transformer.h.2.{suffix}" in names


def test_init_scales_residual_projections_with_depth():
    config = GPT2Config(n_layer=16, n_embd=256, n_head=4, block_size=8, vocab_size=256, weight_init="standard")
    model = build_model(config, seed=0)
    block = model.transformer.h[3]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(32), rel=0.02)
    assert block.attn.c_proj.bias.abs().sum() == 0
    assert torch.equal(block.ln_1.weight, torch.ones(256))


def test_block_init_depends_on_seed_and_index_only():
    shallow = build_model(CONFIGS[1].with_depth(2), seed=7)
    deep = build_model(CONFIGS[1].with_depth(2), seed=7)
    other_seed = build_model(CONFIGS[1].with_depth(2), seed=8)
    assert torch.equal(shallow.transformer.h[1].mlp.c_fc.weight, deep.transformer.h[1].mlp.c_fc.weight)
    assert not torch.equal(shallow.transformer.h[0].mlp.c_fc.weight, shallow.transformer.h[1].mlp.c_fc.weight)
    assert not torch.equal(shallow.transformer.h[1].mlp.c_fc.weight, other_seed.transformer.h[1].mlp.c_fc.weight)


def test_context_longer_than_block_size_is_refused():
    model = build_model(CONFIGS[0], seed=0)
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_model_drawn_a_piece_at_a_time_equals_one_drawn_whole(family):
    # FSDP2 builds a model on the meta device and draws it a piece at a time (each rank keeping its shards);
    # every value must be the one build_model draws, at several depths, the spectral init included
    for depth in (0, 3):
        for weight_init in ("standard", "spectral"):
            config = dataclasses.replace(preset(f"{family}-test"), weight_init=weight_init).with_depth(depth)
            whole = build_model(config, seed=5)
            pieces = skeleton(config)
            pieces.to_empty(device="cpu")
            draw_in_pieces(pieces, seed=5)
            drawn, expected = pieces.state_dict(), whole.state_dict()
            assert drawn.keys() == expected.keys()
            for name, value in expected.items():
                assert torch.equal(drawn[name], value), (family, depth, weight_init, name)
