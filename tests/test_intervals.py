"""Bootstrap intervals of the sample metrics, and the rule that reads them.

- a resample is a vector of counts: all counts 1 reproduce the plain metrics exactly;
- the interval holds the point estimate, narrows with more samples, and is fixed by the seed;
- pairing (the same resample indices for two generated sets) cancels the shared noise of val;
- the champion rule: lower inside the interval keeps the incumbent; lower beyond it wins;
- the report and ``arvision compare`` show "value [low, high]", and old runs without intervals.
"""

import numpy as np
import pytest

from arvision.metrics import samples as S

D = 16


def _gauss(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """``n`` points of one anisotropic Gaussian in ``D`` dims (so FD has something to fit)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, D)) / np.sqrt(np.arange(1, D + 1)) + shift


def test_all_ones_counts_are_the_plain_metrics(monkeypatch):
    gen, real = _gauss(120, 0, 0.1), _gauss(90, 1)
    flags = np.arange(120) % 7 == 0
    monkeypatch.setattr(S, "bootstrap_counts", lambda m, n, b, seed: (np.ones((1, m), np.int64), np.ones((1, n), np.int64)))
    one = S.bootstrap_resamples(gen, real, nearest_k=3, resamples=1, copy_flags=flags)
    plain = S.sample_metrics(gen, real, nearest_k=3)
    for k in ("fd", "precision", "recall", "density", "coverage"):
        assert one[k][0] == pytest.approx(plain[k], rel=1e-9, abs=1e-12), k
    assert one["copy_rate"][0] == pytest.approx(flags.mean())
    # KID: the whole sets' unbiased MMD², which the subset average estimates
    assert one["kid"][0] == pytest.approx(plain["kid"], abs=3 * plain["kid_std"] + 1e-4)


def _widths(gen: np.ndarray, real: np.ndarray) -> dict[str, float]:
    m = S.sample_metrics(gen, real, nearest_k=3)
    ci = S.bootstrap_intervals(S.bootstrap_resamples(gen, real, nearest_k=3, resamples=100, seed=0), m)
    for key in ("fd", "kid", "precision", "recall", "density", "coverage"):
        assert ci[f"{key}_ci_low"] <= m[key] <= ci[f"{key}_ci_high"], key
    return {key: ci[f"{key}_ci_high"] - ci[f"{key}_ci_low"] for key in m if f"{key}_ci_low" in ci}


def test_interval_holds_the_estimate_and_narrows_with_more_samples():
    small, large = _widths(_gauss(60, 0, 0.1), _gauss(50, 1)), _widths(_gauss(480, 0, 0.1), _gauss(400, 1))
    assert set(small) == set(large) == {"fd", "kid", "precision", "recall", "density", "coverage"}
    assert all(large[k] < small[k] for k in small), (small, large)


def test_intervals_stay_in_the_metrics_range():
    same = _gauss(60, 0)  # a set against itself: precision, recall, coverage 1, FD 0
    ci = S.bootstrap_intervals(S.bootstrap_resamples(same, same, nearest_k=3, resamples=50), S.sample_metrics(same, same, nearest_k=3))
    assert ci["precision_ci_high"] == ci["coverage_ci_high"] == 1.0 and ci["fd_ci_low"] >= 0.0


def test_the_seed_fixes_the_intervals():
    gen, real = _gauss(80, 0), _gauss(70, 1)
    a = S.bootstrap_resamples(gen, real, nearest_k=3, resamples=30, seed=4)
    b = S.bootstrap_resamples(gen, real, nearest_k=3, resamples=30, seed=4)
    c = S.bootstrap_resamples(gen, real, nearest_k=3, resamples=30, seed=5)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["fd"], c["fd"])


def test_knn_intervals_are_left_out_for_large_sets(monkeypatch):
    monkeypatch.setattr(S, "BOOTSTRAP_MAX_POINTS", 50)
    out = S.bootstrap_resamples(_gauss(60, 0), _gauss(40, 1), nearest_k=3, resamples=5)
    assert set(out) == {"fd"}


def test_pairing_cancels_the_shared_noise_of_val():
    """Two generated sets of one distribution, against one val set: the paired difference's
    interval holds 0, and is narrower than that of values resampled at independent indices."""
    real, a, b = _gauss(100, 1), _gauss(120, 2), _gauss(120, 3)
    ra = S.bootstrap_resamples(a, real, nearest_k=3, resamples=200, seed=0)
    rb = S.bootstrap_resamples(b, real, nearest_k=3, resamples=200, seed=0)
    fa, fb = S.frechet_distance(a, real), S.frechet_distance(b, real)
    low, high = S.paired_interval(ra["fd"], rb["fd"], fa - fb)
    assert low < 0 < high
    rb_other = S.bootstrap_resamples(b, real, nearest_k=3, resamples=200, seed=1)  # other indices: not paired
    unpaired = S.percentile_interval(ra["fd"] - rb_other["fd"])
    assert high - low < unpaired[1] - unpaired[0]


def test_the_champion_moves_only_beyond_the_interval():
    from arvision.champion import beats, difference_interval

    assert not beats(4.50, 4.62, diff_ci=(-0.30, 0.05))  # lower, but inside the noise
    assert beats(4.00, 4.62, diff_ci=(-0.90, -0.30))
    assert not beats(4.62, 4.62, diff_ci=(-0.1, 0.1))
    assert beats(9.0, 4.62, incumbent_qualifies=False, diff_ci=(3.0, 5.0))  # a copier loses to anyone
    assert difference_interval(None, np.ones(3), 1.0, 2.0) is None  # no interval (val_bpd): plain values
    cand_B, inc_B = np.array([1.0, 1.1, 0.9, 1.05]), np.array([2.0, 2.2, 1.8, 2.1])
    low, high = difference_interval(cand_B, inc_B, 1.0, 2.0)
    assert low <= -1.0 <= high < 0


def test_report_and_compare_cells_show_intervals_and_old_runs_still_display():
    from arvision.compare import table_md
    from stages.evaluate import _cell, _with_ci

    m = {"fd": 4.62, "fd_ci_low": 4.31, "fd_ci_high": 4.95, "precision": 0.8, "precision_ci_low": 0.7,
         "precision_ci_high": 0.9}
    assert _cell(m, "fd") == "4.62 [4.31, 4.95]" and _cell({"fd": 4.62}, "fd") == "4.62"
    assert _with_ci(m, "neg_precision") == "-0.8 [-0.9, -0.7]"
    row = {"version": "3", "family": "vq+gpt", "size": "", "params": 1e6, "train_seconds": 10.0, "aliases": [], **m}
    old = {"version": "1", "family": "vq+gpt", "size": "", "params": 1e6, "train_seconds": 10.0, "aliases": [], "fd": 5.0}
    table = table_md([old, row], {"fd": 1.0, "fd_ci_low": 0.9, "fd_ci_high": 1.1})
    assert "4.62 [4.31, 4.95]" in table and "| 5 |" in table and "1 [0.9, 1.1]" in table
