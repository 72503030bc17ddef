"""`GeneratedSource`: a context written by a generator after the rewards, with the generator pluggable (a model, a
registered function, "module:function") and every bad output stopped naming the source and the row."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import pytest
import torch
from conftest import build_trainer, make_config, make_dataset

from rlsd.context.generated import GENERATED_KNOBS, GeneratedSource, GenerationRequest, context_generator
from rlsd.context.prompts import RolloutTap
from rlsd.context.sources import Context, RolloutView, privileged_source


def make_source(registries, falls_back=False):
    """A registered generated source: the teacher sees what the generator wrote about each row's completion."""

    @privileged_source
    class NoteSource(GeneratedSource):
        name = "test-note"
        fills = ("note",)
        default_template = "{prompt} Note: {note} Answer:"

        def context(self, view: RolloutView, rows: Sequence[int]) -> Context:
            requests = self.requests(view, rows, lambda i: f"Comment on {view.rows[i]['prompt']}")
            texts, metrics = self.generate(view, rows, requests)
            notes = ["" if text is None else text for text in texts]
            return Context({"note": notes}, [text is not None for text in texts], metrics)

    NoteSource.falls_back = falls_back
    return NoteSource


def args(**values):
    return SimpleNamespace(**{**{k: knob.default for k, knob in GENERATED_KNOBS.items()}, **values})


def view(n=3):
    rows = [{"prompt": f"p{i}", "solution": str(i)} for i in range(n)]
    return RolloutView(rows, 1, 0, [f"c{i}" for i in range(n)], [float(i % 2) for i in range(n)])


def test_the_source_knobs_are_config_fields_with_their_checks(tmp_path, registries):
    make_source(registries)
    config = make_config(tmp_path, privileged_source="test-note", context_max_chars=10)
    assert (config.context_generator, config.context_max_chars, config.context_max_tokens) == ("policy", 10, 2048)
    with pytest.raises(ValueError, match="context_max_chars must be an integer >= 1, got 0"):
        make_config(tmp_path, privileged_source="test-note", context_max_chars=0)


def test_a_function_generator_gets_each_rows_completion_and_reward_and_is_counted(registries):
    seen = []

    @context_generator("test-echo")
    def echo(request: GenerationRequest) -> str:
        seen.append(request)
        return f"{request.row['solution']}|{request.completion}|{request.reward}"

    source = make_source(registries)(args(context_generator="test-echo"))
    context = source.context(view(), [0, 2])
    assert context.fields["note"] == ["0|c0|0.0", "2|c2|0.0"] and context.has_context == [True, True]
    assert [r.prompt for r in seen] == ["Comment on p0", "Comment on p2"] and seen[0].source == "test-note"
    assert context.metrics["context_generator_calls"] == 2.0 and context.metrics["context_fallback_count"] == 0.0


@pytest.mark.parametrize(
    ("output", "error", "message"),
    [
        (RuntimeError("boom"), RuntimeError, r"'test-note': context_generator='test-bad' raised on rollout row 2 "
                                              r"\(RuntimeError: boom\)"),
        ("", ValueError, r"'test-bad' returned an empty context for rollout row 2"),
        ("x" * 11, ValueError, r"returned 11 characters for rollout row 2, over context_max_chars=10"),
        (3, TypeError, r"returned a int for rollout row 2, not a string"),
    ],
)  # fmt: skip
def test_a_bad_generator_output_stops_naming_the_source_and_the_row(registries, output, error, message):
    @context_generator("test-bad")
    def bad(request: GenerationRequest):
        if request.row["prompt"] != "p2":
            return "fine"
        if isinstance(output, Exception):
            raise output
        return output

    source = make_source(registries)(args(context_generator="test-bad", context_max_chars=10))
    with pytest.raises(error, match=message):
        source.context(view(), [0, 1, 2])


def test_a_source_that_falls_back_counts_the_rows_left_without_context(registries):
    context_generator("test-empty")(lambda request: "" if request.row["prompt"] == "p1" else "ok")
    source = make_source(registries, falls_back=True)(args(context_generator="test-empty"))
    context = source.context(view(), [0, 1, 2])
    assert context.has_context == [True, False, True] and context.metrics["context_fallback_count"] == 1.0


def test_unknown_and_module_generators(registries, tmp_path, monkeypatch):
    source = make_source(registries)
    with pytest.raises(ValueError, match=r"context_generator='nope' is not one of policy, teacher"):
        source(args(context_generator="nope")).context(view(), [0])
    (tmp_path / "my_generators.py").write_text("def shout(request):\n    return request.prompt.upper()\n")
    monkeypatch.chdir(tmp_path)
    context = source(args(context_generator="my_generators:shout")).context(view(), [1])
    assert context.fields["note"] == ["COMMENT ON P1"]


def test_the_policy_writes_the_context_and_an_over_long_teacher_prompt_is_refused(tokenizer, tmp_path, registries):
    make_source(registries)
    trainer = build_trainer(
        tokenizer, tmp_path, credit="rlsd", privileged_source="test-note", rlsd_lambda_decay_steps=0
    )
    trainer.model.train()
    inputs = [make_dataset()[0]] * 4
    output = trainer._generate_and_score_completions(inputs)
    assert output["rlsd_has_context"].all()
    assert trainer._metrics["train"]["rlsd/context_generator_calls"] == [1.0]  # one batched model call
    trainer.args.context_max_tokens = 3
    tap = RolloutTap(rewards=torch.zeros(4))
    with pytest.raises(ValueError, match=r"'test-note': the teacher prompt of rollout row 0 is \d+ tokens, over the "
                                         r"source's limit of 3 \(context_max_tokens\)"):  # fmt: skip
        trainer.teacher_inputs(inputs, output, rollout=tap)


def test_the_share_of_contexts_that_spell_out_the_answer_is_measured(registries):
    """A generated context holding the reference answer is privileged information too: `context_answer_frac`."""
    context_generator("test-leaky")(lambda request: f"the answer is {request.row['solution']}" if request.row[
        "prompt"] != "p1" else "no answer here")  # fmt: skip
    source = make_source(registries)
    metrics = source(args(context_generator="test-leaky", privileged_column="solution")).context(view(), [0, 1, 2])
    assert metrics.metrics["context_answer_frac"] == pytest.approx(2 / 3)
    assert "context_answer_frac" not in source(args(context_generator="test-leaky")).context(view(), [0]).metrics
