"""``depthgrow plan``: what zero- and one-layer growth would save on a model and a budget, read from the
laws that ``depthgrow experiment scaling`` stored (``<results>/scaling/summary.json``).

For the model's family it takes the ladder's trend of the compute multiplier m with the parameters N
(log2 m = level + slope · (log2 N - center)) and its fixed-depth law L(C) = E + A (C / scale)^-alpha. At
the model's N and budget C it predicts each growth plan's compute fraction f (exact, from the plan), its
multiplier m (the trend at N, with the range that the slope's standard error gives) and its loss gap to
the fixed-depth run of the whole budget, L(m f C) / L(C) - 1 (a run worth m f C of fixed-depth compute).
Everything outside the ladder's sizes is an extrapolation, and the lines say by how much.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from depthgrow.config import RunConfig
from depthgrow.errors import DepthgrowError
from depthgrow.flops import DEPTHGROW, compare_compute
from depthgrow.frontier import PowerLaw
from depthgrow.scaling import GROWTH_AT, Trend
from depthgrow.schedule import growth_plan

SUMMARY = Path("scaling") / "summary.json"
SOURCES = {"0 -> L": 0, "1 -> L": 1}


def plan_lines(config: RunConfig, *, tokens: float | None, flops: float | None, results: str | Path) -> list[str]:
    """The prediction for ``config``'s model trained on ``tokens`` tokens or ``flops`` FLOPs, as lines."""
    model = config.model
    if (tokens is None) == (flops is None):
        raise DepthgrowError("plan needs a budget: --tokens N or --flops C (one of the two)")
    budget = tokens if tokens is not None else flops
    if not 0 < budget < float("inf"):
        raise DepthgrowError(f"the budget must be a finite number > 0, got {budget}")
    if model.task != "lm":
        raise DepthgrowError(f"plan reads the scaling experiment's language-model ladders; {model.family} has none")
    path = Path(results) / SUMMARY
    stored = _read(path)
    if model.family not in stored["laws"]:
        raise DepthgrowError(
            f"{path} holds no {model.family} ladder (it has: {', '.join(stored['laws']) or 'none'}); run "
            f"depthgrow experiment scaling --model <a {model.family} preset> --out {results}"
        )
    rows = [r for r in stored["runs"] if r["family"] == model.family]
    sizes = sorted({r["params"] for r in rows})
    ratios = sorted({round(r["tokens"] / r["params"], 1) for r in rows if r["method"] == "fixed"})

    per_step = config.train.batch_size * model.block_size
    per_token = DEPTHGROW.per_unit(model)
    tokens = budget if tokens is not None else budget / per_token
    steps = max(1, round(tokens / per_step))
    params = model.num_params()
    full = steps * per_step * per_token
    name = config.model_preset or model.family
    lines = [
        f"{name}: {params:,} parameters, {steps:,} steps of {per_step:,} tokens ({steps * per_step:.3g} tokens, "
        f"{steps * per_step / params:.1f} per parameter): {full:.3g} FLOPs at fixed depth"
    ]
    law = _law(stored["laws"][model.family]["fixed"])
    for method, source in SOURCES.items():
        plan = growth_plan(source_depth=source, via=[], at=[GROWTH_AT], target_depth=model.n_layer, total_steps=steps)
        compute = compare_compute(model, plan, total_steps=steps, units_per_step=per_step, counting=DEPTHGROW)
        fraction = compute.fraction
        stored_trend = stored["trends"][model.family].get(method)
        text = f"{method} at {GROWTH_AT} T: {fraction:.1%} of the FLOPs"
        if stored_trend is None:
            lines.append(f"{text}; no multiplier trend stored (the ladder gave fewer than two multipliers)")
            continue
        fitted = Trend(**{**stored_trend, "params": tuple(stored_trend["params"])})
        multiplier = fitted.multiplier(params)
        text += f"; compute multiplier {multiplier:.2f}x"
        if fitted.slope_error is not None:
            low, high = sorted(fitted.multiplier(params, fitted.slope + k * fitted.slope_error) for k in (-2, 2))
            text += f" ({low:.2f}x to {high:.2f}x with the trend's slope +- 2 standard errors)"
        if law is not None:
            gap = law.loss(multiplier * fraction * full) / law.loss(full) - 1.0
            text += f"; loss gap to the fixed-depth run {100 * gap:+.1f} %"
        lines.append(text)
    lines.append(_extrapolation(params, sizes, ratios, steps * per_step / params))
    fixed_text = "no fixed-depth law" if law is None else f"fixed-depth law {law.text()}"
    lines.append(f"from {path}: the {model.family} ladder's {fixed_text} and its multiplier trends")
    return lines


def _extrapolation(params: int, sizes: list[int], ratios: list[float], ratio: float) -> str:
    smallest, largest = sizes[0], sizes[-1]
    per_param = ", ".join(f"{ratio:g}" for ratio in ratios)
    where = f"the ladder's {len(sizes)} sizes, {smallest:,}-{largest:,} parameters, at {per_param} tokens per parameter"
    if params > largest:
        text = f"extrapolated {_factor(params / largest)} beyond the largest of {where}"
    elif params < smallest:
        text = f"extrapolated {_factor(smallest / params)} below the smallest of {where}"
    else:
        text = f"within {where}"
    if not ratios[0] / 2 <= ratio <= ratios[-1] * 2:
        text += f"; this budget is {ratio:.0f} tokens per parameter, which the ladder did not measure"
    return f"uncertainty: {text}; the trend is a straight line in log-log, measured at small scale only"


def _factor(value: float) -> str:
    return f"{value:.1f}x" if value < 10 else f"{value:,.0f}x"


def _law(stored: dict[str, Any] | None) -> PowerLaw | None:
    return None if stored is None else PowerLaw(**stored["law"])


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        results = path.parent.parent
        raise DepthgrowError(f"no scaling laws in {path}: run depthgrow experiment scaling --out {results}")
    try:
        stored = json.loads(path.read_text())
    except ValueError as error:
        raise DepthgrowError(f"{path} is not JSON ({error}); rerun depthgrow experiment scaling") from None
    if not isinstance(stored, dict) or {"laws", "trends", "runs"} - stored.keys():
        raise DepthgrowError(f"{path} is not a scaling summary; rerun depthgrow experiment scaling")
    return stored
