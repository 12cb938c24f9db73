import json
import re

import pytest

from depthgrow import load_config
from depthgrow.cli import SET_BY_COMMAND, main
from depthgrow.experiments import DEFAULT_GRID, EXPERIMENTS, config_hash, experiment_base
from depthgrow.methods import METHOD_INIT

TINY = [
    "--model", "gpt2-test", "--model.n_layer=4", "--train.steps=40", "--train.batch_size=4",
    "--train.eval_every=10", "--train.eval_batches=2",
]  # fmt: skip


@pytest.mark.parametrize("full", [False, True], ids=["default", "full"])
@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_variant_of_every_grid_is_a_valid_config(name, full):
    experiment = EXPERIMENTS[name]
    base = experiment_base(name, full=full)
    assert base.train.steps == (load_config().train.steps if full else int(DEFAULT_GRID["train.steps"]))
    variants = experiment.variants(full, base)
    assert len({v.label for v in variants}) == len(variants)
    configs = [base.with_overrides(v.overrides) for v in variants]
    assert all(c.plan().steps for c in configs)  # every variant grows
    # the growth keys `depthgrow experiment` refuses, as every variant sets its own (a method that fixes its
    # init and may derive its source depth and times - gstack, midas, lemon - sets the method instead)
    set_by_variants = {key for key in SET_BY_COMMAND["experiment"] if key.startswith("growth.")}
    for variant in variants:
        assert set_by_variants <= set(variant.overrides) or variant.overrides["growth.method"] in METHOD_INIT
    assert len({config_hash(c) for c in configs}) == len(configs), "two variants train the same run"


def test_the_grids_cover_the_paper_ablations():
    base = load_config()
    labels = {name: [v.label for v in EXPERIMENTS[name].variants(True, base)] for name in EXPERIMENTS}
    assert {"1 -> L random", "1 -> L copy", "1 -> L zero", "1 -> L copy_zero"} <= set(labels["init"])
    assert {"2 -> L copy", "2 -> L copy_inter", "2 -> L copy_last"} <= set(labels["init"])
    taus = {v.x for v in EXPERIMENTS["timing"].variants(True, base)}
    assert taus == {0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9}
    assert {v.series for v in EXPERIMENTS["timing"].variants(True, base)} == {"wsd", "cosine"}
    assert {"0 -> 2 -> L", "2 -> L", "0 -> L"} == set(labels["stages"])
    assert {0, 1, 2, 4} <= {int(v.series.split()[1]) for v in EXPERIMENTS["sources"].variants(False, base)}


def test_config_hash_ignores_the_output_folder_only():
    config = load_config()
    moved = config.with_overrides({"train.out_dir": "elsewhere"})
    assert config_hash(moved) == config_hash(config)
    assert config_hash(config.with_overrides({"train.seed": "1"})) != config_hash(config)


@pytest.mark.parametrize("name", ["init", "timing", "sources", "lr", "recipe", "methods"])
def test_an_experiment_runs_end_to_end_on_a_tiny_grid(tmp_path, capsys, name):
    out = tmp_path / "results"
    depth = ["--model.n_layer=8"] if name == "sources" else []  # sources up to 4 need a deeper target
    assert main(["experiment", name, *TINY, *depth, "--out", str(out)]) == 0
    rows = json.loads((out / name / "summary.json").read_text())
    assert len(rows) == len(EXPERIMENTS[name].variants(False, experiment_base(name)))
    for row in rows:
        assert row["gap_pct"] == pytest.approx(100 * (row["final_val_loss"] / row["baseline_val_loss"] - 1))
        assert 0 < row["compute_fraction"] < 1
        if not EXPERIMENTS[name].frontier:
            assert row["frontier"] is None and row["compute_multiplier"] is None
            continue
        # every baseline's frontier: it and its runs of a quarter, half and three quarters of its steps
        frontier = row["frontier"]
        assert len(frontier["points"]) == 4 and row["baseline_val_loss"] in [p["val_loss"] for p in frontier["points"]]
        law = frontier["law"]
        assert row["compute_matched_loss"] == pytest.approx(
            law["E"] + law["A"] * (row["flops"] / law["scale"]) ** -law["alpha"]
        )
        if row["compute_multiplier"] is not None:
            needed = law["scale"] * (law["A"] / (row["final_val_loss"] - law["E"])) ** (1 / law["alpha"])
            assert row["compute_multiplier"] == pytest.approx(needed / row["flops"])
    assert (out / name / "plot.png").stat().st_size > 10_000
    table = (out / name / "table.md").read_text()
    assert table.count("\n| ") == len(rows) + 1
    if name == "timing":  # one baseline per schedule, shared by its variants
        assert len({r["baseline_val_loss"] for r in rows}) == 2
    if name == "recipe":  # a baseline per step scale, init and learning rate
        assert len({r["baseline_val_loss"] for r in rows}) == len(rows) == 8
    if name == "lr":  # one baseline per learning rate, shared by both sources
        assert len({r["baseline_val_loss"] for r in rows}) == 3
        peak = load_config().optim.lr
        assert sorted({r["x"] for r in rows}) == pytest.approx([peak / 2, peak, peak * 2])
    capsys.readouterr()
    assert main(["experiment", name, *TINY, *depth, "--out", str(out)]) == 0  # a rerun trains nothing
    assert not re.search(r"step \d+/\d+", capsys.readouterr().err)
    assert json.loads((out / name / "summary.json").read_text()) == rows


def test_an_unknown_experiment_is_refused(capsys):
    assert main(["experiment", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nonsense'" in err and err.count("\n") == 1


def test_user_overrides_win_over_the_grid_and_the_experiment(tmp_path):
    base = experiment_base("sources", overrides={"train.steps": "77", "model.n_layer": "6"})
    assert (base.train.steps, base.model.n_layer) == (77, 6)
    assert experiment_base("sources").model.n_layer == 8


def test_the_regime_plot_draws_the_multiplier_against_the_vocabulary(tmp_path):
    from depthgrow.plot import plot_regime

    rows = [
        {"series": f"muon {scope}", "x": vocab, "compute_multiplier": m, "multiplier_extrapolated": vocab == 256}
        for scope, ms in (("all", (0.8, 1.1, 1.4)), ("blocks", (0.7, 0.9, None)))
        for vocab, m in zip((256, 1024, 4096), ms, strict=True)
    ]
    path = plot_regime(rows, tmp_path / "plot.png", title="regime", x_label="vocabulary size")
    assert path.stat().st_size > 10_000
