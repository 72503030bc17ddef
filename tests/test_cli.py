"""`rlsd train` from every recipe with a tiny local model, `rlsd eval`, the help texts, and two processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset
from test_data_rewards import GSM8K, MATH

from rlsd.commands.cli import main as cli_main
from rlsd.commands.evaluate import GENERATION_KEYS, SUMMARY_KEYS, pass_at_k, summarize
from rlsd.commands.train import make_parser

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
TINY_OVERRIDES = [
    "--max_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "4",
    "--gradient_accumulation_steps", "1", "--max_completion_length", "8", "--bf16", "false", "--use_cpu", "true",
    "--gradient_checkpointing", "false", "--dtype", "float32", "--use_vllm", "false", "--save_strategy", "no",
    "--logging_steps", "1", "--disable_tqdm", "true",
]  # fmt: skip


def free_port() -> str:
    """A free local TCP port for torchrun's rendezvous (a fixed one can still be held by an earlier run)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def write_fixture(folder: Path, suffix: str, rows: list[dict]) -> Path:
    path = folder / f"data{suffix}"
    dataset = Dataset.from_list(rows * 4)
    writers = {".jsonl": dataset.to_json, ".json": lambda p: dataset.to_json(p, lines=False),
               ".parquet": dataset.to_parquet, ".csv": dataset.to_csv}  # fmt: skip
    writers[suffix](str(path))
    return path


RECIPE_CREDIT = {"-srpo": "srpo", "-gui-sd": "grpo"}
"""The credit rule of a recipe named for a method other than RLSD (its file name's end)."""


def test_every_recipe_parses_and_names_only_existing_options():
    assert len(RECIPES) >= 6
    for recipe in RECIPES:
        parser = make_parser()  # TrlParser keeps a config's values as its defaults: one parser per recipe
        keys = set(yaml.safe_load(recipe.read_text()))
        # use_cpu: the recipes ask for bf16, which the config refuses on a machine without a GPU otherwise
        script, training, model = parser.parse_args_and_config(args=["--config", str(recipe), "--use_cpu", "true"])
        # a recipe for another method says it by name (GUI-SD: no policy gradient, its credit rule is GRPO's)
        credit = next((rule for end, rule in RECIPE_CREDIT.items() if recipe.stem.endswith(end)), "rlsd")
        assert training.credit == credit and training.loss_type == "dapo", recipe.name
        known = {f for obj in (script, training, model) for f in vars(obj)}
        assert keys <= known, (recipe.name, keys - known)


