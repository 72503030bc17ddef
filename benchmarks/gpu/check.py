"""GRPO vs RLSD step time and peak memory on one GPU (or a CPU smoke run), plus FSDP2 and ZeRO-3 launch checks and
RLSD generating with TRL's colocated vLLM engine, its teacher scored by the trainer or served by that engine.

`python benchmarks/gpu/check.py [--smoke] [--out FILE]` prints one markdown table and writes the raw numbers as JSON.
Every row runs on its own; a row that cannot run is reported as skipped or failed with its reason.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The three in-process rows: name -> RLSDConfig overrides.
CORE_ROWS: dict[str, dict[str, Any]] = {
    "grpo": {"credit": "grpo"},
    "rlsd-live": {"credit": "rlsd", "teacher": "live"},
    "rlsd-synced": {"credit": "rlsd", "teacher": "synced"},
}
# The launched rows: name -> (backend, RLSDConfig overrides, outcome expected).
LAUNCH_ROWS: dict[str, tuple[str, dict[str, Any], str]] = {
    "fsdp2-distill": ("fsdp2", {"credit": "rlsd", "teacher": "live", "distill_loss": "jsd"}, "ok"),
    "zero3-synced": ("zero3", {"credit": "rlsd", "teacher": "synced"}, "refused"),
    "zero3-live": ("zero3", {"credit": "rlsd", "teacher": "live"}, "ok"),
}
# The vLLM rows (each in its own process, so that its engine's memory and distributed state go with it): name ->
# RLSDConfig overrides. Skipped where vllm is not importable.
VLLM_ROWS: dict[str, dict[str, Any]] = {
    "vllm-colocate": {"credit": "rlsd", "teacher": "live", "use_vllm": True, "vllm_mode": "colocate"},
    "vllm-served-teacher": {
        "credit": "rlsd", "teacher": "live", "teacher_backend": "vllm", "use_vllm": True, "vllm_mode": "colocate",
    },
}  # fmt: skip
QWEN3_06B_SHAPE: dict[str, Any] = dict(
    hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
    intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096,
)  # fmt: skip
SMOKE_SHAPE: dict[str, Any] = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    intermediate_size=64, tie_word_embeddings=True, max_position_embeddings=512,
)  # fmt: skip
SMOKE_VLLM_SHAPE: dict[str, Any] = dict(SMOKE_SHAPE, hidden_size=128, head_dim=64, intermediate_size=256)
"""vLLM's CPU attention refuses heads under 64."""


def parity_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """A deterministic reward with spread inside every group: the parity of a checksum of the completion."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(zlib.crc32(t.encode()) % 2) for t in texts]


def run_settings(smoke: bool) -> dict[str, Any]:
    """Steps and sizes of a run: small on CPU, Qwen3-0.6B shaped and bf16 on the GPU."""
    if smoke:
        return dict(warmup=1, measured=1, batch=4, generations=4, completion=8, launch_steps=1)
    return dict(warmup=2, measured=4, batch=8, generations=8, completion=256, launch_steps=2)


def build_model(smoke: bool, vocab_size: int, device: str, vllm: bool = False) -> Any:
    """A randomly initialised Qwen3 causal LM: Qwen3-0.6B's shape in bf16, or a tiny fp32 one for the smoke run."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config
    from transformers.integrations import is_deepspeed_zero3_enabled

    shape = dict(SMOKE_VLLM_SHAPE if vllm else SMOKE_SHAPE, vocab_size=vocab_size) if smoke else QWEN3_06B_SHAPE
    config = Qwen3Config(**shape, pad_token_id=0)
    dtype = torch.float32 if smoke else torch.bfloat16
    torch.manual_seed(0)
    if is_deepspeed_zero3_enabled():  # built partitioned (deepspeed.zero.Init), as from_pretrained would be
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def build_dataset(n: int) -> Any:
    """Short arithmetic prompts with their answers in the `solution` column."""
    from datasets import Dataset

    rows = [{"prompt": f"Q: {i + 1}+{(i * 7) % 13}=", "solution": str(i + 1 + (i * 7) % 13)} for i in range(n)]
    return Dataset.from_list(rows)


