"""RLSDTrainer against TRL's GRPOTrainer, teacher alignment, loss types, teacher modes, bad input and cost."""

from __future__ import annotations

import pytest
import torch
from conftest import build_trainer, config_kwargs, make_dataset, make_model, parity_reward
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from rlsd.context.templates import render_teacher_prompts

build = build_trainer


def logged(trainer, key: str) -> float:
    """The first logged value of `key`."""
    return next(entry[key] for entry in trainer.state.log_history if key in entry)


def train_loss(trainer) -> float:
    return logged(trainer, "loss")


@pytest.mark.parametrize("overrides", [{"credit": "grpo"}, {"credit": "rlsd", "rlsd_clip": 0.0}])
def test_parity_with_trl_grpo_trainer(tokenizer, tmp_path, overrides):
    ours = build(tokenizer, tmp_path / "ours", **overrides)
    ours.train()  # each trainer seeds the RNGs when built: build and train one after the other
    peer_args = GRPOConfig(**config_kwargs(tmp_path / "peer"))
    peer = GRPOTrainer(
        make_model(tokenizer), parity_reward, args=peer_args, train_dataset=make_dataset(), processing_class=tokenizer
    )
    peer.train()
    assert abs(train_loss(ours) - train_loss(peer)) <= 1e-6
    assert logged(ours, "grad_norm") == pytest.approx(logged(peer, "grad_norm"), rel=1e-6, abs=1e-7)
    assert logged(ours, "grad_norm") > 0
    for (name, p_ours), (_, p_peer) in zip(ours.model.named_parameters(), peer.model.named_parameters(), strict=True):
        assert (p_ours - p_peer).abs().max().item() <= 1e-6, name
    initial = make_model(tokenizer)
    moved = any(not torch.equal(a, b) for a, b in zip(ours.model.parameters(), initial.parameters(), strict=True))
    assert moved, "the optimizer step changed nothing: the parity check would be vacuous"


# ---------------------------------------------------------------------------------------------------- alignment
def teacher_pass(trainer, rows, output):
    """The trainer's teacher context and teacher pass on a hand-made rollout."""
    scores = trainer.teacher_scores(rows, output)
    return scores.logps, scores.entropy


def direct_teacher_logps(model, tokenizer, prompt_text: str, completion: list[int], temperature: float):
    """log p(y_t | teacher prompt, y_<t) from one unpadded forward returning full logits."""
    prompt_ids = tokenizer(prompt_text)["input_ids"]
    ids = torch.tensor([prompt_ids + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1] / temperature
    return torch.log_softmax(logits.double(), dim=-1).gather(1, torch.tensor(completion).unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("conversational", [False, True])
def test_teacher_logps_align_with_a_direct_forward(tokenizer, tmp_path, conversational):
    dataset = make_dataset(conversational=conversational)
    trainer = build(tokenizer, tmp_path, dataset=dataset, teacher="live", temperature=0.7)
    rows = [dataset[i] for i in (0, 1, 2)]  # prompts of three different lengths
    completions = [[10, 11, 12, 13, 14], [20, 21], [30, 31, 32]]
    width = max(map(len, completions))
    output = {
        "completion_ids": torch.tensor([c + [tokenizer.pad_token_id] * (width - len(c)) for c in completions]),
        "completion_mask": torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions]),
    }
    logps, entropy = teacher_pass(trainer, rows, output)
    assert entropy is None  # plain RLSD computes no teacher entropy
    teacher_prompts = render_teacher_prompts(
        [r["prompt"] for r in rows], trainer.args.teacher_template, {"answer": [r["solution"] for r in rows]}
    )
    for row, (prompt, completion) in enumerate(zip(teacher_prompts, completions, strict=True)):
        text = (
            tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            if conversational
            else prompt
        )
        expected = direct_teacher_logps(trainer.model, tokenizer, text, completion, temperature=0.7)
        torch.testing.assert_close(logps[row, : len(completion)].double(), expected, rtol=0, atol=2e-5)
        assert torch.equal(logps[row, len(completion) :], torch.zeros(width - len(completion)))


