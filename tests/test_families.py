import dataclasses
import math

import pytest
import torch
from growth_checks import OPTIMIZERS, SEED
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from depthgrow import build_model, build_optimizer, load_config, preset, train
from depthgrow.models import LlamaConfig, MoEConfig, moe
from depthgrow.trainer import loss_fn

FAMILIES = ["llama-test", "moe-test"]


def tokens(config, step: int, batch: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    return torch.randint(0, config.vocab_size, (batch, config.block_size), generator=generator)


def variants(name: str) -> list:
    """The preset, and the preset with its embeddings tied the other way and (MoE) no shared expert."""
    config = preset(name)
    other = {"tie_embeddings": not config.tie_embeddings}
    if isinstance(config, MoEConfig):
        other["n_shared_expert"] = 0
    return [config, dataclasses.replace(config, **other)]


def config_id(config) -> str:
    return f"{config.family}-L{config.n_layer}-{'tied' if config.tie_embeddings else 'untied'}"


COUNTED = [config.with_depth(depth) for name in FAMILIES for config in variants(name) for depth in (0, 1, 3)]


# --- parameter and FLOP counts ---


@pytest.mark.parametrize("config", COUNTED, ids=config_id)
def test_parameter_count_formula_matches_the_model(config):
    model = build_model(config, seed=0)
    assert config.num_params() == sum(p.numel() for p in model.parameters())
    assert config.num_params(embeddings=False) == config.num_params() - model.model.embed_tokens.weight.numel()
    assert ("lm_head.weight" in dict(model.named_parameters())) != config.tie_embeddings


@pytest.mark.parametrize("config", COUNTED, ids=config_id)
def test_flops_per_token_matches_torch_flop_counter(config):
    model = build_model(config, seed=0)
    idx = tokens(config, 0, batch=2)
    # the math backend runs attention as matmuls, which the counter sees (the fused CPU kernel it does not)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_fn(model(idx), idx).backward()
    assert counter.get_total_flops() == config.flops_per_token() * idx.numel()


def test_paper_counting_is_six_times_the_parameters_a_token_uses():
    llama, moe = preset("llama3-250m"), preset("deepseek-v3-200m")
    assert llama.flops_per_token(count_embeddings=True, count_attention=False) == 6 * llama.num_params()
    assert moe.flops_per_token(count_embeddings=True, count_attention=False) == 6 * moe.num_active_params()
    assert moe.num_active_params() < moe.num_params()


def test_active_parameters_are_those_a_token_reaches():
    config = preset("moe-test").with_depth(3)
    model = build_model(config, seed=0)
    loss_fn(model(tokens(config, 0, batch=1)[:, :1]), torch.zeros(1, 1, dtype=torch.long)).backward()
    # one token: the experts it was not routed to get a gradient of exactly zero (every expert is in the
    # grouped matmul); the ones it was routed to, nonzero ones
    assert all(p.grad is not None for p in model.parameters())
    reached = sum(p.numel() for name, p in model.named_parameters() if ".experts." not in name or p.grad.any())
    assert reached == config.num_active_params() < config.num_params()


def test_paper_sized_presets_are_near_their_names():
    for name, size in [("llama3-250m", 250e6), ("llama3-500m", 500e6), ("llama3-1b", 1e9), ("llama3-2b", 2e9)]:
        assert preset(name).num_params() == pytest.approx(size, rel=0.15), name
    for name, active in [("deepseek-v3-200m", 200e6), ("deepseek-v3-500m", 500e6)]:
        assert preset(name).num_active_params() == pytest.approx(active, rel=0.20), name
    assert preset("llama3-1b").vocab_size == 128256 and preset("llama3-1b").block_size == 2048


# --- the model itself ---


@pytest.mark.parametrize("name", FAMILIES)
def test_zero_layer_model_is_embedding_norm_and_head(name):
    config = preset(name).with_depth(0)
    model = build_model(config, seed=0)
    head = [] if config.tie_embeddings else ["lm_head.weight"]
    assert sorted(n for n, _ in model.named_parameters()) == sorted(
        ["model.embed_tokens.weight", "model.norm.weight", *head]
    )
    idx = tokens(config, 0)
    weight = model.model.embed_tokens.weight if config.tie_embeddings else model.lm_head.weight
    torch.testing.assert_close(model(idx), model.model.norm(model.model.embed_tokens(idx)) @ weight.T)


def test_config_problems_are_reported():
    assert preset("llama-test").problems() == []
    bad = LlamaConfig(n_layer=2, n_embd=30, n_head=4, n_kv_head=3, block_size=8, vocab_size=0, rope_theta=0.0)
    found = " | ".join(bad.problems())
    for fragment in ("vocab_size must be >= 1", "n_embd (30) must be divisible", "n_head (4) must be divisible by"):
        assert fragment in found
    assert "rope_theta must be a finite number > 0" in found
    assert "must be even" in " ".join(LlamaConfig(n_embd=36, n_head=4, n_kv_head=2).problems())
    moe = MoEConfig(n_expert=4, top_k=5, n_shared_expert=-1, balance_rate=float("nan")).problems()
    assert [problem.split(" must")[0] for problem in moe] == [
        "model.top_k",
        "model.n_shared_expert",
        "model.balance_rate",
    ]
    # one expert leaves the router nothing to choose (and top_k=2 nothing to fill): refused, not a traceback
    assert MoEConfig(n_expert=1, top_k=2).problems() == ["model.n_expert must be >= 2, got 1"]


def test_context_longer_than_block_size_is_refused():
    model = build_model(preset("llama-test"), seed=0)
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_init_scales_residual_projections_with_current_depth():
    config = dataclasses.replace(preset("moe-test"), n_layer=8, n_embd=256, expert_hidden=256, weight_init="standard")
    block = build_model(config, seed=0).model.layers[5]
    assert block.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert block.mlp.gate.weight.std().item() == pytest.approx(0.02, rel=0.1)
    for projection in (block.self_attn.o_proj, block.mlp.experts[3].down_proj, block.mlp.shared_experts.down_proj):
        assert projection.weight.std().item() == pytest.approx(0.02 / 4, rel=0.03)
    assert torch.equal(block.input_layernorm.weight, torch.ones(256))


# --- Hugging Face parity: the state dict loads by name and gives the same logits ---


def _sharp(config):
    """Weights large enough that attention is far from uniform, norm gains other than 1 and a balancing
    bias other than 0, so that a wrong rotary convention, a misplaced gain or bias would show."""
    model = build_model(dataclasses.replace(config, weight_init="standard", init_std=0.3), seed=1).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
    return model


def _compare_logits(model, hf_model, state):
    loaded = hf_model.load_state_dict(state, strict=False)
    head = ["lm_head.weight"] if model.config.tie_embeddings else []
    assert (loaded.missing_keys, loaded.unexpected_keys) == (head, [])
    if model.config.tie_embeddings:
        assert hf_model.lm_head.weight is hf_model.model.embed_tokens.weight
    idx = tokens(model.config, 5, batch=2)
    with torch.no_grad():
        ours, theirs = model(idx), hf_model.eval()(idx).logits
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def _hf_decoder_fields(config, **rope) -> dict:
    """The fields that both Hugging Face decoder configs take from a depthgrow decoder, written here by
    hand (not through depthgrow.export) so that these tests check the models against HF independently."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta, **rope},
        tie_word_embeddings=config.tie_embeddings,
        attn_implementation="eager",
    )


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_llama_matches_hugging_face(tie):
    transformers = pytest.importorskip("transformers")
    config = dataclasses.replace(preset("llama-test"), n_layer=3, tie_embeddings=tie)
    model = _sharp(config)
    hf_config = transformers.LlamaConfig(**_hf_decoder_fields(config), intermediate_size=config.ffn_size)
    _compare_logits(model, transformers.LlamaForCausalLM(hf_config), model.state_dict())


def test_moe_matches_hugging_face_glm4_moe():
    transformers = pytest.importorskip("transformers")
    config = dataclasses.replace(preset("moe-test"), n_layer=3)
    model = _sharp(config)
    hf_config = transformers.Glm4MoeConfig(
        **_hf_decoder_fields(config, partial_rotary_factor=1.0),
        n_routed_experts=config.n_expert,
        num_experts_per_tok=config.top_k,
        n_shared_experts=config.n_shared_expert,
        moe_intermediate_size=config.expert_hidden,
        first_k_dense_replace=0,
        use_qk_norm=False,
    )
    # in memory HF fuses the experts (from_pretrained does this from our names); do it by hand here
    state = dict(model.state_dict())
    for i in range(config.n_layer):
        prefix = f"model.layers.{i}.mlp.experts"
        take = [
            [state.pop(f"{prefix}.{j}.{kind}_proj.weight") for j in range(config.n_expert)]
            for kind in ("gate", "up", "down")
        ]
        state[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat(pair) for pair in zip(take[0], take[1], strict=True)])
        state[f"{prefix}.down_proj"] = torch.stack(take[2])
    _compare_logits(model, transformers.Glm4MoeForCausalLM(hf_config), state)


# --- routing ---


def _hidden(config, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, config.block_size, config.n_embd, generator=torch.Generator().manual_seed(9))


def test_routing_is_deterministic_for_a_seed():
    config = preset("moe-test")
    idx = tokens(config, 1)
    runs = []
    for _ in range(2):
        model = build_model(config, seed=SEED).train()
        logits = model(idx)
        choices = model.model.layers[1].mlp.route(_hidden(config).flatten(0, 1))[0]
        runs.append((logits, choices, [block.mlp.gate.e_score_correction_bias.clone() for block in model.model.layers]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2], strict=True))


def test_usage_counts_every_routed_token_while_training():
    config = preset("moe-test")
    model = build_model(config, seed=0)
    idx = tokens(config, 0)
    model.eval()
    model(idx)
    model.before_optimizer_step()
    assert model.eval_metrics() == {"expert_usage": {}}
    model.train()
    for _ in range(2):  # two training steps: a forward, then the optimizer's pre-step hook
        model(idx)
        model.before_optimizer_step()
    for block in model.model.layers:
        assert block.mlp.tokens_per_expert.sum().item() == 2 * idx.numel() * config.top_k
    counts = model.model.layers[0].mlp.tokens_per_expert.float()
    usage = model.eval_metrics()["expert_usage"]
    assert set(usage) == {f"model.layers.{i}.{key}" for i in (0, 1) for key in ("max_load", "min_load")}
    assert usage["model.layers.0.max_load"] == pytest.approx((counts.max() / counts.mean()).item())
    assert usage["model.layers.0.min_load"] <= 1.0 <= usage["model.layers.0.max_load"]
    assert model.eval_metrics() == {"expert_usage": {}}  # the counts started again


def test_moe_forward_and_backward_read_no_value_back_from_the_device():
    # under FakeTensorMode tensors have shapes but no values, so every op that needs a value on the host
    # (.item(), .tolist(), a shape that depends on the data: a host sync on a GPU) raises
    config = preset("moe-test")
    model = build_model(config, seed=0).to(torch.bfloat16).train()  # bfloat16: the grouped matmul's GPU dtype
    idx = tokens(config, 0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        loss_fn(model(idx).float(), idx.roll(-1, dims=1)).backward()
        with pytest.raises(DataDependentOutputException):  # the mode catches a sync
            model.model.layers[0].mlp.gate.weight.sum().tolist()


def test_grouped_expert_matmuls_equal_each_expert_on_its_tokens(monkeypatch):
    config = dataclasses.replace(preset("moe-test"), n_expert=8)
    layer = build_model(config, seed=0).model.layers[0].mlp.train()

    def forward_and_grads():
        layer.zero_grad(set_to_none=True)
        x = _hidden(config)
        layer(x).square().sum().backward()
        return layer(x).detach(), [p.grad.clone() for p in layer.parameters()]

    grouped = forward_and_grads()
    monkeypatch.setattr(moe, "_grouped_dtype", lambda x, weight: None)  # the loop of devices without one
    looped = forward_and_grads()
    torch.testing.assert_close(grouped[0], looped[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grouped[1], looped[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_only_a_training_step_moves_the_balancing_bias():
    config = dataclasses.replace(preset("moe-test"), balance_rate=0.01)
    model = build_model(config, seed=0)
    optimizer = build_optimizer(model, OPTIMIZERS["adamw"])
    idx = tokens(config, 0)

    def biases():
        return [block.mlp.gate.e_score_correction_bias.clone() for block in model.model.layers]

    before = biases()
    with torch.no_grad():
        model.eval()(idx)
        model.train()(idx)  # train mode, but no gradient: not a training step
    model.eval()(idx)
    assert all(torch.equal(a, b) for a, b in zip(biases(), before, strict=True))
    assert model.eval_metrics() == {"expert_usage": {}}
    loss_fn(model.train()(idx), idx.roll(-1, dims=1)).backward()
    assert all(torch.equal(a, b) for a, b in zip(biases(), before, strict=True))  # not before the step
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(biases(), before, strict=True))
    assert all(block.mlp.tokens_per_expert.sum() == idx.numel() * config.top_k for block in model.model.layers)


def test_balancing_bias_unloads_an_overloaded_expert():
    config = dataclasses.replace(preset("moe-test"), balance_rate=0.01)
    layer = build_model(config, seed=0).model.layers[0].mlp.train()
    x = _hidden(config)
    n_tokens = x.shape[0] * x.shape[1]
    with torch.no_grad():
        layer.gate.e_score_correction_bias[0] = 0.2  # expert 0 is chosen by every token
    loads = []
    for _ in range(40):
        layer.tokens_per_expert.zero_()
        layer(x)  # a training forward records its load; the step applies it
        layer.apply_balance()
        loads.append(layer.tokens_per_expert.clone())
    mean = n_tokens * config.top_k / config.n_expert
    assert loads[0][0] == n_tokens
    bias = layer.gate.e_score_correction_bias
    assert bias[0] - bias[1:].mean() < 0.02  # its head start of 0.2 over the others is gone
    assert max(load.max() for load in loads[-10:]) < 1.3 * mean
    # the weights of the chosen experts come from the scores alone: the bias only picks
    chosen, weights = layer.route(x.flatten(0, 1))
    scores = torch.sigmoid(x.flatten(0, 1) @ layer.gate.weight.T).gather(1, chosen)
    torch.testing.assert_close(weights, scores / scores.sum(-1, keepdim=True))


def test_routed_experts_cost_top_k_over_n_expert_of_dense():
    def expert_flops(config):
        model = build_model(config, seed=0)
        idx = tokens(config, 0)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            loss_fn(model(idx), idx).backward()
        return counter.get_flop_counts()["Global"][torch.ops.aten._grouped_mm]  # the routed experts' matmuls

    config = dataclasses.replace(preset("moe-test"), n_expert=8, top_k=2)
    sparse = expert_flops(config)
    dense = expert_flops(dataclasses.replace(config, top_k=8))  # every expert on every token
    assert sparse * 8 == dense * 2
    assert sparse == 6 * 2 * 4 * config.block_size * config.top_k * 3 * config.n_embd * config.expert_hidden


# --- the trainer ---


def _smoke(name: str, out_dir) -> dict[str, str]:
    return {
        "model.preset": name,
        "train.steps": "20",
        "train.batch_size": "2",
        "train.eval_every": "10",
        "train.eval_batches": "1",
        "growth.source_depth": "0",
        "growth.at": "0.5",
        "train.out_dir": str(out_dir),
    }


@pytest.mark.parametrize("name", FAMILIES)
def test_training_grows_and_learns(tmp_path, name):
    result = train(load_config(None, _smoke(name, tmp_path)))
    assert result.finished and result.state.depth == 2
    assert math.isfinite(result.final_val_loss) and result.final_val_loss < math.log(256)


def test_moe_resumes_exactly_with_its_balancing_bias(tmp_path):
    full = train(load_config(None, _smoke("moe-test", tmp_path / "full")))
    config = load_config(None, _smoke("moe-test", tmp_path / "resumed"))
    train(config, stop_at=13)
    resumed = train(config, resume=True)
    assert resumed.final_val_loss == full.final_val_loss


def test_moe_training_logs_expert_usage_at_every_evaluation(tmp_path):
    from depthgrow.metrics import read_log

    result = train(load_config(None, _smoke("moe-test", tmp_path)))
    evals = [r for r in read_log(result.out_dir / "log.jsonl") if r["event"] == "eval"]
    grown = [r for r in evals if r["depth"] == 2 and r.get("phase") is None]
    assert grown, "an evaluation after growth"
    usage = grown[-1]["expert_usage"]
    assert set(usage) == {f"model.layers.{i}.{k}" for i in range(2) for k in ("max_load", "min_load")}
    assert all(u["expert_usage"] == {} for u in evals if u.get("phase") == "post_growth")  # nothing routed yet
    assert all(
        v["max_load"] >= 1.0 >= v["min_load"]
        for v in [
            {"max_load": usage[f"model.layers.{i}.max_load"], "min_load": usage[f"model.layers.{i}.min_load"]}
            for i in range(2)
        ]
    )
