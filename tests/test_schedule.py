"""Learning-rate schedules and growth plans, checked against values derived by hand from the documented formulas."""

import math

import pytest

from depthgrow.errors import DepthgrowError
from depthgrow.schedule import ScheduleConfig, growth_plan, lr_multiplier

T = 1000
# T=1000, warmup 0.02 -> 20 warmup steps; decay 0.1 -> the last 100 steps (900..999) decay, reaching
# final_lr_frac at step T=1000.
WSD = ScheduleConfig(name="wsd", warmup=0.02, decay=0.1)


# ---------------------------------------------------------------------------------------------- WSD


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 1 / 20),  # (0 + 1) / 20
        (9, 10 / 20),
        (19, 1.0),  # last warmup step: 20 / 20
        (20, 1.0),  # stable phase
        (500, 1.0),
        (899, 1.0),
        (900, 1.0),  # decay progress 0
        (950, 0.5),  # progress 50 / 100
        (990, 0.1),  # progress 90 / 100
        (999, 0.01),  # progress 99 / 100
    ],
)
def test_wsd_linear_values(step, expected):
    assert lr_multiplier(step, T, WSD) == pytest.approx(expected, abs=1e-12)


def test_wsd_warmup_is_linear_ramp():
    values = [lr_multiplier(s, T, WSD) for s in range(20)]
    assert values == pytest.approx([(s + 1) / 20 for s in range(20)])


def test_wsd_stable_phase_is_exactly_one():
    assert all(lr_multiplier(s, T, WSD) == 1.0 for s in range(20, 901))


