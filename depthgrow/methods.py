"""Growth methods: each a small, named plan over :func:`depthgrow.growth.grow` and the schedule.

Every method runs in the same trainer and keeps every bit of training state across its expansions
(surviving parameters keep their optimizer state by name; the schedule is a function of the step); they
differ only in the depths they pass through, when, how the new slots are filled, and two optional
mechanisms of the plan: a ramp on the new blocks' residual outputs and a decay from the growth.

=========  ==============================  ===========================================================
method     source                          plan (defaults)
=========  ==============================  ===========================================================
``bu``     Bu 2025/2026 (the paper this    ``source_depth`` -> ``n_layer`` once at ``growth.at`` (0.8 T),
           library implements)             new slots by ``growth.init`` (random); ``via`` for stages
``gstack`` Du et al. 2024, G_stack         the source of L/g blocks (``stack_factor`` g = 4) stacked
                                           g-fold (``copy``: 1..k,1..k,..) once at ``growth.at``
``midas``  Saunshi et al. 2024, MIDAS      g stages (``stack_factor``) of L/g, 2L/g, .., L blocks, each
                                           expansion duplicating the middle L/g blocks (``copy_middle``);
                                           stage i lasts a share of T proportional to i**``prop_alpha``
                                           (PROP-1: 1:2:3:4)
``msg``    Yao et al. 2024, MSG            as ``bu``, and the new blocks' residual outputs scaled by a
                                           mask ramped from 0 to 1 over ``growth.ramp`` (0.05 T) after
                                           each expansion: the function is preserved at the growth step
``lemon``  Wang et al. 2024, LEMON         as ``bu`` with a function-preserving init (``copy_zero``,
                                           ``zero`` from zero layers), and from the last expansion on the
                                           learning rate decays linearly to its final value
=========  ==============================  ===========================================================

Methods whose init is part of their definition (gstack, midas, lemon) take it from the method:
``growth.init`` left at its default (``random``) or set to the method's own.
"""

from __future__ import annotations

import dataclasses
import math

from depthgrow.errors import DepthgrowError
from depthgrow.growth import GrowthConfig
from depthgrow.schedule import GrowthPlan, growth_plan

# the init each method fixes (lemon: from a source with blocks; from zero layers it is "zero")
METHOD_INIT = {"gstack": "copy", "midas": "copy_middle", "lemon": "copy_zero"}
# the growth section's defaults, to tell a key the user set from one left alone
_DEFAULTS = GrowthConfig()


def method_plan(growth: GrowthConfig, *, target_depth: int, total_steps: int) -> GrowthPlan:
    """The plan of ``growth``'s method for a model of ``target_depth`` blocks trained for ``total_steps``
    steps, or :class:`DepthgrowError` saying in one line what does not fit."""
    method = growth.method
    if method == "bu":
        return _single_or_staged(growth, target_depth, total_steps, growth.init)
    if method in ("msg", "lemon") and growth.source_depth is None:
        raise DepthgrowError(f"growth.method={method} grows from growth.source_depth; set it (e.g. 0 or 1)")
    init = _method_init(growth)
    if method in ("gstack", "midas"):
        return _stacked(growth, target_depth, total_steps, init)
    plan = _single_or_staged(growth, target_depth, total_steps, init)
    if method == "lemon":
        return dataclasses.replace(plan, decay_from_growth=True)
    ramp = _ramp_steps(growth.ramp, total_steps)
    for step, end in zip(plan.steps, [*plan.steps[1:], total_steps], strict=True):
        if ramp > end - step:
            what = "the end of the run" if end == total_steps else "the next expansion"
            raise DepthgrowError(
                f"msg's ramp of {ramp} steps (growth.ramp={growth.ramp:g}) after the expansion at step {step} is "
                f"longer than the {end - step} steps left before {what}; shorten growth.ramp or expand earlier"
            )
    return dataclasses.replace(plan, ramp_steps=ramp)


def _single_or_staged(growth: GrowthConfig, target_depth: int, total_steps: int, init: str) -> GrowthPlan:
    return growth_plan(
        source_depth=growth.source_depth,
        via=growth.via,
        at=growth.at,
        target_depth=target_depth,
        total_steps=total_steps,
        init=init,
    )


