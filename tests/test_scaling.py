"""The scaling ladder: sizes, run lengths from tokens per parameter, laws per method, multipliers on the
fixed-depth law, reuse, and a ladder the data cannot feed."""

import json
import math

import pytest

from depthgrow.cli import main
from depthgrow.config import load_config
from depthgrow.flops import DEPTHGROW, compare_compute
from depthgrow.frontier import fit_frontier
from depthgrow.scaling import DEFAULT_WIDTHS, rung_config
from depthgrow.schedule import growth_plan

LADDER = ["experiment", "scaling", "--model", "gpt2-test", "--tokens-per-param", "0.2", "--train.batch_size=4"]


@pytest.fixture(scope="module")
def ladder_results(tmp_path_factory):
    """The tiny ladder, trained once for the tests of the experiment and of plan."""
    folder = tmp_path_factory.mktemp("scaling")
    assert main([*LADDER, "--out", str(folder)]) == 0
    return folder


def test_the_ladder_trains_every_size_and_reads_multipliers_on_the_fixed_law(ladder_results, capsys):
    tmp_path = ladder_results
    result = json.loads((tmp_path / "scaling" / "summary.json").read_text())
    rows = result["runs"]
    assert [(r["width"], r["method"]) for r in rows] == [
        (width, method) for width in DEFAULT_WIDTHS for method in ("fixed", "0 -> L", "1 -> L")
    ]
    sizes = [r["params"] for r in rows if r["method"] == "fixed"]
    assert sizes == sorted(sizes) and sizes[-1] / sizes[0] > 8  # the ladder spans more than 8x
    for row in rows:
        assert row["steps"] == max(10, round(0.2 * row["params"] / 128)) and row["tokens"] == row["steps"] * 128
        assert (row["compute_fraction"] < 0.95) == (row["method"] != "fixed")
    fixed = fit_frontier([(r["flops"], r["final_val_loss"]) for r in rows if r["method"] == "fixed"])
    grown = [r for r in rows if r["method"] != "fixed"]
    if fixed is None:  # tiny runs may not fall at every size: then no multiplier is claimed
        assert all(r["compute_multiplier"] is None for r in grown)
    else:
        for row in grown:
            assert row["compute_multiplier"] == pytest.approx(fixed.multiplier(row["flops"], row["final_val_loss"]))
    table = (tmp_path / "scaling" / "table.md").read_text()
    assert (
        table.startswith("| family | width | parameters |") and "| gpt2 | 40 |" in table and "- gpt2 fixed: " in table
    )
    assert (tmp_path / "scaling" / "plot.png").stat().st_size > 10_000
    # a rerun trains nothing: every run is reused, the rows are the same
    assert main([*LADDER, "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == len(rows)
    assert json.loads((tmp_path / "scaling" / "summary.json").read_text())["runs"] == rows


def test_a_ladder_the_data_cannot_feed_is_refused_before_training(tmp_path, capsys):
    corpus = tmp_path / "small.txt"
    corpus.write_text("a few lines of text, repeated. " * 2000)  # 62K bytes: 56K training tokens
    args = ["experiment", "scaling", "--model", "gpt2-test", "--data", str(corpus), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the scaling ladder does not fit the data: its largest model (gpt2 width 40" in err
    assert "more than 4 passes over the 0.06M training tokens" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_tokens_per_param_belongs_to_the_scaling_experiment(capsys):
    assert main(["experiment", "timing", "--tokens-per-param", "20"]) == 2
    assert "--tokens-per-param is for the scaling experiment, not timing" in capsys.readouterr().err
    assert main(["experiment", "scaling", "--tokens-per-param", "0"]) == 2
    assert "--tokens-per-param must be a finite number > 0" in capsys.readouterr().err


def test_a_rung_scales_the_hidden_sizes_with_the_width():
    llama = rung_config(load_config(None, {"model.preset": "llama-micro-bpe"}), 24)
    model = llama.model  # llama-micro-bpe: width 48, SwiGLU hidden 128
    assert (model.n_embd, model.ffn_hidden, model.n_layer, model.vocab_size) == (24, 64, 4, 1024)
    moe = rung_config(load_config(None, {"model.preset": "moe-micro-bpe"}), 16)
    assert (moe.model.n_embd, moe.model.expert_hidden) == (16, 16)  # 48 wide with experts of 48: the ratio kept


def test_plan_predicts_from_the_stored_laws_and_says_how_far_it_extrapolates(ladder_results, capsys):
    folder = ladder_results
    stored = json.loads((folder / "scaling" / "summary.json").read_text())
    assert main(["plan", "--model", "gpt2-124m", "--tokens", "2.5e9", "--results", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    model = load_config(None, {"model.preset": "gpt2-124m"}).model
    steps = round(2.5e9 / (32 * 1024))
    assert lines[0].startswith(f"gpt2-124m: {model.num_params():,} parameters, {steps:,} steps of 32,768 tokens")
    plan = growth_plan(source_depth=0, via=[], at=[0.8], target_depth=12, total_steps=steps)
    fraction = compare_compute(model, plan, total_steps=steps, units_per_step=32 * 1024, counting=DEPTHGROW).fraction
    assert lines[1].startswith(f"0 -> L at 0.8 T: {fraction:.1%} of the FLOPs")
    trend = stored["trends"]["gpt2"]["0 -> L"]
    if trend is not None:
        multiplier = 2 ** (trend["level"] + trend["slope"] * (math.log2(model.num_params()) - trend["center"]))
        assert f"compute multiplier {multiplier:.2f}x" in lines[1]
    largest = max(r["params"] for r in stored["runs"])
    factor = model.num_params() / largest
    assert f"extrapolated {factor:,.0f}x beyond the largest of the ladder's 5 sizes" in lines[3]


PLAN_ERRORS = {
    "no budget": (["--model", "gpt2-test"], "plan needs a budget: --tokens N or --flops C"),
    "negative budget": (["--model", "gpt2-test", "--flops", "-1"], "the budget must be a finite number > 0"),
    "no laws of the family": (["--model", "llama-test", "--tokens", "1e6"], "holds no llama ladder (it has: gpt2)"),
    "an image model": (["--model", "resnet-test", "--tokens", "1e6"], "resnet has none"),
}


@pytest.mark.parametrize("case", PLAN_ERRORS, ids=list(PLAN_ERRORS))
def test_bad_plan_input_gets_one_line(ladder_results, capsys, case):
    folder = ladder_results
    args, message = PLAN_ERRORS[case]
    assert main(["plan", *args, "--results", str(folder)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_plan_without_stored_laws_says_which_command_makes_them(tmp_path, capsys):
    assert main(["plan", "--model", "gpt2-test", "--tokens", "1e6", "--results", str(tmp_path)]) == 2
    assert f"run depthgrow experiment scaling --out {tmp_path}" in capsys.readouterr().err
