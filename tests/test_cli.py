import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from depthgrow.checkpoint import load_checkpoint
from depthgrow.cli import COMMANDS, build_parser, main
from depthgrow.compare import frontier_text
from depthgrow.config import PRESET_RULE, SECTIONS
from depthgrow.experiments import DEFAULT_GRID, EXPERIMENTS
from depthgrow.frontier import fit_frontier
from depthgrow.models import FAMILIES
from depthgrow.presets import PRESETS

TINY = [
    "--model", "gpt2-test", "--train.steps=40", "--train.batch_size=4", "--train.eval_every=10",
    "--train.eval_batches=2",
]  # fmt: skip


def run_cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "depthgrow", *args], capture_output=True, text=True, timeout=120, **kwargs
    )


def test_command_table_matches_the_parser():
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(subcommands) == set(COMMANDS)


def test_flops_reproduces_the_paper_compute_fractions(capsys):
    assert main(["flops", "--model", "gpt2-7b", "--growth.source_depth=0", "--growth.at=0.8"]) == 0
    paper_7b = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("paper"))
    assert "21.8%" in paper_7b and "4.58x" in paper_7b and "157.54M" in paper_7b
    assert main(["flops", "--model", "gpt2-124m", "--growth.source_depth=0"]) == 0
    paper_124m = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("paper"))
    assert "45.3%" in paper_124m and "39.39M" in paper_124m


