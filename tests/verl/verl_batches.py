"""Micro-batches built as verl 0.9.1 builds them for its actor update, from tiny bigram "models" (a (V, V) logit
table): left-padded prompts and right-padded responses, GRPO advantages from `compute_grpo_outcome_advantage`, the
teacher's log-probs through verl's own `extract_prompt_logprobs` (vLLM's `prompt_logprobs=0` output) and
`_pad_teacher_outputs`, converted by `left_right_2_no_padding`, and the student's log-probs in the FSDP engine's
no-padding layout (log p of token j+1 at packed position j, a jagged tensor). verl's config comes from its own yaml
through Hydra, as its trainer composes it. Imported only where verl is installed (tests/verl)."""

from __future__ import annotations

import ast
import itertools
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import verl
from hydra import compose, initialize_config_module
from tensordict import TensorDict
from verl import DataProto
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.model import compute_position_id_with_mask
from verl.utils.torch_functional import logprobs_from_logits
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

VOCAB = 13
PAD = 0
VERL_DIR = Path(verl.__file__).parent


def verl_function(relative_path: str, name: str) -> Any:
    """A function of verl's source, executed on its own: `extract_prompt_logprobs` and `_pad_teacher_outputs` live in
    modules whose imports need vLLM and verl's server extras, which this CPU venv does not install."""
    tree = ast.parse((VERL_DIR / relative_path).read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace: dict[str, Any] = {"torch": torch, "F": F, "Optional": Any, "RequestOutput": Any}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(VERL_DIR / relative_path), "exec"), namespace)
    return namespace[name]


extract_prompt_logprobs = verl_function("workers/rollout/vllm_rollout/utils.py", "extract_prompt_logprobs")
pad_teacher_outputs = verl_function("experimental/teacher_loop/teacher_manager.py", "_pad_teacher_outputs")


def verl_configs(*overrides: str) -> tuple[Any, Any]:
    """verl's actor and distillation configs, composed from its `ppo_trainer.yaml` with `loss_mode=rlsd` (and the
    settings the rlsd loss needs), then `overrides`, and built into dataclasses as verl's workers build them."""
    base = [
        "distillation.enabled=True",
        "distillation.distillation_loss.loss_mode=rlsd",
        "distillation.distillation_loss.use_policy_gradient=True",
        "distillation.nnodes=1",
        "distillation.n_gpus_per_node=2",
        "distillation.teacher_models.teacher_model.model_path=teacher",
        "actor_rollout_ref.rollout.n=3",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=6",
    ]
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(config_name="ppo_trainer", overrides=[*base, *overrides])
    return omega_conf_to_dataclass(config.actor_rollout_ref.actor), omega_conf_to_dataclass(config.distillation)


@dataclass
class Batch:
    """A micro-batch `data` in verl's no-padding layout and what the project's credit reads of it: the (B,) GRPO
    advantages A_i and the (B, R) response mask, teacher and student log-probs (padded)."""

    data: TensorDict
    seq_advantages: torch.Tensor
    mask: torch.Tensor
    teacher_logps: torch.Tensor
    student_logps: torch.Tensor


def student_log_probs(table: torch.Tensor, data: TensorDict) -> torch.Tensor:
    """The FSDP engine's `model_output["log_probs"]` (no padding): log p(token j+1 | token j) at packed position j,
    labels rolled as the engine rolls them, as a jagged tensor over verl's `cu_seqlens`."""
    input_ids = data["input_ids"]
    values = input_ids.values()
    labels = torch.roll(values, shifts=-1, dims=0)
    log_probs = logprobs_from_logits(logits=table[values], labels=labels)
    return torch.nested.nested_tensor_from_jagged(log_probs, input_ids.offsets())


def teacher_outputs(table: torch.Tensor, prompt: list[int], response: list[int], widths: tuple[int, int]) -> tuple:
    """The teacher's (ids, log-probs) rows of one sequence as verl's teacher loop builds them: vLLM's
    `prompt_logprobs` of [prompt ; response] (None first, then log p(token i | token i-1)), through verl's
    `extract_prompt_logprobs` and `_pad_teacher_outputs`."""
    sequence = prompt + response
    log_softmax = torch.log_softmax(table.double(), dim=-1)
    prompt_logprobs = [None] + [
        {token: types.SimpleNamespace(logprob=log_softmax[previous, token].item(), rank=1)}
        for previous, token in itertools.pairwise(sequence)
    ]
    result: dict[str, list] = {}
    extract_prompt_logprobs(types.SimpleNamespace(prompt_logprobs=prompt_logprobs), 0, result)
    teacher_ids = torch.tensor(result["prompt_ids"], dtype=torch.int32)
    teacher_logprobs = torch.tensor(result["prompt_logprobs"])
    return pad_teacher_outputs(
        teacher_ids, teacher_logprobs, prompt_width=widths[0], response_width=widths[1],
        prompt_length=len(prompt), response_length=len(response), pad_token_id=PAD,
    )  # fmt: skip


