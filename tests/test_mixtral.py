"""What the Mixtral family adds to the LLaMA decoder: softmax top-k routing and the load-balancing loss, and
its export as Hugging Face's MixtralForCausalLM. The family contract (test_contract.py) runs mixtral-test,
untied as Mixtral is, through counts, growth and the export; here the tied head, the exported config's
fields, the router and the loss against transformers' own, the trainer adding the loss, and what an import
refuses."""

import dataclasses
import json

import pytest
import torch
from test_export import (
    SMALL,
    assert_imports_back,
    exported_with_parity,
)
from test_families import tokens
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

import depthgrow
from depthgrow import OptimConfig, build_model, build_optimizer, grow, load_config, preset, train
from depthgrow.checkpoint import CHECKPOINT_NAME, load_checkpoint
from depthgrow.export import import_pretrained
from depthgrow.metrics import LOG_NAME, read_log
from depthgrow.models.mixtral import MixtralConfig
from depthgrow.trainer import loss_fn

transformers = pytest.importorskip("transformers")
hf_mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
load_balancing_loss_func = hf_mixtral.load_balancing_loss_func

TEST = preset("mixtral-test")
# eight experts over three blocks: loads and probabilities that differ between experts and between blocks
WIDE = dataclasses.replace(TEST, n_layer=3, n_expert=8, aux_loss_coef=0.01)


def router_logits(model, idx) -> tuple[torch.Tensor, ...]:
    """A training forward of ``model`` on ``idx``, and each block's router logits in it."""
    logits = []
    hooks = [block.mlp.gate.register_forward_hook(lambda m, i, out: logits.append(out)) for block in model.model.layers]
    model.train()(idx)
    for hook in hooks:
        hook.remove()
    return tuple(logits)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_tied_export_matches_hugging_face_mixtral_and_round_trips(tmp_path, depth):
    # every parameter perturbed and weights large enough (init_std 0.3) that attention is far from uniform
    config = dataclasses.replace(TEST, tie_embeddings=True, weight_init="standard", init_std=0.3).with_depth(depth)
    out, model, expected = exported_with_parity(tmp_path, config, seed=depth)

    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["MixtralForCausalLM"] and hf_config["num_hidden_layers"] == depth
    assert (hf_config["num_local_experts"], hf_config["num_experts_per_tok"], hf_config["intermediate_size"]) == (
        4,
        2,
        32,
    )
    assert hf_config["router_aux_loss_coef"] == config.aux_loss_coef and hf_config["tie_word_embeddings"]
    assert hf_config["sliding_window"] is None and hf_config["router_jitter_noise"] == 0.0
    assert_imports_back(out, config, model, expected)


def test_routing_is_hugging_faces_softmax_top_k_renormalised():
    layer = build_model(WIDE, seed=0).model.layers[0].mlp
    hf_config = transformers.MixtralConfig(**SMALL, num_local_experts=8, num_experts_per_tok=2)
    router = hf_mixtral.MixtralTopKRouter(hf_config)
    router.weight.data.copy_(layer.gate.weight)
    x = torch.randn(256, WIDE.n_embd, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        chosen, weights, probabilities = layer.route(x)
        _, hf_weights, hf_chosen = router(x)
    torch.testing.assert_close(probabilities, torch.softmax(x @ layer.gate.weight.T, dim=-1))
    assert torch.equal(chosen, hf_chosen) and torch.equal(weights, hf_weights)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(256))
    top = probabilities.gather(1, chosen)
    assert torch.equal(top, probabilities.topk(2).values)
    torch.testing.assert_close(weights, top / top.sum(dim=-1, keepdim=True))


def test_balancing_loss_is_transformers_on_the_same_router_logits():
    model = build_model(WIDE, seed=0)
    logits = router_logits(model, tokens(WIDE, 0))
    expected = load_balancing_loss_func(logits, WIDE.n_expert, WIDE.top_k)
    loss = model.auxiliary_loss()
    torch.testing.assert_close(loss, WIDE.aux_loss_coef * expected, rtol=1e-6, atol=0)
    assert loss.requires_grad
    # pooled over the blocks as transformers pools its layers: not the mean of the blocks' own losses
    per_block = torch.stack([load_balancing_loss_func((block,), WIDE.n_expert, WIDE.top_k) for block in logits])
    assert (per_block.mean() - expected).abs() > 1e-4


def test_balancing_loss_is_top_k_times_its_weight_at_uniform_routing():
    model = build_model(WIDE, seed=0)
    with torch.no_grad():
        for block in model.model.layers:
            block.mlp.gate.weight.zero_()  # every probability 1 / n_expert
    logits = router_logits(model, tokens(WIDE, 0))
    assert model.auxiliary_loss().item() == pytest.approx(WIDE.top_k * WIDE.aux_loss_coef, rel=1e-6)
    assert load_balancing_loss_func(logits, WIDE.n_expert, WIDE.top_k).item() == pytest.approx(WIDE.top_k, rel=1e-6)


def test_balancing_loss_is_only_that_of_a_training_forward():
    model = build_model(WIDE, seed=0)
    idx = tokens(WIDE, 0)
    assert model.auxiliary_loss() is None
    model.train()(idx)
    assert model.auxiliary_loss() is not None
    assert model.auxiliary_loss() is None  # taken by the first call: its graph is for one backward
    with torch.no_grad():
        model.train()(idx)
    assert model.auxiliary_loss() is None
    model.train()(idx)
    model.eval()(idx)
    assert model.auxiliary_loss() is None
    zero_layer = build_model(WIDE.with_depth(0), seed=0).train()
    zero_layer(idx)
    assert zero_layer.auxiliary_loss() is None


