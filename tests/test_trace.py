"""TRACE (arXiv 2605.10194): an annotator's key and error spans (`privileged_source="annotation"`), mapped from
characters to tokens, route the forward KL (key spans) and the reverse KL (error spans) of `distill_loss="trace"`,
whose weight is annealed after a warm-up; GRPO on the other tokens (and on every token once the weight is 0, or with
`trace_grpo_on_spans`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import build_trainer, make_config
from torch import nn

from rlsd.context.annotation import (
    ANNOTATION_KNOBS,
    AnnotationSource,
    completion_token_labels,
    locate_spans,
    parse_annotation,
    span_token_labels,
    token_char_offsets,
)
from rlsd.context.generated import GenerationRequest, context_generator
from rlsd.context.sources import RolloutView
from rlsd.core.distill import token_loss_fn
from rlsd.core.family_losses import RoutedTokenLoss, routed_token_loss
from rlsd.experiments.contexts import task_annotator
from rlsd.experiments.methods import CATALOGUE
from rlsd.experiments.task import TaskConfig, make_rl_dataset

RIGHT = "<think>ref=21;4*5=20;3+20=23;23-2=21</think><answer>21</answer>"
WRONG = "<think>4*5=20;3+20=24;24-2=22</think><answer>22</answer>"
ROW = {"prompt": "Q: 3+4*5-2=", "solution": "21"}


# ------------------------------------------------------------------------------------- characters -> tokens
def test_character_spans_map_to_every_token_they_overlap():
    pieces = ["<th", "ink>", "4*5", "=2", "0;", "3+", "20=2", "3"]  # "<think>4*5=20;3+20=23"
    offsets = token_char_offsets(pieces)
    assert offsets == [(0, 3), (3, 7), (7, 10), (10, 12), (12, 14), (14, 16), (16, 20), (20, 21)]
    # "=20" is characters [10, 13): tokens "=2" and "0;"; "=23" is [18, 21): tokens "20=2" and "3"
    assert span_token_labels(offsets, [(10, 13, 1), (18, 21, 1)]) == [0, 0, 0, 1, 1, 0, 1, 1]
    # an error span from "3+" to the end
    assert span_token_labels(offsets, [(14, 21, -1)]) == [0, 0, 0, 0, 0, -1, -1, -1]
    # a span touching a token's edge without covering a character of it leaves it out
    assert span_token_labels(offsets, [(7, 10, 1)]) == [0, 0, 1, 0, 0, 0, 0, 0]


def test_a_token_that_decodes_to_nothing_or_splits_a_character_takes_the_prefix_offsets():
    # "é" split over two byte tokens: alone they decode to replacement characters, their prefixes to "" then "é"
    pieces, prefixes = ["a", "\ufffd", "\ufffd", "b"], ["a", "a", "aé", "aéb"]
    offsets = token_char_offsets(pieces, prefixes)
    assert offsets == [(0, 1), (1, 1), (1, 2), (2, 3)]
    assert span_token_labels(offsets, [(1, 2, -1)]) == [0, 0, -1, 0]  # the empty token is in no span


def test_the_trainers_tokens_are_labelled_from_the_decoded_completion(tokenizer):
    ids = tokenizer(RIGHT)["input_ids"]
    start = RIGHT.index("=20")
    labels = completion_token_labels(tokenizer, ids, [(start, start + 3, 1)])
    assert [tokenizer.decode([i]) for i, label in zip(ids, labels, strict=True) if label] == ["=", "2", "0"]


# ------------------------------------------------------------------------------------------------ the annotator
def test_spans_are_located_in_order_and_unfound_ones_are_counted():
    assert parse_annotation("key steps\n=20\n\n=21\n") == ("key steps", ["=20", "=21"])
    found, missing = locate_spans(RIGHT, ["=21", "=20", "=21", "=99"])
    # the first "=21" is the hint's; the second, searched after "=20", is the last step's
    assert found == [(10, 13), (17, 20), (33, 36)] and missing == 1
    assert RIGHT[33:36] == "=21"


def test_the_task_annotator_marks_the_step_results_of_a_correct_completion_and_the_first_wrong_step_onwards():
    request = lambda completion: GenerationRequest(ROW["prompt"], ROW, completion, 0.0, "annotation")  # noqa: E731
    assert task_annotator(request(RIGHT)) == "key steps\n=20\n=23\n=21"
    assert task_annotator(request(WRONG)) == "arithmetic error\n3+20=24;24-2=22</think><answer>22</answer>"
    order = "<think>3+4=7;7*5=35</think><answer>35</answer>"
    assert task_annotator(request(order)) == f"wrong order of operations\n{order[7:]}"
    short = "<think>4*5=20</think><answer>20</answer>"
    assert task_annotator(request(short)) == "missing step\n</think><answer>20</answer>"
    assert task_annotator(request("no idea\n21")) == "no steps\nno idea\n21"


def source_args(**values):
    defaults = {key: knob.default for key, knob in ANNOTATION_KNOBS.items()}
    return SimpleNamespace(**{**defaults, "privileged_column": "solution", **values})


def test_the_source_labels_key_spans_plus_one_and_error_spans_minus_one_and_shows_the_diagnosis(registries):
    view = RolloutView([ROW, ROW], 2, 0, [RIGHT, WRONG], [1.0, 0.0])
    context = AnnotationSource(source_args(context_generator="task-annotator")).context(view, [0, 1])
    assert context.fields == {"answer": ["21", "21"], "diagnosis": ["key steps", "arithmetic error"]}
    wrong_start = WRONG.index("3+20=24")
    assert context.char_spans == [[(17, 20, 1), (25, 28, 1), (33, 36, 1)], [(wrong_start, len(WRONG), -1)]]
    assert context.has_context == [True, True] and context.metrics["annotation_span_count"] == 4.0

    context_generator("test-sloppy")(lambda request: "typo\n=20\nnot in it\n")
    context = AnnotationSource(source_args(context_generator="test-sloppy")).context(view, [1])
    assert context.char_spans == [[(10, 13, -1)]] and context.metrics["annotation_unfound_count"] == 1.0


# ------------------------------------------------------------------------------------------------- the loss
def identity_heads(vocab):
    head = nn.Linear(vocab, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(vocab))
    return head


@pytest.mark.parametrize("error_kl", [False, True])
def test_the_loss_per_token_by_hand_on_a_1x3_case(error_kl):
    torch.manual_seed(0)
    student = torch.randn(1, 3, 5, requires_grad=True)  # with an identity head the hidden states are the logits
    teacher = torch.randn(1, 3, 5)
    labels = torch.tensor([[1, -1, 0]])
    loss = token_loss_fn("trace", None, trace_error_kl=error_kl)
    selected = torch.ones(1, 3, dtype=torch.bool)
    head = identity_heads(5)
    per_token = routed_token_loss(loss, labels, student, teacher, selected, (head, head), 1.0)
    log_s, log_t = F.log_softmax(student[0].detach(), -1), F.log_softmax(teacher[0], -1)
    forward = (log_t[0].exp() * (log_t[0] - log_s[0])).sum()  # KL(p_T || p_S) on the key token only
    reverse = (log_s.exp() * (log_s - log_t)).sum(-1)[1]  # KL(p_S || p_T) on the error token
    expected = torch.stack([forward, reverse if error_kl else torch.tensor(0.0), torch.tensor(0.0)])
    torch.testing.assert_close(per_token, expected)
    per_token.sum().backward()
    p_s, p_t = log_s.exp(), log_t.exp()
    grad = torch.zeros(3, 5)
    grad[0] = p_s[0] - p_t[0]  # d KL(p_T || p_S) / d student logits
    if error_kl:  # d KL(p_S || p_T) / d z = p_S * (log p_S - log p_T - KL)
        grad[1] = p_s[1] * (log_s[1] - log_t[1] - reverse)
    torch.testing.assert_close(student.grad[0], grad)


def test_the_kl_weight_is_full_for_the_warm_up_then_falls_linearly_to_zero():
    loss = token_loss_fn("trace", None, trace_kl_warmup_steps=2, trace_kl_decay_steps=4)
    assert isinstance(loss, RoutedTokenLoss) and set(loss.routes) == {1}
    assert [loss.scale(step) for step in range(1, 8)] == [1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert token_loss_fn("trace", None, trace_kl_decay_steps=0).scale(10**6) == 1.0
    with pytest.raises(ValueError, match="routes tokens by their labels"):
        loss(torch.zeros(1, 5), torch.zeros(1, 5))


# ------------------------------------------------------------------------------------------------ in a trainer
def zero_reward(completions, **kwargs):
    """No completion is ever rewarded."""
    return [0.0] * len(completions)


def test_the_method_and_its_knobs_are_config_fields(tmp_path):
    config = make_config(tmp_path, **CATALOGUE["trace"])
    assert (config.distill_loss, config.privileged_source, config.trace_error_kl) == ("trace", "annotation", True)
    assert (config.trace_key_kl, config.trace_kl_warmup_steps, config.trace_kl_decay_steps) == (True, 20, 30)
    assert config.policy_loss_coef == 1.0 and config.credit == "grpo"


def test_trace_distils_error_spans_when_no_completion_is_rewarded(tokenizer, tmp_path):
    dataset = make_rl_dataset(TaskConfig(), 8, seed=0)
    trainer = build_trainer(tokenizer, tmp_path, reward=zero_reward, dataset=dataset, **CATALOGUE["trace"])
    trainer.model.train()
    batch = trainer._generate_and_score_completions([dataset[i] for i in (0, 0, 0, 0)])
    labels, mask = batch["rlsd_distill_labels"], batch["completion_mask"].bool()
    assert (labels[~mask] == 0).all() and (labels[mask] == -1).any() and not (labels == 1).any()
    trainer = build_trainer(tokenizer, tmp_path, reward=zero_reward, dataset=dataset, **CATALOGUE["trace"])
    trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "rlsd/distill_loss" in entry]
    assert log["reward"] == 0.0 and log["rlsd/annotation_span_count"] > 0 and log["rlsd/distill_scale"] == 1.0
    assert log["rlsd/distill_loss"] > 0.0 and log["grad_norm"] > 0.0


# ------------------------------------------------------------------------------- GRPO elsewhere (policy mask)
@pytest.mark.parametrize(
    ("error_kl", "step", "expected"),
    [
        (False, 1, [[0, 1, 1, 0], [1, 1, 1, 1]]),  # key spans only: the error span keeps the policy gradient
        (True, 1, [[0, 1, 0, 0], [1, 0, 1, 1]]),  # both routes: every span token leaves it
        (True, 3, [[0, 1, 0, 0], [1, 0, 1, 1]]),  # weight 0.5 in the decay: still distilled, still out
        (True, 4, [[1, 1, 1, 1], [1, 1, 1, 1]]),  # weight 0: the KL channel is annealed away, GRPO on every token
    ],
)
def test_the_routed_tokens_leave_the_policy_gradient_while_the_kl_weight_is_above_zero(error_kl, step, expected):
    labels = torch.tensor([[1, 0, -1, 1], [0, -1, 0, 0]])
    loss = token_loss_fn("trace", None, trace_error_kl=error_kl, trace_kl_warmup_steps=2, trace_kl_decay_steps=2)
    assert loss.scale(step) == {1: 1.0, 3: 0.5, 4: 0.0}[step]
    assert loss.policy_mask(labels, step).tolist() == expected
    kept = token_loss_fn("trace", None, trace_error_kl=error_kl, trace_grpo_on_spans=True)
    assert kept.policy_mask(labels, step).tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]


def alternate_reward(completions, **kwargs):
    """Every other completion is rewarded: every group has reward variance, so every A_i != 0."""
    return [float(i % 2) for i in range(len(completions))]


@pytest.mark.parametrize("on_spans", [False, True])
def test_the_span_tokens_get_no_policy_advantage_in_the_trainer(tokenizer, tmp_path, on_spans):
    dataset = make_rl_dataset(TaskConfig(), 8, seed=0)
    config = {**CATALOGUE["trace"], "trace_grpo_on_spans": on_spans}
    trainer = build_trainer(tokenizer, tmp_path, reward=alternate_reward, dataset=dataset, **config)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([dataset[i] for i in (0, 0, 0, 0)])
    labels, mask, advantages = batch["rlsd_distill_labels"], batch["completion_mask"].bool(), batch["advantages"]
    spans = (labels != 0) & mask
    rewards = torch.tensor([0.0, 1.0, 0.0, 1.0])
    sequence = (rewards - rewards.mean()) / rewards.std()  # GRPO's A_i: -+0.866
    expected = sequence.unsqueeze(1) * mask * (1.0 if on_spans else (~spans).float())
    assert spans.any() and (mask & ~spans).any()
    torch.testing.assert_close(advantages.float(), expected.float(), atol=1e-4, rtol=1e-4)
    assert "rlsd_policy_mask" not in batch  # applied at rollout time: it does not travel to the loss


def test_the_trace_loss_without_an_annotating_source_is_refused(tokenizer, tmp_path):
    trainer = build_trainer(tokenizer, tmp_path, distill_loss="trace", teacher="live")
    trainer.model.train()
    with pytest.raises(ValueError, match="use privileged_source='annotation'"):
        trainer._generate_and_score_completions([trainer.train_dataset[0]] * 4)
