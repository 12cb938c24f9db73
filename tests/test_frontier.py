import math

import pytest

from depthgrow.frontier import PowerLaw, fit_frontier, ladder_fractions

LAW = PowerLaw(E=1.2, A=0.3, alpha=0.4, scale=8e12)
FLOPS = [1e12, 2e12, 4e12, 8e12]


def test_the_law_is_recovered_from_points_on_it_and_inverted_exactly():
    frontier = fit_frontier([(c, LAW.loss(c)) for c in FLOPS])
    assert frontier.law.E == pytest.approx(1.2, abs=1e-4)
    assert frontier.law.alpha == pytest.approx(0.4, rel=1e-3)
    assert max(abs(r) for r in frontier.residuals) < 1e-6
    # a progressive run that spent 2e12 FLOPs and ended where the law is at 6e12 is worth 3x its FLOPs
    assert frontier.multiplier(2e12, LAW.loss(6e12)) == pytest.approx(3.0, rel=1e-3)
    assert frontier.compute_matched_loss(2e12) == pytest.approx(LAW.loss(2e12), rel=1e-6)
    assert not frontier.extrapolated(LAW.loss(6e12))
    assert frontier.extrapolated(LAW.loss(2e13)) and frontier.extrapolated(LAW.loss(5e11))
    assert frontier.law.flops_for(1.1) == math.inf  # below the floor: no fixed-depth run reaches it


def test_noisy_points_give_a_law_whose_residuals_are_the_noise():
    noise = [0.004, -0.003, 0.002, -0.003]
    frontier = fit_frontier([(c, LAW.loss(c) + n) for c, n in zip(FLOPS, noise, strict=True)])
    assert sum(r * r for r in frontier.residuals) <= sum(n * n for n in noise)  # least squares
    assert frontier.law.loss(3e12) == pytest.approx(LAW.loss(3e12), abs=0.01)


def test_no_law_from_two_lengths_or_from_losses_that_do_not_fall():
    assert fit_frontier([(1e12, 2.0), (2e12, 1.9), (2e12, 1.8)]) is None
    assert fit_frontier([(1e12, 2.0), (2e12, 2.1), (4e12, 2.2)]) is None
    # falling overall (a positive exponent fits) but rising at the longest run, as an overfitting model does
    assert fit_frontier([(1e12, 0.08), (2e12, 0.05), (4e12, 0.018), (1e13, 0.081)]) is None


def test_the_ladder_has_each_progressive_fraction_half_the_smallest_and_the_full_run():
    assert ladder_fractions([0.49, 0.62]) == [0.245, 0.49, 0.62, 1.0]
    assert ladder_fractions([]) == [1.0]