def cuda_sync() -> None:
    """Wait for queued CUDA work so that the clock measures it."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_timer() -> Any:
    """A TrainerCallback that records the wall time of every optimizer step (synchronising CUDA)."""
    from transformers import TrainerCallback

    sync = cuda_sync

    class StepTimer(TrainerCallback):
        """Wall time between on_step_begin and on_step_end."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.teacher_times: list[float] = []
            self.start = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync()
            self.teacher_times.append(0.0)
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync()
            self.times.append(time.perf_counter() - self.start)

    return StepTimer()


def vllm_settings(smoke: bool, cpu: bool) -> dict[str, Any]:
    """The colocated engine's share of the device and its context length (teacher prompt + completion)."""
    if cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache (vLLM's CPU default takes more)
    return {"vllm_gpu_memory_utilization": 0.1 if cpu else 0.3, "vllm_max_model_length": 256 if smoke else 512}


def saved_for_vllm(model: Any, tokenizer: Any, folder: str) -> Any:
    """The model saved with its tokenizer to `folder`, where TRL's colocated engine loads it (`model.name_or_path`)."""
    path = os.path.join(folder, "model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    model.name_or_path = model.config.name_or_path = path  # set at the model's construction: set both
    return model


def timed_teacher_passes(trainer: Any, times: list[float]) -> None:
    """Accumulate into `times[-1]` the wall time of the trainer's teacher passes (`Scorer.teacher_rows`)."""
    scorer = trainer.scorer
    inner = scorer.teacher_rows

    def timed(*args: Any, **kwargs: Any) -> Any:
        """`Scorer.teacher_rows`, timed (synchronising CUDA)."""
        cuda_sync()
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            cuda_sync()
            if times:
                times[-1] += time.perf_counter() - started

    object.__setattr__(scorer, "teacher_rows", timed)  # the frozen dataclass, changed in place


def train_row(overrides: dict[str, Any], smoke: bool, max_steps: int, output_dir: str, cpu: bool) -> dict[str, Any]:
    """Train one RLSDTrainer run and return its step times, teacher-pass times and peak memory."""
    import torch

    from rlsd import RLSDConfig, RLSDTrainer
    from rlsd.experiments.tiny import build_char_tokenizer

    settings = run_settings(smoke)
    tokenizer = build_char_tokenizer()
    device = "cpu" if cpu else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    args = RLSDConfig(
        output_dir=output_dir, per_device_train_batch_size=settings["batch"], num_generations=settings["generations"],
        max_completion_length=settings["completion"], max_steps=max_steps, learning_rate=1e-6, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=cpu, bf16=not smoke, seed=0, disable_tqdm=True,
        **overrides, **(vllm_settings(smoke, cpu) if overrides.get("use_vllm") else {}),
    )  # fmt: skip
    model = build_model(smoke, len(tokenizer), device, bool(overrides.get("use_vllm")))  # after the config (ZeRO-3)
    if overrides.get("use_vllm"):
        model = saved_for_vllm(model, tokenizer, output_dir)
    timer = step_timer()
    trainer = RLSDTrainer(
        model, parity_reward, args=args, train_dataset=build_dataset(64), processing_class=tokenizer, callbacks=[timer]
    )
    timed_teacher_passes(trainer, timer.teacher_times)
    if torch.cuda.is_available() and not cpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    backend = str(trainer.accelerator.distributed_type).split(".")[-1].lower()
    sharded = any(type(p).__name__ == "DTensor" for p in trainer.model.parameters())
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and not cpu else None
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"step_times_s": timer.times, "teacher_times_s": timer.teacher_times, "peak_mem_bytes": peak,
            "backend": backend, "dtensor_params": sharded}  # fmt: skip


def median_after_warmup(times: list[float], warmup: int) -> float | None:
    """The median step time once the warm-up steps are dropped (all steps if there are no more)."""
    kept = times[warmup:] or times
    return statistics.median(kept) if kept else None


def core_row(name: str, smoke: bool, cpu: bool) -> dict[str, Any]:
    """Run one of grpo / rlsd-live / rlsd-synced in this process."""
    settings = run_settings(smoke)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as folder:
            raw = train_row(CORE_ROWS[name], smoke, settings["warmup"] + settings["measured"], folder, cpu)
    except Exception as error:  # one row failing must not lose the table
        return {"row": name, "status": "failed", "reason": f"{type(error).__name__}: {error}"[:300]}
    return {
        "row": name, "status": "ok", "step_s": median_after_warmup(raw["step_times_s"], settings["warmup"]),
        "wall_s": time.perf_counter() - started, **raw,
    }  # fmt: skip


def accelerate_config(backend: str, cpu: bool, folder: str) -> str:
    """Write a one-process accelerate config for FSDP2 or ZeRO-3 (from the project's recipes) and return its path."""
    import yaml

    config = yaml.safe_load((ROOT / "recipes" / "accelerate" / f"{backend}.yaml").read_text())
    config.update(num_processes=1, use_cpu=cpu, mixed_precision="no" if cpu else "bf16")
    config.get("fsdp_config", {})["fsdp_cpu_ram_efficient_loading"] = False  # the model is built, not loaded
    path = os.path.join(folder, f"{backend}.yaml")
    Path(path).write_text(yaml.safe_dump(config))
    return path


def launch_skip_reason(backend: str, cpu: bool) -> str | None:
    """Why a launched row cannot run here, or None."""
    if backend == "zero3" and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed not installed and no deepspeed wheel found in RLSD_WHEELS"
    if backend == "zero3" and cpu:
        return "ZeRO-3 needs a GPU"
    if backend == "fsdp2" and cpu:  # accelerate turns FSDP on for MULTI_GPU-like states only, never MULTI_CPU
        return "accelerate applies FSDP only on a GPU (CPU FSDP2 is tests/test_fsdp2_distill.py, gloo)"
    return None


def launch_row(name: str, smoke: bool, cpu: bool, timeout: int) -> dict[str, Any]:
    """Run a row under `accelerate launch --num_processes 1` and read its JSON report."""
    backend, _, expected = LAUNCH_ROWS[name]
    reason = launch_skip_reason(backend, cpu)
    if reason:
        return {"row": name, "status": "skipped", "reason": reason}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        report = os.path.join(folder, "report.json")
        config = accelerate_config(backend, cpu, folder)
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
            "--num_processes", "1", "--main_process_port", str(free_port()), __file__, "--worker", name,
            "--report", report, *(["--smoke"] if smoke else []), *(["--cpu"] if cpu else []),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"row": name, "status": "failed", "reason": f"timed out after {timeout} s"}
        wall = time.perf_counter() - started
        if not os.path.exists(report):
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"row": name, "status": "failed", "reason": f"exit {result.returncode}: {tail[0][:300]}"}
        raw = json.loads(Path(report).read_text())
    return judge_launch(name, raw, expected, wall)


