"""`rlsd eval`: sample n completions per problem and report pass@1, avg@n, unbiased pass@k, lengths and truncation.

The same adapters (`rlsd.data.datasets`) and rewards (`rlsd.data.rewards`) as training. HF `generate` by default; vLLM
when it is installed and `--backend vllm` is asked for. Every argument is checked before the model is loaded, and
generations.jsonl is written batch by batch, so that a crash keeps what was generated."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlsd.commands.parsing import command_line
from rlsd.data.datasets import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM_PROMPT, load_cli_dataset
from rlsd.data.formats import format_help, format_names
from rlsd.data.rewards import call_reward, resolve_reward
from rlsd.infra.validate import ConfigError, OutputDirError, check_model_folder, check_positive

SUMMARY_KEYS = (
    "pass@1",
    "avg@n",
    "pass@k",
    "mean_response_tokens",
    "truncation_rate",
    "num_problems",
    "n",
    "model",
    "dataset",
)
"""Keys of summary.json; generations.jsonl rows carry GENERATION_KEYS."""
GENERATION_KEYS = ("problem", "sample", "prompt", "solution", "completion", "reward", "num_tokens", "truncated")
OUTPUT_FILES = ("generations.jsonl", "summary.json")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n - c, k) / C(n, k) (Chen et al., 2021)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"need 0 < k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(correct: list[list[bool]], lengths: list[int], truncated: list[bool]) -> dict[str, Any]:
    """pass@1 (first sample), avg@n (all samples), pass@k for k = 1, 2, 4, ... <= n, lengths and truncation."""
    if not correct:
        raise ValueError("no problems to summarize")
    n = len(correct[0])
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= n]
    return {
        "pass@1": sum(row[0] for row in correct) / len(correct),
        "avg@n": sum(sum(row) / n for row in correct) / len(correct),
        "pass@k": {str(k): sum(pass_at_k(n, sum(row), k) for row in correct) / len(correct) for k in ks},
        "mean_response_tokens": sum(lengths) / len(lengths),
        "truncation_rate": sum(truncated) / len(truncated),
        "num_problems": len(correct),
        "n": n,
    }


def generate_hf(model, tokenizer, prompts: list[Any], args: argparse.Namespace) -> list[tuple[str, int, bool]]:
    """(text, token count, truncated) for every prompt repeated n times, with HF `generate` in batches."""
    return [result for batch in generate_hf_batches(model, tokenizer, prompts, args) for result in batch]


def generate_hf_batches(
    model, tokenizer, prompts: list[Any], args: argparse.Namespace
) -> Iterator[list[tuple[str, int, bool]]]:
    """The same, one list per `generate` call as soon as it is done (so that results can be written as they come)."""
    texts = [_render(tokenizer, p) for p in prompts for _ in range(args.n)]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for start in range(0, len(texts), args.batch_size):
        results = []
        batch = tokenizer(texts[start : start + args.batch_size], return_tensors="pt", padding=True)
        batch = batch.to(model.device)
        with torch.no_grad():
            output = model.generate(
                **batch,
                max_new_tokens=args.max_new_tokens,
                do_sample=args.temperature > 0,
                temperature=args.temperature if args.temperature > 0 else None,
                top_p=args.top_p,
                pad_token_id=tokenizer.pad_token_id,
            )
        for row in output[:, batch["input_ids"].size(1) :]:
            results.append(_decoded(tokenizer, row.tolist()))
        yield results


def generate_vision_batches(
    model, processor, prompts: list[Any], images: list[list[Any]], args: argparse.Namespace
) -> Iterator[list[tuple[str, int, bool]]]:
    """The same for a vision-language model: each prompt with its images (placed as TRL 1.16 places them), rendered
    by the processor's chat template and encoded with the images by the processor."""
    from trl.data_utils import prepare_multimodal_messages

    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = [(prompt, row_images) for prompt, row_images in zip(prompts, images, strict=True) for _ in range(args.n)]
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start : start + args.batch_size]
        texts = [
            processor.apply_chat_template(prepare_multimodal_messages(prompt, list(row_images)),
                                          add_generation_prompt=True, tokenize=False)
            for prompt, row_images in chunk
        ]  # fmt: skip
        flat = [image.convert("RGB") for _, row_images in chunk for image in row_images]
        batch = processor(images=flat, text=texts, return_tensors="pt", padding=True, padding_side="left")
        batch = batch.to(model.device)
        with torch.no_grad():
            output = model.generate(
                **batch,
                max_new_tokens=args.max_new_tokens,
                do_sample=args.temperature > 0,
                temperature=args.temperature if args.temperature > 0 else None,
                top_p=args.top_p,
                pad_token_id=tokenizer.pad_token_id,
            )
        yield [_decoded(tokenizer, row.tolist()) for row in output[:, batch["input_ids"].size(1) :]]


def _decoded(tokenizer, ids: list[int]) -> tuple[str, int, bool]:
    """(text up to the end-of-sequence token, its token count, whether it was cut off before one)."""
    ended = tokenizer.eos_token_id in ids
    length = ids.index(tokenizer.eos_token_id) if ended else len(ids)
    return tokenizer.decode(ids[:length], skip_special_tokens=True), length, not ended


def row_images(dataset) -> list[list[Any]] | None:
    """The images of each row (`image` or `images` column), None for a text dataset."""
    if "images" in dataset.column_names:
        return [list(images or []) for images in dataset["images"]]
    if "image" in dataset.column_names:
        return [[image] for image in dataset["image"]]
    return None