def test_the_trainer_trains_with_the_balancing_loss_and_logs_the_task_loss(tmp_path):
    def run(coef: str) -> tuple[list[float], dict[str, torch.Tensor], dict]:
        out = tmp_path / coef
        overrides = {
            "model.preset": "mixtral-test",
            "model.aux_loss_coef": coef,
            "train.steps": "3",
            "train.batch_size": "2",
            "train.eval_every": "3",
            "train.eval_batches": "1",
            "train.out_dir": str(out),
        }
        assert train(load_config(None, overrides)).finished
        log = read_log(out / LOG_NAME)
        losses = [r["loss"] for r in log if r["event"] == "train"]
        evals = [r for r in log if r["event"] == "eval"]
        return losses, load_checkpoint(out / CHECKPOINT_NAME)["model"], evals[-1]

    without, balanced = run("0.0"), run("1.0")
    # the first step's logged loss is the same model's task loss (the balancing loss, about top_k here, is
    # not in it); after it, the weights the balancing loss moved differ
    assert without[0][0] == balanced[0][0]
    router = "model.layers.0.mlp.gate.weight"
    assert not torch.equal(without[1][router], balanced[1][router])
    assert without[0][1:] != balanced[0][1:]
    # the usage of the training steps is logged at the evaluation, as for the DeepSeek-style family
    usage = balanced[2]["expert_usage"]
    assert set(usage) == {f"model.layers.{i}.{key}" for i in (0, 1) for key in ("max_load", "min_load")}
    assert usage["model.layers.0.min_load"] <= 1.0 <= usage["model.layers.0.max_load"]


def test_forward_and_backward_with_the_balancing_loss_read_no_value_back_from_the_device():
    # under FakeTensorMode tensors have shapes but no values, so every op that needs a value on the host
    # (.item(), .tolist(), a shape that depends on the data: a host sync on a GPU) raises
    model = build_model(TEST, seed=0).to(torch.bfloat16).train()  # bfloat16: the grouped matmul's GPU dtype
    idx = tokens(TEST, 0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        loss = loss_fn(model(idx).float(), idx.roll(-1, dims=1))
        (loss + model.auxiliary_loss()).backward()
        with pytest.raises(DataDependentOutputException):  # the mode catches a sync
            model.model.layers[0].mlp.gate.weight.sum().tolist()


def test_growth_after_a_training_step_keeps_the_function_and_balances_every_block():
    model = build_model(TEST.with_depth(1), seed=0)
    optimizer = build_optimizer(model, OptimConfig(name="adamw", lr=1e-2))
    idx = tokens(TEST, 0)
    loss = loss_fn(model.train()(idx), idx.roll(-1, dims=1))
    (loss + model.auxiliary_loss()).backward()
    optimizer.step()
    with torch.no_grad():
        before = model.eval()(idx)
        grown = grow(model, optimizer, 3, "zero", seed=0)
        torch.testing.assert_close(grown.model(idx), before, rtol=0, atol=1e-6)
    # copying a trained block right after a training forward: the blocks hold no part of the autograd graph
    grown.model.train()(idx)
    copied = grow(grown.model, grown.optimizer, 4, "copy", seed=0).model
    copied(idx)
    assert len(copied.balance) == 4
    assert all(block.mlp.tokens_per_expert.sum() == 0 for block in copied.model.layers[1:3])  # fresh: no usage


def test_config_problems_are_reported():
    assert TEST.problems() == []
    bad = MixtralConfig(n_expert=4, top_k=1, expert_hidden=0, aux_loss_coef=float("nan")).problems()
    assert [problem.split(" must")[0] for problem in bad] == [
        "model.expert_hidden",
        "model.top_k",
        "model.aux_loss_coef",
    ]
    assert MixtralConfig(n_expert=4, top_k=5).problems() == ["model.top_k must be in [2, n_expert=4], got 5"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sliding_window": 16}, "it attends within a sliding window of 16 tokens"),
        ({"router_jitter_noise": 0.01}, "its router jitters its input by up to 0.01 in training"),
        ({"hidden_act": "gelu"}, "hidden_act is 'gelu', not 'silu'"),
        ({"head_dim": 16}, "head_dim is 16, not hidden_size / num_attention_heads"),
    ],
    ids=["sliding-window", "jitter", "activation", "head-size"],
)
def test_import_refuses_a_mixtral_depthgrow_cannot_express(tmp_path, fields, message):
    transformers.MixtralConfig(**SMALL, **fields).save_pretrained(tmp_path)  # refused from config.json alone
    with pytest.raises(depthgrow.DepthgrowError, match=f"this Mixtral differs from depthgrow's: {message}"):
        import_pretrained(tmp_path)


def test_import_refuses_a_single_expert_per_token(tmp_path):
    transformers.MixtralConfig(**SMALL, num_experts_per_tok=1).save_pretrained(tmp_path)
    with pytest.raises(depthgrow.DepthgrowError, match=r"model.top_k must be in \[2, n_expert=8\], got 1"):
        import_pretrained(tmp_path)
