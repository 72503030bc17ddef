"""SOD and Uni-OPD with a frozen external teacher (`teacher_model`), by hand: the sampled-token log-probs of a
hand-made rollout come from plain forwards of the two models (log_softmax, gather), and the token advantages from the
rules' formulas written out here in float64, against the trainer's public scoring and credit methods."""

from __future__ import annotations

import pytest
import torch
from conftest import build_trainer, make_dataset, make_model

from rlsd.context.templates import render_teacher_prompts
from rlsd.step.batch import scalar

TEMPERATURE = 0.7
GROUP = 4
# two groups of four completions; A_i as TRL would hand them over (group 0 mixes correct and incorrect, group 1 has
# no incorrect completion, so Uni-OPD never shifts it)
SEQ_ADVANTAGES = [1.5, -0.5, -0.5, -0.5, 0.8, 0.8, 0.0, 0.8]
COMPLETIONS = [[40, 41, 42, 43, 44], [50, 51], [60, 61, 62], [70], [80, 81, 82, 83], [90, 91, 92], [100, 101],
               [110, 111, 112, 113, 114]]  # fmt: skip


def make_student(tokenizer):
    """The tiny student (freshly initialised, seed 0: small logits, so float32 rounding stays near 1e-7)."""
    return make_model(tokenizer)


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    return ids, torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])


def right_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    return ids, torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])


def direct_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(y_t | prompt, y_<t) at the sampling temperature: one unpadded plain forward, log_softmax, gather."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double() / TEMPERATURE
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion).unsqueeze(1)).squeeze(1)


