"""The documents' numbers are rendered from the committed raw files: a table that differs from its render fails."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rlsd.experiments.demo import DemoConfig, _auc, trainer_args
from rlsd.experiments.evidence import TABLES, mean_interval, render_documents

ROOT = Path(__file__).resolve().parents[1]


def test_every_table_in_the_documents_equals_its_render_from_the_raw_files():
    differing = render_documents(ROOT, check=True)
    assert differing == [], f"run `rlsd bench report` and commit: {differing}"


def test_every_table_name_is_used_in_a_document():
    text = (ROOT / "README.md").read_text() + (ROOT / "BENCHMARKS.md").read_text()
    assert all(f"<!-- table:{name} -->" in text for name in TABLES)


def test_a_hand_edited_number_is_detected_and_rerendering_restores_it(tmp_path):
    for document in ("README.md", "BENCHMARKS.md"):
        shutil.copy(ROOT / document, tmp_path / document)
    shutil.copytree(ROOT / "benchmarks", tmp_path / "benchmarks")
    text = (tmp_path / "BENCHMARKS.md").read_text()
    start = text.index("<!-- table:methods -->")
    row = text.index("| grpo |", start)
    cell = text.index("|", row + 8) + 2  # the first digit of GRPO's final pass@1
    edited = text[:cell] + ("1" if text[cell] != "1" else "2") + text[cell + 1 :]
    (tmp_path / "BENCHMARKS.md").write_text(edited)
    assert render_documents(tmp_path, check=True) == ["BENCHMARKS.md:methods"]
    assert (tmp_path / "BENCHMARKS.md").read_text() == edited  # check writes nothing
    render_documents(tmp_path)
    assert (tmp_path / "BENCHMARKS.md").read_text() == text
    assert render_documents(tmp_path, check=True) == []


def test_unknown_table_names_are_refused(tmp_path):
    for document in ("README.md", "BENCHMARKS.md"):
        (tmp_path / document).write_text("")
    (tmp_path / "README.md").write_text("<!-- table:nope -->\n| x |\n<!-- end -->\n")
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        render_documents(tmp_path, check=True)


def test_mean_interval_by_hand():
    mean, low, high = mean_interval([1.0, 2.0, 3.0])  # sd 1, t(2) = 4.30265, half = 4.30265 / sqrt(3)
    assert mean == 2.0 and low == pytest.approx(2.0 - 2.48414, abs=1e-5) and high == pytest.approx(4.48414, abs=1e-5)
    assert mean_interval([0.5]) == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("n", [12, 30])
def test_intervals_past_eleven_seeds_are_scipys_t_intervals(n):
    """The t quantile is scipy's for any number of seeds (a hand-written table ended at 11: `KeyError: 11`)."""
    from scipy import stats

    from rlsd.experiments.bench import study_table

    grpo = [0.30 + 0.011 * ((7 * seed) % 5) for seed in range(n)]
    knob = [0.32 + 0.013 * ((3 * seed) % 7) for seed in range(n)]
    diffs = [a - b for a, b in zip(knob, grpo, strict=True)]
    mean, sem = sum(diffs) / n, stats.sem(diffs)
    exact = stats.t.interval(0.95, n - 1, loc=mean, scale=sem)
    expected = exact
    _, low, high = mean_interval(diffs)
    assert (low, high) == pytest.approx(expected, abs=1e-12)
    rows = [{"kind": "eval", "method": method, "seed": seed, "step": 10, "pass_at_1": scores[seed]}
            for method, scores in (("grpo", grpo), ("knob", knob)) for seed in range(n)]  # fmt: skip
    table = study_table(rows, ["grpo", "knob"], list(range(n)), steps=10)
    assert table["knob"]["diff_ci95"] == pytest.approx(list(expected), abs=1e-12)
    assert table["grpo"]["diff_ci95"] == [0.0, 0.0]


def test_auc_counts_ties_half():
    assert _auc([3.0, 2.0], [1.0, 2.0]) == 0.875  # 3>1, 3>2, 2>1 and one tie: 3.5 of 4 pairs
    assert _auc([1.0], []) is None


def test_lr_variants_scale_only_their_own_learning_rate():
    config = DemoConfig()
    assert trainer_args(config, "opsd-10x").learning_rate == pytest.approx(10 * config.learning_rate)
    assert trainer_args(config, "grpo-10x").learning_rate == pytest.approx(10 * config.learning_rate)
    assert trainer_args(config, "opsd").learning_rate == config.learning_rate
    assert trainer_args(config, "opsd-10x").credit == "opsd"


def test_method_colors_never_repeat():
    from rlsd.experiments.report import COLORS, method_colors

    methods = [*COLORS, *(f"method-{i}" for i in range(30))]
    colors = method_colors(methods)
    assert len(set(colors.values())) == len(methods) and colors["grpo"] == COLORS["grpo"]


