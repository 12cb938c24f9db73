"""The growth methods (depthgrow.methods) in the trainer: their plans, their mechanics (stacking, middle
duplication, MSG's ramped mask, LEMON's function-preserving init and decay), exact resume across each
growth, two processes, and one line for every plan that does not fit."""

import pytest
import torch
from launch import assert_same_losses, torchrun

from depthgrow import build_model, grow, load_config, train
from depthgrow.cli import main
from depthgrow.growth import new_slots, slot_sources
from depthgrow.masking import ResidualRamp, new_blocks
from depthgrow.methods import gstack_growth_tokens, prop_steps
from depthgrow.metrics import read_log
from depthgrow.schedule import lr_multiplier

BASE = {
    "model.preset": "gpt2-test",
    "model.n_layer": "4",
    "train.steps": "24",
    "train.batch_size": "4",
    "train.eval_every": "4",
    "train.eval_batches": "1",
    "train.checkpoint_every": "5",
}
# each method on the tiny run, with a stop inside its growth's interesting part
METHODS = {
    "gstack": {"growth.method": "gstack", "growth.stack_factor": "2", "growth.at": "8"},
    "midas": {"growth.method": "midas"},  # 1 -> 2 -> 3 -> 4 blocks at steps 2, 7, 14 (PROP-1 over 24)
    "msg": {"growth.method": "msg", "growth.source_depth": "1", "growth.at": "8", "growth.ramp": "6"},
    "lemon": {"growth.method": "lemon", "growth.source_depth": "1", "growth.at": "12"},
}


def config(tmp_path, name, **overrides):
    return load_config(None, {**BASE, **overrides, "train.out_dir": str(tmp_path / name)})


def records(run_dir, event):
    return [r for r in read_log(run_dir / "log.jsonl") if r["event"] == event]


def test_each_method_resolves_to_its_documented_plan():
    eight = {"model.n_layer": "8", "train.steps": "1000"}
    gstack = load_config(None, {**eight, "growth.method": "gstack", "growth.at": "0.1"}).plan()
    assert (gstack.depths, gstack.steps, gstack.init) == ((2, 8), (100,), "copy")
    midas = load_config(None, {**eight, "growth.method": "midas"}).plan()
    assert midas.depths == (2, 4, 6, 8) and midas.init == "copy_middle"
    lengths = [b - a for a, b in zip((0, *midas.steps), (*midas.steps, 1000), strict=True)]
    assert lengths == [100, 200, 300, 400]  # PROP-1: stage i lasts a share proportional to i
    assert prop_steps(4, 0.0, 1000) == [250, 500, 750]
    msg = load_config(None, {**eight, "growth.method": "msg", "growth.source_depth": "0", "growth.at": "0.5"}).plan()
    assert (msg.depths, msg.steps, msg.init, msg.ramp_steps) == ((0, 8), (500,), "random", 50)
    assert (msg.ramp_at(499), msg.ramp_at(500), msg.ramp_at(525), msg.ramp_at(550)) == (None, (0, 0.0), (0, 0.5), None)
    lemon = load_config(None, {**eight, "growth.method": "lemon", "growth.source_depth": "1"}).plan()
    assert (lemon.init, lemon.decay_from_growth) == ("copy_zero", True)
    from_zero = load_config(None, {**eight, "growth.method": "lemon", "growth.source_depth": "0"}).plan()
    assert from_zero.init == "zero"
    assert (
        load_config(None, {**eight, "growth.source_depth": "1"}).plan()
        == load_config(None, {**eight, "growth.method": "bu", "growth.source_depth": "1"}).plan()
    )


def test_copy_middle_duplicates_the_middle_blocks_in_place():
    assert slot_sources("copy_middle", 2, 4) == [0, 1, 0, 1]
    assert slot_sources("copy_middle", 4, 6) == [0, 1, 2, 1, 2, 3]
    assert slot_sources("copy_middle", 6, 8) == [0, 1, 2, 3, 2, 3, 4, 5]
    assert slot_sources("copy_middle", 3, 4) == [0, 1, 1, 2]
    assert new_slots(slot_sources("copy_middle", 4, 6)) == [3, 4]
    with pytest.raises(ValueError, match="duplicates 3 middle blocks, but the model has only 1"):
        slot_sources("copy_middle", 1, 4)
    model = build_model(load_config(None, BASE).model.with_depth(4), seed=0)
    sources = [{k: v.clone() for k, v in block.state_dict().items()} for block in model.transformer.h]
    grown = grow(model, torch.optim.AdamW(model.parameters()), 6, "copy_middle").model
    for slot, source in enumerate([0, 1, 2, 1, 2, 3]):
        for key, value in grown.transformer.h[slot].state_dict().items():
            assert torch.equal(value, sources[source][key]), (slot, key)
    assert grown.transformer.h[3] is not grown.transformer.h[1]  # a copy, trained on its own


