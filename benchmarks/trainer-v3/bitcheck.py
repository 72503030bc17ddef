"""Trainer v3 moved code without changing behaviour: train the tiny test model 3 steps under ten configurations and
print a hash of the final weights and of the logged metrics (timings left out), for the checkout on PYTHONPATH.

Run it from a checkout's root for two commits and compare the lines (`benchmarks/trainer-v3/bitcheck.txt`):
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/trainer-v3/bitcheck.py
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile

import torch

STAGES = [{"until_step": 1, "credit": "opsd"}, {"until_step": 2, "distill_loss": "jsd", "credit": "grpo"}]
CONFIGS = {
    "grpo": dict(credit="grpo"),
    "rlsd-synced": dict(credit="rlsd", teacher="synced"),
    "rlsd-live-num_it2": dict(credit="rlsd", teacher="live", num_iterations=2),
    "opsd": dict(credit="opsd", teacher="initial"),
    "grpo+jsd": dict(credit="grpo", distill_loss="jsd", teacher="initial"),
    "rlsd+jsd": dict(credit="rlsd", distill_loss="jsd", teacher="synced"),
    "sibling": dict(credit="rlsd", privileged_source="sibling"),
    "uni-opd": dict(credit="uni-opd", teacher="initial"),
    "stages": dict(credit="grpo", stages=STAGES),
    "sdpg": dict(credit="grpo", distill_loss="sdpg", teacher="live"),
}


def digest(value: object) -> str:
    """The first 16 hex digits of a SHA-256 of `value`'s JSON (or of raw bytes)."""
    data = value if isinstance(value, bytes) else json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def main() -> None:
    sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
    torch.set_num_threads(1)
    from conftest import build_trainer

    from rlsd.experiments.tiny import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    for name, config in CONFIGS.items():
        trainer = build_trainer(tokenizer, tempfile.mkdtemp(), max_steps=3, rlsd_lambda_decay_steps=0, **config)
        trainer.train()
        weights = b"".join(p.detach().cpu().numpy().tobytes() for p in trainer.model.parameters())
        timing = ("time", "runtime", "per_second")
        logs = [{k: v for k, v in e.items() if not any(t in k for t in timing)} for e in trainer.state.log_history]
        print(name, digest(weights), digest(logs), flush=True)


if __name__ == "__main__":
    main()