def _method_init(growth: GrowthConfig) -> str:
    method, init = growth.method, growth.init
    if method not in METHOD_INIT:
        return init
    own = "zero" if method == "lemon" and growth.source_depth == 0 else METHOD_INIT[method]
    allowed = ("zero", "copy_zero") if method == "lemon" else (own,)
    if init != _DEFAULTS.init and init not in allowed:
        raise DepthgrowError(
            f"growth.method={method} fills the new slots by {own} (its definition); growth.init={init} does not "
            "apply: leave growth.init unset"
        )
    return own if init == _DEFAULTS.init else init


def _stacked(growth: GrowthConfig, target_depth: int, total_steps: int, init: str) -> GrowthPlan:
    """gstack and midas: the source is n_layer / stack_factor blocks."""
    method, factor = growth.method, growth.stack_factor
    if factor < 2:
        raise DepthgrowError(f"growth.stack_factor must be >= 2 for {method}, got {factor}")
    if target_depth % factor:
        raise DepthgrowError(
            f"{method} grows from n_layer / stack_factor blocks: model.n_layer={target_depth} is not a multiple of "
            f"growth.stack_factor={factor}; choose a stack_factor that divides it"
        )
    source = target_depth // factor
    if growth.source_depth is not None and growth.source_depth != source:
        raise DepthgrowError(
            f"{method} grows from n_layer / stack_factor = {target_depth}/{factor} = {source} blocks, not "
            f"growth.source_depth={growth.source_depth}; leave source_depth unset, or set growth.stack_factor "
            "to n_layer / source_depth"
        )
    if growth.via != _DEFAULTS.via:
        raise DepthgrowError(f"{method} sets its own stages; growth.via is for bu, msg and lemon")
    if method == "gstack":
        return growth_plan(
            source_depth=source, via=[], at=growth.at, target_depth=target_depth, total_steps=total_steps, init=init
        )
    if growth.at != _DEFAULTS.at:
        raise DepthgrowError("midas times its stages by growth.prop_alpha; growth.at is for the other methods")
    if not (math.isfinite(growth.prop_alpha) and growth.prop_alpha >= 0):
        raise DepthgrowError(f"growth.prop_alpha must be a finite number >= 0, got {growth.prop_alpha}")
    steps = prop_steps(factor, growth.prop_alpha, total_steps)
    if len(set(steps)) < len(steps) or not 0 < steps[0] or steps[-1] >= total_steps:
        raise DepthgrowError(
            f"midas's {factor} stages do not fit T={total_steps} steps (they would start at steps "
            f"{', '.join(map(str, [0, *steps]))}); train for more steps or lower growth.stack_factor"
        )
    depths = [source * stage for stage in range(2, factor)]
    return growth_plan(
        source_depth=source, via=depths, at=steps, target_depth=target_depth, total_steps=total_steps, init=init
    )


def prop_steps(stages: int, alpha: float, total_steps: int) -> list[int]:
    """The steps at which stages 2..k of a PROP-alpha schedule begin (stage i lasts a share of T
    proportional to i**alpha; Saunshi et al. 2024)."""
    weights = [i**alpha for i in range(1, stages + 1)]
    total = sum(weights)
    return [round(total_steps * sum(weights[:i]) / total) for i in range(1, stages)]


def _ramp_steps(ramp: float, total_steps: int) -> int:
    steps = int(ramp) if ramp >= 1 else round(ramp * total_steps)
    if not (math.isfinite(ramp) and ramp > 0 and steps >= 1):
        raise DepthgrowError(f"growth.ramp must be a fraction of T in (0, 1) or whole steps >= 1, got {ramp:g}")
    return steps


def gstack_growth_tokens(params: float, flops: float) -> float:
    """G_stack's fitted growth time d in tokens (Du et al. 2024, "Stacking Your Transformers"):
    log10(d) = 0.88 log10(N) + 163.27 / log10(C) - 5.74 for a target of N parameters trained on C FLOPs.
    Fitted on runs of 410M-7B parameters; far below them the 1/log10(C) term makes it exceed any budget
    (a 0.3M-parameter model on 5e12 FLOPs: about 1e12 tokens)."""
    return 10 ** (0.88 * math.log10(params) + 163.27 / math.log10(flops) - 5.74)
