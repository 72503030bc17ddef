"""Citation of generated contexts (`rlsd.context.citation`): the pure metric on hand-computed cases, the record a
generated source keeps of its training contexts, and the held-out meter of the demo and benchmarks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import build_trainer

from rlsd.context.citation import (
    ContextRecord,
    citation_rate,
    cites,
    distinctive_windows,
    mask_digits,
    windows,
)
from rlsd.context.harness import NO_HARNESS_TEXT, HarnessSource
from rlsd.context.sources import Context, RolloutView
from rlsd.experiments.contexts import plan_steps, task_problem
from rlsd.experiments.heldout_citation import HeldoutCitations, heldout_citations
from rlsd.experiments.methods import CATALOGUE
from rlsd.experiments.task import Problem, TaskConfig, make_rl_dataset

PLAN = "Plan: 4*5;3+#1"
BACKGROUND = ["Q: 3+4*5-2=", "<think>4*5=20;3+20=23</think>"]


def test_digits_are_masked_run_by_run_and_windows_are_taken_after_masking():
    assert mask_digits("4*5=20;3+#1") == "0*0=0;0+#0"
    assert mask_digits("no digits") == "no digits"
    assert windows("ab12c", 3) == {"ab0", "b0c"}
    assert windows("ab", 3) == set()
    with pytest.raises(ValueError, match=">= 1 character"):
        windows("abc", 0)


def test_the_distinctive_windows_are_the_contexts_windows_outside_the_background():
    # "Plan: 0*0;0+#0" has 11 windows of 4; only "0;0+" is also in the background ("...=0;0+0=0...")
    expected = {"Plan", "lan:", "an: ", "n: 0", ": 0*", " 0*0", "0*0;", "*0;0", ";0+#", "0+#0"}
    assert distinctive_windows([(PLAN, "")], BACKGROUND, 4) == expected
    assert distinctive_windows([(PLAN, "")], [*BACKGROUND, PLAN], 4) == frozenset()


def test_a_completion_cites_when_it_writes_a_distinctive_window():
    distinctive = distinctive_windows([(PLAN, "")], BACKGROUND, 4)
    assert cites("<think>7+#2;9</think>", distinctive, 4)  # "0+#0", with other numbers
    assert cites("Plan: 7", distinctive, 4)
    assert not cites("<think>4*5=20;3+20=23</think><answer>23</answer>", distinctive, 4)
    assert not cites("0;0+", distinctive, 4)  # in the background: the student writes it anyway


def test_the_citation_rate_by_hand():
    completions = ["<think>7+#2</think>", "Plan: 7", "<think>4*5=20</think>", "Q: 3+4*5-2="]
    assert citation_rate(completions, [(PLAN, "")], BACKGROUND, 4) == 0.5
    assert citation_rate(completions, [], BACKGROUND, 4) == 0.0
    # at the default window of 8: "<think>0+#0</think>" shares no 8 characters with the plan; "Plan: 7" is too short
    assert citation_rate(completions, [(PLAN, "")], BACKGROUND) == 0.0
    assert citation_rate(["Plan: 4*5;9"], [(PLAN, "")], BACKGROUND) == 1.0
    with pytest.raises(ValueError, match="needs at least one completion"):
        citation_rate([], [(PLAN, "")], BACKGROUND)


def test_the_record_keeps_the_most_recent_distinct_texts():
    record = ContextRecord(2)
    record.add([("a", ""), ("b", ""), ("a", ""), ("c", ""), ("c", "x")])
    assert record.texts() == [("c", ""), ("c", "x")] and record.seen == 5 and len(record) == 2
    with pytest.raises(ValueError, match=">= 1 text"):
        ContextRecord(0)


def test_a_generated_source_records_training_contexts_without_placeholders_with_the_completion_they_read():
    source = HarnessSource(SimpleNamespace())
    context = Context({"harness": ["Plan: a", NO_HARNESS_TEXT, "Plan: b", "Plan: a"]}, [True, False, True, True])
    rows = [{"prompt": "p"}] * 4
    source.remember(RolloutView(rows, 2, mode="eval"), [0, 1, 2, 3], context)
    assert source.record.texts() == []
    source.remember(RolloutView(rows, 2), [0, 1, 2, 3], context)  # no completion read: none quoted
    assert source.record.texts() == [("Plan: b", ""), ("Plan: a", "")] and source.record.seen == 3
    read = RolloutView(rows, 2, offset=2, completion_texts=["w", "x", "y", "z"], rewards=[0.0] * 4)
    source.remember(read, [0, 1], Context({"harness": ["Plan: c", "Plan: d"]}, [True, True]))
    assert source.record.texts()[-2:] == [("Plan: c", "y"), ("Plan: d", "z")]  # the rows' own, after the offset


def test_a_window_of_the_completion_a_context_quotes_is_the_students_own():
    reflection = "Step 3 wrote --1=-1=-1 where 4-5=-1 is right."  # quotes the attempt's degenerate step
    attempt = "<think>1*5=5;4-5=-1;--1=-1=-1</think>"
    quoted = distinctive_windows([(reflection, attempt)], [], 8)
    unquoted = distinctive_windows([(reflection, "")], [], 8)
    assert unquoted - quoted == {"--0=-0=-", "-0=-0=-0"}  # the two windows inside the quoted "--0=-0=-0"
    student = "<think>7*2=14;--3=-3=-3</think>"  # writes that degenerate step again, on another problem
    assert cites(student, unquoted, 8) and not cites(student, quoted, 8)


def test_the_trainer_records_what_the_harness_showed_the_teacher(tokenizer, tmp_path):
    dataset = make_rl_dataset(TaskConfig(num_operands=3), 8, seed=0)
    trainer = build_trainer(tokenizer, tmp_path, dataset=dataset, **CATALOGUE["ophsd-scripted"])
    output = {"prompt_ids": None, "completion_mask": torch.ones(2, 1, dtype=torch.long)}
    trainer.teacher_inputs([dataset[0]] * 2, output, "eval")
    assert trainer.source.record.texts() == []
    trainer.teacher_inputs([dataset[0]] * 2, output, "train")
    assert trainer.source.record.texts() == [(f"Plan: {';'.join(plan_steps(task_problem(dataset[0])))}", "")]


def test_the_heldout_meter_fixes_its_background_first_then_measures_the_runs_record():
    problems = [Problem((3, 4, 5), ("+", "*")), Problem((2, 6, 1), ("*", "-"))]
    assert heldout_citations(CATALOGUE["rlsd"], problems) is None
    assert heldout_citations(CATALOGUE["rlcsd"], problems) is None  # its hints are the student's own completions
    meter = heldout_citations(CATALOGUE["ophsd-scripted"], problems)
    assert isinstance(meter, HeldoutCitations)
    before = ["<think>3+4=7</think>", "<think>2*6=12</think>"]
    assert meter.measure(before) == {"context_citation_rate": 0.0, "context_record_size": 0.0}
    assert meter.background == ["Q: 3+4*5=", "Q: 2*6-1=", problems[0].solution(), problems[1].solution(), *before]
    source = HarnessSource(SimpleNamespace())
    source.record.add([("Plan: 4*5;3+#1", "")])
    meter.source = source
    after = ["<think>4*5;3+#1</think>", "<think>3+4=7</think>"]  # the first writes the plan's "0*0;0+#0"
    example = {"completion": after[0], "window": "0*0;0+#0"}
    assert meter.measure(after) == {"context_citation_rate": 0.5, "context_record_size": 1.0,
                                    "context_citation_example": example}  # fmt: skip


def test_the_harness_measures_the_share_of_its_outputs_that_contain_the_answer():
    """Per group (one harness run each): the plan of the row whose answer is 7 writes it, the other's does not."""
    from rlsd.context.harness import HARNESS_KNOBS

    values = {**{k: knob.default for k, knob in HARNESS_KNOBS.items()}, "privileged_column": "solution"}
    rows = [{"prompt": "p0", "solution": "7"}] * 2 + [{"prompt": "p1", "solution": "9"}] * 2
    reply = {"p0": "the answer is 7", "p1": "add, then multiply"}
    view = RolloutView(rows, 2, generate=lambda prompts, model="policy": [reply[p.split()[1]] for p in prompts])
    context = HarnessSource(SimpleNamespace(**values)).context(view, [0, 1, 2, 3])
    assert float(context.metrics["context_answer_frac"]) == 0.5
    assert context.fields["harness"] == ["Plan: the answer is 7"] * 2 + ["Plan: add, then multiply"] * 2


