"""A frozen external teacher (`teacher_model`): loading, placement, the vocabulary / tokenizer checks, every kind of
teacher use (a credit rule, a distillation loss, OPD) and checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_trainer, make_config, make_dataset, rule_overrides
from transformers import Qwen2Tokenizer

from rlsd.config import DISTILL_LOSSES
from rlsd.context.templates import render_teacher_prompts
from rlsd.experiments.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, TAG_TOKENS, build_tiny_qwen2
from rlsd.teachers import ExternalTeacher

TEMPERATURE = 0.7


def make_teacher(tokenizer, vocab_size: int | None = None):
    """A tiny Qwen2 larger than the student (hidden 48, 3 layers vs 32, 2) over the same vocabulary."""
    model = build_tiny_qwen2(tokenizer, hidden_size=48, num_layers=3, num_heads=2, intermediate_size=96, seed=7)
    if vocab_size is not None:
        model.resize_token_embeddings(vocab_size)
    return model


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer):
    """The larger tiny teacher saved with the student's tokenizer."""
    folder = tmp_path_factory.mktemp("teacher")
    make_teacher(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def logged(trainer, key: str) -> float:
    return next(entry[key] for entry in trainer.state.log_history if key in entry)


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------------------------------- config
def test_teacher_model_sets_the_external_mode_and_refuses_a_self_teacher_mode_beside_it(tmp_path):
    assert make_config(tmp_path, teacher_model="some/teacher").teacher == "external"
    with pytest.raises(ValueError, match="self-teacher mode"):
        make_config(tmp_path, teacher_model="some/teacher", teacher="live")
    with pytest.raises(ValueError, match="teacher_model is not set"):
        make_config(tmp_path, teacher="external")
    parsed = make_config(tmp_path, teacher_model="t", teacher_model_init_kwargs='{"dtype": "float32"}')
    assert parsed.teacher_model_init_kwargs == {"dtype": "float32"}


def test_the_none_source_shows_the_plain_prompt(tmp_path):
    args = make_config(tmp_path, privileged_source="none")
    assert args.teacher_template == "{prompt}"
    prompts = ["Q: 1+2=", [{"role": "system", "content": "s"}, {"role": "user", "content": "Q: 3="}]]
    assert render_teacher_prompts(prompts, args.teacher_template, {}) == prompts
    with pytest.raises(ValueError, match="does not fill"):
        make_config(tmp_path, privileged_source="none", teacher_template="{prompt} {answer}")


# ---------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize(
    "overrides",
    [
        {"credit": "rlsd"},  # RLSD with the external teacher
        {"credit": "grpo", "distill_loss": "jsd"},  # a distillation loss beside GRPO
        {"credit": "opsd", "privileged_source": "none"},  # OPD: sampled-token Delta as the advantage, plain prompt
        {"credit": "grpo", "distill_loss": "jsd", "policy_loss_coef": 0.0, "privileged_source": "none"},  # OPD, JSD
    ],
)
def test_a_training_step_runs_with_an_external_teacher(tokenizer, tmp_path, teacher_dir, overrides):
    trainer = build_trainer(tokenizer, tmp_path, teacher_model=str(teacher_dir), temperature=TEMPERATURE, **overrides)
    assert isinstance(trainer.teacher, ExternalTeacher) and trainer.args.teacher == "external"
    teacher = trainer.teacher.model
    assert teacher.config.hidden_size == 48 and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    policy_before, teacher_before = params(trainer.model), params(teacher)
    trainer.train()
    assert torch.isfinite(torch.tensor(logged(trainer, "loss")))
    assert not same(policy_before, trainer.model.parameters())  # the student learned
    assert same(teacher_before, teacher.parameters())  # the teacher did not
    if "distill_loss" in overrides:
        assert logged(trainer, "rlsd/distill_loss") > 0
    else:
        assert "rlsd/teacher_synced" not in {k for e in trainer.state.log_history for k in e}  # never follows