def test_wsd_decay_strictly_decreasing_and_positive_at_last_step():
    decay = [lr_multiplier(s, T, WSD) for s in range(900, T)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert decay[-1] > 0
    # linear: 1 - (s - 900) / 100 at every decay step
    assert decay == pytest.approx([1 - k / 100 for k in range(100)])


def test_wsd_reaches_final_fraction_at_step_t():
    assert lr_multiplier(T, T, WSD) == pytest.approx(0.0, abs=1e-12)
    shifted = ScheduleConfig(name="wsd", warmup=0.02, decay=0.1, final_lr_frac=0.1)
    assert lr_multiplier(T, T, shifted) == pytest.approx(0.1)


def test_wsd_final_lr_frac_shifts_the_end():
    config = ScheduleConfig(name="wsd", warmup=0.02, decay=0.1, final_lr_frac=0.1)
    # final + (1 - final) * remaining
    assert lr_multiplier(900, T, config) == pytest.approx(1.0)
    assert lr_multiplier(950, T, config) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(999, T, config) == pytest.approx(0.1 + 0.9 * 0.01)
    # the warmup and the stable phase are unaffected
    assert lr_multiplier(0, T, config) == pytest.approx(1 / 20)
    assert lr_multiplier(500, T, config) == 1.0


@pytest.mark.parametrize(
    ("shape", "expected_mid"),
    [("linear", 0.5), ("cosine", 0.5), ("sqrt", 1 - math.sqrt(0.5))],
)
def test_wsd_decay_shapes_at_midpoint(shape, expected_mid):
    config = ScheduleConfig(name="wsd", warmup=0.02, decay=0.1, decay_shape=shape)
    assert lr_multiplier(950, T, config) == pytest.approx(expected_mid)
    assert lr_multiplier(900, T, config) == pytest.approx(1.0)


def test_wsd_cosine_shape_quarter_point():
    config = ScheduleConfig(name="wsd", warmup=0.02, decay=0.1, decay_shape="cosine")
    # progress 0.25: 0.5 * (1 + cos(pi / 4))
    assert lr_multiplier(925, T, config) == pytest.approx(0.5 * (1 + math.sqrt(0.5)))


def test_wsd_sqrt_shape_quarter_point():
    config = ScheduleConfig(name="wsd", warmup=0.02, decay=0.1, decay_shape="sqrt")
    # progress 0.25: 1 - sqrt(0.25) = 0.5
    assert lr_multiplier(925, T, config) == pytest.approx(0.5)


def test_zero_warmup_starts_at_peak():
    config = ScheduleConfig(name="wsd", warmup=0.0, decay=0.1)
    assert lr_multiplier(0, T, config) == 1.0
    assert lr_multiplier(0, T, ScheduleConfig(name="cosine", warmup=0.0)) == pytest.approx(1.0)
    assert lr_multiplier(0, T, ScheduleConfig(name="constant", warmup=0.0)) == 1.0


# ------------------------------------------------------------------------------------ cosine, constant


def test_cosine_schedule():
    config = ScheduleConfig(name="cosine", warmup=0.02)
    assert lr_multiplier(0, T, config) == pytest.approx(1 / 20)
    assert lr_multiplier(19, T, config) == pytest.approx(1.0)
    assert lr_multiplier(20, T, config) == pytest.approx(1.0)  # post-warmup progress 0
    # the post-warmup part is 980 steps long; its midpoint is step 20 + 490
    assert lr_multiplier(510, T, config) == pytest.approx(0.5)
    last = lr_multiplier(T - 1, T, config)
    assert 0 < last < 1e-4  # 0.5 * (1 + cos(pi * 979 / 980)) ~ 2.6e-6
    assert last == pytest.approx(0.5 * (1 + math.cos(math.pi * 979 / 980)))


def test_cosine_schedule_with_final_fraction():
    config = ScheduleConfig(name="cosine", warmup=0.02, final_lr_frac=0.1)
    assert lr_multiplier(510, T, config) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(T, T, config) == pytest.approx(0.1)


def test_cosine_schedule_is_monotone_after_warmup():
    config = ScheduleConfig(name="cosine", warmup=0.02)
    values = [lr_multiplier(s, T, config) for s in range(20, T)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


def test_constant_schedule():
    config = ScheduleConfig(name="constant", warmup=0.02, decay=0.1)
    assert lr_multiplier(0, T, config) == pytest.approx(1 / 20)
    assert lr_multiplier(19, T, config) == pytest.approx(1.0)
    # the decay setting belongs to wsd only
    assert all(lr_multiplier(s, T, config) == 1.0 for s in range(20, T))


# ---------------------------------------------------------------------------------- ScheduleConfig


def test_default_schedule_has_no_problems():
    assert ScheduleConfig().problems() == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"warmup": -0.1}, "schedule.warmup"),
        ({"warmup": 1.5}, "schedule.warmup"),
        ({"decay": -0.01}, "schedule.decay"),
        ({"decay": 2.0}, "schedule.decay"),
        ({"final_lr_frac": 1.1}, "schedule.final_lr_frac"),
        ({"final_lr_frac": -0.5}, "schedule.final_lr_frac"),
    ],
)
def test_schedule_fraction_out_of_range(changes, field):
    problems = ScheduleConfig(**changes).problems()
    assert len(problems) >= 1
    assert any(field in p and "[0, 1]" in p for p in problems)


def test_schedule_warmup_plus_decay_over_one():
    problems = ScheduleConfig(name="wsd", warmup=0.5, decay=0.6).problems()
    assert len(problems) == 1
    assert "warmup + schedule.decay" in problems[0]
    # exactly 1 is allowed
    assert ScheduleConfig(name="wsd", warmup=0.5, decay=0.5).problems() == []
    # the decay fraction only constrains wsd
    assert ScheduleConfig(name="cosine", warmup=0.5, decay=0.6).problems() == []


# ------------------------------------------------------------------------------------- growth plans


def plan(source_depth, at, *, via=(), target_depth=12, total_steps=T):
    return growth_plan(
        source_depth=source_depth, via=list(via), at=list(at), target_depth=target_depth, total_steps=total_steps
    )


