import pytest
import torch
from growth_checks import CASES

from depthgrow import GPT2Config, OptimConfig, build_model, build_optimizer, grow
from depthgrow.growth import slot_sources
from depthgrow.optim import as_optimizer_list, check_coverage
from depthgrow.trainer import loss_fn

SMALL = GPT2Config(n_layer=4, n_embd=32, n_head=2, block_size=16, vocab_size=64)
SEED = 3


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, SMALL.vocab_size, (4, SMALL.block_size), generator=torch.Generator().manual_seed(step))


def train_steps(model, optimizer, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        idx = batch(step)
        loss_fn(model(idx), idx.roll(-1, dims=1)).backward()
        for opt in as_optimizer_list(optimizer):
            opt.step()
            opt.zero_grad(set_to_none=True)


def depthgrow_adamw(model):
    return build_optimizer(model, OptimConfig(name="adamw", lr=1e-2))


def depthgrow_muon_nsgd(model):
    return build_optimizer(model, OptimConfig(name="muon-nsgd", lr=2e-2, weight_decay=0.01))


def torch_adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def torch_muon_and_adamw(model):
    matrices = [p for name, p in model.named_parameters() if p.ndim == 2 and ".h." in name]
    rest = [p for name, p in model.named_parameters() if not (p.ndim == 2 and ".h." in name)]
    return [torch.optim.Muon(matrices, lr=2e-2), torch.optim.AdamW(rest, lr=1e-2)]


OPTIMIZERS = [depthgrow_adamw, depthgrow_muon_nsgd, torch_adamw, torch_muon_and_adamw]


def trained(source_depth: int, make_optimizer, steps: int = 3):
    model = build_model(SMALL.with_depth(source_depth), seed=SEED)
    # a zero-layer model has no hidden matrix for a plain torch Muon: it trains with AdamW and gets its
    # Muon + AdamW pair from make_optimizer at growth (see grow_as)
    optimizer = torch_adamw(model) if needs_factory(source_depth, make_optimizer) else make_optimizer(model)
    train_steps(model, optimizer, steps)
    return model, optimizer


def needs_factory(source_depth: int, make_optimizer) -> bool:
    return source_depth == 0 and make_optimizer is torch_muon_and_adamw


def grow_as(model, optimizer, init, make_optimizer, **options):
    if needs_factory(model.config.n_layer, make_optimizer):
        options["make_optimizer"] = make_optimizer
    return grow(model, optimizer, 4, init, seed=SEED, **options)


def test_slot_sources_follow_the_documented_orders():
    assert slot_sources("random", 1, 4) == [0, None, None, None]
    assert slot_sources("zero", 0, 3) == [None, None, None]
    assert slot_sources("copy", 2, 5) == [0, 1, 0, 1, 0]
    assert slot_sources("copy_zero", 1, 3) == [0, 0, 0]
    assert slot_sources("copy_inter", 2, 5) == [0, 0, 0, 1, 1]
    assert slot_sources("copy_inter", 3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert slot_sources("copy_last", 2, 5) == [0, 1, 1, 1, 1]
    assert slot_sources("copy_middle", 3, 5) == [0, 1, 0, 1, 2]
    with pytest.raises(ValueError, match="random or zero"):
        slot_sources("copy", 0, 4)


@pytest.mark.parametrize(
    ("source_depth", "init"), [(0, "zero"), (1, "zero"), (2, "zero"), (1, "copy_zero"), (2, "copy_zero")]
)
def test_zero_inits_preserve_the_function(source_depth, init):
    model, optimizer = trained(source_depth, depthgrow_adamw)
    idx = batch(100)
    with torch.no_grad():
        before = model(idx)
    grown = grow(model, optimizer, 4, init, seed=SEED)
    with torch.no_grad():
        after = grown.model(idx)
    assert len(grown.model.transformer.h) == 4
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("source_depth", [0, 1])
def test_random_init_changes_the_function(source_depth):
    model, optimizer = trained(source_depth, depthgrow_adamw)
    idx = batch(100)
    with torch.no_grad():
        before = model(idx)
        grown = grow(model, optimizer, 4, "random", seed=SEED)
        assert not torch.allclose(grown.model(idx), before, atol=1e-4)


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(("source_depth", "init"), CASES)
def test_every_parameter_is_optimized_and_trains_after_growth(source_depth, init, make_optimizer):
    model, optimizer = trained(source_depth, make_optimizer)
    grown = grow_as(model, optimizer, init, make_optimizer)
    check_coverage(grown.model, grown.optimizer)
    before = {name: p.detach().clone() for name, p in grown.model.named_parameters()}
    # a zeroed residual projection passes no gradient to the layers before it until it has taken a step,
    # so the function-preserving inits get two steps; every other init must move everything in one
    train_steps(grown.model, grown.optimizer, 2 if init in ("zero", "copy_zero") else 1, start=50)
    frozen = [name for name, p in grown.model.named_parameters() if torch.equal(p, before[name])]
    assert frozen == []


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(("source_depth", "init"), [(1, "random"), (1, "copy"), (2, "copy_inter"), (0, "random")])
def test_surviving_state_is_carried_by_name_and_new_state_is_fresh(source_depth, init, make_optimizer):
    model, optimizer = trained(source_depth, make_optimizer)
    names = {id(p): name for name, p in model.named_parameters()}
    old_state = {
        names[id(p)]: {key: value.clone() if torch.is_tensor(value) else value for key, value in state.items()}
        for opt in as_optimizer_list(optimizer)
        for p, state in opt.state.items()
    }
    assert old_state, "the source optimizer should hold state after training"
    grown = grow_as(model, optimizer, init, make_optimizer)
    # a parameter survives when the grown model still holds the very tensor; it may have moved slot
    moved = {name: names[id(p)] for name, p in grown.model.named_parameters() if id(p) in names}
    new_state = {}
    for opt in as_optimizer_list(grown.optimizer):
        for p, state in opt.state.items():
            new_state[next(name for name, q in grown.model.named_parameters() if q is p)] = state
    assert set(new_state) == {name for name, old in moved.items() if old in old_state}
    assert set(moved.values()) == set(names.values()), "every source parameter lives on in the grown model"
    for name, state in new_state.items():
        expected = old_state[moved[name]]
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            if torch.is_tensor(value):
                assert torch.equal(state[key], value), (name, key)
            else:
                assert state[key] == value
    if init == "copy_inter" and source_depth == 2:
        assert moved["transformer.h.2.mlp.c_fc.weight"] == "transformer.h.1.mlp.c_fc.weight"


def test_copy_optimizer_state_copies_momentum_into_copied_blocks():
    model, optimizer = trained(1, depthgrow_adamw)
    source_moment = optimizer.state[model.transformer.h[0].mlp.c_fc.weight]["exp_avg"].clone()
    grown = grow(model, optimizer, 3, "copy", seed=SEED, copy_optimizer_state=True)
    copy_state = grown.optimizer.state[grown.model.transformer.h[2].mlp.c_fc.weight]
    assert torch.equal(copy_state["exp_avg"], source_moment)
    original_state = grown.optimizer.state[grown.model.transformer.h[0].mlp.c_fc.weight]
    assert copy_state["exp_avg"] is not original_state["exp_avg"]


def test_copied_blocks_equal_their_source_but_are_independent():
    model, optimizer = trained(2, depthgrow_adamw)
    source = [block.mlp.c_fc.weight.detach().clone() for block in model.transformer.h]
    grown = grow(model, optimizer, 5, "copy_inter", seed=SEED)
    blocks = grown.model.transformer.h
    for slot, origin in enumerate([0, 0, 0, 1, 1]):
        assert torch.equal(blocks[slot].mlp.c_fc.weight, source[origin])
    assert blocks[1].mlp.c_fc.weight is not blocks[0].mlp.c_fc.weight


def test_random_init_gives_new_blocks_exactly_as_a_fresh_target_depth_model():
    model, optimizer = trained(1, depthgrow_adamw)
    grown = grow(model, optimizer, 4, "random", seed=SEED)
    fresh = build_model(SMALL, seed=SEED)
    for slot in (1, 2, 3):
        for (name, p), (_, q) in zip(
            grown.model.transformer.h[slot].named_parameters(),
            fresh.transformer.h[slot].named_parameters(),
            strict=True,
        ):
            assert torch.equal(p, q), (slot, name)
    trained_block = grown.model.transformer.h[0].attn.c_attn.weight
    assert not torch.equal(trained_block, fresh.transformer.h[0].attn.c_attn.weight)


def test_growth_keeps_the_learning_rate_position():
    model, optimizer = trained(0, depthgrow_muon_nsgd)
    optimizer.set_lr_multiplier(0.25)
    grown = grow(model, optimizer, 4, "random", seed=SEED)
    assert {group["role"] for group in grown.optimizer.param_groups} == {"matrix", "other_no_decay"}
    for group in grown.optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.25 * 2e-2)


def test_a_plain_optimizer_with_several_groups_needs_a_factory_from_zero_layers():
    model = build_model(SMALL.with_depth(0), seed=SEED)
    optimizer = torch.optim.AdamW(
        [{"params": [model.transformer.wte.weight]}, {"params": [model.transformer.wpe.weight]}]
        + [{"params": list(model.transformer.ln_f.parameters()), "weight_decay": 0.0}]
    )
    with pytest.raises(ValueError, match="make_optimizer"):
        grow(model, optimizer, 2, "random", seed=SEED)
    model = build_model(SMALL.with_depth(0), seed=SEED)
    grown = grow(model, torch.optim.SGD(model.parameters(), lr=0.1), 2, "random", make_optimizer=torch_adamw)
    assert isinstance(grown.optimizer, torch.optim.AdamW)
    check_coverage(grown.model, grown.optimizer)


def test_bad_growth_requests_are_refused():
    model, optimizer = trained(2, depthgrow_adamw, steps=0)
    with pytest.raises(ValueError, match="must exceed"):
        grow(model, optimizer, 2, "random")
    with pytest.raises(ValueError, match="unknown init"):
        grow(model, optimizer, 4, "clone")


def test_a_chain_without_a_recipe_comes_back_as_a_chain():
    from depthgrow.optim import OptimizerChain

    model, _ = trained(1, depthgrow_adamw, steps=0)
    chain = OptimizerChain([torch_adamw(model)])
    grown = grow(model, chain, 3, "copy", seed=SEED)
    assert isinstance(grown.optimizer, OptimizerChain)
    check_coverage(grown.model, grown.optimizer)