def teacher_rules() -> list[str]:
    from rlsd.core.rules import RULES, get_rule

    return [name for name in RULES if "teacher_logps" in get_rule(name).needs]


@pytest.mark.parametrize(
    "overrides",
    [rule_overrides(rule) for rule in teacher_rules()]
    + [{"credit": "grpo", "distill_loss": loss} for loss in DISTILL_LOSSES if loss not in ("none", "trace")]
    + [{"credit": "rlsd", "teacher_prefix_sharing": True}],
)
def test_every_credit_rule_and_distillation_loss_runs_with_an_external_teacher(
    tokenizer, tmp_path, teacher_dir, overrides
):
    trainer = build_trainer(tokenizer, tmp_path, teacher_model=str(teacher_dir), distill_topk=8, **overrides)
    teacher_before = params(trainer.teacher.model)
    trainer.train()
    assert torch.isfinite(torch.tensor(logged(trainer, "loss")))
    assert same(teacher_before, trainer.teacher.model.parameters())


def direct_logps(model, tokenizer, text: str, completion: list[int]) -> torch.Tensor:
    """log p(y_t | text, y_<t) from one unpadded forward returning full logits."""
    prompt_ids = tokenizer(text)["input_ids"]
    ids = torch.tensor([prompt_ids + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1] / TEMPERATURE
    return torch.log_softmax(logits.double(), dim=-1).gather(1, torch.tensor(completion).unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("source", ["answer", "none"])
def test_external_teacher_logps_equal_a_direct_forward_of_the_external_model(tokenizer, tmp_path, teacher_dir, source):
    dataset = make_dataset()
    trainer = build_trainer(
        tokenizer, tmp_path, dataset=dataset, teacher_model=str(teacher_dir), temperature=TEMPERATURE,
        privileged_source=source,
    )  # fmt: skip
    rows = [dataset[i] for i in (0, 1, 2)]
    completions = [[10, 11, 12, 13, 14], [20, 21], [30, 31, 32]]
    width = max(map(len, completions))
    output = {
        "completion_ids": torch.tensor([c + [tokenizer.pad_token_id] * (width - len(c)) for c in completions]),
        "completion_mask": torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions]),
    }
    logps = trainer.teacher_scores(rows, output).logps
    fields = {"answer": [r["solution"] for r in rows]} if source == "answer" else {}
    prompts = render_teacher_prompts([r["prompt"] for r in rows], trainer.args.teacher_template, fields)
    if source == "none":
        assert prompts == [r["prompt"] for r in rows]
    for row, (text, completion) in enumerate(zip(prompts, completions, strict=True)):
        expected = direct_logps(trainer.teacher.model, tokenizer, text, completion)
        torch.testing.assert_close(logps[row, : len(completion)].double(), expected, rtol=0, atol=2e-5)
        student = direct_logps(trainer.model, tokenizer, text, completion)
        assert (logps[row, : len(completion)].double() - student).abs().max() > 1e-3  # not the policy


# ------------------------------------------------------------------------------------------------------ checks
def test_a_teacher_with_another_vocabulary_size_is_refused_naming_both(tokenizer, tmp_path):
    folder = tmp_path / "wide-teacher"
    make_teacher(tokenizer, vocab_size=len(tokenizer) + 8).save_pretrained(folder)
    with pytest.raises(ValueError, match=rf"vocab_size {len(tokenizer) + 8} .* vocab_size {len(tokenizer)}"):
        build_trainer(tokenizer, tmp_path / "run", teacher_model=str(folder))


def permuted_tokenizer(tokenizer):
    """The char tokenizer with the ids of '1' and 'Q' swapped: the same size, other ids for the same text."""
    vocab = {token: index for token, index in tokenizer.get_vocab().items() if token not in TAG_TOKENS}
    vocab["1"], vocab["Q"] = vocab["Q"], vocab["1"]
    other = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<unk>", eos_token="<eos>", pad_token="<pad>",
                           bos_token=None)  # fmt: skip
    other.add_tokens(list(TAG_TOKENS), special_tokens=False)
    other.chat_template = CHAT_TEMPLATE
    assert len(other) == len(tokenizer) and set(SPECIAL_TOKENS) <= set(other.get_vocab())
    return other


