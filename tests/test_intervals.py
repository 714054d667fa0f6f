"""The worth grid's intervals are calibrated over the right units: a simulation with known truth through
experiments.analysis.intervals, and the corrections across a table's claims."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.analysis import intervals
from experiments.analysis.intervals import adjust, interval, paired_differences, resampling_unit

SPLITS, EXPANSIONS, SEEDS = 3, 2, 5
TRUE_GAIN = 1.5


def _simulated_grid(rng, *, split_sd: float, interaction_sd: float, expansion_sd: float, seed_sd: float):
    """One worth cell with known truth: the original (per base draw and classifier seed) and a method
    (per base draw, expansion seed and classifier seed). ``split_sd``: how much a base draw moves both arms;
    ``interaction_sd``: how much the method's gain itself changes from draw to draw (what pairing cannot
    remove); ``expansion_sd``: which generated set; ``seed_sd``: the classifier seed's noise."""
    control, treated = {}, {}
    for s in range(SPLITS):
        draw = rng.normal(0.0, split_sd)
        gain = TRUE_GAIN + rng.normal(0.0, interaction_sd)
        for c in range(SEEDS):
            control[(s, None, c)] = 60.0 + draw + rng.normal(0.0, seed_sd)
        for e in range(EXPANSIONS):
            generated_set = rng.normal(0.0, expansion_sd)
            for c in range(SEEDS):
                treated[(s, e, c)] = 60.0 + draw + gain + generated_set + rng.normal(0.0, seed_sd)
    return control, treated


def _coverage(trials: int, seed: int, unit: str | None = None, **sds) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    hits, widths = 0, []
    for _ in range(trials):
        control, treated = _simulated_grid(rng, **sds)
        ci = interval(paired_differences(treated, control), unit=unit)
        hits += ci.low <= TRUE_GAIN <= ci.high
        widths.append(ci.width)
    return hits / trials, float(np.mean(widths))


SOME_OF_EACH = {"split_sd": 2.0, "interaction_sd": 0.8, "expansion_sd": 0.5, "seed_sd": 1.0}


def test_gain_intervals_cover_the_truth_at_their_nominal_level():
    """3 base draws x 2 expansion seeds x 5 classifier seeds, every factor contributing: 95 % intervals hold
    the true gain in 92-98 % of 2,000 simulated grids (the binomial spread at 2,000 is +-1 point)."""
    coverage, _ = _coverage(2000, seed=1, **SOME_OF_EACH)
    assert 0.92 <= coverage <= 0.98, coverage


def test_seed_only_intervals_undercover_the_same_simulation():
    """The simulation can fail: resampling only the classifier seeds (every run its own unit, as the worth
    table did before) covers far less than 95 % of the same grids."""
    coverage, _ = _coverage(1000, seed=1, unit="seed", **SOME_OF_EACH)
    assert coverage < 0.8, coverage


def test_intervals_widen_when_base_draws_disagree():
    """The same within-draw noise, with and without draw-to-draw variance of the gain: the intervals widen
    with it (and still cover)."""
    quiet = {"split_sd": 2.0, "interaction_sd": 0.0, "expansion_sd": 0.2, "seed_sd": 1.0}
    loud = {**quiet, "interaction_sd": 3.0}
    coverage_quiet, width_quiet = _coverage(600, seed=2, **quiet)
    coverage_loud, width_loud = _coverage(600, seed=2, **loud)
    assert width_loud > 3 * width_quiet
    assert coverage_loud >= 0.92 and coverage_quiet >= 0.92


def test_the_unit_is_the_outermost_factor_that_varies_and_says_so():
    many = {(s, e, c): 1.0 for s in range(3) for e in range(2) for c in range(5)}
    assert resampling_unit(many) == "split"
    one_draw = {(0, e, c): float(e + c) for e in range(2) for c in range(5)}
    assert resampling_unit(one_draw) == "expansion"
    ci = interval(one_draw)
    assert ci.n_units == 2 and "conditional on one base-set draw" in ci.describe()
    one_set = {(0, 0, c): float(c) for c in range(5)}
    assert interval(one_set).describe() == (
        "t over 5 classifier seeds, conditional on one base-set draw and one expanded set"
    )
    real_arm = {(s, None, c): float(s) for s in range(3) for c in range(5)}
    assert resampling_unit(real_arm) == "split" and interval(real_arm).n_units == 3
    single = interval({(0, 0, 0): 2.0})
    assert single.low is None and single.p_value is None


def test_a_draws_mean_weighs_its_expansion_seeds_equally():
    values = {(0, 0, 0): 0.0, (0, 0, 1): 0.0, (0, 0, 2): 0.0, (0, 1, 0): 6.0}
    assert intervals.unit_means(values, "split") == [3.0]


def test_pairs_meet_on_draw_and_seed():
    control = {(0, None, 0): 10.0, (0, None, 1): 20.0, (1, None, 0): 30.0}
    treated = {(0, 0, 0): 11.0, (0, 1, 1): 23.0, (1, 0, 1): 99.0}
    assert paired_differences(treated, control) == {(0, 0, 0): 1.0, (0, 1, 1): 3.0}


def test_holm_and_benjamini_hochberg_adjust_one_family():
    ps = [0.01, 0.04, None, 0.03, 0.2]
    holm = adjust(ps, "holm")
    # sorted 0.01, 0.03, 0.04, 0.2 (m = 4): 4 x 0.01, 3 x 0.03, max(0.09, 2 x 0.04), max(0.09, 0.2)
    assert holm[2] is None and [holm[i] for i in (0, 1, 3, 4)] == pytest.approx([0.04, 0.09, 0.09, 0.2])
    bh = adjust(ps, "bh")
    # rank r: p x 4 / r, then the running minimum from the largest: 0.04, 0.0533, 0.0533, 0.2
    assert bh[2] is None and [bh[i] for i in (0, 1, 3, 4)] == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.2])
    assert adjust(ps, "none")[0] == 0.01
    with pytest.raises(ValueError, match="correction must be one of"):
        adjust(ps, "bonferoni")
