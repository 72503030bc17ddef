"""`rlsd bench localisation`: does the self-teacher's Delta point at the error, measured before training (issue 26)?

From the regime's warm start, sampled completions (T = 1) of pilot problems are checked against the task's steps; in
each wrong completion whose first wrong step has a wrong result character, Delta_t = log p_T - log p_S (the teacher:
the same weights shown a privileged context) is read on every result character (the sign and digits after a step's
`=`). The error-localisation AUC is P(Delta at the first wrong result character < Delta at another result character
of the same completion), ties counted half: averaged over completions (the primary number) and pooled over all pairs
of first-wrong and other characters. 0.5 is no localisation; 1 is a teacher whose Delta is lowest exactly where the
completion first goes wrong. A teacher that flags the final answer, not the error, scores near or below 0.5.

Contexts: "answer" (the reference answer, as in the paper) and "steps" (the worked steps with their intermediate
values), each in the task's teacher template.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rlsd.context.annotation import token_char_offsets
from rlsd.experiments.contexts import _written_steps
from rlsd.experiments.task import Problem, accuracy_reward, steps_teacher_prompt, teacher_prompt
from rlsd.experiments.warmstart import generate
from rlsd.step.scoring import score_tokens

CONTEXTS = {"answer": teacher_prompt, "steps": steps_teacher_prompt}
"""The privileged contexts the diagnostic compares, by name: the teacher prompt each builds from a problem."""


@dataclass(frozen=True)
class ResultChars:
    """The result characters of one wrong completion: their character offsets, and which one is the first wrong."""

    offsets: list[int]
    first_wrong: int  # an element of `offsets`


def result_chars(completion: str, problem: Problem) -> ResultChars | None:
    """The character offsets of every written step's result (sign and digits after the step's last `=`), and the first
    wrong one: in the first written step that departs from the task's own steps, the first result character that
    differs from the correct result at the same index. None when there is none (every written step right, or the
    departing step's result a prefix of the right one)."""
    offsets, first_wrong = [], None
    expected = problem.steps
    departed = False
    for index, (offset, step) in enumerate(_written_steps(completion)):
        if "=" not in step:
            continue
        result_at = offset + step.rindex("=") + 1
        result = step[step.rindex("=") + 1 :]
        chars = [result_at + i for i, ch in enumerate(result) if ch.isdigit() or (ch == "-" and i == 0)]
        offsets += chars
        if departed or first_wrong is not None:
            continue
        right = expected[index] if index < len(expected) else None
        if step == right:
            continue
        departed = True
        right_result = right.rsplit("=", 1)[1] if right else ""
        for i, ch in enumerate(result):
            if result_at + i in chars and (i >= len(right_result) or ch != right_result[i]):
                first_wrong = result_at + i
                break
    return ResultChars(offsets, first_wrong) if first_wrong is not None else None


def within_auc(first: float, others: list[float]) -> float:
    """P(first < other), ties half: how far below the completion's other result characters its first error sits."""
    return sum((first < o) + 0.5 * (first == o) for o in others) / len(others)


def token_deltas(
    model, tokenizer, problems: list[Problem], completions: list[str], context: str, batch_size: int = 64
):
    """Per completion: the token ids and Delta_t (teacher shown `context` minus student), temperature 1."""
    teacher_prompt_of = CONTEXTS[context]
    ids = [tokenizer(c)["input_ids"] or [tokenizer.eos_token_id] for c in completions]

    def logps(prompts: list[str]) -> torch.Tensor:
        prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
        width, length = max(map(len, prompt_ids)), max(map(len, ids))
        p_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
        p_mask = torch.zeros((len(ids), width), dtype=torch.long)
        c_ids = torch.full((len(ids), length), tokenizer.pad_token_id)
        c_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for row, (p, c) in enumerate(zip(prompt_ids, ids, strict=True)):
            p_ids[row, width - len(p) :], p_mask[row, width - len(p) :] = torch.tensor(p), 1
            c_ids[row, : len(c)], c_mask[row, : len(c)] = torch.tensor(c), 1
        return score_tokens(model, p_ids, p_mask, c_ids, c_mask, temperature=1.0, batch_size=batch_size).logps

    with torch.no_grad():
        student = logps([p.prompt for p in problems]).double()
        teacher = logps([teacher_prompt_of(p) for p in problems]).double()
    delta = (teacher - student).clamp(-20, 20)
    return ids, [delta[row, : len(c)].tolist() for row, c in enumerate(ids)]


def char_deltas(tokenizer, ids: list[int], deltas: list[float]) -> dict[int, float]:
    """Delta of the token covering each character of the decoded completion."""
    pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in ids]
    out = {}
    for (start, end), value in zip(token_char_offsets(pieces), deltas, strict=True):
        for char in range(start, end):
            out[char] = value
    return out