def test_train_end_to_end_through_the_console_entry(tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", *TINY, "--growth.source_depth=0", "--growth.at=0.5", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "final validation loss" in result.stdout
    for name in ("config.toml", "log.jsonl", "checkpoint.pt", "summary.json"):
        assert (out / name).exists(), name
    assert "grew to depth 2 at step 20" in result.stderr


def test_train_from_a_config_file_with_overrides(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[model]\npreset = "gpt2-test"\n[train]\nsteps = 12\nbatch_size = 2\neval_every = 6\n')
    assert main(["train", str(config), "--train.steps", "8", "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 8 and summary["tokens"] == 8 * 2 * 32


BAD_INPUTS = {
    "unknown preset": (["--model", "gpt2-huge"], "unknown model preset 'gpt2-huge'"),
    "unknown init": (["--growth.source_depth=1", "--growth.init=clone"], "growth.init must be one of"),
    "unknown optimizer": (["--optim.name=adamax"], "optim.name must be one of"),
    "source not below target": (["--growth.source_depth=2"], "growth depths must increase"),
    "expansion after T": (["--growth.source_depth=0", "--growth.at=40"], "outside (0, T=40)"),
    "expansion at 0": (["--growth.source_depth=0", "--growth.at=0"], "outside (0, T=40)"),
    "copy from zero layers": (["--growth.source_depth=0", "--growth.init=copy"], "zero-layer source"),
    "unknown key": (["--train.stepz=5"], "unknown config key train.stepz"),
    "unknown section": (["--trainer.steps=5"], "unknown config section 'trainer'"),
    "bad number": (["--train.steps=many"], "train.steps must be an integer"),
    "missing data": (["--data", "/nonexistent/corpus.txt"], "does not exist"),
    "missing config": (["/nonexistent/run.toml"], "config file /nonexistent/run.toml does not exist"),
    "not a number": (["--optim.lr=nan"], "optim.lr must be a finite number > 0"),
    "negative seed": (["--train.seed=-1"], "train.seed must be >= 0"),
    "bad eps": (["--optim.eps=0"], "optim.eps must be a finite number > 0"),
    "no such gpu": (["--train.device=cuda:7"], "CUDA device"),
    "stop before start": (["--stop-at", "0"], "--stop-at must be in (0, 40]"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_gets_one_line_and_exit_status_2(tmp_path, capsys, case):
    args, message = BAD_INPUTS[case]
    code = main(["train", *TINY, "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("depthgrow: error: ") and err.count("\n") == 1, err
    assert message in err


def data_file(tmp_path, content: bytes):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"to be or not to be", "fewer than one context"), (b"\xff\xfe\x00bad", "not UTF-8")],
    ids=["empty", "too short", "not text"],
)
def test_bad_data_gets_one_line(tmp_path, capsys, content, message):
    assert main(["train", *TINY, "--out", str(tmp_path / "run"), "--data", data_file(tmp_path, content)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_an_output_folder_that_cannot_be_written_gets_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file, not a folder")
    assert main(["train", *TINY, "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the run folder" in err and err.count("\n") == 1


def test_flops_of_a_one_layer_target_shows_only_the_zero_layer_source(capsys):
    assert main(["flops", "--model", "gpt2-tiny", "--model.n_layer=1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if " -> " in line]
    assert len(rows) == 2 and all("0 -> 1" in row for row in rows)


def test_unreadable_config_and_foreign_checkpoint_get_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nsteps = 3")
    assert main(["train", str(broken)]) == 2
    assert "is unreadable" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run), "--stop-at", "5"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--train.batch_size=8"]) == 2
    err = capsys.readouterr().err
    assert "belongs to another config" in err and "train.batch_size (4 in the checkpoint, 8 now)" in err
    assert "a resume may change only optim.beta1" in err and err.count("\n") == 1
    for elsewhere in (["--out", str(tmp_path / "other")], [f"--train.out_dir={tmp_path / 'other'}"]):
        assert main(["train", "--resume", str(run), *elsewhere]) == 2
        err = capsys.readouterr().err
        assert f"continues the run in {run}, and {tmp_path / 'other'} is another folder" in err
        assert err.count("\n") == 1 and not (tmp_path / "other").exists()
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {run / 'checkpoint.pt'} is unreadable: it is not a zip archive" in err
    assert "that depthgrow train writes" in err and "weights_only" not in err and err.count("\n") == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path, sig):
    out = tmp_path / "run"
    args = ["train", "--model", "gpt2-test", "--train.steps=100000", "--train.batch_size=2", "--out", str(out)]
    process = subprocess.Popen(
        [sys.executable, "-m", "depthgrow", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    log = out / "log.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (log.exists() and log.stat().st_size > 20_000):
        time.sleep(0.1)
    os.kill(process.pid, sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert f"Resume with: depthgrow train --resume {out}" in err
    assert "Traceback" not in err
    step = load_checkpoint(out / "checkpoint.pt")["train_state"]["step"]
    assert step > 0
    resumed = run_cli("train", "--resume", str(out), "--stop-at", str(step + 5))
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(out / "checkpoint.pt")["train_state"]["step"] == step + 5
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if '"train"' in line]
    assert steps == list(range(1, step + 6))  # one run's log: nothing lost, nothing repeated


def test_compare_writes_table_summary_and_plot_and_reuses_finished_runs(tmp_path, capsys):
    out = tmp_path / "compare"
    args = ["compare", *TINY, "--growth.at=0.5", "--growth.init=copy", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["runs"]
    fixed, grow0, grow1, *ladder = rows
    assert [r["name"] for r in rows[:3]] == ["fixed", "grow0", "grow1"]
    assert [r["source_depth"] for r in rows[:3]] == [None, 0, 1]
    assert [r["init"] for r in rows[:3]] == [None, "random", "copy"]  # zero layers cannot copy
    assert fixed["gap_pct"] == 0 and fixed["compute_fraction"] == 1 and fixed["wall_fraction"] == 1
    for row in (grow0, grow1):
        for key in ("final_val_loss", "gap_pct", "flops", "compute_fraction", "wall_s", "wall_fraction"):
            assert isinstance(row[key], float), key
        assert row["gap_pct"] == pytest.approx(100 * (row["final_val_loss"] / fixed["final_val_loss"] - 1))
        assert 0 < row["compute_fraction"] < 1 and row["flops"] < fixed["flops"]
        # by the paper's counting (every parameter) the zero- and one-layer models cost more than by ours
        assert row["compute_fraction"] < row["compute_fraction_paper"] < 1
    assert grow0["compute_fraction"] < grow1["compute_fraction"]
    # the compute-matched baseline: a fixed-depth run at each progressive run's compute (40 steps x fraction,
    # rounded) and one at half the smaller, each with its own whole schedule
    steps = sorted({round(40 * grow0["compute_fraction"]), round(40 * grow1["compute_fraction"]),
                    round(40 * grow0["compute_fraction"] / 2)})  # fmt: skip
    assert [r["name"] for r in ladder] == [f"fixed-T{s}" for s in steps]
    assert [r["steps"] for r in ladder] == steps and all(r["source_depth"] is None for r in ladder)
    for row in ladder:
        assert row["compute_fraction"] == pytest.approx(row["steps"] / 40)
    frontier = summary["frontier"]
    assert sorted(p["val_loss"] for p in frontier["points"]) == sorted(r["final_val_loss"] for r in [fixed, *ladder])
    law = frontier["law"]
    for row in (grow0, grow1):
        matched = law["E"] + law["A"] * (row["flops"] / law["scale"]) ** -law["alpha"]
        assert row["compute_matched_loss"] == pytest.approx(matched)
        needed = law["scale"] * (law["A"] / (row["final_val_loss"] - law["E"])) ** (1 / law["alpha"])
        assert row["compute_multiplier"] == pytest.approx(needed / row["flops"])
    assert (out / "compare.png").stat().st_size > 10_000
    assert "| grow0 | 0 -> L at 20 (random) |" in printed and (out / "summary.md").read_text().strip() in printed
    assert "fixed-depth frontier" in printed
    assert fixed["mixing_steps"] is None
    assert all(r["mixing_steps"] is None or 0 <= r["mixing_steps"] <= 20 for r in (grow0, grow1))
    assert main(args) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == len(rows)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert main([*args, "--mix-tolerance", "10"]) == 0  # within 1000 %: mixed at the expansion itself
    assert [r["mixing_steps"] for r in json.loads((out / "summary.json").read_text())["runs"][:3]] == [None, 0, 0]
    capsys.readouterr()
    # another init changes the progressive runs only: they are refused without --overwrite, and with it
    # replaced while the fixed-depth runs are reused
    assert main([*args[:-3], "--growth.init=zero", "--out", str(out)]) == 2
    assert "holds a run of another config" in capsys.readouterr().err
    assert main([*args[:-3], "--growth.init=zero", "--out", str(out), "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing the finished run") == 1 + len(ladder) and "fixed: reusing" in printed
    assert [r["init"] for r in json.loads((out / "summary.json").read_text())["runs"][:3]] == [None, "zero", "zero"]


def test_compare_runs_an_image_model_to_its_plot(tmp_path, capsys):
    out = tmp_path / "compare"
    args = ["--model", "resnet-test", "--train.steps=30", "--train.batch_size=16", "--train.eval_every=10"]
    assert main(["compare", *args, "--sources", "0", "--out", str(out)]) == 0
    assert "fixed-depth frontier" in capsys.readouterr().out
    assert (out / "compare.png").stat().st_size > 10_000


def test_without_a_frontier_the_table_says_why_and_gives_no_multipliers():
    rows = [
        {"source_depth": None, "steps": steps, "final_val_loss": loss}
        for steps, loss in [(2000, 0.0812), (202, 0.0796), (403, 0.0493), (802, 0.0178)]
    ]  # the digits' fixed-depth runs: the longest overfits
    assert fit_frontier([(row["steps"] * 1e9, row["final_val_loss"]) for row in rows]) is None
    text = frontier_text(None, rows)
    assert "no compute multipliers" in text and "T = 802: 0.0178, T = 2000: 0.0812" in text
    assert "2 fixed-depth lengths, a law needs 3" in frontier_text(None, rows[:2])


def test_the_package_imports_without_optional_extras():
    blocked = "import sys; sys.modules.update(matplotlib=None, tiktoken=None, transformers=None); "
    code = blocked + "import depthgrow, depthgrow.cli, depthgrow.compare, depthgrow.data; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr


def test_compare_without_matplotlib_still_writes_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "depthgrow.plot", None)  # as if matplotlib were not installed
    out = tmp_path / "compare"
    assert main(["compare", *TINY, "--growth.at=0.5", "--sources", "0", "--out", str(out)]) == 0
    assert "pip install 'depthgrow[plot]'" in capsys.readouterr().out
    assert (out / "summary.json").exists() and not (out / "compare.png").exists()


CONFIG_COMMANDS = {"train": [], "compare": [], "flops": [], "experiment": ["init"]}


def command_help(capsys, monkeypatch, command: str) -> str:
    monkeypatch.setenv("COLUMNS", "100")  # argparse's own layout: the width the config keys are laid out for
    with pytest.raises(SystemExit) as stopped:
        main([command, *CONFIG_COMMANDS[command], "--help"])
    assert stopped.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_the_help_of_a_config_command_names_every_key_of_every_section(capsys, monkeypatch, command):
    text = command_help(capsys, monkeypatch, command)
    classes = {name: [cls] for name, cls in SECTIONS.items()}
    classes["model"] = [family.config for family in FAMILIES.values()]
    for section, section_classes in classes.items():
        for section_class in section_classes:
            for f in dataclasses.fields(section_class):
                assert re.search(rf"^  {section}\.{f.name} ", text, re.M), f"{command} --help lacks {section}.{f.name}"
    assert re.search(r"^  model\.preset +gpt2-micro-bpe ", text, re.M)
    assert max(map(len, text.splitlines())) <= 100


def test_the_help_shows_each_command_s_own_defaults_and_docs(capsys, monkeypatch):
    train = command_help(capsys, monkeypatch, "train")
    assert re.search(r"^  optim\.lr +0\.01 +peak learning rate", train, re.M)  # the optimizer's, resolved
    assert re.search(r"^  train\.out_dir +runs/train ", train, re.M)
    decoders = ", ".join(name for name, f in FAMILIES.items() if "n_kv_head" in f.config.__dataclass_fields__)
    assert re.search(rf"^  model\.n_kv_head +\({decoders}\)\n +grouped-query attention", train, re.M)
    assert re.search(r"^  train\.out_dir +runs/compare ", command_help(capsys, monkeypatch, "compare"), re.M)
    experiment = command_help(capsys, monkeypatch, "experiment")
    assert re.search(rf"^  train\.steps +{DEFAULT_GRID['train.steps']} ", experiment, re.M)
    assert re.search(r"^  train\.out_dir +- +not taken: every run gets its own folder under --out", experiment, re.M)


def test_the_help_states_the_override_rules_where_they_apply(capsys, monkeypatch):
    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in CONFIG_COMMANDS:
        model_option = next(a for a in subcommands[command]._actions if "--model" in a.option_strings)
        assert model_option.help.endswith(f"{', '.join(PRESETS)}; {PRESET_RULE}")
    text = " ".join(command_help(capsys, monkeypatch, "train").split())
    assert "optim.name muon-nsgd muon-nsgd (the paper's" in text
    # test_config checks that the config does what these say
    assert "another optimizer brings its own lr and weight_decay unless they are given too" in text


def test_experiment_help_asks_the_paper_s_questions_instead_of_stating_its_claims(capsys, monkeypatch):
    text = " ".join(command_help(capsys, monkeypatch, "experiment").split())
    for experiment in EXPERIMENTS.values():
        assert experiment.question.endswith("?") and f"{experiment.name} {experiment.question}" in text
    assert "docs/results.md" in text
    for claim in ("one expansion 0 -> L beats two", "the gap closes as more", "under WSD an expansion at 0.8 T still"):
        assert claim not in text


REFUSED = {
    "flops --data": (["flops", "--data", "corpus.txt"], "unrecognized arguments: --data (see depthgrow flops --help)"),
    "flops --out": (["flops", "--out", "runs/x"], "unrecognized arguments: --out (see depthgrow flops --help)"),
    "compare source depth": (
        ["compare", "--growth.source_depth=0"],
        "compare does not take --growth.source_depth: it is set for each run from --sources",
    ),
    "experiment out_dir": (
        ["experiment", "init", "--train.out_dir", "runs/x"],
        "experiment does not take --train.out_dir: every run gets its own folder under --out",
    ),
    "experiment growth": (
        ["experiment", "timing", "--growth.at=0.5"],
        "experiment does not take --growth.at: every variant of an experiment sets it",
    ),
    "export config key": (["export", "run", "out", "--train.steps=3"], "export takes no config options"),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_an_option_a_command_would_ignore_is_refused_in_one_line(tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)  # nothing may be trained or written
    args, message = REFUSED[case]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"depthgrow: error: {message}") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []
