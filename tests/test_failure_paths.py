"""Where a long run fails in practice: a full disk, a diverging loss, an interrupt at start-up, a resume
that changes the learning rate, and the command line's own mistakes. Each ends with one line, a
status of its own and the files as they should be."""

import errno
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from depthgrow import checkpoint as checkpoint_module
from depthgrow.checkpoint import load_checkpoint
from depthgrow.cli import main
from depthgrow.config import load_config, read_toml
from depthgrow.errors import Diverged, OutputWriteError
from depthgrow.guard import DivergenceGuard
from depthgrow.metrics import JsonlLog, read_log, strict_json
from depthgrow.trainer import _write_run_file, train

TINY = [
    "--model", "gpt2-test", "--train.steps=40", "--train.batch_size=4", "--train.eval_every=10",
    "--train.eval_batches=2", "--train.checkpoint_every=10",
]  # fmt: skip
GROWING = [*TINY, "--growth.source_depth=0", "--growth.at=25"]


def one_error_line(err: str) -> str:
    """The error, alone on the last line of stderr (after the run's own progress lines, if any)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("depthgrow: error: ") and "Traceback" not in err, err
    assert sum("error" in line.lower() for line in lines) == 1, err
    return lines[-1]


def strict_records(path: Path) -> list[dict]:
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


# --- a full disk -------------------------------------------------------------------------------------


def test_a_checkpoint_write_that_runs_out_of_space_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    """The third checkpoint (step 30, after the expansion at 25) hits a full disk half-way through."""
    real_save, calls = torch.save, []

    def save_until_full(obj, handle):
        calls.append(1)
        if len(calls) < 3:
            return real_save(obj, handle)
        handle.write(b"PK\x03\x04" + bytes(5000))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", save_until_full)
    run = tmp_path / "run"
    assert main(["train", *GROWING, "--out", str(run)]) == 74
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot write {run / 'checkpoint.pt'}: No space left on device (it needs " in line
    assert "free there)" in line and "the previous checkpoint (if any) is left whole" in line
    assert load_checkpoint(run / "checkpoint.pt")["train_state"]["step"] == 20
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.toml", "log.jsonl"]
    assert not (run / "checkpoint.pt.tmp").exists() and not (run / "summary.json").exists()

    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert main(["train", "--resume", str(run)]) == 0  # space freed: the run goes on from step 20
    resumed = json.loads((run / "summary.json").read_text())["final_val_loss"]
    assert main(["train", *GROWING, "--out", str(tmp_path / "whole")]) == 0
    assert resumed == json.loads((tmp_path / "whole" / "summary.json").read_text())["final_val_loss"]


def test_a_real_write_limit_stops_the_run_with_one_line_and_no_temporary_file(tmp_path):
    """A file-size limit (RLIMIT_FSIZE) makes the kernel refuse the write of the grown model's checkpoint:
    a real failed write, end to end through the command."""
    run = tmp_path / "run"
    limit = 1_000_000  # at n_embd 128 the zero-layer checkpoint takes 0.3 MB, the two-layer one 3.4 MB

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = ["train", *GROWING, "--model.n_embd=128", "--out", str(run)]
    result = subprocess.run(
        [sys.executable, "-m", "depthgrow", *args],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit_file_size,
    )
    assert result.returncode == 74, result.stderr
    line = one_error_line(result.stderr)
    assert f"cannot write {run / 'checkpoint.pt'}: File too large" in line
    assert not (run / "checkpoint.pt.tmp").exists()
    assert load_checkpoint(run / "checkpoint.pt")["train_state"]["depth"] == 0


def test_log_and_summary_writes_on_a_full_device_name_the_file(tmp_path):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    log = JsonlLog("/dev/full")
    log.write({"event": "train", "step": 1, "loss": 3.0})
    with pytest.raises(OutputWriteError, match=r"cannot write /dev/full: No space left on device \(it needs \d+ bytes"):
        log.flush()
    log.close()
    with pytest.raises(OutputWriteError, match=r"cannot write /dev/full: No space left on device \(it needs 12 bytes"):
        _write_run_file(Path("/dev/full"), '{"done": 1}\n')


# --- a diverging loss --------------------------------------------------------------------------------


def test_a_diverging_run_stops_before_writing_another_checkpoint(tmp_path, capsys):
    """From scratch at lr 30 (3,000 times the default) the loss explodes in the warm-up, before any
    checkpoint; resumed at lr 30 from a checkpoint of step 20, it explodes and leaves that checkpoint."""
    scratch = tmp_path / "scratch"
    assert main(["train", *TINY, "--optim.lr=30", "--out", str(scratch)]) == 3
    line = one_error_line(capsys.readouterr().err)
    assert "the training loss (smoothed over ~10 steps) reached" in line and "train.diverge_factor=3.0" in line
    assert "no checkpoint was written; start again with a lower optim.lr (now 30)" in line
    assert not (scratch / "checkpoint.pt").exists() and not (scratch / "summary.json").exists()

    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run), "--stop-at", "20"]) == 0
    assert main(["train", "--resume", str(run), "--optim.lr=30"]) == 3
    line = one_error_line(capsys.readouterr().err)
    records = strict_records(run / "log.jsonl")
    diverged = [r for r in records if r["event"] == "diverged"]
    assert len(diverged) == 1 and diverged[0]["quantity"] == "loss" and 20 < diverged[0]["step"] <= 30
    assert f"at step {diverged[0]['step']}, " in line
    assert load_checkpoint(run / "checkpoint.pt")["train_state"]["step"] == 20  # none written after it
    assert f"the checkpoint of step 20 in {run} is whole" in line
    assert f"depthgrow train --resume {run} --optim.lr 15" in line
    assert not (run / "summary.json").exists()
    # what it says to do works: the run goes on from the checkpoint at a lower learning rate
    assert main(["train", "--resume", str(run), "--optim.lr", "0.005"]) == 0
    assert math.isfinite(json.loads((run / "summary.json").read_text())["final_val_loss"])


def test_guard_lets_noise_and_low_losses_pass_and_stops_explosions():
    guard = DivergenceGuard(3.0)
    for step in range(1, 50):
        assert guard.train(step, 3.0 - step * 0.01) is None
    assert guard.train(50, 30.0) is None  # one bad batch moves the ~10-step average only to 5.2
    assert "reached" in (guard.train(51, 80.0) or "")
    classifier = DivergenceGuard(3.0)
    for step, loss in enumerate([2.3, 0.5, 0.05, 0.01], start=1):
        assert classifier.train(step, loss) is None
        assert classifier.validation(step, loss) is None
    assert classifier.validation(5, 0.2) is None  # 20x its best, but far better than at the start
    assert "validation loss reached 9.5" in (classifier.validation(6, 9.5) or "")
    assert "became nan" in (DivergenceGuard(None).validation(1, math.nan) or "")
    assert DivergenceGuard(None).train(1, 1e30) is None  # only non-finite losses stop an unguarded run


def test_non_finite_values_are_written_as_null_and_named():
    line = strict_json({"event": "eval", "val_loss": math.nan, "expert_usage": [[0.5, math.inf]]})
    assert json.loads(line) == {
        "event": "eval",
        "val_loss": None,
        "expert_usage": [[0.5, None]],
        "nonfinite": {"val_loss": "nan", "expert_usage": "inf"},
    }


# --- resuming with another learning rate --------------------------------------------------------------


def test_a_resume_may_change_the_learning_rate_and_says_so_in_the_log(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run), "--stop-at", "20"]) == 0
    assert main(["train", "--resume", str(run), "--optim.lr=0.005", "--stop-at", "30"]) == 0
    assert "from step 20 on, optim.lr 0.01 -> 0.005" in capsys.readouterr().err
    assert read_toml(run / "config.toml")["optim"]["lr"] == 0.005
    assert load_checkpoint(run / "checkpoint.pt")["config"]["optim"]["lr"] == 0.005
    assert main(["train", "--resume", str(run)]) == 0  # the run's config now holds the new rate
    records = read_log(run / "log.jsonl")
    changes = [r for r in records if r["event"] == "config_change"]
    assert changes == [{"event": "config_change", "step": 20, "changes": {"optim.lr": [0.01, 0.005]}}]
    lr = {r["step"]: r["lr"] for r in records if r["event"] == "train"}
    assert lr[20] == pytest.approx(0.01) and lr[21] == pytest.approx(0.005)  # WSD: at its peak until step 36
    assert lr[31] == pytest.approx(0.005)


# --- interrupts at start-up and the command line's own errors -----------------------------------------


def handles_sigterm(pid: int) -> bool:
    """Whether the process has installed a SIGTERM handler (depthgrow.console's first act)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads signal masks from /proc (Linux)")
@pytest.mark.parametrize("delay", [0.0, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_at_start_up_exits_quietly_with_130(tmp_path, sig, delay):
    args = ["train", "--model", "gpt2-test", "--train.steps=100000", "--out", str(tmp_path / "run")]
    process = subprocess.Popen(
        [sys.executable, "-m", "depthgrow", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while not handles_sigterm(process.pid) and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        os.kill(process.pid, sig)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()  # never left training when the test fails
        process.communicate()
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0], err


ARGPARSE_ERRORS = {
    "bad --stop-at": (["train", "--stop-at", "x"], "argument --stop-at: invalid int value: 'x' (see depthgrow train"),
    "misspelt command": (["trian"], "invalid choice: 'trian'"),
    "bad --sources": (["compare", "--sources", "a,b"], "expected comma-separated whole numbers, got 'a,b'"),
    "no command": ([], "the following arguments are required: COMMAND (see depthgrow --help)"),
    "unknown flag": (["train", "--bogus"], "unrecognized arguments: --bogus (see depthgrow train --help)"),
}


@pytest.mark.parametrize("case", ARGPARSE_ERRORS, ids=list(ARGPARSE_ERRORS))
def test_argparse_errors_are_one_line_like_every_other(capsys, case):
    args, message = ARGPARSE_ERRORS[case]
    assert main(args) == 2
    assert message in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("spelling", ["1.0", "0.5,1.0", "1e0"])
def test_growth_at_spelled_as_one_point_zero_is_refused_with_both_meanings(tmp_path, capsys, spelling):
    code = main(["train", *TINY, "--growth.source_depth=0", f"--growth.at={spelling}", "--out", str(tmp_path / "r")])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "is ambiguous" in line
    assert "write growth.at=1 for an expansion after the first step" in line and "growth.at=0.99" in line
    assert not (tmp_path / "r").exists()


def test_growth_at_one_is_step_one_and_survives_a_saved_config(tmp_path, capsys):
    file = tmp_path / "run.toml"
    file.write_text('[model]\npreset = "gpt2-test"\n[growth]\nsource_depth = 0\nat = [1.0]\n')
    assert main(["train", str(file)]) == 2
    assert "growth.at value 1.0 is ambiguous" in one_error_line(capsys.readouterr().err)
    run = tmp_path / "run"
    assert main(["train", *TINY, "--growth.source_depth=0", "--growth.at=1", "--out", str(run), "--stop-at=2"]) == 0
    assert read_toml(run / "config.toml")["growth"]["at"] == [1]  # an integer: read back as a step
    assert main(["train", "--resume", str(run)]) == 0
    assert [r["step"] for r in read_log(run / "log.jsonl") if r["event"] == "growth"] == [1]


def test_a_run_that_fails_before_it_starts_leaves_no_folder(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("too short")
    assert main(["train", *TINY, "--data", str(corpus), "--out", str(tmp_path / "run")]) == 2
    assert "fewer than one context" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_a_diverged_run_of_a_compare_points_back_to_the_compare(tmp_path):
    overrides = dict(arg[2:].split("=", 1) for arg in TINY[2:])
    config = load_config(None, {"model.preset": "gpt2-test", **overrides, "train.out_dir": str(tmp_path / "run")})
    train(config, stop_at=20)
    with pytest.raises(Diverged, match=r"is whole; lower optim.lr \(now 30\) and run the same compare command again"):
        train(config.with_overrides({"optim.lr": "30"}), resume=True, resume_hint="the same compare command")


# --- extending a run -----------------------------------------------------------------------------------


def test_a_constant_schedule_run_extends_to_the_run_it_would_have_been(tmp_path, capsys):
    constant = [*TINY, "--schedule.name=constant"]
    assert main(["train", *constant, "--out", str(tmp_path / "short")]) == 0
    assert main(["train", "--resume", str(tmp_path / "short"), "--train.steps=60"]) == 0
    assert "from step 40 on, train.steps 40 -> 60" in capsys.readouterr().err
    assert main(["train", *constant, "--train.steps=60", "--out", str(tmp_path / "long")]) == 0
    extended, whole = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("short", "long"))
    assert extended["step"] == 60 and extended["final_val_loss"] == whole["final_val_loss"]
    steps = [r["step"] for r in read_log(tmp_path / "short" / "log.jsonl") if r["event"] == "train"]
    assert steps == list(range(1, 61))


def test_extending_a_wsd_run_before_its_decay_works_after_it_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run), "--stop-at", "20"]) == 0
    assert main(["train", "--resume", str(run), "--train.steps=80", "--stop-at", "30"]) == 0  # decay starts at 72
    lr = {r["step"]: r["lr"] for r in read_log(run / "log.jsonl") if r["event"] == "train"}
    assert lr[30] == pytest.approx(0.01)  # still at the peak, where the 40-step run would have been decaying
    assert main(["train", "--resume", str(run), "--train.steps=50"]) == 2
    assert "a run can be extended, not shortened (train.steps 80 -> 50)" in one_error_line(capsys.readouterr().err)
    assert main(["train", *TINY, "--out", str(tmp_path / "done")]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "done"), "--train.steps=80"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "cannot extend the run" in line and "from 40 to 80 steps at step 40" in line
    assert "wsd learning rate had begun to fall" in line and "Extend a run before its decay" in line


def test_an_extension_keeps_the_expansions_already_made(tmp_path, capsys):
    run = tmp_path / "run"
    growing = [*TINY, "--schedule.name=constant", "--growth.source_depth=0", "--growth.at=0.5"]
    assert main(["train", *growing, "--out", str(run), "--stop-at", "30"]) == 0
    assert main(["train", "--resume", str(run), "--train.steps=60"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "the expansions made at step 20 would move to step 30 with T = 60" in line
    assert "keep them where they were with --growth.at 20" in line
    assert main(["train", "--resume", str(run), "--train.steps=60", "--growth.at=20"]) == 0
    assert [r["step"] for r in read_log(run / "log.jsonl") if r["event"] == "growth"] == [20]