def localisation(model, tokenizer, problems: list[Problem], samples: int, max_length: int, seed: int,
                 contexts: list[str]) -> dict[str, Any]:  # fmt: skip
    """Sample `samples` completions per problem (seeded, T = 1), keep the wrong ones with a located first wrong result
    character, and measure the error-localisation AUC of each context's teacher on them."""
    asked = [p for p in problems for _ in range(samples)]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        completions = generate(model, tokenizer, [p.prompt for p in asked], max_new_tokens=max_length, do_sample=True,
                               batch_size=256)  # fmt: skip
    rewards = accuracy_reward(completions, [str(p.answer) for p in asked])
    wrong = [(p, c) for p, c, r in zip(asked, completions, rewards, strict=True) if not r]
    located = [(p, c, chars) for p, c in wrong if (chars := result_chars(c, p)) is not None and len(chars.offsets) > 1]
    result: dict[str, Any] = {
        "completions": len(asked),
        "correct": int(sum(rewards)),
        "wrong": len(wrong),
        "wrong_located": len(located),
        "mean_completion_tokens": statistics.mean(len(tokenizer(c)["input_ids"]) for c in completions),
        "mean_result_chars": statistics.mean(len(ch.offsets) for _, _, ch in located) if located else None,
        "contexts": {},
    }
    for context in contexts if located else ():  # no wrong completion located: nothing to measure
        ids, deltas = token_deltas(model, tokenizer, [p for p, _, _ in located], [c for _, c, _ in located], context)
        per_completion, firsts, others, before, after = [], [], [], [], []
        for (_, _, chars), row_ids, row_deltas in zip(located, ids, deltas, strict=True):
            by_char = char_deltas(tokenizer, row_ids, row_deltas)
            first = by_char[chars.first_wrong]
            rest = [by_char[o] for o in chars.offsets if o != chars.first_wrong and o in by_char]
            per_completion.append(within_auc(first, rest))
            firsts.append(first)
            others += rest
            before += [by_char[o] for o in chars.offsets if o < chars.first_wrong and o in by_char]
            after += [by_char[o] for o in chars.offsets if o > chars.first_wrong and o in by_char]
        result["contexts"][context] = {
            "auc_mean": statistics.mean(per_completion),
            "auc_ci95": _t_interval(per_completion),
            "auc_pooled": _pooled_auc(firsts, others),
            "delta_first_wrong_mean": statistics.mean(firsts),
            "delta_result_before_mean": statistics.mean(before) if before else None,
            "delta_result_after_mean": statistics.mean(after) if after else None,
            "auc_per_completion": per_completion,
        }
    return result


