"""Peak resident memory (ru_maxrss) of a short RLSD run with an EMA teacher, with and without `teacher_offload`, each
in a fresh process: `.venv/bin/python benchmarks/offload/rss.py`. On a CPU the offload's moves are no-ops (the teacher
already lives in host memory), so the two peaks should match; on a GPU the same run measures what leaves it."""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = """
import json, resource, sys, tempfile, zlib
import torch
from datasets import Dataset
from rlsd import RLSDConfig, RLSDTrainer
from rlsd.experiments.tiny import build_char_tokenizer, build_tiny_qwen2

torch.manual_seed(0)
tokenizer = build_char_tokenizer()
model = build_tiny_qwen2(tokenizer, hidden_size=512, num_layers=6, num_heads=8, intermediate_size=2048, seed=0)
rows = [{"prompt": f"Q: {i}+{i % 7}=", "solution": str(i + i % 7)} for i in range(8)]
reward = lambda completions, **kwargs: [float(zlib.crc32(c.encode()) % 2) for c in completions]
args = RLSDConfig(
    output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, num_generations=4, max_completion_length=16,
    max_steps=3, learning_rate=1e-3, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
    disable_tqdm=True, logging_steps=1, credit="rlsd", teacher="ema", teacher_offload=sys.argv[1] == "1",
)
trainer = RLSDTrainer(model, reward, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
trainer.train()
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"teacher_offload": args.teacher_offload, "params": params,
                  "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    """Run both settings and print one JSON line each."""
    for flag in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", CHILD, flag], capture_output=True, text=True, check=True)
        print(json.loads(out.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