# --------------------------------------------------------------------------------------------------- loss types
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"])
def test_a_training_step_runs_under_every_loss_type(tokenizer, tmp_path, loss_type):
    trainer = build(tokenizer, tmp_path, loss_type=loss_type, teacher="live")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert torch.isfinite(torch.tensor(logged(trainer, "loss")))
    assert logged(trainer, "rlsd/weight_mean") > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def test_student_logps_come_from_trl_old_logps_when_available(tokenizer, tmp_path):
    trainer = build(tokenizer, tmp_path, num_iterations=2, max_steps=2, teacher="live")
    trainer.train()
    batch = trainer._buffered_inputs[0]
    assert "old_per_token_logps" in batch
    assert "rlsd_teacher_logps" not in batch  # the credit was final at rollout time
    assert batch["advantages"].shape == batch["completion_ids"].shape
    assert logged(trainer, "rlsd/weight_mean") > 0


# ------------------------------------------------------------------------------------------------ teacher modes
class Snapshots(TrainerCallback):
    """Copies of the policy's and the teacher's parameters after every optimizer step."""

    def __init__(self, trainer):
        self.trainer, self.policy, self.teacher = trainer, [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.policy.append([p.detach().clone() for p in self.trainer.model.parameters()])
        self.teacher.append([p.detach().clone() for p in self.trainer.teacher.model.parameters()])


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_synced_teacher_copies_exactly_at_the_sync_step_and_not_between(tokenizer, tmp_path):
    trainer = build(tokenizer, tmp_path, teacher="synced", teacher_sync_steps=2, max_steps=3)
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    snapshots = Snapshots(trainer)
    trainer.add_callback(snapshots)
    trainer.train()
    policy, teacher = snapshots.policy, snapshots.teacher
    assert same(teacher[0], initial) and not same(teacher[0], policy[0])  # step 1: still the initial model
    assert same(teacher[1], policy[1])  # step 2: hard copy
    assert same(teacher[2], policy[1]) and not same(teacher[2], policy[2])  # step 3: unchanged
    synced = [e["rlsd/teacher_synced"] for e in trainer.state.log_history if "rlsd/teacher_synced" in e]
    assert synced == [0.0, 1.0, 0.0]


def test_ema_teacher_follows_the_policy_by_its_decay(tokenizer, tmp_path):
    trainer = build(tokenizer, tmp_path, teacher="ema", teacher_ema_decay=0.9)
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    snapshots = Snapshots(trainer)
    trainer.add_callback(snapshots)
    trainer.train()
    for start, policy, teacher in zip(initial, snapshots.policy[0], snapshots.teacher[0], strict=True):
        torch.testing.assert_close(teacher, 0.9 * start + 0.1 * policy)


def test_initial_teacher_never_changes(tokenizer, tmp_path):
    trainer = build(tokenizer, tmp_path, teacher="initial", max_steps=2)
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    snapshots = Snapshots(trainer)
    trainer.add_callback(snapshots)
    trainer.train()
    assert same(snapshots.teacher[-1], initial) and not same(snapshots.policy[-1], initial)


def test_live_teacher_adds_no_parameters_and_runs_on_the_policy(tokenizer, tmp_path):
    trainer = build(tokenizer, tmp_path, teacher="live")
    assert trainer.teacher.model is None
    calls = count_scoring_forwards(trainer.model)
    trainer.train()
    assert calls == [2]  # the teacher pass and the loss forward, both on the policy module


def test_initial_teacher_with_peft_is_the_base_model_without_a_copy(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer = build(tokenizer, tmp_path, model=model, teacher="initial", max_steps=2)
    assert trainer.teacher.model is None and trainer.teacher.uses_disabled_adapter
    trainer.train()
    rows = [make_dataset()[0]]
    output = {"completion_ids": torch.tensor([[10, 11, 12]]), "completion_mask": torch.ones(1, 3, dtype=torch.long)}
    teacher, _ = teacher_pass(trainer, rows, output)
    with trainer.model.disable_adapter():
        base = trainer._get_per_token_logps_and_entropies(*teacher_inputs(trainer, rows, output))[0]
    adapted = trainer._get_per_token_logps_and_entropies(*teacher_inputs(trainer, rows, output))[0]
    torch.testing.assert_close(teacher, base)
    assert not torch.allclose(teacher, adapted)


def teacher_inputs(trainer, rows, output):
    """(model, ids, mask, logits_to_keep) of the teacher sequence for a single unpadded row."""
    answers = {"answer": [rows[0]["solution"]]}
    prompt = render_teacher_prompts([rows[0]["prompt"]], trainer.args.teacher_template, answers)
    prompt_ids = torch.tensor([trainer.processing_class(prompt[0])["input_ids"]])
    ids = torch.cat([prompt_ids, output["completion_ids"]], dim=1)
    return trainer.model, ids, torch.ones_like(ids), output["completion_ids"].size(1)


def test_resume_restores_the_synced_teacher_and_continues_exactly(tokenizer, tmp_path):
    # The teacher is synced at step 3 and saved with checkpoint-3; step 4 does not sync, so the final teacher is
    # the policy after step 3 only if resuming restored it (a fresh trainer's teacher is the initial model).
    settings = dict(teacher="synced", teacher_sync_steps=3, max_steps=4, save_strategy="steps", save_steps=3)
    straight = build(tokenizer, tmp_path / "straight", **settings)
    straight.train()
    resumed = build(tokenizer, tmp_path / "resumed", **settings)
    assert not same(list(resumed.teacher.model.parameters()), list(straight.teacher.model.parameters()))
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert (checkpoint / "rlsd_teacher.pt").exists()
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.teacher.last_sync_step == straight.teacher.last_sync_step == 3
    assert same(list(resumed.model.parameters()), list(straight.model.parameters()))
    assert same(list(resumed.teacher.model.parameters()), list(straight.teacher.model.parameters()))


# -------------------------------------------------------------------------------------------------------- cost
def count_scoring_forwards(*modules) -> list[int]:
    """Per optimizer step, the number of log-prob forwards (TRL's fused head) through `modules`.

    Generation calls the model too, but never with `fused_lm_head=True`, so it is not counted.
    """
    counts = [0]

    def hook(module, args, kwargs):
        if kwargs.get("fused_lm_head"):
            counts[-1] += 1

    for module in modules:
        module.register_forward_pre_hook(hook, with_kwargs=True)
    return counts


class StepCounter(TrainerCallback):
    """Starts a new count at the end of every optimizer step."""

    def __init__(self, counts):
        self.counts = counts

    def on_step_end(self, args, state, control, **kwargs):
        self.counts.append(0)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"credit": "grpo"}, [1, 1, 1]),
        ({"credit": "rlsd", "teacher": "synced"}, [2, 2, 2]),
        ({"credit": "rlsd", "teacher": "live"}, [2, 2, 2]),
        ({"credit": "rlsd", "teacher": "live", "rlsd_lambda_decay_steps": 1}, [2, 1, 1]),  # lam: 0.5, 0, 0
        ({"credit": "rlsd", "rlsd_clip": 0.0}, [1, 1, 1]),
        ({"credit": "opsd", "teacher": "live"}, [2, 2, 2]),
    ],
)
def test_rlsd_adds_exactly_one_forward_pass_per_step(tokenizer, tmp_path, config, expected):
    trainer = build(tokenizer, tmp_path, max_steps=3, **config)
    modules = [trainer.model] + ([trainer.teacher.model] if trainer.teacher and trainer.teacher.model else [])
    counts = count_scoring_forwards(*modules)
    trainer.add_callback(StepCounter(counts))
    trainer.train()
    assert counts[:3] == expected
