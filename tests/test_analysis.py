import pytest

from depthgrow.analysis import closest_gap, eval_curve, last_growth_step, mixing_time, pareto_front


def test_mixing_time_is_the_first_step_after_growth_within_tolerance():
    baseline = [(100, 2.0), (200, 1.8), (300, 1.7), (400, 1.6), (500, 1.5)]
    progressive = [(100, 2.6), (200, 2.5), (300, 1.8), (400, 1.61), (500, 1.5)]
    # growth at 200: 300 is 5.9 % above, 400 is 0.625 % above
    assert mixing_time(progressive, baseline, growth_step=200, tolerance=0.01) == 200
    assert mixing_time(progressive, baseline, growth_step=200, tolerance=0.06) == 100
    assert mixing_time(progressive, baseline, growth_step=200, tolerance=0.0) == 300


def test_mixing_time_ignores_the_time_before_growth_and_may_never_come():
    baseline = [(100, 2.0), (200, 1.8), (300, 1.7)]
    early_lucky = [(100, 1.9), (200, 2.5), (300, 2.0)]
    assert mixing_time(early_lucky, baseline, growth_step=150, tolerance=0.01) is None
    assert mixing_time(early_lucky, baseline, growth_step=50, tolerance=0.01) == 50


def test_mixing_time_only_compares_steps_evaluated_in_both():
    baseline = [(100, 2.0), (300, 1.7)]
    progressive = [(200, 1.0), (300, 1.7)]
    assert mixing_time(progressive, baseline, growth_step=100) == 200


def test_eval_curve_and_growth_step_from_a_log():
    records = [
        {"event": "train", "step": 1, "loss": 3.0},
        {"event": "eval", "step": 100, "val_loss": 2.0},
        {"event": "eval", "step": 100, "val_loss": 2.0, "phase": "pre_growth"},
        {"event": "eval", "step": 100, "val_loss": 2.4, "phase": "post_growth"},
        {"event": "growth", "step": 100},
        {"event": "eval", "step": 200, "val_loss": 1.9},
    ]
    assert eval_curve(records) == [(100, 2.4), (200, 1.9)]  # the grown model's loss at the growth step
    assert last_growth_step(records) == 100
    assert last_growth_step(records[:3]) is None


def test_pareto_front_keeps_points_no_other_beats_on_cost_and_loss():
    points = [(10, 1.0), (2, 2.0), (5, 1.5), (6, 1.6), (1, 3.0), (5, 1.4), (12, 1.0)]
    assert pareto_front(points) == [4, 1, 5, 0]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0]


def test_closest_gap_is_the_smallest_relative_gap_from_the_expansion_on():
    baseline = [(100, 2.0), (200, 1.8), (300, 1.6), (400, 1.5)]
    progressive = [(100, 1.0), (200, 2.7), (300, 1.68), (400, 1.59)]
    assert closest_gap(progressive, baseline, growth_step=200) == pytest.approx(5.0)  # 1.68 / 1.6
    assert closest_gap(progressive, baseline, growth_step=50) == pytest.approx(-50.0)  # before growth counts too
    assert closest_gap(progressive, [(1, 1.0)], growth_step=0) is None
