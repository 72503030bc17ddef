"""Why round 1's real-model steps took 100-200 s: time one sampled generate call (8 x 48 tokens) and one forward +
backward (8 x 80 tokens) of SmolLM2-135M at the current OMP_NUM_THREADS (BENCHMARKS.md section 10, round 2).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/real/contention.py quiet
    (python3 -c "while True: pass" &) ; OMP_NUM_THREADS=2 .venv/bin/python benchmarks/real/contention.py busy1
"""

import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.manual_seed(0)
m = AutoModelForCausalLM.from_pretrained("runs/smollm2")
tok = AutoTokenizer.from_pretrained("runs/smollm2")
tok.padding_side = "left"
question = "What is {} + 7?\n\nAnswer with the number."
msgs = [
    tok.apply_chat_template(
        [{"role": "user", "content": question.format(i)}], tokenize=False, add_generation_prompt=True
    )
    for i in range(8)
]
enc = tok(msgs, return_tensors="pt", padding=True)
with torch.no_grad():
    m.generate(**enc, max_new_tokens=4, do_sample=False)
    start = time.perf_counter()
    m.generate(**enc, max_new_tokens=48, min_new_tokens=48, do_sample=True)
    g = time.perf_counter() - start
ids = torch.randint(0, 49152, (8, 80))
start = time.perf_counter()
m(ids).logits.sum().backward()
fb = time.perf_counter() - start
print(f"threads={torch.get_num_threads()} generate8x48={g:.2f}s fwd+bwd8x80={fb:.2f}s", sys.argv[1:])
