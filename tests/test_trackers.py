"""Optional trackers beside log.jsonl: the record -> scalar mapping, TensorBoard event files read back,
an offline W&B run read back, and the one-line errors for a missing package or an unknown name."""

import json
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from depthgrow import trackers
from depthgrow.config import load_config
from depthgrow.errors import DepthgrowError
from depthgrow.trackers import Trackers, record_notes, record_scalars

CONFIG = {"model": {"preset": "gpt2-test", "n_layer": 2}, "train": {"steps": 4}}


def train_record(step: int, loss: float) -> dict:
    return dict(event="train", step=step, loss=loss, lr=0.01, depth=0, flops=3e9 * step, tokens=64 * step, wall_s=0.5)


def eval_record(step: int, val_loss: float, **extra) -> dict:
    return dict(event="eval", step=step, val_loss=val_loss, val_accuracy=0.25, depth=0, flops=3e9 * step, **extra)


GROWTH = dict(event="growth", step=2, from_depth=0, to_depth=2, init="random", seconds=0.1, val_loss_before=3.0)


def f32(value: float) -> float:
    # TensorBoard stores scalars as float32: "exact" means equal after that rounding
    return float(np.float32(value))


# ---------------------------------------------------------------------------------------------- mapping


def test_records_map_to_event_slash_field_tags():
    assert record_scalars(train_record(3, 2.5)) == {
        "train/loss": 2.5,
        "train/lr": 0.01,
        "train/depth": 0.0,
        "train/flops": 9e9,
        "train/tokens": 192.0,
        "train/wall_s": 0.5,
    }
    usage = {"layers.0.max_load": 1.5, "layers.0.min_load": 0.5}
    scalars = record_scalars(eval_record(2, 3.0, phase="pre_growth", expert_usage=usage, histogram=[[1, 2]]))
    assert scalars["eval/val_loss"] == 3.0 and scalars["eval/val_accuracy"] == 0.25
    assert scalars["eval/expert_usage/layers.0.max_load"] == 1.5  # a nested table flattens
    assert not any("phase" in tag or "histogram" in tag for tag in scalars)  # strings and lists are left out
    assert record_scalars(GROWTH)["growth/to_depth"] == 2.0 and "growth/init" not in record_scalars(GROWTH)
    assert record_notes(GROWTH) == {"growth/summary": "depth 0 -> 2 at step 2 (init random)"}
    assert record_scalars({"event": "train", "loss": 1.0}) == {}  # no step: nowhere to put it


def test_no_trackers_is_a_no_op(tmp_path):
    with Trackers.open([], out_dir=tmp_path, run_name="run", config=CONFIG, resume=False) as none:
        none.log(train_record(1, 2.0))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_package_names_the_extra_to_install(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail as if not installed
    with pytest.raises(DepthgrowError, match=rf"pip install 'depthgrow\[{name}\]'"):
        Trackers.open([name], out_dir=tmp_path, run_name="run", config=CONFIG, resume=False)


def test_a_tracker_that_fails_to_open_closes_those_opened_before(tmp_path, monkeypatch):
    closed = []

    class Opened:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def close(self) -> None:
            closed.append(True)

    monkeypatch.setattr(trackers, "_TensorBoard", Opened)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(DepthgrowError, match="wandb"):
        Trackers.open(["tensorboard", "wandb"], out_dir=tmp_path, run_name="run", config=CONFIG, resume=False)
    assert closed == [True]


def test_unknown_logger_names_are_rejected():
    with pytest.raises(DepthgrowError, match="unknown train.loggers mlflow; choose from: tensorboard, wandb"):
        load_config(None, {"train.loggers": "mlflow"})
    assert load_config(None, {"train.loggers": "tensorboard,wandb"}).train.loggers == ["tensorboard", "wandb"]
    with pytest.raises(DepthgrowError, match="mlflow"):
        Trackers.open(["mlflow"], out_dir=Path("unused"), run_name="run", config=CONFIG, resume=False)


# ----------------------------------------------------------------------------------------- tensorboard


def read_tensorboard(directory: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory))
    accumulator.Reload()
    return accumulator