def test_a_teacher_tokenizer_that_encodes_the_prompts_differently_is_refused(tokenizer, tmp_path):
    folder = tmp_path / "other-tokenizer"
    make_teacher(tokenizer).save_pretrained(folder)
    other = permuted_tokenizer(tokenizer)
    assert other("Q: 1+2=")["input_ids"] != tokenizer("Q: 1+2=")["input_ids"]
    other.save_pretrained(folder)
    with pytest.raises(ValueError, match=r"tokenizes training text 0 .* differently"):
        build_trainer(tokenizer, tmp_path / "run", teacher_model=str(folder))


def test_a_teacher_with_a_tokenizer_of_another_length_is_refused(tokenizer, tmp_path):
    folder = tmp_path / "longer-tokenizer"
    make_teacher(tokenizer).save_pretrained(folder)
    longer = permuted_tokenizer(tokenizer)
    longer.add_tokens(["<extra>"])
    longer.save_pretrained(folder)
    with pytest.raises(ValueError, match=rf"tokenizer of {len(tokenizer) + 1} tokens .* {len(tokenizer)}"):
        build_trainer(tokenizer, tmp_path / "run", teacher_model=str(folder))


# ------------------------------------------------------------------------------------------------- checkpoints
def test_resume_with_an_external_teacher_keeps_only_its_state_file(tokenizer, tmp_path, teacher_dir):
    settings = dict(teacher_model=str(teacher_dir), max_steps=2, save_strategy="steps", save_steps=1)
    straight = build_trainer(tokenizer, tmp_path / "straight", **settings)
    straight.train()
    checkpoint = tmp_path / "straight" / "checkpoint-1"
    state = json.loads((checkpoint / "rlsd_teacher.json").read_text())
    assert state["mode"] == "external" and state["teacher_model"] == str(teacher_dir)
    assert not (checkpoint / "rlsd_teacher.pt").exists()
    resumed = build_trainer(tokenizer, tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert same(params(resumed.model), straight.model.parameters())
    assert same(params(resumed.teacher.model), straight.teacher.model.parameters())


def test_a_weights_only_resume_without_the_teacher_state_keeps_the_external_teacher(tokenizer, tmp_path, teacher_dir):
    settings = dict(teacher_model=str(teacher_dir), max_steps=2, save_strategy="steps", save_steps=1)
    build_trainer(tokenizer, tmp_path / "first", **settings).train()
    checkpoint = tmp_path / "first" / "checkpoint-1"
    (checkpoint / "rlsd_teacher.json").unlink()
    resumed = build_trainer(tokenizer, tmp_path / "resumed", resume_weights_only=True, **settings)
    teacher_before = params(resumed.teacher.model)
    resumed.train(resume_from_checkpoint=str(checkpoint))  # the policy is not copied into the external teacher
    assert same(teacher_before, resumed.teacher.model.parameters())
    assert resumed.state.global_step == 2


def test_a_self_teacher_checkpoint_is_refused_by_an_external_teacher_run(tokenizer, tmp_path, teacher_dir):
    settings = dict(max_steps=1, save_strategy="steps", save_steps=1, teacher="live")
    build_trainer(tokenizer, tmp_path / "self", **settings).train()
    external = build_trainer(tokenizer, tmp_path / "ext", **{**settings, "teacher": "synced"},
                             teacher_model=str(teacher_dir))  # fmt: skip
    with pytest.raises(ValueError, match="teacher mode 'live' differs"):
        external.train(resume_from_checkpoint=str(tmp_path / "self" / "checkpoint-1"))


# ---------------------------------------------------------------------------------------------------------- OPD
@pytest.mark.parametrize("method", ["opd", "opd-jsd"])
def test_the_opd_catalogue_entries_train_with_a_teacher_path_and_are_refused_without(
    tokenizer, tmp_path, teacher_dir, method
):
    from rlsd.experiments.methods import CATALOGUE

    entry = CATALOGUE[method]
    with pytest.raises(ValueError, match="teacher_model is not set"):
        make_config(tmp_path, **entry)
    trainer = build_trainer(tokenizer, tmp_path, teacher_model=str(teacher_dir), **entry)
    assert isinstance(trainer.teacher, ExternalTeacher) and trainer.args.privileged_source == "none"
    before = params(trainer.model)
    trainer.train()
    assert not same(before, trainer.model.parameters())


# ------------------------------------------------------------------------------------- Rethinking-OPD diagnostic
def test_topk_overlap_by_hand():
    from rlsd.core.distill import topk_overlap

    student = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [0.0, 0.5, 9.0, 8.0, 1.0]])
    teacher = torch.tensor([[1.0, 5.0, 4.0, 0.0, 0.5], [9.0, 8.0, 0.0, 0.5, 1.0]])
    # k = 2: {0, 1} & {1, 2} = {1} -> 1/2; {2, 3} & {0, 1} = {} -> 0
    assert topk_overlap(student, teacher, 2).tolist() == [0.5, 0.0]
    # k = 3: {0, 1, 2} & {1, 2, 0} -> 3/3; {2, 3, 4} & {0, 1, 4} = {4} -> 1/3
    torch.testing.assert_close(topk_overlap(student, teacher, 3), torch.tensor([1.0, 1.0 / 3.0]))
    assert topk_overlap(student, teacher, 99).tolist() == [1.0, 1.0]  # k capped at the vocabulary: all shared


