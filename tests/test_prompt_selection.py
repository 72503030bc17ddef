"""Teacher-aligned prompt selection (`teacher_aligned_prompts`, `rlsd.core.prompt_selection`): the ranking, the score
on hand-made bigram models, the batched score against an unbatched greedy reference, the trainer's selection and the
refusals."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import build_trainer, make_config, make_dataset, make_model
from datasets import Dataset
from torch import nn
from transformers import AutoModelForCausalLM

from rlsd.context.sources import AnswerSource
from rlsd.context.templates import render_teacher_prompts
from rlsd.core.prompt_selection import alignment_scores, select_aligned
from rlsd.experiments.tiny import build_tiny_qwen2
from rlsd.infra.validate import ConfigError
from rlsd.step.aligned_prompts import select_aligned_prompts

PAD, EOS = 0, 5


# ------------------------------------------------------------------------------------------------------ ranking
def test_select_aligned_keeps_the_highest_scores_in_dataset_order():
    scores = [0.2, 0.9, 0.5, 0.1, 0.7]
    assert select_aligned(scores, 0.4) == [1, 4]  # ceil(0.4 * 5) = 2: 0.9 and 0.7
    assert select_aligned(scores, 0.6) == [1, 2, 4]  # 3 kept, returned in index order
    assert select_aligned(torch.tensor(scores), 0.6) == [1, 2, 4]


def test_select_aligned_breaks_ties_by_the_lower_index():
    assert select_aligned([0.5, 0.8, 0.5, 0.8, 0.5], 0.4) == [1, 3]
    assert select_aligned([0.5, 0.8, 0.5, 0.8, 0.5], 0.6) == [0, 1, 3]  # the third: the first 0.5
    assert select_aligned([0.3] * 4, 0.5) == [0, 1]


def test_select_aligned_fraction_bounds():
    scores = [0.2, 0.9, 0.5, 0.1]
    assert select_aligned(scores, 1.0) == [0, 1, 2, 3]
    assert select_aligned(scores, 1e-6) == [1]  # at least one prompt
    assert select_aligned([0.1] * 10, 0.3) == [0, 1, 2]  # 0.3 * 10 is 3.0000000000000004 in floats: 3, not 4
    assert select_aligned([0.4, math.nan, 0.1], 0.6) == [0, 2]  # NaN ranks last
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            select_aligned(scores, bad)
    with pytest.raises(ValueError, match="at least one"):
        select_aligned([], 0.5)


# ------------------------------------------------------------------------------------------- hand-made models
class Bigram(nn.Module):
    """Next-token logits = table[last token]; greedy `generate` (argmax, stops at EOS, pads with PAD)."""

    def __init__(self, table: list[list[float]]) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table))

    def forward(self, input_ids, attention_mask, logits_to_keep):
        return SimpleNamespace(logits=self.table[input_ids][:, -logits_to_keep:])

    def generate(self, input_ids, attention_mask, generation_config, synced_gpus):
        rows = []
        for ids in input_ids.tolist():
            new, last = [], ids[-1]
            while len(new) < generation_config.max_new_tokens and (not new or new[-1] != EOS):
                last = int(self.table[last].argmax())
                new.append(last)
            rows.append(ids + new)
        width = max(map(len, rows))
        return torch.tensor([row + [PAD] * (width - len(row)) for row in rows])


#        token:   0    1    2    3    4    5 (EOS)
STUDENT = [
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # 0 (PAD: never a state)
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # 1
    [0.0, 1.0, 2.0, 9.0, 8.0, 3.0],  # 2: greedy 3, top-2 {3, 4}
    [0.0, 1.0, 2.0, 3.0, 7.0, 9.0],  # 3: greedy EOS, top-2 {5, 4}
    [0.0, 1.0, 7.0, 2.0, 9.0, 3.0],  # 4: greedy 4 (loops), top-2 {4, 2}
    [9.0, 8.0, 0.0, 0.0, 0.0, 0.0],  # 5: after EOS, top-2 {0, 1}: must never count
]
TEACHER = [
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.0, 1.0, 2.0, 8.0, 9.0, 3.0],  # 2: top-2 {4, 3}: overlap 1 with the student
    [0.0, 8.0, 2.0, 3.0, 9.0, 1.0],  # 3: top-2 {4, 1}: overlap 1/2
    [9.0, 8.0, 1.0, 2.0, 3.0, 0.0],  # 4: top-2 {0, 1}: overlap 0; top-3 {0, 1, 4}: overlap 1/3 with {4, 2, 5}
    [0.0, 0.0, 0.0, 0.0, 9.0, 8.0],  # 5: top-2 {4, 5}: overlap 0 with the student's {0, 1} (would lower a score)
]


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_alignment_scores_by_hand_on_bigram_models(batch_size):
    student_prompts = [[1, 2], [1, 4], [2], [1, 2]]
    teacher_prompts = [[1, 2], [3, 4], [2], [2, 4]]
    scores = alignment_scores(Bigram(STUDENT), Bigram(TEACHER), student_prompts, teacher_prompts, k=2,
                              max_new_tokens=3, pad_token_id=PAD, eos_token_id=EOS,
                              batch_size=batch_size)  # fmt: skip
    # 0: continuation [3, EOS], states 2, 3 for both: (1 + 1/2) / 2; the padded slot after EOS does not count
    # 1: continuation [4, 4, 4] (no EOS within 3 tokens), states 4, 4, 4: 0
    # 2: like 0 from a shorter prompt (left padding): 3/4
    # 3: the teacher sees its own prompt [2, 4]: its first state is 4, not 2: (0 + 1/2) / 2
    torch.testing.assert_close(scores, torch.tensor([0.75, 0.0, 0.75, 0.25]))
    assert select_aligned(scores, 0.5) == [0, 2]
    k3 = alignment_scores(Bigram(STUDENT), Bigram(TEACHER), student_prompts[1:2], teacher_prompts[1:2], k=3,
                          max_new_tokens=2, pad_token_id=PAD, eos_token_id=EOS)  # fmt: skip
    torch.testing.assert_close(k3, torch.tensor([1.0 / 3.0]))  # {4, 2, 5} & {0, 1, 4} = {4}, twice


def test_alignment_scores_refuse_mismatched_prompt_lists():
    with pytest.raises(ValueError, match="2 student prompts but 1 teacher"):
        alignment_scores(Bigram(STUDENT), Bigram(TEACHER), [[1], [2]], [[1]], k=2, max_new_tokens=2,
                         pad_token_id=PAD, eos_token_id=EOS)  # fmt: skip


# ----------------------------------------------------------------------------------- real tiny models, batched
def spread(model, seed: int):
    """The model with N(0, 0.3^2) noise added to every weight: a freshly initialised tiny model predicts nearly the
    same tokens whatever the context, so every prompt would score alike."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def make_student(tokenizer):
    return spread(make_model(tokenizer), seed=1)