def hand_rollout(tokenizer, trainer, source: str):
    """Two prompts, four completions each, as TRL's rollout lays them out (groups of consecutive rows); the direct
    teacher and student log-probs of every completion, float64, per row."""
    dataset = make_dataset(2)
    rows = [dataset[i // GROUP] for i in range(2 * GROUP)]
    prompts = [tokenizer(row["prompt"])["input_ids"] for row in rows]
    prompt_ids, prompt_mask = left_padded(prompts, tokenizer.pad_token_id)
    completion_ids, completion_mask = right_padded(COMPLETIONS, tokenizer.pad_token_id)
    output = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask}  # fmt: skip
    fields = {"answer": [row["solution"] for row in rows]} if source == "answer" else {}
    teacher_texts = render_teacher_prompts([row["prompt"] for row in rows], trainer.args.teacher_template, fields)
    student = make_student(tokenizer).eval()  # the trainer's student, rebuilt: same seed, same noise
    teacher = trainer.teacher.model
    tau = [direct_logps(teacher, tokenizer(text)["input_ids"], c) for text, c in zip(teacher_texts, COMPLETIONS,
                                                                                     strict=True)]  # fmt: skip
    s = [direct_logps(student, p, c) for p, c in zip(prompts, COMPLETIONS, strict=True)]
    return rows, output, tau, s


def trainer_advantages(trainer, rows, output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The trainer's teacher and student log-probs (its public scoring passes) and its token advantages."""
    trainer.model.train()  # the training group size
    teacher_logps = trainer.teacher_scores(rows, output).logps
    student_logps = trainer.score_rollout("student", output).logps
    batch = {
        **output,
        "rlsd_seq_advantages": torch.tensor(SEQ_ADVANTAGES),
        "rlsd_teacher_logps": teacher_logps,
        "rlsd_has_context": torch.ones(len(rows), dtype=torch.bool),
        "rlsd_lam": scalar(0.5),
    }
    return teacher_logps, student_logps, trainer.token_advantages(batch, student_logps, "train")


def check_scores(teacher_logps, student_logps, tau, s) -> list[torch.Tensor]:
    """The trainer's log-probs equal the direct ones; Delta_t = tau_t - s_t per row (float64), visibly non-zero."""
    deltas = []
    for row, completion in enumerate(COMPLETIONS):
        n = len(completion)
        torch.testing.assert_close(teacher_logps[row, :n].double(), tau[row], rtol=0, atol=2e-5)
        torch.testing.assert_close(student_logps[row, :n].double(), s[row], rtol=0, atol=2e-5)
        deltas.append(tau[row] - s[row])
    assert min(d.abs().max().item() for d in deltas) > 1e-2  # a different teacher: Delta is not 0
    return deltas


def padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    return torch.stack([torch.cat([r, torch.zeros(width - len(r), dtype=r.dtype)]) for r in rows])


@pytest.mark.parametrize("source", ["none", "answer"])
@pytest.mark.parametrize("knobs", [{"sod_c": 0.7, "sod_delta": 0.2, "sod_eps": 1e-6}, {"sod_c": 2.5}])
def test_sod_with_an_external_teacher_by_hand(tokenizer, tmp_path, teacher_dir, source, knobs):
    trainer = build_trainer(tokenizer, tmp_path, model=make_student(tokenizer), teacher_model=str(teacher_dir),
                            credit="sod", privileged_source=source, temperature=TEMPERATURE,
                            per_device_train_batch_size=8, num_generations=GROUP, **knobs)  # fmt: skip
    rows, output, tau, s = hand_rollout(tokenizer, trainer, source)
    teacher_logps, student_logps, advantages = trainer_advantages(trainer, rows, output)
    deltas = check_scores(teacher_logps, student_logps, tau, s)
    c, delta, eps = trainer.args.sod_c, trainer.args.sod_delta, trainer.args.sod_eps
    assert c == knobs["sod_c"]
    expected = []
    for a_i, d in zip(SEQ_ADVANTAGES, deltas, strict=True):
        # single-turn text: one step, k = 1, over every completion token: d_1 = d_k = mean |Delta|
        d_1 = d_k = d.abs().mean().item()
        w = min((d_1 + eps) / (d_k + eps), 1.0 + delta)  # = 1
        expected.append(a_i + c * w * d)  # A_it = A_i + c * w_k(t) * Delta_t
    expected = padded(expected, output["completion_ids"].size(1))
    torch.testing.assert_close(advantages.double(), expected, rtol=0, atol=1e-5)
    assert (advantages[output["completion_mask"] == 0] == 0).all()


@pytest.mark.parametrize("source", ["none", "answer"])
@pytest.mark.parametrize("margin", [5.0, 0.4, -5.0])
def test_uni_opd_with_an_external_teacher_by_hand(tokenizer, tmp_path, teacher_dir, source, margin):
    trainer = build_trainer(tokenizer, tmp_path, model=make_student(tokenizer), teacher_model=str(teacher_dir),
                            credit="uni-opd", privileged_source=source, temperature=TEMPERATURE,
                            uniopd_margin=margin, per_device_train_batch_size=8, num_generations=GROUP)  # fmt: skip
    rows, output, tau, s = hand_rollout(tokenizer, trainer, source)
    teacher_logps, student_logps, advantages = trainer_advantages(trainer, rows, output)
    deltas = check_scores(teacher_logps, student_logps, tau, s)
    expected = [d.clone() for d in deltas]  # a_it = Delta_t
    shifted = []
    for start in range(0, len(deltas), GROUP):
        group = range(start, start + GROUP)
        correct = [i for i in group if SEQ_ADVANTAGES[i] > 0]
        wrong = [i for i in group if SEQ_ADVANTAGES[i] < 0]
        if not correct or not wrong:
            continue
        mean_correct = sum(deltas[i].mean().item() for i in correct) / len(correct)
        mean_wrong = sum(deltas[i].mean().item() for i in wrong) / len(wrong)
        shortfall = margin - (mean_correct - mean_wrong)
        if shortfall > 0:
            for i in correct:
                expected[i] = expected[i] + shortfall / 2
            for i in wrong:
                expected[i] = expected[i] - shortfall / 2
            shifted.append(start // GROUP)
    # margins of +-5 nats decide the shift whatever the models say; group 1 has no incorrect completion
    assert shifted == {5.0: [0], -5.0: []}.get(margin, shifted)
    expected = padded(expected, output["completion_ids"].size(1))
    torch.testing.assert_close(advantages.double(), expected, rtol=0, atol=1e-5)
    assert (advantages[output["completion_mask"] == 0] == 0).all()
    assert trainer._metrics["train"]["rlsd/uniopd_shifted_groups"][-1] == len(shifted)
