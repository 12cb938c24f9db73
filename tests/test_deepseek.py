"""What is DeepSeek's own (the contract suite checks the presets as they are): latent attention with and
without the queries' latent, routed and dense feed-forwards, the export's interleaved rotary layout against a
model that Hugging Face built itself, and the HF configs that cannot be imported."""

import dataclasses
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from depthgrow import OptimConfig, build_model, build_optimizer, grow, preset
from depthgrow.errors import DepthgrowError
from depthgrow.models import FAMILIES
from depthgrow.models.deepseek import DeepseekConfig
from depthgrow.trainer import loss_fn

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from test_export import (  # noqa: E402 - needs transformers
    TOKENS,
    assert_imports_back,
    depthgrow_logits,
    exported_with_parity,
    perturbed_model,
)

from depthgrow.export import import_pretrained  # noqa: E402


def variants() -> list:
    """Both presets as they are (the queries through their latent, the head tied) and with a plain q_proj,
    an untied head and (routed) no shared expert."""
    found = []
    for name in ("deepseek-test", "deepseek-mla-test"):
        config = preset(name)
        other = dict(q_lora_rank=None, tie_embeddings=False)
        if config.moe:
            other["n_shared_expert"] = 0
        found += [config, dataclasses.replace(config, **other)]
    return found


def variant_id(config) -> str:
    return "-".join(
        [
            "moe" if config.moe else "dense",
            "qlatent" if config.q_lora_rank else "qproj",
            "tied" if config.tie_embeddings else "untied",
            f"shared{config.n_shared_expert}" if config.moe else "",
        ]
    ).strip("-")


VARIANTS = variants()


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_parameter_and_flop_counts_are_the_model_s(variant, depth):
    config = variant.with_depth(depth)
    model = build_model(config, seed=0)
    assert config.num_params() == sum(p.numel() for p in model.parameters())
    assert config.num_params(embeddings=False) == config.num_params() - model.model.embed_tokens.weight.numel()
    assert (config.num_active_params() < config.num_params()) == (config.moe and depth > 0)
    names = {name.split(".")[-2] for name, _ in model.named_parameters() if ".self_attn." in name}
    expected = {"kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"}
    expected |= {"q_proj"} if config.q_lora_rank is None else {"q_a_proj", "q_a_layernorm", "q_b_proj"}
    assert names == (expected if depth else set())

    idx = torch.randint(0, config.vocab_size, (2, config.block_size), generator=torch.Generator().manual_seed(0))
    # the math backend runs attention as matmuls, which the counter sees (the fused CPU kernel it does not)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_fn(model(idx), idx).backward()
    assert counter.get_total_flops() == config.flops_per_token() * idx.numel()


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_export_matches_hugging_face_and_imports_back(tmp_path, variant, depth):
    # weights large enough that attention is far from uniform and the logits are O(1)
    config = dataclasses.replace(variant, weight_init="standard", init_std=0.3).with_depth(depth)
    out, model, expected = exported_with_parity(tmp_path, config, seed=depth)

    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert hf_config["rope_interleave"] is True and hf_config["num_nextn_predict_layers"] == 0
    # a zero-layer dense export says 1: its (no) blocks are dense, and it imports as such
    assert hf_config["first_k_dense_replace"] == (0 if config.moe else max(depth, 1))
    assert hf_config["q_lora_rank"] == config.q_lora_rank and hf_config["num_key_value_heads"] == config.n_head
    assert_imports_back(out, config, model, expected)


def hf_config(**changes):
    """A tiny HF DeepSeek-V3 config that depthgrow imports, with ``changes``."""
    fields = dict(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        routed_scaling_factor=1.0,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return transformers.DeepseekV3Config(**{**fields, **changes})


@pytest.mark.parametrize(
    "changes",
    [
        {},  # num_mtp_layers=1, HF's default: the layers are no part of the logits, and ignored
        # dense blocks and HF's default grouped, scaled routing, which a dense model never reads
        dict(first_k_dense_replace=3, n_group=2, topk_group=1, routed_scaling_factor=2.5, q_lora_rank=None),
    ],
    ids=["moe", "dense"],
)
def test_a_model_hugging_face_built_imports_with_its_logits(tmp_path, changes):
    # HF's own init and DeepSeek's interleaved rotary layout: the import must reorder the rows itself
    hf = transformers.DeepseekV3ForCausalLM(hf_config(**changes)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
        for name, buffer in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
        expected = hf(TOKENS).logits
    assert expected.abs().max().item() > 1.0
    hf.save_pretrained(tmp_path)

    config, model = import_pretrained(tmp_path)
    assert config.moe == (changes == {}) and config.n_layer == 3
    assert (depthgrow_logits(model, TOKENS) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["deepseek-test", "deepseek-mla-test"])
def test_zero_growth_keeps_the_function(name):
    model = perturbed_model(preset(name).with_depth(1))
    optimizer = build_optimizer(model, OptimConfig(name="adamw", lr=1e-2))
    with torch.no_grad():
        before = model(TOKENS)
        grown = grow(model, optimizer, 3, "zero", seed=0).model.eval()
        after = grown(TOKENS)
    assert len(grown.model.layers) == 3
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        (dict(n_group=2, topk_group=1), "it routes within the best 1 of 2 expert groups"),
        (dict(routed_scaling_factor=2.5), "the routed experts' output is scaled by 2.5"),
        (dict(norm_topk_prob=False), "not normalised to sum to 1"),
        (dict(first_k_dense_replace=1), "its first 1 of 3 blocks have a dense feed-forward"),
        (
            dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "mscale_all_dim": 1.0}),
            "its rotary embedding is scaled ('yarn')",
        ),
        (dict(attention_bias=True), "its attention projections have biases"),
        (dict(rope_interleave=False), "laid out in halves"),
        (dict(num_key_value_heads=2), "num_key_value_heads is 2"),
    ],
    ids=["groups", "scaling", "unnormalised", "dense-first", "yarn", "bias", "halves", "kv-heads"],
)
def test_what_depthgrow_cannot_express_is_refused_in_one_line(changes, says):
    with pytest.raises(DepthgrowError) as refused:
        FAMILIES["deepseek"].hf.from_hf_config(hf_config(**changes))
    message = str(refused.value)
    assert message.startswith("this DeepseekV3 differs from depthgrow's: ") and "\n" not in message
    assert says in message


def test_config_problems_name_the_latent_attention_fields():
    # the head sizes are their own fields: a width that n_head does not divide is fine
    assert DeepseekConfig(n_embd=100, n_head=3, n_kv_head=3).problems() == []
    bad = DeepseekConfig(n_kv_head=4, q_lora_rank=0, kv_lora_rank=0, qk_rope_head_dim=5, v_head_dim=0, ffn_hidden=0)
    assert [problem.split(" must")[0] for problem in bad.problems()] == [
        "model.qk_rope_head_dim",
        "model.n_kv_head (4)",
        "model.q_lora_rank",
        "model.kv_lora_rank",
        "model.v_head_dim",
        "model.ffn_hidden",
    ]