def judge_launch(name: str, raw: dict[str, Any], expected: str, wall: float) -> dict[str, Any]:
    """Turn a worker's report into a row: a ZeRO-3 copy-teacher refusal is the expected outcome there."""
    row = {"row": name, "wall_s": wall, **raw}
    if expected == "refused":
        refused = raw.get("status") == "failed" and "ZeRO-3" in raw.get("reason", "")
        row.update(status="refused as designed" if refused else "unexpected: " + raw.get("status", "?"))
    elif raw.get("status") == "ok" and name.startswith("fsdp2") and not raw["dtensor_params"]:
        row.update(status="failed", reason=f"ran as {raw['backend']!r}, parameters not sharded by FSDP2")
    elif raw.get("status") == "ok":
        row["step_s"] = median_after_warmup(raw["step_times_s"], 1)
        row["note"] = f"{raw['backend']}, DTensor params: {raw['dtensor_params']}"
    return row


def vllm_skip_reason() -> str | None:
    """Why the vLLM rows cannot run here, or None."""
    if importlib.util.find_spec("vllm") is None:
        return ("vllm is not importable by this Python (GPU: pip install vllm==0.31.0, the vLLM TRL 1.16 supports; "
                "CPU: make install-vllm, then PYTHON=.venv-vllm/bin/python)")  # fmt: skip
    return None