def make_teacher(tokenizer):
    """A tiny Qwen2 with other weights and shape than the student, over the same vocabulary."""
    model = build_tiny_qwen2(tokenizer, hidden_size=48, num_layers=3, num_heads=2, intermediate_size=96, seed=7)
    return spread(model, seed=2)


def reference_score(student, teacher, prompt: list[int], teacher_prompt: list[int], k: int, max_new: int,
                    eos: int) -> float:  # fmt: skip
    """One prompt, unpadded: greedy continuation by repeated full forwards, then the overlap of the top-k sets as
    Python sets at every continuation token, averaged."""
    ids = list(prompt)
    continuation: list[int] = []
    with torch.no_grad():
        while len(continuation) < max_new and (not continuation or continuation[-1] != eos):
            token = int(student(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            continuation.append(token)
        n = len(continuation)
        s = student(input_ids=torch.tensor([prompt + continuation])).logits[0, -n - 1 : -1]
        t = teacher(input_ids=torch.tensor([teacher_prompt + continuation])).logits[0, -n - 1 : -1]
    shared = [len(set(s[i].topk(k).indices.tolist()) & set(t[i].topk(k).indices.tolist())) / k for i in range(n)]
    return sum(shared) / n


def test_batched_alignment_scores_equal_an_unbatched_greedy_reference(tokenizer):
    student, teacher = make_student(tokenizer).eval(), make_teacher(tokenizer).eval()
    texts = [row["prompt"] for row in make_dataset(6)]
    prompts = [tokenizer(text)["input_ids"] for text in texts]
    teacher_prompts = [tokenizer("Teacher: " + text)["input_ids"] for text in texts]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    scores = alignment_scores(student, teacher, prompts, teacher_prompts, k=8, max_new_tokens=6,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              batch_size=4)  # fmt: skip
    expected = [reference_score(student, teacher, p, tp, 8, 6, tokenizer.eos_token_id)
                for p, tp in zip(prompts, teacher_prompts, strict=True)]  # fmt: skip
    torch.testing.assert_close(scores.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)
    assert len(set(expected)) > 1  # the prompts differ in alignment


# ------------------------------------------------------------------------------------------------------ trainer
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("aligned-teacher")
    make_teacher(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def direct_scores(tokenizer, student, teacher, dataset, teacher_texts, k: int = 16) -> torch.Tensor:
    prompts = [tokenizer(text)["input_ids"] for text in dataset["prompt"]]
    teacher_prompts = [tokenizer(text)["input_ids"] for text in teacher_texts]
    return alignment_scores(student.eval(), teacher.eval(), prompts, teacher_prompts, k=k, max_new_tokens=8,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip


def check_selection(trainer, dataset, expected: torch.Tensor, fraction: float) -> list[int]:
    """The trainer kept exactly the rows the directly computed scores rank highest, with every column."""
    keep = select_aligned(expected, fraction)
    assert len(keep) == math.ceil(fraction * len(dataset))
    torch.testing.assert_close(trainer.prompt_alignment, expected.float(), rtol=0, atol=1e-6)
    assert trainer.aligned_prompt_indices == keep
    assert trainer.train_dataset.column_names == dataset.column_names
    assert trainer.train_dataset.to_list() == dataset.select(keep).to_list()
    dropped = [i for i in range(len(dataset)) if i not in keep]
    assert min(expected[keep]) >= max(expected[dropped])  # the kept rows are the most aligned
    assert len(set(expected.tolist())) > 1  # the selection is not a tie-break artefact
    return keep


def test_a_trainer_keeps_the_prompts_the_pure_function_ranks_highest(tokenizer, tmp_path, teacher_dir, caplog):
    dataset = make_dataset(8)
    with caplog.at_level("INFO", logger="rlsd.trainer"):
        trainer = build_trainer(tokenizer, tmp_path, dataset=dataset, model=make_student(tokenizer),
                                teacher_model=str(teacher_dir), credit="opsd", privileged_source="none",
                                teacher_aligned_prompts=0.5)  # fmt: skip
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    expected = direct_scores(tokenizer, make_student(tokenizer), teacher, dataset, dataset["prompt"])
    keep = check_selection(trainer, dataset, expected, 0.5)
    assert len(keep) == 4
    line = next(r.getMessage() for r in caplog.records if "teacher_aligned_prompts" in r.getMessage())
    kept_mean = expected[keep].mean().item()
    dropped_mean = expected[[i for i in range(8) if i not in keep]].mean().item()
    assert f"kept 4 of 8 training prompts; mean top-16 overlap {kept_mean:.4f} kept, {dropped_mean:.4f}" in line
    trainer.train()  # a step on the selected prompts
    assert trainer.state.global_step == 1


def test_a_self_teacher_scores_with_the_privileged_prompt(tokenizer, tmp_path):
    dataset = make_dataset(8)
    trainer = build_trainer(tokenizer, tmp_path, dataset=dataset, model=make_student(tokenizer), credit="rlsd",
                            teacher="initial", distill_overlap_k=4, teacher_aligned_prompts=0.25)  # fmt: skip
    teacher_texts = render_teacher_prompts(dataset["prompt"], trainer.args.teacher_template,
                                           {"answer": dataset["solution"]})  # fmt: skip
    assert teacher_texts[0] != dataset["prompt"][0]
    model = make_student(tokenizer)  # the self-teacher equals the student at construction
    expected = direct_scores(tokenizer, model, model, dataset, teacher_texts, k=4)
    assert len(check_selection(trainer, dataset, expected, 0.25)) == 2


# ------------------------------------------------------------------------------------------------------ refusals
def test_the_fraction_must_be_zero_or_in_the_unit_interval(tmp_path):
    assert make_config(tmp_path).teacher_aligned_prompts == 0.0
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=r"--teacher_aligned_prompts.*must be 0 \(off\) or lie in \(0, 1\]"):
            make_config(tmp_path, teacher_aligned_prompts=bad, teacher_model="t")
    assert make_config(tmp_path, teacher_aligned_prompts=1.0, teacher_model="t").teacher_aligned_prompts == 1.0


def test_a_run_without_a_teacher_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="credit='grpo' and distill_loss='none' use no teacher"):
        make_config(tmp_path, credit="grpo", teacher_aligned_prompts=0.5)
    make_config(tmp_path, credit="grpo", distill_loss="jsd", teacher_aligned_prompts=0.5)  # a distillation loss
    staged = [{"until_step": 2, "credit": "opsd"}, {"credit": "grpo"}]  # a stage reads the teacher
    make_config(tmp_path, credit="grpo", stages=staged, teacher_aligned_prompts=0.5)


def test_sources_without_a_teacher_prompt_before_training_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="privileged_source='sibling'"):
        make_config(tmp_path, privileged_source="sibling", teacher_aligned_prompts=0.5)
    with pytest.raises(ConfigError, match="self-teacher shown the plain prompt"):
        make_config(tmp_path, privileged_source="none", teacher_aligned_prompts=0.5)
    make_config(tmp_path, privileged_source="none", teacher_model="t", teacher_aligned_prompts=0.5)
    make_config(tmp_path, privileged_source="both", teacher_aligned_prompts=0.5)


def test_a_streaming_dataset_is_refused(tokenizer, tmp_path, teacher_dir):
    stream = make_dataset(8).to_iterable_dataset()
    assert not isinstance(stream, Dataset)
    with pytest.raises(TypeError, match=r"teacher_aligned_prompts needs a datasets\.Dataset"):
        build_trainer(tokenizer, tmp_path, dataset=stream, teacher_model=str(teacher_dir), credit="opsd",
                      privileged_source="none", teacher_aligned_prompts=0.5)  # fmt: skip


def test_aligned_prompts_under_zero3_are_refused_before_the_policy_generates(tokenizer, tmp_path, monkeypatch):
    """Under ZeRO-3 the policy's parameters are not gathered while the trainer is built: the selection, which
    generates with the policy there, is refused before any generation (DeepSpeed itself cannot run here)."""
    from rlsd.trainer import RLSDTrainer

    monkeypatch.setattr(RLSDTrainer, "_zero_stage", lambda self: 3)
    model = make_model(tokenizer)
    calls = []
    monkeypatch.setattr(model, "generate", lambda *args, **kwargs: calls.append(1))
    with pytest.raises(NotImplementedError, match=r"teacher_aligned_prompts.*ZeRO-3"):
        build_trainer(tokenizer, tmp_path, model=model, teacher="initial", distill_overlap_k=4,
                      teacher_aligned_prompts=0.25)  # fmt: skip
    assert calls == []


# ------------------------------------------------------------------------------- the function, without a trainer
class EvalRecordingBigram(Bigram):
    """A `Bigram` student that records whether it was in train mode at each `generate`."""

    is_gradient_checkpointing = False

    def generate(self, *args, **kwargs):
        self.modes.append(self.training)
        return super().generate(*args, **kwargs)


def test_select_aligned_prompts_takes_values_and_uses_the_broadcast_scores(caplog):
    """`select_aligned_prompts` is given models, a tokenizer callable and a broadcast, no trainer: the teacher sees
    the rendered teacher prompt, the policy generates in eval mode and is put back in train mode, and the choice
    follows the main process's (broadcast) scores, not the local ones."""
    pairs = [("1 2", "2"), ("1 4", "4"), ("2", "2"), ("1 2", "4")]  # (prompt, answer): token ids as text
    dataset = Dataset.from_list([{"prompt": p, "solution": a, "id": i} for i, (p, a) in enumerate(pairs)])
    args = SimpleNamespace(privileged_column="solution", teacher_template="{prompt} {answer}", distill_overlap_k=2,
                           max_completion_length=3, per_device_train_batch_size=2, gradient_checkpointing_kwargs=None,
                           teacher_aligned_prompts=0.5)  # fmt: skip
    student = EvalRecordingBigram(STUDENT).train()
    student.modes = []
    sent = []

    def broadcast(objects):
        sent.append(objects[0])
        return [[0.0, 0.9, 0.1, 0.8]]  # the main process's scores

    with caplog.at_level("INFO", logger="rlsd.trainer"):
        selection = select_aligned_prompts(
            dataset, args, source=AnswerSource(args), has_images=False,
            tokenize_prompts=lambda prompts: ([[int(t) for t in p.split()] for p in prompts], None, None),
            model=student, policy=student, teacher=lambda: contextlib.nullcontext(Bigram(TEACHER)),
            pad_token_id=PAD, eos_token_id=EOS, synced_gpus=False, broadcast=broadcast,
        )  # fmt: skip
    # local scores as in the bigram test: the teacher's last prompt state is the appended answer
    assert sent == [pytest.approx([0.75, 0.0, 0.75, 0.25])]
    assert student.modes == [False, False] and student.training  # two batches of 2, in eval; train mode restored
    assert selection.keep == [1, 3]  # from the broadcast scores
    torch.testing.assert_close(selection.scores, torch.tensor([0.0, 0.9, 0.1, 0.8]))
    assert selection.dataset.to_list() == dataset.select([1, 3]).to_list()
    assert "kept 2 of 4 training prompts; mean top-2 overlap 0.8500 kept, 0.0500 dropped" in caplog.text
    with pytest.raises(NotImplementedError, match="text prompts only"):
        select_aligned_prompts(dataset, args, source=AnswerSource(args), has_images=True, tokenize_prompts=None,
                               model=student, policy=student, teacher=None, pad_token_id=PAD, eos_token_id=EOS,
                               synced_gpus=False)  # fmt: skip
