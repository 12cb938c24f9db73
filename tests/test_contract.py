"""The contract every model family keeps, checked the same way for each: the tiny presets (named ``*-test``)
that each family declares beside its model, so that a new family is checked here without a line added.

What a family's own tests add is what is its own: formulas at other variants (untied heads, biases, conv
transitions), routing, the exact Hugging Face class's quirks. GPT-2's growth with plain torch optimizers is
in test_growth.py.

Golden losses: tests/assets/losses/NAME.txt holds the train losses of a tiny run of each preset with a growth
in it. Today's self-comparisons (grown against fresh, exported against depthgrow) would not see a change that
moves both sides; these files do. After a change that is meant to move them, rewrite them with
``DEPTHGROW_WRITE_GOLDEN=1 pytest tests/test_contract.py -k golden`` and say why in the commit.
"""

import dataclasses
import math
import os
from pathlib import Path

import pytest
import torch
from growth_checks import CASES, FUNCTION_PRESERVING, OPTIMIZERS, SEED, grow_and_check
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from depthgrow import build_model, build_optimizer, grow, load_config, preset, train
from depthgrow.metrics import LOG_NAME, read_log
from depthgrow.models import FAMILIES
from depthgrow.trainer import loss_fn

CONTRACT = sorted(name for family in FAMILIES.values() for name in family.presets if name.endswith("-test"))
EXPORTED = [name for name in CONTRACT if FAMILIES[preset(name).family].hf is not None]
TARGET = 3
GOLDEN = Path(__file__).parent / "assets" / "losses"
GOLDEN_RTOL = 1e-3  # room for float32 sums in another order on another CPU (another vector width)


def test_every_family_has_a_test_preset():
    assert {preset(name).family for name in CONTRACT} == set(FAMILIES)