@pytest.mark.parametrize(
    ("recipe", "suffix", "rows", "dataset_format"),
    [
        ("qwen3-0.6b-gsm8k-lora-1gpu.yaml", ".jsonl", GSM8K, None),
        ("qwen3-1.7b-gsm8k-zero3-8gpu.yaml", ".csv", GSM8K, None),
        ("qwen3-0.6b-dapo-math-lora-1gpu.yaml", ".parquet", MATH, "math"),  # the recipe names dapo_math
        ("qwen3-0.6b-gsm8k-fsdp2-8gpu.yaml", ".json", MATH, None),
    ],
)
@pytest.mark.slow
def test_train_two_steps_from_a_recipe_then_eval(tmp_path, tiny_model_dir, recipe, suffix, rows, dataset_format):
    data = write_fixture(tmp_path, suffix, rows)
    out = tmp_path / "out"
    argv = ["train", "--config", str(ROOT / "recipes" / recipe), "--model_name_or_path", str(tiny_model_dir),
            "--dataset_name", str(data), "--output_dir", str(out), *TINY_OVERRIDES]  # fmt: skip
    if dataset_format is not None:
        argv += ["--dataset_format", dataset_format]
    assert cli_main(argv) == 0
    assert (out / "config.json").exists() or (out / "adapter_config.json").exists()

    eval_dir = tmp_path / "eval"
    assert cli_main(["eval", "--model", str(out), "--dataset", str(data), "--n", "2", "--max_new_tokens", "6",
                     "--output", str(eval_dir), "--max_samples", "3"]) == 0  # fmt: skip
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["num_problems"] == 3 and summary["n"] == 2
    generations = [json.loads(line) for line in (eval_dir / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 6 and set(GENERATION_KEYS) == set(generations[0])


def test_pass_at_k_matches_hand_values():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    summary = summarize([[True, False], [False, False]], [3, 5, 7, 9], [False, False, True, False])
    assert summary["pass@1"] == 0.5 and summary["avg@n"] == 0.25 and summary["pass@k"]["2"] == 0.5
    assert summary["mean_response_tokens"] == 6 and summary["truncation_rate"] == 0.25


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    text = capsys.readouterr().out
    for option in ("--credit", "--rlsd_lambda", "--teacher_sync_steps", "--privileged_column", "--dataset_format",
                   "--use_peft", "--reward_funcs"):  # fmt: skip
        assert option in text
    assert "default: rlsd" in text or "(default: rlsd)" in text
    with pytest.raises(SystemExit):
        cli_main(["demo", "--help"])
    assert "--quick" in capsys.readouterr().out


def run_ddp_worker(tmp_path, model_dir, mode: str, out) -> list[dict]:
    """`tests/ddp_worker.py` in `mode` on two gloo processes under torchrun (GSM8K fixture data): each rank's
    report."""
    data = write_fixture(tmp_path, ".jsonl", GSM8K)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
        str(ROOT / "tests" / "ddp_worker.py"), str(model_dir), str(data), str(out), mode,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_two_processes_agree_on_lambda_and_teacher_sync(tmp_path, tiny_model_dir):
    reports = run_ddp_worker(tmp_path, tiny_model_dir, "rlsd", tmp_path / "ddp")
    assert reports[0]["world_size"] == reports[1]["world_size"] == 2
    assert reports[0]["lambda"] == reports[1]["lambda"] == [0.5, 0.25]
    assert reports[0]["synced"] == reports[1]["synced"] == [0.0, 1.0]
    # Both ranks hold the same policy, it moved, and the teacher is its copy from the sync at step 2.
    assert reports[0]["policy_checksum"] == reports[1]["policy_checksum"] != reports[0]["initial_checksum"]
    assert reports[0]["teacher_checksum"] == reports[1]["teacher_checksum"] == reports[0]["policy_checksum"]


@pytest.mark.slow
def test_two_processes_uni_opd_groups_span_both_ranks(tmp_path, tiny_model_dir):
    reports = run_ddp_worker(tmp_path, tiny_model_dir, "uniopd", tmp_path / "ddp")
    for rank, report in enumerate(reports):
        assert report["groups"], "the rule never ran"
        for call, other in zip(report["groups"], reports[1 - rank]["groups"], strict=True):
            # one group of four rows, two on each rank, seen whole by both ranks
            assert call["group_ids"] == [0, 0, 0, 0] and call["seq"] == other["seq"]
            assert call["local_seq"] == call["seq"][2 * rank : 2 * rank + 2]
            width = len(call["local_output"][0])
            assert [row[:width] for row in call["rule_output"][2 * rank : 2 * rank + 2]] == call["local_output"]


@pytest.mark.slow
def test_two_processes_share_sibling_contexts_and_the_distillation_term(tmp_path, tiny_model_dir):
    """One group spans both ranks; only rank 0's first completion succeeds, so every other row's sibling is that
    completion, also on rank 1; the JSD term trains and both ranks end with the same policy."""
    rank0, rank1 = run_ddp_worker(tmp_path, tiny_model_dir, "family", tmp_path / "ddp-family")
    for step0, step1 in zip(rank0["contexts"], rank1["contexts"], strict=True):
        winner = step0["own"][0]
        assert step0["found"] == [False, True] and step1["found"] == [True, True]
        assert step0["siblings"][1] == step1["siblings"][0] == step1["siblings"][1] == winner
    assert len(rank0["contexts"]) == 2 and rank0["distill_loss"] and rank0["distill_loss"][0] > 0
    assert rank0["policy_checksum"] == rank1["policy_checksum"] != rank0["initial_checksum"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["brts", "pbsd"])
def test_two_processes_train_with_teacher_rollouts(tmp_path, tiny_model_dir, method):
    """BRTS / PBSD under DDP with a group straddling the ranks: each rank generates for its own rows, the extra
    student forward joins TRL's backward, and both ranks end with the same, moved policy."""
    rank0, rank1 = run_ddp_worker(tmp_path, tiny_model_dir, method, tmp_path / f"ddp-{method}")
    assert len(rank0["rollout_loss"]) == len(rank1["rollout_loss"]) == 2
    assert all(loss > 0 for loss in rank0["rollout_loss"])
    assert rank0["policy_checksum"] == rank1["policy_checksum"] != rank0["initial_checksum"]


def test_version_and_help_print_without_importing_torch():
    """`rlsd --help` and `rlsd --version` read no model code: nothing imports torch (it took ~9 s before)."""
    code = (
        "import contextlib, io, sys\n"
        "from rlsd.commands.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    codes = (main(['--version']), main(['--help']))\n"
        "print(codes, 'torch' in sys.modules, out.getvalue().splitlines()[0])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import rlsd

    assert result.stdout.strip() == f"(0, 0) False rlsd {rlsd.__version__}"
