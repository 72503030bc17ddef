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
    mean, low, high = mean_interval([1.0, 2.0, 3.0])  # sd 1, t(2) = 4.303, half = 4.303 / sqrt(3)
    assert mean == 2.0 and low == pytest.approx(2.0 - 2.48434, abs=1e-4) and high == pytest.approx(4.48434, abs=1e-4)
    assert mean_interval([0.5]) == (0.5, 0.5, 0.5)


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