def vllm_row(name: str, smoke: bool, cpu: bool, timeout: int) -> dict[str, Any]:
    """Run a vLLM row in a child process (`--worker`): its engine's memory is freed when the row ends."""
    reason = vllm_skip_reason()
    if reason:
        return {"row": name, "status": "skipped", "reason": reason}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        report = os.path.join(folder, "report.json")
        command = [sys.executable, __file__, "--worker", name, "--report", report,
                   *(["--smoke"] if smoke else []), *(["--cpu"] if cpu else [])]  # fmt: skip
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"row": name, "status": "failed", "reason": f"timed out after {timeout} s"}
        if not os.path.exists(report):
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"row": name, "status": "failed", "reason": f"exit {result.returncode}: {tail[0][:300]}"}
        raw = json.loads(Path(report).read_text())
    row = {"row": name, "wall_s": time.perf_counter() - started, **raw}
    if raw.get("status") == "ok":
        warmup = run_settings(smoke)["warmup"]
        row["step_s"] = median_after_warmup(raw["step_times_s"], warmup)
        row["teacher_s"] = median_after_warmup(raw["teacher_times_s"], warmup)
    return row


def worker(name: str, smoke: bool, cpu: bool, report: str) -> None:
    """Inside `accelerate launch` (or a plain child process for a vLLM row): train the row and write its report (a
    failure is a report too)."""
    settings = run_settings(smoke)
    launched = name in LAUNCH_ROWS
    steps = settings["launch_steps"] if launched else settings["warmup"] + settings["measured"]
    try:
        with tempfile.TemporaryDirectory() as folder:
            raw = train_row(LAUNCH_ROWS[name][1] if launched else VLLM_ROWS[name], smoke, steps, folder, cpu)
        raw["status"] = "ok"
    except Exception as error:
        raw = {"status": "failed", "reason": f"{type(error).__name__}: {error}"[:300]}
    Path(report).write_text(json.dumps(raw))


def free_port() -> int:
    """A free local TCP port for the launcher's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(cpu: bool) -> dict[str, Any]:
    """The device and library versions behind the numbers."""
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for module in ("trl", "accelerate", "deepspeed", "vllm"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:
            versions[module] = None
    device = "cpu (smoke)" if cpu else torch.cuda.get_device_name(0)
    return {"device": device, "host": socket.gethostname(), "versions": versions}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Step time and peak memory of every in-process or vLLM row as a ratio to GRPO's; the served teacher's step and
    teacher pass as ratios to `vllm-colocate`'s (the same run with the trainer's teacher), in its note."""
    base = next((r for r in rows if r["row"] == "grpo" and r.get("status") == "ok"), None)
    for row in (r for r in rows if r["row"] in CORE_ROWS or r["row"] in VLLM_ROWS):
        for key, ratio in (("step_s", "time_ratio"), ("peak_mem_bytes", "mem_ratio")):
            if base and row.get(key) and base.get(key):
                row[ratio] = row[key] / base[key]
        if row["row"] in VLLM_ROWS and row.get("status") == "ok":
            engine = " (peak memory includes the engine's)" if row.get("peak_mem_bytes") else ""
            row["note"] = f"teacher pass {cell(row.get('teacher_s'), '.3f')} s{engine}"
    trainer = next((r for r in rows if r["row"] == "vllm-colocate" and r.get("step_s")), None)
    served = next((r for r in rows if r["row"] == "vllm-served-teacher" and r.get("step_s")), None)
    if trainer and served and trainer.get("teacher_s") and served.get("teacher_s") is not None:
        served["step_ratio_to_trainer_teacher"] = served["step_s"] / trainer["step_s"]
        served["teacher_ratio_to_trainer_teacher"] = served["teacher_s"] / trainer["teacher_s"]
        served["note"] += (f"; x vllm-colocate: step {served['step_ratio_to_trainer_teacher']:.2f}, teacher pass "
                           f"{served['teacher_ratio_to_trainer_teacher']:.2f}")  # fmt: skip


