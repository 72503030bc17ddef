"""Arithmetic word-free problems as chat rows for the SmolLM2-135M run (GSM8K columns: `question`, `answer` ending
`#### N`), so that `rlsd train` / `rlsd eval` read them with the gsm8k adapter and score them with math_accuracy.

    python benchmarks/real/make_arith.py --level add2 --out runs/arith   # writes train.jsonl and test.jsonl

Train and test are disjoint (split by a hash of the question); the files are small and regenerated, not committed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

LEVELS = {
    # name: (operand sampler, operators)
    "add2": "two 2-digit operands, + or -",
    "add3": "three 1-2 digit operands, + and -",
    "mul1": "a + b * c with one-digit operands (products first)",
    "add1": "a 2-digit and a 1-digit operand, + or -",
    "add0": "a + b with a in 1-20 and b in 1-9",
}


def problem(level: str, rng: random.Random) -> tuple[str, int]:
    if level == "add2":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        op = rng.choice("+-")
        return f"{a} {op} {b}", a + b if op == "+" else a - b
    if level == "add3":
        a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 40)
        o1, o2 = rng.choice("+-"), rng.choice("+-")
        value = a + b if o1 == "+" else a - b
        value = value + c if o2 == "+" else value - c
        return f"{a} {o1} {b} {o2} {c}", value
    if level == "add0":
        a, b = rng.randint(1, 20), rng.randint(1, 9)
        return f"{a} + {b}", a + b
    if level == "add1":
        a, b = rng.randint(10, 99), rng.randint(1, 9)
        op = rng.choice("+-")
        return f"{a} {op} {b}", a + b if op == "+" else a - b
    if level == "mul1":
        a, b, c = rng.randint(1, 9), rng.randint(2, 9), rng.randint(2, 9)
        return f"{a} + {b} * {c}", a + b * c
    raise ValueError(level)


def rows(level: str, n: int, seed: int) -> dict[str, list[dict[str, str]]]:
    rng, seen, split = random.Random(seed), set(), {"train": [], "test": []}
    for _ in range(50 * n):  # small levels run out of distinct problems before n
        if sum(map(len, split.values())) >= n:
            break
        expr, value = problem(level, rng)
        if expr in seen:
            continue
        seen.add(expr)
        name = "test" if int(hashlib.sha256(expr.encode()).hexdigest(), 16) % 5 == 0 else "train"
        split[name].append({"question": f"What is {expr}?", "answer": f"{expr} = {value}\n#### {value}"})
    return split


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--level", choices=LEVELS, default="add2")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, items in rows(args.level, args.n, args.seed).items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(item) + "\n" for item in items)
        print(name, len(items))


if __name__ == "__main__":
    main()