def generate_vllm(model_path: str, tokenizer, prompts: list[Any], args: argparse.Namespace):
    """The same with vLLM (imported only when asked for)."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError as err:
        raise RuntimeError("--backend vllm needs vLLM installed (pip install vllm)") from err
    llm = LLM(model=model_path)
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens)
    outputs = llm.generate([_render(tokenizer, p) for p in prompts], params)
    return [(o.text, len(o.token_ids), o.finish_reason == "length") for request in outputs for o in request.outputs]


def _render(tokenizer, prompt: Any) -> str:
    """Plain text as is; a conversation through the tokenizer's chat template."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def check_args(args: argparse.Namespace) -> Path:
    """Every argument of `rlsd eval`, before any model is loaded: counts, sampling, the output folder (not a file,
    no earlier results unless --overwrite) and a local model folder; returns the output folder."""
    check_positive(
        {"--n": args.n, "--batch_size": args.batch_size, "--max_new_tokens": args.max_new_tokens,
         "--max_samples": args.max_samples}
    )  # fmt: skip
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError("--temperature", f"must be >= 0, got {args.temperature}", "0 is greedy decoding")
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise ConfigError("--top_p", f"must lie in (0, 1], got {args.top_p}", "1 disables nucleus sampling")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise OutputDirError(f"--output {output}", "is a file", "choose a folder")
    existing = [name for name in OUTPUT_FILES if (output / name).exists()]
    if existing and not args.overwrite:
        raise OutputDirError(
            f"--output {output}", f"already holds {', '.join(existing)}", "pass --overwrite, or choose another folder"
        )
    check_model_folder(args.model)
    return output


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation and write generations.jsonl (batch by batch) and summary.json into args.output."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = check_args(args)
    reward = resolve_reward(args.reward)
    dataset = load_cli_dataset(args, args.dataset, args.split)
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    prompts, solutions = dataset["prompt"], dataset["solution"]
    images = row_images(dataset)
    if images is not None:
        if args.backend == "vllm":
            raise ConfigError("--backend vllm", "is text-only in rlsd eval", "use --backend hf for an image dataset")
        from transformers import AutoModelForImageTextToText

        from rlsd.data.images import load_processor

        processor = load_processor(args.model)
        model = AutoModelForImageTextToText.from_pretrained(args.model)
        model.eval()
        torch.manual_seed(args.seed)
        batches: Any = generate_vision_batches(model, processor, prompts, images, args)
    elif args.backend == "vllm":
        batches = [generate_vllm(args.model, AutoTokenizer.from_pretrained(args.model), prompts, args)]
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
        model.eval()
        torch.manual_seed(args.seed)
        batches = generate_hf_batches(model, tokenizer, prompts, args)
    output.mkdir(parents=True, exist_ok=True)
    correct: list[list[bool]] = [[] for _ in prompts]
    results: list[tuple[str, int, bool]] = []
    bar = tqdm(total=len(prompts), desc="problems", unit="problem", disable=getattr(args, "no_progress", False))
    with (output / "generations.jsonl").open("w") as f, bar:
        for batch in batches:
            start = len(results)
            results.extend(batch)
            solution = [solutions[index // args.n] for index in range(start, len(results))]
            rewards = call_reward(reward, [text for text, _, _ in batch], solution=solution)
            for index, ((text, length, truncated), score) in enumerate(zip(batch, rewards, strict=True), start):
                problem, sample = divmod(index, args.n)
                correct[problem].append(bool(score and score > 0.5))
                values = (problem, sample, prompts[problem], solutions[problem], text, score, length, truncated)
                f.write(json.dumps(dict(zip(GENERATION_KEYS, values, strict=True))) + "\n")
            f.flush()
            bar.update(len(results) // args.n - bar.n)  # problems whose n samples are all scored
    summary = {
        **summarize(correct, [r[1] for r in results], [r[2] for r in results]),
        "model": args.model,
        "dataset": args.dataset,
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlsd eval",
        description="Evaluate a model: pass@1, avg@n, unbiased pass@k, response length, truncation rate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="hub name or local folder")
    parser.add_argument("--dataset", required=True, help="hub dataset name or local .jsonl/.json/.parquet/.csv")
    parser.add_argument("--dataset_config", default=None, help="hub dataset configuration")
    parser.add_argument("--split", default="test", help="split to evaluate (local files have one)")
    parser.add_argument("--dataset_format", default=None, choices=format_names(), help=format_help())
    parser.add_argument("--prompt_column", default=None, help="question column of the generic format")
    parser.add_argument("--answer_column", default=None, help="answer column of the generic format")
    parser.add_argument("--system_prompt", default=DEFAULT_SYSTEM_PROMPT, help="system turn ('' for none)")
    parser.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="answer-format instruction")
    parser.add_argument("--reward", default="math_accuracy",
                        help="reward name, dotted import path, or file path PATH.fn (PATH.py inside the working "
                             "folder, or absolute)")  # fmt: skip
    parser.add_argument("--n", type=int, default=8, help="samples per problem")
    parser.add_argument("--max_new_tokens", type=int, default=1024, help="generation budget per sample")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling")
    parser.add_argument("--batch_size", type=int, default=64, help="sequences per HF generate call")
    parser.add_argument("--max_samples", type=int, default=None, help="evaluate only the first N problems")
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="generation engine")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--output", required=True, help="folder for generations.jsonl and summary.json")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --output")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar (problems done)")
    return command_line(parser)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    summary = evaluate(args)
    print(json.dumps({k: summary[k] for k in ("pass@1", "avg@n", "pass@k", "truncation_rate")}, indent=1))
    return 0