def test_fixed_depth_run():
    fixed = plan(None, [0.8])
    assert fixed.depths == (12,)
    assert fixed.steps == ()
    assert fixed.initial_depth == fixed.target_depth == 12
    assert fixed.depth_at(0) == 12
    assert fixed.depth_at(T - 1) == 12


def test_single_expansion_at_fraction():
    grown = plan(0, [0.8])
    assert grown.depths == (0, 12)
    assert grown.steps == (800,)
    assert grown.initial_depth == 0
    assert grown.target_depth == 12
    assert grown.depth_at(0) == 0
    assert grown.depth_at(799) == 0
    assert grown.depth_at(800) == 12  # grows at the start of step 800
    assert grown.depth_at(T - 1) == 12


def test_integer_at_is_a_step():
    grown = plan(1, [750.0])
    assert grown.steps == (750,)
    assert grown.depth_at(749) == 1
    assert grown.depth_at(750) == 12


def test_at_one_is_step_one():
    # values >= 1 are steps, so 1.0 is step 1, not "the end of the run"
    assert plan(1, [1.0]).steps == (1,)


def test_fraction_rounds_to_nearest_step():
    assert plan(1, [0.3337]).steps == (334,)  # 333.7 -> 334


def test_multi_stage_plan():
    grown = plan(0, [0.4, 0.8], via=[2])
    assert grown.depths == (0, 2, 12)
    assert grown.steps == (400, 800)
    assert [grown.depth_at(s) for s in (0, 399, 400, 799, 800, 999)] == [0, 0, 2, 2, 12, 12]


def test_multi_stage_mixed_fraction_and_step():
    grown = plan(0, [0.25, 600], via=[2])
    assert grown.steps == (250, 600)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source_depth": 12, "at": [0.8]}, "must increase"),  # source == target
        ({"source_depth": 13, "at": [0.8]}, "must increase"),  # source > target
        ({"source_depth": 0, "at": [0.4, 0.8], "via": [12]}, "must increase"),  # via == target
        ({"source_depth": 2, "at": [0.4, 0.8], "via": [2]}, "must increase"),  # via == source
        ({"source_depth": 0, "at": [0.2, 0.4, 0.8], "via": [4, 2]}, "must increase"),  # via decreasing
        ({"source_depth": -1, "at": [0.8]}, ">= 0"),
        ({"source_depth": 0, "at": [0.4, 0.8]}, "one expansion time per stage"),  # 2 values, 1 stage
        ({"source_depth": 0, "at": [0.8], "via": [2]}, "one expansion time per stage"),  # 1 value, 2 stages
        ({"source_depth": 0, "at": []}, "one expansion time per stage"),
        ({"source_depth": 0, "at": [0.0]}, "outside (0, T=1000)"),  # step 0
        ({"source_depth": 0, "at": [0.0004]}, "outside (0, T=1000)"),  # rounds to step 0
        ({"source_depth": 0, "at": [-0.5]}, "outside (0, T=1000)"),
        ({"source_depth": 0, "at": [1000.0]}, "outside (0, T=1000)"),  # step T
        ({"source_depth": 0, "at": [1500.0]}, "outside (0, T=1000)"),
        ({"source_depth": 0, "at": [0.9999]}, "outside (0, T=1000)"),  # rounds to step 1000
        ({"source_depth": 0, "at": [12.5]}, "neither a fraction"),
        ({"source_depth": 0, "at": [0.8, 0.4], "via": [2]}, "increasing steps"),
        ({"source_depth": 0, "at": [0.5, 500.0], "via": [2]}, "increasing steps"),  # both step 500
    ],
)
def test_growth_plan_errors(kwargs, message):
    with pytest.raises(DepthgrowError) as caught:
        plan(**kwargs)
    assert message in str(caught.value)


def test_expansion_at_last_valid_step():
    assert plan(0, [999.0]).steps == (999,)
    assert plan(0, [1.0], total_steps=2).steps == (1,)