def cell(value: Any, fmt: str) -> str:
    """A table cell: formatted number or n/a."""
    return format(value, fmt) if isinstance(value, int | float) else "n/a"


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of all rows."""
    lines = ["| row | status | step s | x grpo | peak GiB | x grpo | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = r["peak_mem_bytes"] / 2**30 if r.get("peak_mem_bytes") else None
        lines.append(
            f"| {r['row']} | {r['status']} | {cell(r.get('step_s'), '.3f')} | {cell(r.get('time_ratio'), '.2f')} "
            f"| {cell(mem, '.2f')} | {cell(r.get('mem_ratio'), '.2f')} | {r.get('reason') or r.get('note', '')} |"
        )
    return "\n".join(lines)


def default_out(cpu: bool) -> Path:
    """benchmarks/gpu/results/<gpu name or host>.json."""
    import torch

    name = "cpu-smoke" if cpu else torch.cuda.get_device_name(0)
    return ROOT / "benchmarks" / "gpu" / "results" / ("".join(c if c.isalnum() else "-" for c in name) + ".json")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every row, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 model on CPU, 1 warm-up + 1 measured step")
    parser.add_argument("--out", help="JSON path (default benchmarks/gpu/results/<device>.json)")
    parser.add_argument("--rows", help="comma-separated subset of rows")
    parser.add_argument("--launch-timeout", type=int, default=180, help="seconds per launched row at most")
    parser.add_argument("--vllm-timeout", type=int, default=300, help="seconds per vLLM row at most")
    parser.add_argument("--budget", type=float, default=540, help="seconds for all rows; later rows are skipped")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    cpu = args.cpu or args.smoke or not torch.cuda.is_available()
    if args.worker:
        worker(args.worker, args.smoke, cpu, args.report)
        return 0
    if cpu and not args.smoke:
        print("no CUDA device: run with --smoke for the CPU check", file=sys.stderr)
        return 2
    started = time.perf_counter()
    every = (*CORE_ROWS, *LAUNCH_ROWS, *VLLM_ROWS)  # the vLLM rows last: their engines take a share of the GPU
    wanted = args.rows.split(",") if args.rows else every
    unknown = sorted(set(wanted) - set(every))
    if unknown:
        print(f"--rows: unknown {', '.join(unknown)}; known: {', '.join(every)}", file=sys.stderr)
        return 2
    rows = []
    for name in [n for n in every if n in wanted]:
        left = args.budget - (time.perf_counter() - started)
        if left < 20:
            rows.append({"row": name, "status": "skipped", "reason": f"time budget of {args.budget:.0f} s spent"})
        elif name in CORE_ROWS:
            rows.append(core_row(name, args.smoke, cpu))
        elif name in VLLM_ROWS:
            rows.append(vllm_row(name, args.smoke, cpu, int(min(args.vllm_timeout, left))))
        else:
            rows.append(launch_row(name, args.smoke, cpu, int(min(args.launch_timeout, left))))
        print(f"[{time.perf_counter() - started:6.1f} s] {name}: {rows[-1]['status']}", file=sys.stderr, flush=True)
    add_ratios(rows)
    elapsed = time.perf_counter() - started
    info = environment(cpu)
    print(f"device: {info['device']}; versions: {info['versions']}")
    print(table(rows))
    print(f"elapsed: {elapsed:.1f} s")
    out = Path(args.out) if args.out else default_out(cpu)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = run_settings(args.smoke)
    out.write_text(json.dumps({**info, "settings": settings, "elapsed_s": elapsed, "rows": rows}, indent=2))
    print(f"raw numbers: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