def test_the_overlap_probe_sees_each_chunk_once_through_the_checkpointed_backward():
    from rlsd.core.distill import OverlapProbe, chunked_token_loss, generalized_jsd, topk_overlap

    torch.manual_seed(0)
    student_head, teacher_head = torch.nn.Linear(6, 11, bias=False), torch.nn.Linear(5, 11, bias=False)
    student_h = torch.randn(1, 7, 6, requires_grad=True)
    teacher_h = torch.randn(1, 7, 5)
    probe = OverlapProbe(4)
    loss = chunked_token_loss(generalized_jsd, student_h, teacher_h, student_head, teacher_head, 3, overlap=probe)
    loss.sum().backward()  # recomputes each chunk: the probe must not count it twice
    assert sorted(probe.chunks) == [0, 1, 2]
    with torch.no_grad():
        expected = topk_overlap(student_head(student_h[0]), teacher_head(teacher_h[0]), 4)
    torch.testing.assert_close(probe.values(), expected)


def test_a_distillation_step_logs_the_topk_overlap(tokenizer, tmp_path, teacher_dir):
    vocabulary = len(tokenizer)
    full = build_trainer(tokenizer, tmp_path / "full", teacher_model=str(teacher_dir), credit="grpo",
                         distill_loss="jsd", distill_overlap_k=vocabulary)  # fmt: skip
    full.train()
    assert logged(full, "rlsd/topk_overlap") == 1.0  # k = |V|: every token is in both sets
    small = build_trainer(tokenizer, tmp_path / "small", teacher_model=str(teacher_dir), credit="grpo",
                          distill_loss="jsd", distill_overlap_k=4)  # fmt: skip
    small.train()
    assert 0.0 <= logged(small, "rlsd/topk_overlap") < 1.0
    off = build_trainer(tokenizer, tmp_path / "off", credit="grpo", distill_loss="jsd", teacher="initial",
                        distill_overlap_k=0)  # fmt: skip
    off.train()
    assert "rlsd/topk_overlap" not in {k for e in off.state.log_history for k in e}
