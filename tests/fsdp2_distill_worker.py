"""Run by `torchrun --nproc_per_node 2` in test_fsdp2_distill (gloo, CPU): a tiny FSDP2 (`fully_shard`) language
model trains a cross-entropy loss plus the distillation term through `rlsd.core.distill.selected_token_loss`, the path
the trainer uses, with a different number of selected tokens on each rank (none on one of them). Every parameter's
gradient must equal the single-process gradient of the loss averaged over ranks, as data-parallel training gives.
Prints "rank R: ok" at the end; any mismatch raises, and a collective out of step times out."""

from __future__ import annotations

import copy
import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from rlsd.core.distill import generalized_jsd, selected_token_loss

HIDDEN, VOCAB, LENGTH, TEMPERATURE, CHUNK = 6, 11, 7, 0.7, 2  # 11 rows: uneven shards over two ranks


class TinyLM(nn.Module):
    """Embedding -> one hidden layer -> LM head; `tied` shares the head's weight with the embedding."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.body = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=not tied)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        hidden = torch.tanh(self.body(self.embed(ids)))
        return hidden, self.head(hidden)


def rank_data(rank: int, selected_counts: tuple[int, int]) -> dict[str, Tensor]:
    """Rank `rank`'s micro-batch (the same on every process, so that each can compute the reference)."""
    gen = torch.Generator().manual_seed(100 + rank)
    selected = torch.zeros(1, LENGTH, dtype=torch.bool)
    selected[0, torch.randperm(LENGTH, generator=gen)[: selected_counts[rank]]] = True
    return {
        "ids": torch.randint(VOCAB, (1, LENGTH), generator=gen),
        "targets": torch.randint(VOCAB, (1, LENGTH), generator=gen),
        "teacher_hidden": torch.randn(1, LENGTH, HIDDEN, generator=gen),
        "selected": selected,
    }


def sharded_loss(model: TinyLM, teacher: nn.Linear, data: dict[str, Tensor]) -> Tensor:
    """The trainer's shape of loss: the module's own forward, then the distillation term on its hidden states."""
    hidden, logits = model(data["ids"])
    if not isinstance(model.head.weight, DTensor):
        raise AssertionError("the head is not sharded after the forward: the test would not exercise FSDP2")
    per_token = selected_token_loss(
        generalized_jsd, hidden, data["teacher_hidden"], data["selected"], (model.head, teacher), TEMPERATURE, CHUNK
    )
    return F.cross_entropy(logits.flatten(0, 1), data["targets"].flatten()) + per_token.sum() / LENGTH


def reference_loss(model: TinyLM, teacher: nn.Linear, data: dict[str, Tensor]) -> Tensor:
    """The same loss on whole (unsharded) float64 modules, written without the project's chunking or gathering."""
    hidden, logits = model(data["ids"])
    sel = data["selected"]
    student_logits = model.head(hidden[sel]) / TEMPERATURE
    with torch.no_grad():
        teacher_logits = teacher(data["teacher_hidden"][sel].double()) / TEMPERATURE
    distill = generalized_jsd(student_logits, teacher_logits).sum() / LENGTH
    return F.cross_entropy(logits.flatten(0, 1), data["targets"].flatten()) + distill


def full(tensor: Tensor) -> Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def check(tied: bool, selected_counts: tuple[int, int], rank: int, live: bool = False) -> None:
    """One backward step of each rank's loss under FSDP2 against the mean of the single-process gradients; `live`:
    the teacher is the student's own head (no gradient through the teacher side)."""
    torch.manual_seed(0)
    model, teacher = TinyLM(tied), nn.Linear(HIDDEN, VOCAB)
    teacher.requires_grad_(False)
    ref_model, ref_teacher = copy.deepcopy(model).double(), copy.deepcopy(teacher).double()
    if live:
        teacher, ref_teacher = model.head, ref_model.head
    mesh = init_device_mesh("cpu", (2,))
    fully_shard(model.body, mesh=mesh, reshard_after_forward=True)
    if not tied:  # a tied head stays in the root's unit, with the embedding
        fully_shard(model.head, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    if not live:
        fully_shard(teacher, mesh=mesh, reshard_after_forward=True)

    loss = sharded_loss(model, teacher, rank_data(rank, selected_counts))
    loss.backward()
    for r in range(2):
        ref = reference_loss(ref_model, ref_teacher, rank_data(r, selected_counts))
        if r == rank:
            torch.testing.assert_close(loss.detach().double(), ref.detach(), rtol=1e-5, atol=1e-6)
        (ref / 2).backward()  # FSDP averages the ranks' gradients
    for (name, param), (_, ref_param) in zip(model.named_parameters(), ref_model.named_parameters(), strict=True):
        torch.testing.assert_close(
            full(param.grad).double(), ref_param.grad, rtol=1e-4, atol=1e-6,
            msg=lambda m, n=name: f"tied={tied} counts={selected_counts}: gradient of {n}: {m}",
        )  # fmt: skip


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    for tied in (False, True):
        for counts in ((5, 0), (1, 4)):  # more chunks on one rank than the other; a rank with none
            check(tied, counts, rank)
    check(False, (5, 0), rank, live=True)
    print(f"rank {rank}: ok", flush=True)
    dist.barrier()  # every rank is done with its collectives
    # exit without tearing gloo down: its teardown after FSDP2 aborts now and then ("terminate called without an
    # active exception"), after everything this worker checks has passed and been reported
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
