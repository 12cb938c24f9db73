"""The growth properties every family must have, checked the same way for each (GPT-2's own, with plain
torch optimizers as well, are in test_growth.py)."""

import torch

from depthgrow import INITS, OptimConfig, grow
from depthgrow.optim import as_optimizer_list, check_coverage

SEED = 3
OPTIMIZERS = {
    "adamw": OptimConfig(name="adamw", lr=1e-2),
    "muon-nsgd": OptimConfig(name="muon-nsgd", lr=2e-2, weight_decay=0.01),
}
# every init from every source depth it applies to (growing to 4 blocks): a zero-layer source has nothing
# to copy, and copy_middle duplicates at most every block, so it grows 2 -> 4 but not 1 -> 4
CASES = [
    (s, init)
    for s in (0, 1, 2)
    for init in INITS
    if (s > 0 or init in ("random", "zero")) and (init != "copy_middle" or s >= 2)
]
FUNCTION_PRESERVING = ("zero", "copy_zero")


def state_by_name(model, optimizer) -> dict[str, dict]:
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(p)]: state for opt in as_optimizer_list(optimizer) for p, state in opt.state.items()}


def clone_state(state: dict) -> dict:
    return {key: value.clone() if torch.is_tensor(value) else value for key, value in state.items()}


def grow_and_check(model, optimizer, target: int, init: str, train_steps):
    """Grow, then check that every parameter is optimized, that surviving parameters keep their state
    under their (possibly new) names while new ones have none, and that every parameter changes within
    the next step (two for the function-preserving inits: a zeroed residual projection passes no
    gradient to the layers before it until it has taken a step). Returns the grown model and optimizer."""
    old_state = {key: clone_state(state) for key, state in state_by_name(model, optimizer).items()}
    old_ids = {id(p): name for name, p in model.named_parameters()}
    grown = grow(model, optimizer, target, init, seed=SEED)
    check_coverage(grown.model, grown.optimizer)
    assert all(len(stack) == target for stack in grown.model.block_stacks().values())
    assert grown.model.config.n_layer == target

    new_state = state_by_name(grown.model, grown.optimizer)
    survivors = {key: old_ids[id(p)] for key, p in grown.model.named_parameters() if id(p) in old_ids}
    assert set(survivors.values()) == set(old_ids.values()), "every source parameter lives on"
    assert set(grown.new_parameters).isdisjoint(new_state)
    assert set(new_state) == {key for key, old in survivors.items() if old in old_state}
    for parameter, state in new_state.items():
        expected = old_state[survivors[parameter]]
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(state[key], value) if torch.is_tensor(value) else state[key] == value, (parameter, key)

    before = {key: p.detach().clone() for key, p in grown.model.named_parameters()}
    train_steps(grown.model, grown.optimizer, 2 if init in FUNCTION_PRESERVING else 1, start=50)
    frozen = [key for key, p in grown.model.named_parameters() if torch.equal(p, before[key])]
    assert frozen == []
    return grown
