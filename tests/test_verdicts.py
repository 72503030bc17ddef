"""Statistics of the benchmark verdicts, pinned by hand: Holm's step-down (statsmodels), the paired t-test (scipy),
the exact McNemar test, the detectable effect, and the renderings that must not show a zero-width interval."""

from __future__ import annotations

import json
import math

import pytest

from rlsd.experiments.evidence import _interval
from rlsd.experiments.tables import extra_over_teacher, render_study_table
from rlsd.experiments.verdicts import (
    detectable_effect,
    family_tests,
    holm,
    mcnemar_exact,
    paired_test,
    render_holm,
    verdict,
)


def test_holm_by_hand():
    """Sorted p 0.01, 0.03, 0.04, 0.20 times 4, 3, 2, 1 = 0.04, 0.09, 0.08, 0.20; step-down takes the running maximum
    (0.08 -> 0.09); back in the input order. A NaN (one seed) stays NaN and is not counted in the family."""
    assert holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    adjusted = holm([0.01, math.nan, 0.04])  # a family of two: 0.02, 0.04
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    assert holm([0.3, 0.9]) == pytest.approx([0.6, 0.9]) and holm([0.8, 0.9]) == pytest.approx([1.0, 1.0])


def test_paired_t_test_by_hand():
    """Differences 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3) = sqrt 12 on 2 degrees of freedom, whose CDF is
    1/2 + t / (2 sqrt(t^2 + 2)): p = 1 - sqrt 12 / sqrt 14; interval 2 -+ 4.30265 / sqrt 3."""
    mean, low, high, p = paired_test([1.0, 2.0, 3.0])
    assert mean == 2.0 and p == pytest.approx(1 - math.sqrt(12) / math.sqrt(14), abs=1e-12)
    assert (low, high) == pytest.approx((2 - 2.48414, 2 + 2.48414), abs=1e-5)
    assert all(math.isnan(v) for v in paired_test([0.5])[1:])  # one seed: no interval, no test
    assert paired_test([0.0, 0.0]) == (0.0, 0.0, 0.0, 1.0)


def test_exact_mcnemar_by_hand():
    """18 gained, 6 lost: p = 2 * sum_{k<=6} C(24, k) / 2^24 = 2 * 190051 / 16777216."""
    before, after = "0" * 18 + "1" * 6 + "1" * 10 + "0" * 5, "1" * 18 + "0" * 6 + "1" * 10 + "0" * 5
    gained, lost, p = mcnemar_exact(before, after)
    assert (gained, lost) == (18, 6) and p == pytest.approx(2 * 190051 / 2**24, rel=1e-9)
    assert mcnemar_exact("01", "01") == (0, 0, 1.0)
    with pytest.raises(ValueError, match="differ in length"):
        mcnemar_exact("01", "011")


def test_detectable_effect_has_eighty_percent_power():
    """The returned difference, as a noncentral t (nc = d sqrt n), exceeds the 5% two-sided critical value 80% of the
    time; it scales with the spread and shrinks with more seeds."""
    from scipy import stats

    sd, n = 0.0314, 5
    effect = detectable_effect(sd, n)
    nc, crit = effect / sd * math.sqrt(n), stats.t.ppf(0.975, n - 1)
    power = stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc)
    assert power == pytest.approx(0.8, abs=1e-6) and effect == pytest.approx(0.053, abs=5e-4)
    assert detectable_effect(2 * sd, n) == pytest.approx(2 * effect) and detectable_effect(sd, 20) < effect
    assert math.isnan(detectable_effect(sd, 1))


def _rows(scores: dict[str, list[float]]) -> list[dict]:
    """Eval rows at steps 0 and 10 with the final pass@1 of each (method, seed)."""
    return [{"kind": "eval", "method": m, "seed": s, "step": step, "pass_at_1": v if step else 0.5}
            for m, values in scores.items() for s, v in enumerate(values) for step in (0, 10)]  # fmt: skip


def test_family_verdicts_are_corrected_together(tmp_path):
    """Two methods against GRPO over 3 seeds: the clearly worse one stays "below GRPO" after Holm, the other is not
    distinguishable; the rendered table holds both with p and Holm p."""
    rows = _rows({"grpo": [0.60, 0.62, 0.61], "bad": [0.40, 0.41, 0.43], "same": [0.61, 0.60, 0.62]})
    tests = {t["method"]: t for t in family_tests(rows)}
    bad = tests["bad"]["final"]
    assert bad["p"] < tests["same"]["final"]["p"] and bad["holm"] == pytest.approx(2 * bad["p"])  # the smaller of 2
    assert verdict(bad["mean"], bad["holm"]) == "below GRPO"
    assert verdict(tests["same"]["final"]["mean"], tests["same"]["final"]["holm"]) == "not distinguishable"
    folder = tmp_path / "benchmarks" / "methods"
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = render_holm(tmp_path)
    assert "| section 1, methods (final) | bad | 3 | -19.7 [" in table and "below GRPO" in table


def test_one_seed_renders_no_interval():
    assert _interval([0.5]) == "50.0 [n/a (1 seed)]" and _interval([0.5, 0.7]).startswith("60.0 [")
    none = [math.nan, math.nan]
    table = render_study_table({"grpo": {"score_mean": 0.5, "diff_mean": 0.0, "diff_ci95": none},
                                "knob": {"score_mean": 0.6, "diff_mean": 0.1, "diff_ci95": none}})  # fmt: skip
    assert "| knob | 60.0 | +10.0 | n/a (1 seed) | n/a (1 seed) |" in table and "nan" not in table


def test_extra_over_teacher_is_na_when_the_teacher_pass_is_almost_nothing():
    """RLSD after lam = 0 (teacher 0.0014 s of a 0.244 s step) logged 4.02: a ratio to almost nothing."""

    def row(extra, teacher, step):
        return {"extra_over_teacher": extra, "teacher_s_median": teacher, "step_s_median": step}

    assert extra_over_teacher(row(4.02, 0.0014, 0.244)) == "n/a"
    assert extra_over_teacher(row(0.94, 0.018, 0.256)) == "0.94"
    assert extra_over_teacher(row(None, 0.0, 0.2)) == "n/a"