def test_paired_bootstrap_by_hand():
    """Equal differences collapse the interval onto them; otherwise it brackets the mean within the data's range."""
    from rlsd.experiments.evidence_real import paired_bootstrap

    assert paired_bootstrap([0.25] * 10, resamples=200) == (0.25, 0.25, 0.25)
    mean, low, high = paired_bootstrap([0.0, 0.0, 0.0, 1.0], resamples=2000)
    assert mean == 0.25 and 0.0 <= low < mean < high <= 1.0
    assert paired_bootstrap([0.0, 1.0], resamples=500, seed=3) == paired_bootstrap([0.0, 1.0], resamples=500, seed=3)


def test_real_round_renders_intervals_from_samples(tmp_path):
    """A later real-model round: avg@n by problem, the paired change, halves of the reward, the teacher's share."""
    import json

    from rlsd.experiments.evidence_real import render_real_round

    folder = tmp_path / "benchmarks" / "real" / "round2"
    (folder / "runs" / "grpo").mkdir(parents=True)
    base = [{"problem": p, "reward": float(p == 0 and s == 0), "completion": "x"} for p in range(2) for s in range(2)]
    after = [{"problem": p, "reward": 1.0, "completion": "a reference"} for p in range(2) for s in range(2)]
    (folder / "eval-base.samples.json").write_text(json.dumps(base))
    (folder / "eval-grpo.samples.json").write_text(json.dumps(after))
    history = [{"reward": r, "frac_reward_zero_std": 0.5, "step_time": 10.0} for r in (0.0, 0.5, 0.25, 0.75)]
    (folder / "runs" / "grpo" / "log_history.json").write_text(json.dumps(history))
    table = render_real_round(tmp_path)
    # before: problem 0 avg 0.5, problem 1 avg 0 -> 25.0; after 100.0; reward halves 25.0 / 50.0; leakage 0 -> 100
    expected = (
        "| grpo | 4 | 25.0 -> 100.0 | +75.0 [+50.0, +100.0] | 25.0 / 50.0 | 50.0 | 10.0 | - | 0.0 -> 100.0 | n/a"
    )
    assert expected in table
    assert "| rlsd | 0 | (did not finish)" in table


def test_real_round_teacher_share_counts_only_steps_where_the_teacher_ran(tmp_path):
    """A skipped teacher pass (no row with A != 0) logs tens of microseconds: its step is not one where it ran, so
    the median share is over the two steps of 1.0 s and 3.0 s in 10 s (20.0), not over all four (10.0)."""
    import json

    from rlsd.experiments.evidence_real import render_real_round

    folder = tmp_path / "benchmarks" / "real" / "round2"
    (folder / "runs" / "rlsd").mkdir(parents=True)
    samples = [{"problem": p, "reward": 0.0, "completion": "x"} for p in range(2)]
    for name in ("base", "rlsd"):
        (folder / f"eval-{name}.samples.json").write_text(json.dumps(samples))
    history = [{"reward": 0.5, "frac_reward_zero_std": 0.5, "step_time": 10.0, "rlsd/teacher_time_s": t}
               for t in (3e-5, 1.0, 3.0, 4e-5)]  # fmt: skip
    (folder / "runs" / "rlsd" / "log_history.json").write_text(json.dumps(history))
    assert "| 10.0 | 20.0 | 0.0 -> 0.0 |" in render_real_round(tmp_path)


def test_real_leakage_matches_the_protocols_definition_only():
    """A "reference" or a "given answer" (BENCHMARKS.md section 10), not "the answer is given"."""
    from rlsd.experiments.evidence_real import _REAL_LEAK

    assert _REAL_LEAK.search("I created a new question based on the given answer")
    assert _REAL_LEAK.search("See the Reference solution")
    assert _REAL_LEAK.search("The answer is given below: 12") is None


def test_the_external_teacher_has_the_parameters_the_documents_state():
    """3,595,392 parameters (3.6M; BENCHMARKS.md section 11, README) against the student's 1,084,928 (1.1M)."""
    from rlsd.experiments.tiny import build_char_tokenizer, build_tiny_qwen2
    from rlsd.experiments.warmstart import WarmStartConfig, external_teacher_config

    def count(c: WarmStartConfig) -> int:
        model = build_tiny_qwen2(build_char_tokenizer(), hidden_size=c.hidden_size, num_layers=c.num_layers,
                                 num_heads=c.num_heads, intermediate_size=c.intermediate_size)  # fmt: skip
        return sum(p.numel() for p in model.parameters())

    student = WarmStartConfig()
    assert (count(student), count(external_teacher_config(student))) == (1_084_928, 3_595_392)


def test_training_clip_rows_say_where_nothing_was_logged():
    """The clip shares are logged while lam > 0 only: the whole run's row must not repeat steps 1-50's numbers."""
    from rlsd.experiments.evidence import render_training_clip

    table = render_training_clip(ROOT)
    assert "| steps 1-150 | not logged after step 50 |" in table and "all steps" not in table
    assert "adds at most 3.6 points" in table and ", 1.8 if half are." in table