def example(config, seed: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of the family's task: token windows and their next tokens, or images and labels."""
    generator = torch.Generator().manual_seed(seed)
    if config.task == "image":
        shape = (batch, config.in_channels, config.image_size, config.image_size)
        return torch.randn(shape, generator=generator), torch.randint(
            0, config.num_classes, (batch,), generator=generator
        )
    tokens = torch.randint(0, config.vocab_size, (batch, config.block_size), generator=generator)
    return tokens, tokens.roll(-1, dims=1)


def train_steps(model, optimizer, steps: int, start: int = 0) -> None:
    model.train()
    for step in range(start, start + steps):
        x, y = example(model.config, step)
        loss = loss_fn(model(x), y)
        auxiliary = model.auxiliary_loss()
        (loss if auxiliary is None else loss + auxiliary).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def trained(name: str, source_depth: int, optimizer: str = "adamw"):
    model = build_model(preset(name).with_depth(source_depth), seed=SEED)
    chain = build_optimizer(model, OPTIMIZERS[optimizer])
    train_steps(model, chain, 3)
    return model, chain


# --- sizes: parameters, FLOPs, the zero-layer model ---


@pytest.mark.parametrize("depth", [0, 1, TARGET])
@pytest.mark.parametrize("name", CONTRACT)
def test_parameter_count_is_the_formula(name, depth):
    config = preset(name).with_depth(depth)
    model = build_model(config, seed=0)
    assert config.num_params() == sum(p.numel() for p in model.parameters())
    assert config.num_params(embeddings=False) <= config.num_params()
    assert config.num_active_params() <= config.num_params()


@pytest.mark.parametrize("depth", [0, 1, TARGET])
@pytest.mark.parametrize("name", CONTRACT)
def test_flops_per_unit_are_what_torch_counts(name, depth):
    config = preset(name).with_depth(depth)
    model = build_model(config, seed=0)
    x, y = example(config, 0)
    # the math backend runs attention as matmuls, which the counter sees (the fused CPU kernel it does not)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_fn(model(x), y).backward()
    assert counter.get_total_flops() == config.flops_per_unit() * len(x) * config.units_per_example()


@pytest.mark.parametrize("name", CONTRACT)
def test_the_zero_layer_model_has_no_block_and_trains(name):
    config = preset(name).with_depth(0)
    model = build_model(config, seed=0)
    assert all(len(stack) == 0 for stack in model.block_stacks().values())
    x, y = example(config, 0)
    loss = loss_fn(model(x), y)
    assert math.isfinite(loss.item())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# --- growth ---


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize(("source_depth", "init"), CASES)
@pytest.mark.parametrize("name", CONTRACT)
def test_growth_carries_state_and_trains_every_parameter(name, source_depth, init, optimizer):
    model, chain = trained(name, source_depth, optimizer)
    grow_and_check(model, chain, TARGET + 1, init, train_steps)


@pytest.mark.parametrize(("source_depth", "init"), [(s, i) for s, i in CASES if i in FUNCTION_PRESERVING])
@pytest.mark.parametrize("name", CONTRACT)
def test_function_preserving_inits_keep_the_outputs(name, source_depth, init):
    model, chain = trained(name, source_depth)
    x, _ = example(model.config, 100)
    model.eval()  # no balancing bias moves and BatchNorm uses its running statistics: the outputs are the model's
    with torch.no_grad():
        before = model(x)
        after = grow(model, chain, TARGET + 1, init, seed=SEED).model(x)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("source_depth", [0, 1])
@pytest.mark.parametrize("name", CONTRACT)
def test_random_init_changes_the_function(name, source_depth):
    model, chain = trained(name, source_depth)
    x, _ = example(model.config, 100)
    model.eval()
    with torch.no_grad():
        before = model(x)
        after = grow(model, chain, TARGET, "random", seed=SEED).model(x)
    assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize("source_depth", [0, 1, 2])
@pytest.mark.parametrize("name", CONTRACT)
def test_random_init_gives_new_blocks_exactly_as_a_fresh_target_depth_model(name, source_depth):
    model, chain = trained(name, source_depth)
    grown = grow(model, chain, TARGET, "random", seed=SEED).model
    fresh = build_model(preset(name).with_depth(TARGET), seed=SEED)
    for stack, blocks in grown.block_stacks().items():
        for slot, block in enumerate(blocks):
            other = fresh.get_submodule(stack)[slot]
            ours = {**dict(block.named_parameters()), **dict(block.named_buffers())}
            theirs = {**dict(other.named_parameters()), **dict(other.named_buffers())}
            assert ours.keys() == theirs.keys()
            same = [key for key in ours if torch.equal(ours[key], theirs[key])]
            if slot >= source_depth:
                assert same == list(ours), (stack, slot)
            else:  # the trained block keeps its place
                assert {p for p in dict(block.named_parameters())} - set(same), (stack, slot)


# --- Hugging Face export ---


@pytest.mark.parametrize("depth", [0, 1, TARGET])
@pytest.mark.parametrize("name", EXPORTED)
def test_the_export_computes_the_same_logits_and_imports_back(tmp_path, name, depth):
    pytest.importorskip("transformers")
    from test_export import assert_imports_back, exported_with_parity

    # weights large enough that attention is far from uniform and the logits are O(1)
    config = dataclasses.replace(preset(name), weight_init="standard", init_std=0.3).with_depth(depth)
    out, model, expected = exported_with_parity(tmp_path, config, seed=depth)
    assert_imports_back(out, config, model, expected)


# --- golden losses ---


def golden_run(name: str, out_dir: Path) -> list[tuple[int, float]]:
    """The train losses of 10 steps of ``name`` growing 1 -> 2 blocks at step 5 (batch 2, default recipe)."""
    overrides = {
        "model.preset": name,
        "model.n_layer": "2",
        "train.steps": "10",
        "train.batch_size": "2",
        "train.eval_every": "10",
        "train.eval_batches": "1",
        "growth.source_depth": "1",
        "growth.at": "5",
        "train.out_dir": str(out_dir),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # another thread count sums convolutions in another order: ResNet's 7th loss moved 0.2 %
    try:
        assert train(load_config(None, overrides)).finished
    finally:
        torch.set_num_threads(threads)
    return [(r["step"], r["loss"]) for r in read_log(out_dir / LOG_NAME) if r["event"] == "train"]


@pytest.mark.parametrize("name", CONTRACT)
def test_golden_losses(tmp_path, name):
    losses = golden_run(name, tmp_path / "run")
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("DEPTHGROW_WRITE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        header = f"# step, train loss: 10 steps of {name} at 2 blocks grown 1 -> 2 at step 5 (tests/test_contract.py)\n"
        path.write_text(header + "".join(f"{step} {loss!r}\n" for step, loss in losses))
    assert path.exists(), f"no golden losses for {name}: write them with DEPTHGROW_WRITE_GOLDEN=1"
    rows = [line.split() for line in path.read_text().splitlines() if not line.startswith("#")]
    golden = [(int(step), float(loss)) for step, loss in rows]
    assert [step for step, _ in losses] == [step for step, _ in golden] == list(range(1, 11))
    for (step, loss), (_, expected) in zip(losses, golden, strict=True):
        assert loss == pytest.approx(expected, rel=GOLDEN_RTOL), (name, step)
