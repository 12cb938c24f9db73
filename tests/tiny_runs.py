"""A tiny trained run to generate from, plot or export: 12 steps of a test preset growing 0 -> 2 at step 6."""

from depthgrow.cli import main

TINY = ["--train.steps=12", "--train.batch_size=4", "--train.eval_every=6", "--train.eval_batches=1"]


def trained(tmp_path, preset: str, *extra: str) -> str:
    run = tmp_path / preset
    args = ["train", "--model", preset, *TINY, "--growth.source_depth=0", "--growth.at=6", *extra, "--out", str(run)]
    assert main(args) == 0
    return str(run)
