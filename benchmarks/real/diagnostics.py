"""Teacher diagnostics of RLSD on a real model, forward passes only (BENCHMARKS.md, "Real model").

Samples G completions (T = 1) per problem from the student, scores them with the run's reward, and scores the
sampled tokens under the student (`RLSDTrainer.score_rollout("student", ...)`) and under the privileged teacher
(`RLSDTrainer.teacher_scores(...)`, the pass training runs) for each teacher template. Delta = teacher log-prob -
student log-prob on each sampled token. Reported per template: how well the per-sequence mean Delta separates
correct from incorrect completions (AUC, 95% bootstrap interval resampling problems), Delta by token position, and
the share of tokens whose clipped RLSD weight clip(exp(sign(A) Delta), 0.8, 1.2) differs from 1.

    cd benchmarks/real && OMP_NUM_THREADS=2 ../../.venv/bin/python diagnostics.py --model ../../runs/smollm2 \
        --data ../../runs/arith-add0/train.jsonl --problems 64 --generations 2 --batch 64 --output diagnostics.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from real_reward import last_integer

from rlsd import RLSDConfig, RLSDTrainer
from rlsd.context.templates import PAPER_TEACHER_TEMPLATE
from rlsd.data.datasets import load_rlsd_dataset

TEMPLATES = {
    "paper": PAPER_TEACHER_TEMPLATE,
    "short": "{prompt}\n\n(The answer is {answer}.)",
}
POSITION_BINS = [(0, 4), (4, 8), (8, 16), (16, 32), (32, 48)]
EPS_W = 0.2


def auc(pos: list[float], neg: list[float]) -> float | None:
    """P(a correct completion's score > an incorrect one's), ties 1/2 (Mann-Whitney)."""
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def bootstrap_auc(problem: list[int], score: list[float], correct: list[bool], n: int, seed: int) -> list[float]:
    """95% interval of the AUC, resampling problems (a problem's G completions stay together)."""
    rng = random.Random(seed)
    by_problem: dict[int, list[int]] = {}
    for i, p in enumerate(problem):
        by_problem.setdefault(p, []).append(i)
    keys, values = list(by_problem), []
    for _ in range(n):
        rows = [i for k in (rng.choice(keys) for _ in keys) for i in by_problem[k]]
        value = auc([score[i] for i in rows if correct[i]], [score[i] for i in rows if not correct[i]])
        if value is not None:
            values.append(value)
    values.sort()
    return [values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]] if values else [None, None]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--problems", type=int, default=96)
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=48, help="sequences per generate call")
    parser.add_argument("--system_prompt", default="")
    parser.add_argument("--instruction", default="Answer with the number.")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="diagnostics.json")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    started = time.time()

    dataset = load_rlsd_dataset(args.data, system_prompt=args.system_prompt or None, instruction=args.instruction)
    dataset = dataset.select(range(min(args.problems, len(dataset))))
    config = RLSDConfig(
        output_dir=tempfile.mkdtemp(), credit="rlsd", teacher="initial", num_generations=args.generations,
        per_device_train_batch_size=args.generations * 2, max_completion_length=args.max_new_tokens,
        use_cpu=True, bf16=False, report_to="none", teacher_template=TEMPLATES["paper"],
    )  # fmt: skip
    trainer = RLSDTrainer(args.model, last_integer, args=config, train_dataset=dataset)
    model, tokenizer = trainer.model.eval(), trainer.processing_class
    tokenizer.padding_side = "left"
    rows = [dataset[i] for i in range(len(dataset)) for _ in range(args.generations)]
    problem = [i for i in range(len(dataset)) for _ in range(args.generations)]

    records: list[dict] = []
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in TEMPLATES}
    rendered: dict[str, str] = {}
    gen_time = score_time = 0.0
    for start in range(0, len(rows), args.batch):
        chunk = rows[start : start + args.batch]
        texts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        t0 = time.time()
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        gen_time += time.time() - t0
        completion_ids = out[:, enc.input_ids.size(1) :]
        is_eos = completion_ids == tokenizer.eos_token_id
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], is_eos.size(1)))
        completion_mask = (torch.arange(is_eos.size(1))[None] <= first[:, None]).int()
        completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
        output = {"prompt_ids": enc.input_ids, "prompt_mask": enc.attention_mask,
                  "completion_ids": completion_ids, "completion_mask": completion_mask}  # fmt: skip
        t0 = time.time()
        student = trainer.score_rollout("student", output).logps
        for name, template in TEMPLATES.items():
            trainer.args.teacher_template = template
            teacher = trainer.teacher_scores(chunk, output).logps
            scores[name].append(((teacher - student) * completion_mask).float())
            if name not in rendered:
                context = getattr(trainer, "teacher_inputs", None) or trainer._teacher_context
                ids, mask, _, _ = context(chunk[:1], {k: v[:1] for k, v in output.items()}, "train", None)
                rendered[name] = tokenizer.decode(ids[0][mask[0].bool()], skip_special_tokens=False)
        score_time += time.time() - t0
        texts_out = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        rewards = last_integer(texts_out, [r["solution"] for r in chunk])
        for j, (text, reward) in enumerate(zip(texts_out, rewards, strict=True)):
            records.append({"problem": problem[start + j], "reward": reward, "length": int(completion_mask[j].sum()),
                            "completion": text})  # fmt: skip
        print(f"{len(records)}/{len(rows)} sequences, {time.time() - started:.0f} s", flush=True)

    correct = [r["reward"] > 0 for r in records]
    group = torch.tensor([r["reward"] for r in records]).view(-1, args.generations)
    advantage = (group - group.mean(1, keepdim=True)).flatten()
    result = {
        "model": args.model, "data": args.data, "problems": len(dataset), "generations": args.generations,
        "sequences": len(records), "max_new_tokens": args.max_new_tokens, "temperature": 1.0,
        "reward": "real_reward.last_integer", "system_prompt": args.system_prompt, "instruction": args.instruction,
        "accuracy": sum(correct) / len(correct), "n_correct": sum(correct),
        "groups_with_signal": int((group.std(1) > 0).sum()), "groups": group.size(0),
        "generate_s": round(gen_time, 1), "score_s": round(score_time, 1),
        "wall_s": round(time.time() - started, 1), "templates": {}, "rendered_teacher_prompt": rendered,
    }  # fmt: skip
    for name, template in TEMPLATES.items():
        width = max(s.size(1) for s in scores[name])
        delta = torch.cat([torch.nn.functional.pad(s, (0, width - s.size(1))) for s in scores[name]])
        mask = torch.zeros_like(delta, dtype=torch.bool)
        for i, r in enumerate(records):
            mask[i, : r["length"]] = True
        seq_mean = ((delta * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
        pos = [s for s, c in zip(seq_mean, correct, strict=True) if c]
        neg = [s for s, c in zip(seq_mean, correct, strict=True) if not c]
        weight = torch.exp(torch.sign(advantage)[:, None] * delta).clamp(1 - EPS_W, 1 + EPS_W)
        signal = mask & (advantage != 0)[:, None]
        by_position = []
        for lo, hi in POSITION_BINS:
            in_bin = torch.zeros_like(mask)
            in_bin[:, lo:hi] = True
            cell = {"positions": f"{lo}-{hi - 1}"}
            for label, rows_ok in (("correct", torch.tensor(correct)), ("incorrect", ~torch.tensor(correct))):
                sel = mask & in_bin & rows_ok[:, None]
                cell[label] = round(delta[sel].mean().item(), 4) if sel.any() else None
                cell[f"{label}_tokens"] = int(sel.sum())
            by_position.append(cell)
        result["templates"][name] = {
            "template": template,
            "auc": auc(pos, neg),
            "auc_ci95": bootstrap_auc(problem, seq_mean, correct, args.bootstrap, args.seed),
            "delta_mean_correct": sum(pos) / len(pos) if pos else None,
            "delta_mean_incorrect": sum(neg) / len(neg) if neg else None,
            "delta_token_mean": delta[mask].mean().item(),
            "delta_token_abs_mean": delta[mask].abs().mean().item(),
            "tokens": int(mask.sum()),
            "signal_tokens": int(signal.sum()),
            "weight_differs_frac": ((weight - 1).abs() > 1e-3)[signal].float().mean().item() if signal.any() else None,
            "weight_clipped_frac": ((weight - 1).abs() >= EPS_W - 1e-6)[signal].float().mean().item()
            if signal.any() else None,
            "delta_by_position": by_position,
            "seq_mean_delta": [round(x, 5) for x in seq_mean],
        }
    result["records"] = [{k: r[k] for k in ("problem", "reward", "length")} for r in records]
    result["examples"] = [r["completion"] for r in records[:6]]
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("records", "templates")}, indent=1))
    for name, t in result["templates"].items():
        print(name, "AUC", t["auc"], t["auc_ci95"], "weight!=1", t["weight_differs_frac"], "clipped",
              t["weight_clipped_frac"])  # fmt: skip


if __name__ == "__main__":
    main()