def _t_interval(values: list[float]) -> list[float] | None:
    """The 95% Student-t interval of the mean (None for fewer than two values)."""
    if len(values) < 2:
        return None
    from scipy import stats

    half = float(stats.t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    mean = statistics.mean(values)
    return [mean - half, mean + half]


def _pooled_auc(firsts: list[float], others: list[float]) -> float:
    """P(a first-wrong Delta < another result character's Delta) over all pairs of the pool, ties half."""
    ranked = sorted(others)
    wins = sum(len(ranked) - bisect.bisect_right(ranked, f) + 0.5 * (bisect.bisect_right(ranked, f)
               - bisect.bisect_left(ranked, f)) for f in firsts)  # fmt: skip
    return wins / (len(firsts) * len(ranked))


# ------------------------------------------------------------------------------------------------ command
def add_parser(sub: Any) -> None:
    """`rlsd bench localisation`'s arguments."""
    from rlsd.experiments.regimes import add_regime_options

    parser = sub.add_parser("localisation", help="error-localisation AUC of the self-teacher's Delta, before training",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    add_regime_options(parser)
    parser.add_argument("--context", default="answer,steps", help=f"comma-separated, from {', '.join(CONTEXTS)}")
    parser.add_argument("--problems", type=int, default=200, help="pilot problems (never the held-out set)")
    parser.add_argument("--samples", type=int, default=4, help="sampled completions per problem (T = 1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: benchmarks/localisation-TASK)")
    parser.add_argument("--quick", action="store_true", help="smoke run (CI): tiny model")


def run_command(args: argparse.Namespace, base: Any, command: list[str]) -> int:
    """Measure the AUC for each `--context` on the `--task` regime's warm start; write `localisation.json`."""
    from rlsd.experiments.provenance import provenance
    from rlsd.experiments.regimes import apply_regime
    from rlsd.experiments.task import evaluation_problems
    from rlsd.experiments.warmstart import load_warm_start, warm_start
    from rlsd.infra.validate import ConfigError, check_positive

    check_positive({"--problems": args.problems, "--samples": args.samples})
    contexts = [c.strip() for c in args.context.split(",") if c.strip()]
    if not contexts or set(contexts) - set(CONTEXTS):
        raise ConfigError("--context", f"choose from {', '.join(CONTEXTS)}; got {args.context!r}")
    out = args.out or (
        Path("runs/bench-localisation-quick") if args.quick else Path(f"benchmarks/localisation-{args.task}")
    )
    config = apply_regime(base, args)
    started = time.perf_counter()
    model, tokenizer = load_warm_start(warm_start(config.warm, progress=False))
    problems = evaluation_problems(config.warm.task, args.problems, "pilot")
    result = localisation(model, tokenizer, problems, args.samples, config.max_completion_length, args.seed, contexts)
    result.update(task=args.task, warm_start=asdict(config.warm), warm_start_key=config.warm.key(),
                  seconds=time.perf_counter() - started, provenance=provenance(command))  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "localisation.json").write_text(json.dumps(result, indent=2))
    if not result["contexts"]:
        print(f"no wrong completion with a located first wrong result among {result['completions']} samples")
    for name, row in result["contexts"].items():
        print(f"{name}: error-localisation AUC {row['auc_mean']:.3f} (pooled {row['auc_pooled']:.3f}) over "
              f"{result['wrong_located']} wrong completions")  # fmt: skip
    print(f"wrote {out}/localisation.json")
    return 0


def render_localisation(root: Path, folder: str = "localisation-long") -> str:
    """The diagnostic's table from `benchmarks/FOLDER/localisation.json`: per context, the AUC (mean over completions,
    95% interval; pooled) and the mean Delta at the first wrong result character and at the others before and after
    it; a line saying so while it was not measured."""
    path = root / "benchmarks" / folder / "localisation.json"
    if not path.exists():
        return f"Not measured yet (`benchmarks/{folder}/` holds no `localisation.json`).\n"
    result = json.loads(path.read_text())

    def num(value: float | None, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [
        f"{result['wrong']} of {result['completions']} sampled completions wrong, {result['wrong_located']} with a "
        f"located first wrong result; {num(result['mean_completion_tokens'], 1)} tokens per completion on average.",
        "",
        "| privileged context | error-localisation AUC [95% CI] | pooled AUC | Delta at the first wrong result | "
        "Delta at results before it | Delta at results after it |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["contexts"].items():
        ci = row["auc_ci95"]
        interval = "" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]"
        lines.append(f"| {name} | {row['auc_mean']:.3f}{interval} | {row['auc_pooled']:.3f} | "
                     f"{num(row['delta_first_wrong_mean'])} | {num(row['delta_result_before_mean'])} | "
                     f"{num(row['delta_result_after_mean'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"