def scalars_of(accumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    records = [train_record(1, 3.5), train_record(2, 3.25), eval_record(2, 3.125), GROWTH, train_record(3, 2.75)]
    with Trackers.open(["tensorboard"], out_dir=tmp_path, run_name="run", config=CONFIG, resume=False) as tracked:
        for record in records:
            tracked.log(record)
    board = read_tensorboard(tmp_path / "tensorboard")
    assert scalars_of(board, "train/loss") == [(1, 3.5), (2, 3.25), (3, 2.75)]
    assert scalars_of(board, "train/lr") == [(step, f32(0.01)) for step in (1, 2, 3)]
    assert scalars_of(board, "train/flops") == [(step, f32(3e9 * step)) for step in (1, 2, 3)]
    assert scalars_of(board, "eval/val_loss") == [(2, 3.125)]
    assert scalars_of(board, "growth/to_depth") == [(2, 2.0)]
    assert {"config/text_summary", "growth/summary/text_summary"} <= set(board.Tags()["tensors"])
    # validation loss against compute, x in GFLOPs, in its own folder
    by_flops = read_tensorboard(tmp_path / "tensorboard" / "vs_gflops")
    assert scalars_of(by_flops, "eval_vs_gflops/val_loss") == [(6, 3.125)]
    assert scalars_of(by_flops, "eval_vs_gflops/val_accuracy") == [(6, 0.25)]


def test_tensorboard_resume_drops_what_a_killed_run_logged_after_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    opened = dict(out_dir=tmp_path, run_name="run", config=CONFIG)
    with Trackers.open(["tensorboard"], **opened, resume=False) as killed:
        for step in range(1, 6):
            killed.log(train_record(step, 4.0 - step / 4))
            if step in (2, 4):
                killed.log(eval_record(step, 5.0 - step / 4))
    time.sleep(1.05)  # event files are read in name order, and the name starts with the time in seconds
    # the checkpoint was at step 3: the resumed run logs steps 4 and 5 again (other values here, to tell)
    with Trackers.open(["tensorboard"], **opened, resume=True, resume_step=3) as resumed:
        resumed.log(train_record(4, 0.5))
        resumed.log(eval_record(4, 0.75))
        resumed.log(train_record(5, 0.25))
    board = read_tensorboard(tmp_path / "tensorboard")
    assert scalars_of(board, "train/loss") == [(1, 3.75), (2, 3.5), (3, 3.25), (4, 0.5), (5, 0.25)]
    assert scalars_of(board, "eval/val_loss") == [(2, 4.5), (4, 0.75)]
    by_flops = read_tensorboard(tmp_path / "tensorboard" / "vs_gflops")
    assert scalars_of(by_flops, "eval_vs_gflops/val_loss") == [(6, 4.5), (12, 0.75)]

    time.sleep(1.05)
    with Trackers.open(["tensorboard"], **opened, resume=False) as fresh:  # a fresh start replaces the run
        fresh.log(train_record(1, 1.5))
    assert scalars_of(read_tensorboard(tmp_path / "tensorboard"), "train/loss") == [(1, 1.5)]


# ---------------------------------------------------------------------------------------------- wandb


def read_wandb_history(run_file: Path, wait_s: float = 60.0) -> list[dict[str, Any]]:
    """The history rows of a finished run's .wandb file (LevelDB-log framing of protobuf records).

    wandb's own process writes the file and may still be at it when ``finish()`` has returned (seen as a
    bare header about 1 run in 10): read it again until its last record, ``exit``, is there."""
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + wait_s
    while True:
        kinds, rows = _wandb_records(run_file.read_bytes(), wandb_internal_pb2)
        if "exit" in kinds or time.monotonic() > deadline:
            assert "exit" in kinds, f"{run_file} has no exit record after {wait_s:.0f} s"
            return rows
        time.sleep(0.1)


def _wandb_records(data: bytes, wandb_internal_pb2: Any) -> tuple[set[str], list[dict[str, Any]]]:
    """The record kinds in ``data`` and its history rows."""
    assert data[:4] == b":W&B"
    block, position, pending, rows, kinds = 32768, 7, b"", [], set()
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 or position + 7 + length > len(data):  # the end, or a record still being written
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            kinds.add(record.WhichOneof("record_type"))
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return kinds, rows


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's capture of stdout alone
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: no request could leave
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path / "run"


def test_wandb_offline_run_holds_the_logged_records_and_resumes_the_same_id(offline_wandb):
    out_dir = offline_wandb
    out_dir.mkdir()
    opened = dict(out_dir=out_dir, run_name="run", config=CONFIG)
    with Trackers.open(["wandb"], **opened, resume=False) as tracked:
        for record in (train_record(1, 3.5), train_record(2, 3.25), eval_record(2, 3.0), eval_record(2, 2.5)):
            tracked.log(record)
    run_id = (out_dir / "wandb_id.txt").read_text().strip()
    (run_dir,) = (out_dir / "wandb").glob(f"offline-run-*-{run_id}")
    rows = read_wandb_history(run_dir / f"run-{run_id}.wandb")
    assert [(row["step"], row["train/loss"]) for row in rows if "train/loss" in row] == [(1, 3.5), (2, 3.25)]
    # both evaluations at step 2 (as just before and after an expansion) are kept
    assert [row["eval/val_loss"] for row in rows if "eval/val_loss" in row] == [3.0, 2.5]

    with Trackers.open(["wandb"], **opened, resume=True) as resumed:
        resumed.log(train_record(3, 2.0))
    assert (out_dir / "wandb_id.txt").read_text().strip() == run_id
    assert len(list((out_dir / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1
