"""`teacher_prefix_sharing` under mixed precision: the prefix path scores under the same autocast as TRL's scoring
forward (`accelerator.autocast()`), so a bf16=True run on fp32 weights gives the teacher the student's precision."""

from __future__ import annotations

import torch
from conftest import build_trainer, make_dataset
from transformers import set_seed

from rlsd.step.scoring import score_tokens


def test_prefix_sharing_scores_under_the_trainers_autocast(tokenizer, tmp_path):
    """Live teacher shown the plain prompt (teacher == student), bf16=True, fp32 weights. The prefix path's
    log-probs equal `score_tokens` run by hand under CPU bf16 autocast (same ops, same shapes: bit-equal) and not the
    same call in fp32 (1e-3 apart: what the teacher got before). Against TRL's own student pass they agree only to
    bf16 rounding, not exactly: the cached prompt and the full row round differently (fp32: 5e-7)."""
    trainer = build_trainer(
        tokenizer, tmp_path, credit="rlsd", teacher="live", privileged_source="none", bf16=True,
        teacher_prefix_sharing=True, per_device_train_batch_size=8, rlsd_lambda_decay_steps=0,
    )  # fmt: skip
    assert next(trainer.model.parameters()).dtype == torch.float32
    dataset = make_dataset()
    rows = [dataset[i] for i in (0, 1) for _ in range(trainer.num_generations)]
    trainer.model.train()
    set_seed(0)
    output = trainer._generate_and_score_completions(rows)
    seen: list[int] = []
    trainer.model.model.register_forward_hook(lambda module, args, out: seen.append(out[0].size(0)))
    teacher = trainer.teacher_scores(rows, output).logps
    assert seen == [2, 8]  # the prefix path: both prompts once, then the 8 completions
    prompt_ids, prompt_mask, _, _ = trainer.teacher_inputs(rows, output, "train", None)
    assert torch.equal(prompt_ids, output["prompt_ids"])  # the teacher sees the student's prompt
    args = (prompt_ids, prompt_mask, output["completion_ids"], output["completion_mask"])
    options = {"temperature": trainer.temperature, "batch_size": 8, "group_size": 4, "fused_head": True}
    with trainer.scorer.scoring_model("teacher") as model:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = score_tokens(model, *args, **options).logps
        fp32 = score_tokens(model, *args, **options).logps
    mask = output["completion_mask"].bool()
    torch.testing.assert_close(teacher[mask], bf16[mask], atol=1e-6, rtol=0)
    assert (teacher - fp32)[mask].abs().max() > 1e-4  # the two precisions are apart: the check can fail
    student = trainer.score_rollout("student", output).logps
    torch.testing.assert_close(teacher[mask], student[mask], atol=1e-2, rtol=0)  # a few bf16 ulps of a logit