def build_batch(student: torch.Tensor, teacher: torch.Tensor, *, seed: int = 0, groups: int = 2, n: int = 3) -> Batch:
    """`groups` prompts with `n` responses each, rewards 0/1 on the last response token, as verl's actor update
    receives them (one micro-batch, one data-parallel rank, on-policy: `old_log_probs` are the student's)."""
    generator = torch.Generator().manual_seed(seed)
    rows = groups * n
    prompts = [torch.randint(1, VOCAB, (int(torch.randint(2, 5, (1,), generator=generator)),), generator=generator)
               for _ in range(groups) for _ in range(n)]  # fmt: skip
    responses = [torch.randint(1, VOCAB, (int(torch.randint(1, 6, (1,), generator=generator)),), generator=generator)
                 for _ in range(rows)]  # fmt: skip
    widths = (max(len(p) for p in prompts), max(len(r) for r in responses))
    prompt_ids = torch.full((rows, widths[0]), PAD)
    response_ids = torch.full((rows, widths[1]), PAD)
    prompt_mask = torch.zeros(rows, widths[0], dtype=torch.int64)
    response_mask = torch.zeros(rows, widths[1], dtype=torch.int64)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        prompt_ids[row, widths[0] - len(prompt) :] = prompt
        prompt_mask[row, widths[0] - len(prompt) :] = 1
        response_ids[row, : len(response)] = response
        response_mask[row, : len(response)] = 1
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    rewards = torch.zeros(rows, widths[1])
    scores = torch.randint(0, 2, (rows,), generator=generator).float()
    scores[:n] = torch.tensor([1.0, 0.0, 1.0][:n])  # the first group has spread whatever the seed
    rewards[torch.arange(rows), response_mask.sum(1) - 1] = scores
    uids = np.array([f"prompt-{row // n}" for row in range(rows)], dtype=object)
    advantages, returns = compute_grpo_outcome_advantage(rewards, response_mask.float(), uids)
    teacher_rows = [
        teacher_outputs(teacher, p.tolist(), r.tolist(), widths) for p, r in zip(prompts, responses, strict=True)
    ]
    batch = DataProto.from_single_dict(
        {
            "prompts": prompt_ids, "responses": response_ids,
            "input_ids": torch.cat([prompt_ids, response_ids], dim=1), "attention_mask": attention_mask,
            "position_ids": compute_position_id_with_mask(attention_mask), "response_mask": response_mask,
            "advantages": advantages, "returns": returns,
            "teacher_ids": torch.cat([ids for ids, _ in teacher_rows]),
            "teacher_logprobs": torch.cat([logprobs for _, logprobs in teacher_rows]),
        }
    )  # fmt: skip
    data = left_right_2_no_padding(batch.to_tensordict())
    with torch.no_grad():
        old_log_probs = no_padding_2_padding(student_log_probs(student, data), data)
    data["old_log_probs"] = old_log_probs
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(response_mask.sum()), global_batch_size=rows)
    teacher_logps = by_hand(teacher, prompts, responses, widths[1])
    student_logps = by_hand(student, prompts, responses, widths[1])
    return Batch(data, row_values(advantages, response_mask), response_mask.bool(), teacher_logps, student_logps)


def by_hand(table: torch.Tensor, prompts: list, responses: list, width: int) -> torch.Tensor:
    """(B, width) log p(response token k | the token before it) under `table`, computed directly (no verl layout)."""
    log_softmax = torch.log_softmax(table.detach().double(), dim=-1)
    logps = torch.zeros(len(responses), width, dtype=torch.float64)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        previous = torch.cat([prompt[-1:], response[:-1]])
        logps[row, : len(response)] = log_softmax[previous, response]
    return logps


def row_values(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A_i: the value GRPO broadcast over row i's response (0 for an empty response)."""
    return (advantages * mask).sum(1).double() / mask.sum(1).clamp(min=1)