def test_the_citation_table_renders_the_seed_mean_at_each_evaluation(tmp_path):
    import json

    from rlsd.experiments.evidence_citation import CITATION, render_generated_citation

    assert render_generated_citation(tmp_path).startswith("No run yet")
    folder = tmp_path / CITATION
    folder.mkdir(parents=True)

    def evaluation(seed, step, cited, record):
        return {"kind": "eval", "method": "msd", "seed": seed, "step": step, "context_citation_rate": cited,
                "context_record_size": record, "leakage_rate": 0.0, "pass_at_1": 0.5, "mean_length": 20.0}  # fmt: skip

    rows = [
        evaluation(0, 0, 0.0, 0.0), evaluation(1, 0, 0.0, 0.0), evaluation(0, 10, 0.25, 8.0),
        evaluation(1, 10, 0.5, 10.0), {"kind": "train", "method": "msd", "seed": 0, "rlsd/context_answer_frac": 0.1},
        {"kind": "train", "method": "msd", "seed": 1, "rlsd/context_answer_frac": 0.3},
        {"kind": "eval", "method": "grpo", "seed": 0, "step": 10, "leakage_rate": 0.0, "pass_at_1": 0.6},
    ]  # fmt: skip
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    table = render_generated_citation(tmp_path).splitlines()
    assert len(table) == 3  # grpo has no generated source: no row
    assert table[2] == "| msd | 2 | 9 | 0: 0.0, 10: 37.5 | 0.0 | 20.0 | 50.0 | 20.0 |"


def test_the_cited_window_is_the_first_distinctive_one_in_the_masked_completion():
    from rlsd.context.citation import cited_window

    distinctive = distinctive_windows([(PLAN, "")], BACKGROUND, 4)
    assert cited_window("xx Plan: 4*5", distinctive, 4) == "Plan"
    assert cited_window("<think>7+#2</think>", distinctive, 4) == "0+#0"
    assert cited_window("<think>4*5=20</think>", distinctive, 4) is None
    problems = [Problem((3, 4, 5), ("+", "*"))]
    meter = HeldoutCitations(problems)
    meter.measure(["<think>3+4=7</think>"])
    source = HarnessSource(SimpleNamespace())
    source.record.add([("Plan: 4*5;3+#1", "")])
    meter.source = source
    measured = meter.measure(["<think>4*5;3+#1</think>"])
    assert measured["context_citation_example"] == {"completion": "<think>4*5;3+#1</think>", "window": "0*0;0+#0"}
