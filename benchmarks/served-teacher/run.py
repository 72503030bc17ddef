"""The cost of a vLLM-served teacher (`teacher_backend="vllm"`) against the in-trainer teacher, on a CPU.

One `RLSDTrainer` (tiny Qwen2 with head_dim 64, live self-teacher shown the answer, TRL's colocated vLLM engine) trains
alternating steps: on even steps the teacher's log-probs come from the trainer's forward, on odd steps from the
engine's `prompt_logprobs` (the scorer's `served` is switched in place between steps). Per step it records the wall
time of the step and of the teacher pass (`Scorer.teacher_rows`); after training, on one fixed rollout, it times the
two teacher passes alternately on the same batch and records their log-prob gap. Medians after warm-up; raw JSON with
provenance. Runs in `.venv-vllm` (`make install-vllm`):

    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/served-teacher/run.py [--steps 10] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache (vLLM's CPU default takes much more)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
BACKENDS = ("trainer", "vllm")
WARMUP_STEPS = 2  # one of each backend
WARMUP_PASSES = 2


def alternating_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """1, 0, 1, 0, ...: spread inside every group, so that no step skips its teacher pass (a group of equal rewards
    has A_i = 0 and RLSD does not score it)."""
    return [float(i % 2 == 0) for i in range(len(completions))]


def build_folder(folder: Path) -> Any:
    """Save the tiny Qwen2 (hidden 128, 2 heads of 64, 2 layers; vLLM's CPU attention needs head_dim >= 64) and the
    character tokenizer to `folder`; return the tokenizer."""
    from rlsd.experiments.tiny import build_char_tokenizer, build_tiny_qwen2

    tokenizer = build_char_tokenizer()
    build_tiny_qwen2(tokenizer, hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256).save_pretrained(
        folder
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def dataset() -> Any:
    """Arithmetic prompts with their answers (the teacher's privileged context)."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": f"Q: {i + 1}+{(i * 7) % 13}=", "solution": str(i + 1 + (i * 7) % 13)}
                              for i in range(64)])  # fmt: skip


class Recorder:
    """Wall time of every step and of the teacher passes within it, with the backend that served the step."""

    def __init__(self, scorer: Any) -> None:
        self.scorer, self.served = scorer, scorer.served
        self.steps: list[dict[str, Any]] = []
        self.teacher_s = 0.0
        inner = scorer.teacher_rows

        def timed_teacher_rows(*args: Any, **kwargs: Any) -> Any:
            """`Scorer.teacher_rows`, timed."""
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.teacher_s += time.perf_counter() - started

        object.__setattr__(scorer, "teacher_rows", timed_teacher_rows)  # the frozen dataclass, changed in place

    def use(self, backend: str) -> None:
        """Score the teacher with the trainer's forward or with the engine."""
        object.__setattr__(self.scorer, "served", self.served if backend == "vllm" else None)

    def callback(self) -> Any:
        """A TrainerCallback that alternates the backend and records each step."""
        from transformers import TrainerCallback

        recorder = self

        class Alternate(TrainerCallback):
            """Even steps: the trainer's teacher; odd steps: the served teacher."""

            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                recorder.backend = BACKENDS[state.global_step % 2]
                recorder.use(recorder.backend)
                recorder.teacher_s, recorder.started = 0.0, time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                recorder.steps.append({"backend": recorder.backend, "step_s": time.perf_counter() - recorder.started,
                                       "teacher_s": recorder.teacher_s})  # fmt: skip

        return Alternate()


def fixed_batch_passes(trainer: Any, recorder: Recorder, repeats: int) -> dict[str, Any]:
    """Both teacher passes on one fixed rollout, alternately (`WARMUP_PASSES` each first), and their log-prob gap."""
    trainer.model.train()
    inputs = [trainer.train_dataset[0]] * trainer.num_generations
    output = trainer._generate_and_score_completions(inputs)
    times: dict[str, list[float]] = {b: [] for b in BACKENDS}
    logps = {}
    for _ in range(WARMUP_PASSES + repeats):
        for backend in BACKENDS:
            recorder.use(backend)
            started = time.perf_counter()
            logps[backend] = trainer.teacher_scores(inputs, output).logps
            times[backend].append(time.perf_counter() - started)
    mask = output["completion_mask"].bool()
    gap = (logps["vllm"] - logps["trainer"])[mask].abs()
    return {
        "pass_s": times, "pass_s_median": {b: statistics.median(t[WARMUP_PASSES:]) for b, t in times.items()},
        "rows": int(mask.size(0)), "tokens": int(mask.sum()),
        "logp_gap_max": float(gap.max()), "logp_gap_mean": float(gap.mean()),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Train the alternating run, time the fixed-batch passes, write the raw JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="measured steps per backend after the warm-up")
    parser.add_argument("--repeats", type=int, default=15, help="measured fixed-batch passes per backend")
    parser.add_argument("--completion", type=int, default=32, help="max_completion_length")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args(argv)
    import torch
    import vllm

    from rlsd import RLSDConfig, RLSDTrainer
    from rlsd.experiments.provenance import provenance

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_folder(Path(tmp) / "model")
        config = RLSDConfig(
            output_dir=str(Path(tmp) / "run"), per_device_train_batch_size=4, num_generations=4,
            max_completion_length=args.completion, max_steps=WARMUP_STEPS + 2 * args.steps, learning_rate=1e-4,
            logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
            disable_tqdm=True, credit="rlsd", teacher="live", teacher_backend="vllm", privileged_source="answer",
            use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.1, vllm_max_model_length=256,
        )  # fmt: skip
        trainer = RLSDTrainer(str(Path(tmp) / "model"), alternating_reward, args=config, train_dataset=dataset(),
                              processing_class=tokenizer)  # fmt: skip
        engine_ready = time.perf_counter() - started
        recorder = Recorder(trainer.scorer)
        trainer.add_callback(recorder.callback())
        trainer.train()
        passes = fixed_batch_passes(trainer, recorder, args.repeats)
    measured = recorder.steps[WARMUP_STEPS:]
    medians = {
        b: {key: statistics.median(s[key] for s in measured if s["backend"] == b) for key in ("step_s", "teacher_s")}
        for b in BACKENDS
    }
    command = ["python", "benchmarks/served-teacher/run.py", *(argv if argv is not None else sys.argv[1:])]
    result = {
        "provenance": {**provenance(command), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "versions": {"torch": torch.__version__, "vllm": vllm.__version__},
        "settings": {
            "model": "tiny Qwen2, hidden 128, 2 layers, 2 heads of 64, float32",
            "batch": 4,
            "generations": 4,
            "max_completion_length": args.completion,
            "warmup_steps": WARMUP_STEPS,
            "measured_steps_per_backend": args.steps,
            "warmup_passes": WARMUP_PASSES,
            "measured_passes_per_backend": args.repeats,
        },
        "steps": recorder.steps,
        "step_medians": medians,
        "fixed_batch": passes,
        "engine_start_s": engine_ready,
        "wall_s": time.perf_counter() - started,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"step_medians": medians, "pass_s_median": passes["pass_s_median"],
                      "logp_gap_max": passes["logp_gap_max"], "wall_s": result["wall_s"]}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
