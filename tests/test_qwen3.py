"""What the Qwen3 family adds to the LLaMA decoder (QK-norm, a head size apart from the width) and its export
as Hugging Face's Qwen3ForCausalLM. The family contract (test_contract.py) runs qwen3-test, tied as Qwen3's
small models are, through counts, growth and the export; here the untied head, the exported config's fields,
the norms themselves and what an import refuses."""

import dataclasses
import json

import pytest
import torch
from test_export import (
    SMALL,
    TOKENS,
    assert_imports_back,
    depthgrow_logits,
    exported_with_parity,
    perturbed_model,
)
from test_families import tokens
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import depthgrow
from depthgrow import build_model, preset
from depthgrow.export import import_pretrained
from depthgrow.models.llama import Llama
from depthgrow.models.qwen3 import Qwen3Config
from depthgrow.trainer import loss_fn

transformers = pytest.importorskip("transformers")

TEST = preset("qwen3-test")
UNTIED = dataclasses.replace(TEST, tie_embeddings=False)


def test_the_test_preset_has_heads_apart_from_the_width():
    # so that every test of qwen3-test takes the path of a head size other than n_embd / n_head
    assert TEST.head_dim == 16 != TEST.n_embd // TEST.n_head
    attention = build_model(TEST, seed=0).model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (4 * 16, 32) and attention.k_proj.weight.shape == (2 * 16, 32)
    assert attention.o_proj.weight.shape == (32, 4 * 16)
    assert attention.q_norm.weight.shape == attention.k_norm.weight.shape == (16,)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_untied_export_matches_hugging_face_qwen3_and_round_trips(tmp_path, depth):
    # weights large enough (init_std 0.3) that attention is far from uniform; every parameter perturbed, so
    # that the q/k norm gains are not 1
    config = dataclasses.replace(UNTIED, weight_init="standard", init_std=0.3).with_depth(depth)
    out, model, expected = exported_with_parity(tmp_path, config, seed=depth)

    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["Qwen3ForCausalLM"] and hf_config["num_hidden_layers"] == depth
    assert (hf_config["head_dim"], hf_config["intermediate_size"]) == (16, 96)
    assert hf_config["use_sliding_window"] is False and hf_config["sliding_window"] is None
    assert hf_config["layer_types"] == ["full_attention"] * depth
    assert hf_config["attention_bias"] is False and hf_config["tie_word_embeddings"] is False
    assert hf_config["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}
    assert hf_config["rms_norm_eps"] == 1e-6

    assert_imports_back(out, config, model, expected)


def test_queries_and_keys_are_normalised_per_head():
    # an RMSNorm forgets the scale of its input (but for its epsilon, so scaled up, not down): scaling q_proj
    # and k_proj changes nothing under QK-norm, while it changes the attention logits (so the output) of the
    # same weights without it
    model = perturbed_model(TEST.with_depth(1))
    with torch.device("meta"):
        plain = Llama(model.config)  # LLaMA's attention on Qwen3's shapes: the same state but the norms
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "_norm." not in k}, assign=True)
    before, plain_before = depthgrow_logits(model, TOKENS), depthgrow_logits(plain, TOKENS)
    assert not torch.allclose(before, plain_before, atol=1e-2)  # the norms and their gains do something
    with torch.no_grad():
        for attention in (model.model.layers[0].self_attn, plain.model.layers[0].self_attn):
            attention.q_proj.weight.mul_(4.0)
            attention.k_proj.weight.mul_(3.0)
    torch.testing.assert_close(depthgrow_logits(model, TOKENS), before, rtol=0, atol=5e-5)
    assert not torch.allclose(depthgrow_logits(plain, TOKENS), plain_before, atol=1e-2)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_untied_parameter_and_flop_counts_match_the_model(depth):
    config = UNTIED.with_depth(depth)
    model = build_model(config, seed=0)
    assert config.num_params() == sum(p.numel() for p in model.parameters())
    assert config.num_params(embeddings=False) == config.num_params() - model.model.embed_tokens.weight.numel()
    # the model is allocated uninitialised: the init sets the q/k norm gains to 1, as every RMSNorm gain
    for block in model.model.layers:
        assert torch.equal(block.self_attn.q_norm.weight, torch.ones(16))
        assert torch.equal(block.self_attn.k_norm.weight, torch.ones(16))
    idx = tokens(config, 0, batch=2)
    # the math backend runs attention as matmuls, which the counter sees; the norms are no matmuls
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_fn(model(idx), idx).backward()
    assert counter.get_total_flops() == config.flops_per_token() * idx.numel()


def test_paper_presets_have_qwen3s_sizes():
    # Qwen3-0.6B and -1.7B: 0.6B and 1.7B parameters, of which 0.44B and 1.4B outside the embedding
    for name, total, blocks in [("qwen3-0.6b", 0.6e9, 0.44e9), ("qwen3-1.7b", 1.7e9, 1.4e9)]:
        config = preset(name)
        assert config.num_params() == pytest.approx(total, rel=0.02), name
        assert config.num_params(embeddings=False) == pytest.approx(blocks, rel=0.02), name
        assert (config.head_dim, config.vocab_size, config.rope_theta, config.norm_eps) == (128, 151936, 1e6, 1e-6)
        assert config.tie_embeddings, name
    assert Qwen3Config() == preset("qwen3-0.6b")


def test_config_problems_include_the_head_size():
    assert all(preset(name).problems() == [] for name in ("qwen3-test", "qwen3-micro", "qwen3-micro-bpe"))
    assert "model.head_size must be >= 1" in " ".join(dataclasses.replace(TEST, head_size=0).problems())
    assert "model.head_size (15) must be even" in " ".join(dataclasses.replace(TEST, head_size=15).problems())


REFUSED = {
    "sliding window": (
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=0),
        r"^this Qwen3 differs from depthgrow's: 1 of its layers attend within a sliding window \(8 tokens\)$",
    ),
    "everything else": (
        dict(
            hidden_act="gelu",
            rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0},
            attention_bias=True,
            attention_dropout=0.1,
        ),
        r"^this Qwen3 differs from depthgrow's: hidden_act is 'gelu', not 'silu' \(SwiGLU\); its rotary embedding "
        r"is scaled \('yarn'\), not plain RoPE; its attention projections have biases; it has attention dropout "
        r"\(0.1\)$",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_import_refuses_a_qwen3_depthgrow_cannot_express_in_one_line(tmp_path, case):
    fields, message = REFUSED[case]
    transformers.Qwen3Config(**SMALL, **fields).save_pretrained(tmp_path)  # refused from config.json alone
    with pytest.raises(depthgrow.DepthgrowError, match=message):
        import_pretrained(tmp_path)
