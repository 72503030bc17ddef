"""Run by test_teacher_scale: two CPU processes (gloo) shard a policy and its EMA self-teacher copy with FSDP2's
`fully_shard` (root only, as TRL's `prepare_fsdp`), take an EMA step (bf16: an fp32 shadow), save the teacher through
`SelfTeacher.save` on every rank (rank 0 writes), perturb it, load it back, and write one JSON report per rank: does
every rank get its own shards (teacher weights and shadow) back, and does the file hold whole tensors?"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from rlsd.experiments.tiny import build_char_tokenizer, build_tiny_qwen2
from rlsd.teachers import TEACHER_WEIGHTS_FILE, SelfTeacher


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor as it is)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def run(rank: int, folder: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model_kwargs = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0)
    policy = build_tiny_qwen2(build_char_tokenizer(), **model_kwargs).to(torch.bfloat16)
    shapes = {name: tuple(p.shape) for name, p in policy.state_dict().items()}
    teacher = SelfTeacher("ema", policy, sync_steps=1, ema_decay=0.5, temperature=1.0)
    mesh = init_device_mesh("cpu", (2,))
    for module in (policy, teacher.model):
        fully_shard(module, mesh=mesh, reshard_after_forward=True)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.ones_like(p))
    teacher.on_optimizer_step(1, policy)  # creates the fp32 shadow (DTensor shards)
    weights = [local(p).detach().clone() for p in teacher.model.parameters()]
    shadow = [local(s).clone() for s in teacher.shadow]
    teacher.save(folder, lambda m: m, write=rank == 0)
    dist.barrier()
    with torch.no_grad():
        for p in teacher.model.parameters():
            p.add_(1.0)
        for s in teacher.shadow:
            s.add_(1.0)
    teacher.load(folder, lambda m: m)
    saved = torch.load(os.path.join(folder, TEACHER_WEIGHTS_FILE), map_location="cpu", weights_only=True)
    report = {
        "weights_restored": all(
            torch.equal(local(p), w) for p, w in zip(teacher.model.parameters(), weights, strict=True)
        ),
        "shadow_restored": all(torch.equal(local(s), w) for s, w in zip(teacher.shadow, shadow, strict=True)),
        "saved_whole_tensors": {k: tuple(v.shape) for k, v in saved.items()} == shapes,
        "shards_differ_across_ranks": None,
    }
    first = weights[0].flatten()[:8].float()
    gathered = [torch.zeros_like(first) for _ in range(2)]
    dist.all_gather(gathered, first)
    report["shards_differ_across_ranks"] = not torch.equal(gathered[0], gathered[1])
    with open(os.path.join(folder, f"report_{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()  # every rank is done with its collectives
    # exit without tearing gloo down: its teardown after FSDP2 aborts now and then ("terminate called without an
    # active exception"), after everything this worker checks has passed and been reported
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mp.spawn(run, args=(sys.argv[1], sys.argv[2]), nprocs=2)