def test_gstack_stacks_the_source_and_midas_grows_stage_by_stage(tmp_path):
    run = train(config(tmp_path, "gstack", **METHODS["gstack"])).out_dir
    assert [(g["from_depth"], g["to_depth"], g["init"], g["method"]) for g in records(run, "growth")] == [
        (2, 4, "copy", "gstack")
    ]
    run = train(config(tmp_path, "midas", **METHODS["midas"])).out_dir
    growth = records(run, "growth")
    assert [(g["step"], g["from_depth"], g["to_depth"]) for g in growth] == [(2, 1, 2), (7, 2, 3), (14, 3, 4)]
    assert {g["init"] for g in growth} == {"copy_middle"}


def test_msg_preserves_the_function_at_growth_and_ramps_the_new_blocks_in(tmp_path):
    run = train(config(tmp_path, "msg", **METHODS["msg"])).out_dir
    (growth,) = records(run, "growth")
    assert growth["val_loss_after"] == growth["val_loss_before"]  # the new blocks add exactly nothing
    # the mask is the new blocks' residual outputs times the ramp: the same as scaling their projections
    model = build_model(load_config(None, BASE).model.with_depth(1), seed=0)
    model = grow(model, torch.optim.AdamW(model.parameters()), 4, "random").model
    plan = load_config(None, {**BASE, **METHODS["msg"]}).plan()
    ramp = ResidualRamp(model, new_blocks(model, plan, 0), expansion=0)
    assert ramp.handles and len(ramp.handles) == 2 * 3  # attention and MLP projections of blocks 1-3
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    ramp.set(0.25)
    with torch.no_grad():
        masked = model(idx)
        ramp.remove()
        for block in model.transformer.h[1:]:
            for projection in (block.attn.c_proj, block.mlp.c_proj):
                projection.weight.mul_(0.25)
                projection.bias.mul_(0.25)
        torch.testing.assert_close(masked, model(idx), rtol=1e-5, atol=1e-5)
    assert not any(module._forward_hooks for module in model.modules())


def test_lemon_preserves_the_function_and_decays_from_the_growth(tmp_path):
    run_config = config(tmp_path, "lemon", **METHODS["lemon"])
    run = train(run_config).out_dir
    (growth,) = records(run, "growth")
    assert growth["init"] == "copy_zero" and growth["val_loss_after"] == growth["val_loss_before"]
    lr = {r["step"]: r["lr"] for r in records(run, "train")}  # the lr of step s is logged at s + 1
    peak, schedule = run_config.optim.lr, run_config.schedule
    assert lr[12] == pytest.approx(peak * lr_multiplier(11, 24, schedule))
    for step in range(12, 24):  # linear from the peak at the growth to 0 at T (WSD would hold until 21)
        assert lr[step + 1] == pytest.approx(peak * (1 - (step - 12) / 12))


@pytest.mark.parametrize(
    ("method", "stop_at"),
    [("gstack", 8), ("midas", 10), ("msg", 10), ("msg", 14), ("lemon", 16)],
    ids=["gstack-at-growth", "midas-between-stages", "msg-in-ramp", "msg-after-ramp", "lemon-in-decay"],
)
def test_a_resume_across_each_method_s_growth_repeats_the_uninterrupted_run(tmp_path, method, stop_at):
    whole = train(config(tmp_path, "whole", **METHODS[method])).out_dir
    stopped = config(tmp_path, "stopped", **METHODS[method])
    assert not train(stopped, stop_at=stop_at).finished
    train(stopped, resume=True)
    losses = [(r["step"], r["loss"]) for r in records(tmp_path / "stopped", "train")]
    assert losses == [(r["step"], r["loss"]) for r in records(whole, "train")]
    evals = [(r["step"], r["val_loss"]) for r in records(tmp_path / "stopped", "eval")]
    assert evals == [(r["step"], r["val_loss"]) for r in records(whole, "eval")]


def test_a_checkpoint_written_before_growth_methods_existed_resumes(tmp_path):
    from depthgrow.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint

    run_config = config(tmp_path, "old", **{"growth.source_depth": "1", "growth.at": "8"})
    train(run_config, stop_at=5)
    path = tmp_path / "old" / CHECKPOINT_NAME
    saved = load_checkpoint(path)
    for key in ("method", "stack_factor", "prop_alpha", "ramp"):
        del saved["config"]["growth"][key]
    save_checkpoint(path, saved)
    assert train(run_config, resume=True).finished


