"""Run by `torchrun --nproc_per_node 2` in test_cli (accelerate's multi-CPU equivalent: it reads torchrun's
environment and uses gloo): two RLSD steps, one JSON report per rank. Mode `family`: one group of four completions
spans both ranks, the teacher sees the answer and a successful sibling, and a JSD distillation term is trained.
Mode `uniopd`: Uni-OPD with groups of four completions straddling the two ranks (two rows each); the rule's gathered
inputs and each rank's share of its output are recorded. Modes `brts` and `pbsd`: GRPO plus the teacher-rollout term
(two teacher samples per prompt, the teacher shown the answer), groups straddling the ranks."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import zlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlsd import RLSDConfig, RLSDTrainer
from rlsd.data.datasets import load_rlsd_dataset
from rlsd.data.rewards import completion_text, resolve_reward
from rlsd.step.assign import CreditAssembler


def checksum_reward(completions, **kwargs):
    """A reward with spread inside every group, so that the two steps really update the policy."""
    return [float(zlib.crc32(completion_text(c).encode()) % 2) for c in completions]


def first_of_rank0_reward(completions, **kwargs):
    """Only rank 0's first completion succeeds: rank 1's rows must find their sibling on the other process."""
    rank = torch.distributed.get_rank()
    return [1.0 if rank == 0 and i == 0 else 0.0 for i in range(len(completions))]


def checksum(module) -> float:
    return float(sum(p.detach().double().sum() for p in module.parameters()))


def main(model_dir: str, data: str, out: str, mode: str = "rlsd") -> None:
    family = mode == "family"
    extra = dict(privileged_source="both", distill_loss="jsd", per_device_train_batch_size=2) if family else {}
    if mode == "uniopd":
        extra = dict(credit="uni-opd", per_device_train_batch_size=2)
    if mode in ("brts", "pbsd"):
        extra = dict(credit="grpo", teacher_rollout_loss=mode, teacher_rollouts=2, per_device_train_batch_size=2)
    args = RLSDConfig(**{
        **dict(output_dir=out, max_steps=2, per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
               learning_rate=1e-2, teacher="synced", teacher_sync_steps=2, rlsd_lambda_decay_steps=2, use_cpu=True,
               bf16=False, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0),
        **extra,
    })  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    initial = checksum(model)
    trainer = RLSDTrainer(
        model,
        first_of_rank0_reward if family else [checksum_reward, resolve_reward("integer_match")],
        args=args,
        train_dataset=load_rlsd_dataset(data),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    contexts: list[dict] = []
    if family:  # record what the sibling source shows each row
        siblings = trainer.source.siblings

        def recorded(view):
            texts, found = siblings(view)
            own = list(view.completion_texts[view.offset : view.offset + len(view.rows)])
            contexts.append({"own": own, "siblings": texts, "found": found})
            return texts, found

        trainer.source.siblings = recorded
    groups: list[dict] = []
    if mode == "uniopd":  # record the rule's global inputs and what this rank keeps of its output

        def recording(rule_fn):
            def recording_rule(signals, params):
                token_adv, metrics = rule_fn(signals, params)
                groups.append({"group_ids": signals.group_ids.tolist(), "seq": signals.seq_advantages.tolist(),
                               "rule_output": token_adv.tolist()})  # fmt: skip
                return token_adv, metrics

            return recording_rule

        class RecordingAssembler(CreditAssembler):
            def rule_on_global_groups(self, rule_fn, signals, params, mode):
                local, metrics = super().rule_on_global_groups(recording(rule_fn), signals, params, mode)
                groups[-1]["local_output"] = local.tolist()
                groups[-1]["local_seq"] = signals.seq_advantages.tolist()
                return local, metrics

        values = {item.name: getattr(trainer.credit, item.name) for item in dataclasses.fields(trainer.credit)}
        trainer.credit = RecordingAssembler(**values)
        trainer.rollout = dataclasses.replace(trainer.rollout, credit=trainer.credit)  # the rollout's assembler too
    trainer.train()
    history = trainer.state.log_history
    report = {
        "world_size": trainer.accelerator.num_processes,
        "lambda": [e["rlsd/lambda"] for e in history if "rlsd/lambda" in e],
        "synced": [e["rlsd/teacher_synced"] for e in history if "rlsd/teacher_synced" in e],
        "initial_checksum": initial,
        "teacher_checksum": checksum(trainer.teacher.model),
        "policy_checksum": checksum(trainer.model),
        "contexts": contexts,
        "distill_loss": [e["rlsd/distill_loss"] for e in history if "rlsd/distill_loss" in e],
        "rollout_loss": [e["rlsd/teacher_rollout_loss"] for e in history if "rlsd/teacher_rollout_loss" in e],
        "groups": groups,
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    rank = trainer.accelerator.process_index
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.barrier() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    main(*sys.argv[1:5])
    # exit without tearing gloo down: its teardown at interpreter exit aborts now and then ("terminate called
    # without an active exception") after the report is written and every rank has passed the barrier
    sys.stdout.flush()
    os._exit(0)
