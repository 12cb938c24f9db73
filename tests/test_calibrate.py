"""The paper's calibration of tau: pilots, the measured rule for t_mix, the recommendation, growth.at=auto."""

import json
import math

import pytest

from depthgrow import calibrate as calibrate_module
from depthgrow.analysis import eval_curve, mixing_time
from depthgrow.cli import main
from depthgrow.compare import run_flops
from depthgrow.config import load_config, read_toml
from depthgrow.flops import DEPTHGROW
from depthgrow.metrics import read_log

TARGET = ["--model", "gpt2-test", "--growth.source_depth", "0", "--train.steps", "200", "--train.batch_size", "8"]


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibrate")
    assert main(["calibrate", *TARGET, "--pilots", "40,80", "--out", str(folder)]) == 0
    return folder / "calibration.json"


def test_the_pilots_measure_mixing_and_the_rule_carries_it_to_the_target(calibration):
    result = json.loads(calibration.read_text())
    first, second = result["pilots"]
    for pilot in (first, second):
        grown, fixed = (read_log(f"{pilot[key]}/log.jsonl") for key in ("run_dir", "fixed_dir"))
        after_warmup = round(0.02 * pilot["steps"]) + 1  # the step right after warm-up (2 % of T)
        assert pilot["growth_step"] == after_warmup
        assert pilot["mixing_steps"] == mixing_time(eval_curve(grown), eval_curve(fixed), after_warmup, 0.01)
    beta = math.log(second["mixing_steps"] / first["mixing_steps"]) / math.log(80 / 40)
    t_mix = round(first["mixing_steps"] * (200 / 40) ** beta)
    assert result["beta"] == pytest.approx(beta) and result["predicted_mixing_steps"] == t_mix
    assert result["recommended_step"] == 200 - t_mix
    config = load_config(None, {"model.preset": "gpt2-test", "growth.source_depth": "0", "train.steps": "200",
                                "train.batch_size": "8"})  # fmt: skip
    grown = config.with_overrides({"growth.at": str(200 - t_mix)})
    fixed = config.with_overrides({"growth.source_depth": "none"})
    assert result["compute_fraction"] == pytest.approx(run_flops(grown, DEPTHGROW) / run_flops(fixed, DEPTHGROW))


def test_train_with_growth_at_auto_expands_at_the_recommended_step(calibration, tmp_path, capsys):
    step = json.loads(calibration.read_text())["recommended_step"]
    run = tmp_path / "run"
    args = [*TARGET, "--growth.at", "auto", "--calibration", str(calibration), "--out", str(run)]
    assert main(["train", *args]) == 0
    assert f"growth.at=auto: step {step}, from {calibration}" in capsys.readouterr().out
    assert read_toml(run / "config.toml")["growth"]["at"] == [step]
    assert [r["step"] for r in read_log(run / "log.jsonl") if r["event"] == "growth"] == [step]


def test_growth_at_auto_refuses_a_calibration_of_other_settings(calibration, tmp_path, capsys):
    args = ["train", *TARGET, "--train.steps", "100", "--growth.at", "auto", "--calibration", str(calibration)]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "calibrates growth.source_depth=0 at train.steps=200, not 0 at 100" in err and err.count("\n") == 1
    assert main(["train", *TARGET, "--growth.at", "auto", "--calibration", str(tmp_path / "none.json")]) == 2
    assert "which does not exist: run depthgrow calibrate first" in capsys.readouterr().err
    assert main(["compare", "--model", "gpt2-test", "--growth.at", "auto", "--calibration", str(calibration)]) == 2
    assert "give it alone, e.g. --sources 0" in capsys.readouterr().err


def test_a_pilot_that_never_mixes_recommends_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(calibrate_module, "mixing_time", lambda *args: None)  # as if it never came close
    assert main(["calibrate", *TARGET, "--pilots", "40", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pilot T = 40: expanded at step 2, never mixed" in out
    assert "no recommendation: the pilot at T = 40 never came within 1.0% of its baseline" in out
    assert json.loads((tmp_path / "calibration.json").read_text())["recommended_step"] is None
    assert main(["train", *TARGET, "--growth.at", "auto", "--calibration", str(tmp_path / "calibration.json")]) == 2
    assert "recommends no expansion step: the pilot at T = 40 never came within" in capsys.readouterr().err


def test_calibrate_needs_a_progressive_target_and_sensible_pilots(tmp_path, capsys):
    assert main(["calibrate", "--model", "gpt2-test", "--out", str(tmp_path)]) == 2
    assert "calibrate needs a progressive run: set growth.source_depth" in capsys.readouterr().err
    assert main(["calibrate", *TARGET, "--pilots", "40,40", "--out", str(tmp_path)]) == 2
    assert "--pilots must be distinct step counts > 0" in capsys.readouterr().err