BAD_PLANS = {
    "gstack factor": (["--growth.method=gstack", "--growth.stack_factor=3"], "not a multiple of growth.stack_factor=3"),
    "gstack other source": (["--growth.method=gstack", "--growth.source_depth=2"], "not growth.source_depth=2"),
    "midas stages": (["--growth.method=midas", "--train.steps=3"], "midas's 4 stages do not fit T=3 steps"),
    "midas at": (["--growth.method=midas", "--growth.at=0.5"], "midas times its stages by growth.prop_alpha"),
    "gstack via": (["--growth.method=gstack", "--growth.via=2"], "gstack sets its own stages"),
    "msg ramp": (
        ["--growth.method=msg", "--growth.source_depth=1", "--growth.at=20", "--growth.ramp=10"],
        "msg's ramp of 10 steps (growth.ramp=10) after the expansion at step 20 is longer than the 4 steps left",
    ),
    "msg source": (["--growth.method=msg"], "growth.method=msg grows from growth.source_depth"),
    "method init": (["--growth.method=gstack", "--growth.init=copy_last"], "gstack fills the new slots by copy"),
    "lemon init": (
        ["--growth.method=lemon", "--growth.source_depth=1", "--growth.init=copy"],
        "growth.method=lemon fills the new slots by copy_zero",
    ),
    "unknown method": (["--growth.method=stack"], "growth.method must be one of"),
}


@pytest.mark.parametrize("case", BAD_PLANS)
def test_a_plan_that_does_not_fit_gets_one_line(tmp_path, capsys, case):
    args, message = BAD_PLANS[case]
    flat = [f"--{key}={value}" for key, value in BASE.items()]
    assert main(["train", *flat, "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("depthgrow: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "run").exists()


def test_gstack_accepts_the_source_depth_it_would_derive():
    plan = load_config(None, {**BASE, "growth.method": "gstack", "growth.source_depth": "1"}).plan()
    assert plan.depths == (1, 4)


def test_the_gstack_formula_is_out_of_range_at_cpu_scale():
    # at the paper's 7B model (300B tokens) it lands at ~10B tokens; at this library's CPU scale beyond the run
    seven_b = gstack_growth_tokens(7e9, 6 * 7e9 * 300e9)
    assert 5e9 < seven_b < 3e10
    assert gstack_growth_tokens(2.8e5, 6 * 2.8e5 * 3e6) > 3e6


@pytest.mark.parametrize(
    ("method", "parallel"), [("gstack", "ddp"), ("midas", "fsdp"), ("msg", "fsdp"), ("lemon", "ddp")]
)
def test_each_method_on_two_processes_repeats_the_single_process_losses(tmp_path, method, parallel):
    reference = train(config(tmp_path, "single", **METHODS[method])).out_dir
    flags = [f"--{key}={value}" for key, value in {**BASE, **METHODS[method]}.items()]
    done = torchrun(*flags, "--train.parallel", parallel, "--out", str(tmp_path / parallel))
    assert done.returncode == 0, done.stderr[-5000:]
    assert_same_losses(tmp_path / parallel, reference)
    assert [g["to_depth"] for g in records(tmp_path / parallel, "growth")] == [
        g["to_depth"] for g in records(reference, "growth")
    ]


def test_an_extension_in_the_middle_of_a_ramp_keeps_its_length(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    flags = [f"--{key}={value}" for key, value in {**BASE, **METHODS["msg"], "growth.ramp": "0.25"}.items()]
    assert main(["train", *flags, "--out", run_dir, "--stop-at", "10"]) == 0  # the ramp runs over steps 8-13
    assert main(["train", "--resume", run_dir, "--train.steps", "48"]) == 2
    assert "would change from 6 to 12 steps with T = 48; keep it with --growth.ramp 6" in capsys.readouterr().err
    assert main(["train", "--resume", run_dir, "--train.steps", "48", "--growth.ramp", "6"]) == 0
    ramp = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r["event"] == "config_change"]
    assert ramp and "growth.ramp" in ramp[0]["changes"]


def test_flops_counts_a_method_s_plan(capsys):
    assert main(["flops", "--model.n_layer=8", "--growth.method=midas", "--train.steps=1000"]) == 0
    out = capsys.readouterr().out
    assert "2 -> 4 -> 6 -> 8 at 100, 300, 600" in out
    assert "0 -> 8" not in out  # the method's plan only, not the paper's two sources
