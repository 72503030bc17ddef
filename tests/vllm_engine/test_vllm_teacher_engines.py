"""A served teacher with an engine of its own (`teacher_backend="vllm"`, `rlsd.engines.vllm_teacher.TeacherEngine`):
an external teacher (`teacher_model`) loaded by a second vLLM engine, and the synced self-teacher, a second engine
pushed the trainer's synced copy at the first teacher pass after each sync. Each trainer holds two vLLM engines in one
CPU process (TRL's generation engine and the teacher's), both used at every step.

Without vLLM (the project's `.venv`, CI's `make test`) the module is skipped (`make test-vllm` runs it).
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest

pytest.importorskip("vllm.platforms", reason="vLLM is not installed: `make test-vllm` runs these tests in .venv-vllm")
pytestmark = pytest.mark.vllm
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine (vLLM's CPU default takes more)

import torch  # noqa: E402
from conftest import config_kwargs, make_dataset, make_head64_model, parity_reward  # noqa: E402

from rlsd import RLSDConfig, RLSDTrainer  # noqa: E402
from rlsd.engines.vllm_teacher import ServedTeacher, TeacherEngine  # noqa: E402

LOGP_TOLERANCE = 0.03
"""Max |vLLM log-prob - trainer log-prob| per token, as in `test_vllm_colocate.py` (vLLM's CPU backend runs the
float32 checkpoint in bfloat16, the trainer in float32)."""
STALE = 0.3
"""At least this far apart: an engine holding other weights (the policy's, or the teacher's before a sync)."""
FIXED_TEXT = "Q: 3+4*11=47, so the answer is 47."
VLLM = dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.1, vllm_max_model_length=256)


def tiny_head64(tokenizer, seed: int, noise: float = 0.0):
    """`make_head64_model` with `seed`; `noise` moves every weight by that much Gaussian noise, so that its log-probs
    are far from another seed's (a random init is near uniform)."""
    model = make_head64_model(tokenizer, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """The policy's folder and an external teacher's (another seed, moved by noise), with the same tokenizer."""
    saved = []
    for name, seed, noise in (("policy", 0, 0.0), ("teacher", 1, 0.05)):
        folder = tmp_path_factory.mktemp(name)
        tiny_head64(tokenizer, seed, noise).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        saved.append(folder)
    return saved


def build(folder, tmp_path, tokenizer, **overrides) -> RLSDTrainer:
    """An RLSD trainer generating with vLLM whose teacher (shown the answer) is served by vLLM."""
    args = RLSDConfig(**config_kwargs(tmp_path, credit="rlsd", teacher_backend="vllm", privileged_source="answer",
                                      **VLLM, **overrides))  # fmt: skip
    return RLSDTrainer(str(folder), parity_reward, args=args, train_dataset=make_dataset(), processing_class=tokenizer)


def counted_pushes(engine: TeacherEngine) -> list[int]:
    """The teacher's `last_sync_step` at every push into `engine` (TRL's `sync_weights` on the teacher's copy)."""
    pushes, sync = [], engine.generation.sync_weights

    def counted():
        pushes.append(engine.teacher.last_sync_step)
        return sync()

    engine.generation.sync_weights = counted
    return pushes


def fixed_rows(tokenizer):
    """FIXED_TEXT as one row: its first token the prompt, the rest the completion (ids and masks)."""
    ids = tokenizer(FIXED_TEXT)["input_ids"]
    prompt, completion = torch.tensor([ids[:1]]), torch.tensor([ids[1:]])
    return prompt, torch.ones_like(prompt), completion, torch.ones_like(completion)


def in_trainer_teacher(trainer, prompt, prompt_mask, completion, completion_mask) -> torch.Tensor:
    """The trainer's own teacher pass (its scorer without the served teacher) on the rows."""
    scorer = dataclasses.replace(trainer.scorer, served=None)
    batch = {"completion_ids": completion, "completion_mask": completion_mask}
    return scorer.score("teacher", prompt, prompt_mask, batch, {}).logps


def rollout_gap(trainer) -> torch.Tensor:
    """|served - in-trainer| teacher log-probs on the completion tokens of one training rollout (one prompt, four
    completions by vLLM)."""
    trainer.model.train()
    inputs = [trainer.train_dataset[0]] * trainer.num_generations
    output = trainer._generate_and_score_completions(inputs)
    prompt_ids, prompt_mask, types, _ = trainer.teacher_inputs(inputs, output)
    served = trainer.scorer.teacher_rows(output, prompt_ids, prompt_mask, types, None, entropy=False).logps
    local = dataclasses.replace(trainer.scorer, served=None)
    local = local.teacher_rows(output, prompt_ids, prompt_mask, types, None, entropy=False).logps
    mask = output["completion_mask"].bool()
    assert (served[~mask] == 0).all()
    return (served - local)[mask].abs()


def assert_trained(trainer, steps: int) -> None:
    """`steps` logged steps, finite, with RLSD's credit (the teacher, shown the answer, is not the policy)."""
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == steps
    for entry in logs:
        assert all(math.isfinite(v) for v in entry.values() if isinstance(v, float)), entry
        assert entry["rlsd/delta_mean"] != 0.0 and "sampling/importance_sampling_ratio/mean" in entry


# ------------------------------------------------------------------------------------------- external teacher
@pytest.fixture(scope="module")
def external(folders, tmp_path_factory, tokenizer):
    policy, teacher = folders
    trainer = build(policy, tmp_path_factory.mktemp("external"), tokenizer, teacher_model=str(teacher), max_steps=1)
    engine = trainer.scorer.served.engine
    assert isinstance(engine, TeacherEngine) and engine().llm is not trainer.vllm_generation.llm  # a second engine
    pushes = counted_pushes(engine)
    trainer.train()
    return trainer, pushes


def test_a_served_external_teacher_trains_and_is_never_pushed(external):
    trainer, pushes = external
    assert trainer.teacher.mode == "external"
    assert_trained(trainer, 1)
    assert pushes == []  # loaded from its folder; frozen


def test_a_served_external_teacher_equals_the_in_trainer_external_teacher(external, tokenizer):
    trainer, _ = external
    gap = rollout_gap(trainer)
    assert gap.max() <= LOGP_TOLERANCE
    rows = fixed_rows(tokenizer)
    served = ServedTeacher(trainer.scorer.served.engine)(*rows)
    assert (served - in_trainer_teacher(trainer, *rows)).abs().max() <= LOGP_TOLERANCE
    policy_engine = ServedTeacher(lambda: trainer.vllm_generation)(*rows)  # the policy's weights (generation engine)
    assert (served - policy_engine).abs().max() > STALE  # the teacher engine holds the teacher, not the policy
    print(f"\nserved external teacher vs in-trainer: max {gap.max().item():.5f}, mean {gap.mean().item():.5f} nats "
          f"over {gap.numel()} rollout tokens")  # fmt: skip


# --------------------------------------------------------------------------------------------- synced teacher
@pytest.fixture(scope="module")
def synced(folders, tmp_path_factory, tokenizer):
    trainer = build(folders[0], tmp_path_factory.mktemp("synced"), tokenizer, teacher="synced", teacher_sync_steps=1,
                    max_steps=2)  # fmt: skip
    engine = trainer.scorer.served.engine
    assert isinstance(engine, TeacherEngine) and engine().llm is not trainer.vllm_generation.llm
    pushes = counted_pushes(engine)
    trainer.train()
    return trainer, pushes


def test_a_served_synced_teacher_trains_and_is_pushed_at_the_pass_after_each_sync(synced):
    trainer, pushes = synced
    assert_trained(trainer, 2)
    # step 1's teacher pass pushes the copy (first use), step 2's the copy synced after step 1; the sync after the
    # last step waits for a next pass
    assert pushes == [0, 1] and trainer.teacher.last_sync_step == 2
    assert trainer.scorer.served.engine.pushed_step == 1


def test_the_synced_engine_is_stale_before_a_push_and_equals_the_synced_teacher_after(synced, tokenizer):
    trainer, pushes = synced
    engine = trainer.scorer.served.engine
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    step = trainer.teacher.last_sync_step + 1
    assert trainer.teacher.on_optimizer_step(step, trainer.accelerator.unwrap_model(trainer.model))  # synced
    rows = fixed_rows(tokenizer)
    teacher = in_trainer_teacher(trainer, *rows)
    unpushed = ServedTeacher(engine)(*rows)  # no `follow`: what the engine holds now
    stale = (unpushed - teacher).abs().max()
    assert engine.follow() and not engine.follow()  # one push, then nothing changed
    pushed = (ServedTeacher(engine)(*rows) - teacher).abs().max()
    print(f"\nsynced engine vs the trainer's synced teacher: before the push {stale:.4f}, after {pushed:.5f} nats")
    assert stale > STALE
    assert pushed <= LOGP_TOLERANCE
    assert pushes[-1] == step
    gap = rollout_gap(trainer)  # the scorer's path (it pushes when needed: nothing changed here)
    assert gap.max() <= LOGP_TOLERANCE and pushes[-1] == step


# ------------------------------------------------------------------------------------------------ EMA teacher
def test_a_served_ema_teacher_is_pushed_at_every_step_and_equals_the_trainers_ema(folders, tmp_path, tokenizer):
    """The EMA copy changes after every optimizer step, so each teacher pass pushes it; after the last step's update
    the next pass pushes again and the engine equals the trainer's EMA teacher."""
    trainer = build(folders[0], tmp_path, tokenizer, teacher="ema", teacher_ema_decay=0.5, max_steps=2)
    engine = trainer.scorer.served.engine
    pushes = counted_pushes(engine)
    trainer.train()
    assert_trained(trainer, 2)
    assert pushes == [0, 1] and trainer.teacher.last_sync_step == 2
    rows = fixed_rows(tokenizer)
    served = trainer.scorer.served(*rows)  # the scorer's call: pushes the copy updated after step 2 first
    assert pushes == [0, 1, 2]
    assert (served - in_trainer_teacher(trainer, *rows)).abs().max() <= LOGP_TOLERANCE
