"""The `rlsd` command line as a person meets it (issue 27): an error a person can act on is one line on stderr and
exit status 2 from every subcommand (`--debug`, anywhere on the line, shows the traceback), a bug keeps its
traceback, flags take both spellings, quick benchmarks write under runs/, and `rlsd eval` shows its progress."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from test_data_rewards import GSM8K

from rlsd.commands.cli import main as cli_main
from rlsd.infra.validate import ConfigError

TRAIN_FLAGS = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--reward_funcs", "integer_match"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def one_line(capsys) -> str:
    """What the command wrote to stderr, checked to be exactly one line."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err


def last_line(capsys) -> str:
    """The last line the command wrote to stderr (`datasets` may show a progress bar before it), no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("\n"), err
    return err.rstrip("\n").split("\n")[-1]


def eval_argv(tmp_path: Path, *extra: str) -> list[str]:
    data = write_jsonl(tmp_path / "d.jsonl", GSM8K)
    return ["eval", "--model", str(tmp_path / "model"), "--dataset", str(data), "--output", str(tmp_path / "eval"),
            *extra]  # fmt: skip


# ------------------------------------------------------------------------------------------------ errors
def test_a_config_error_is_one_line_and_exit_2_and_debug_anywhere_shows_the_traceback(tmp_path, capsys):
    argv = eval_argv(tmp_path, "--temperature", "-1")
    assert cli_main(argv) == 2
    assert one_line(capsys) == "rlsd eval: --temperature: must be >= 0, got -1.0; 0 is greedy decoding\n"
    for debug in ([*argv, "--debug"], ["--debug", *argv], [argv[0], "--debug", *argv[1:]]):
        with pytest.raises(ConfigError, match="--temperature: must be >= 0"):
            cli_main(debug)


def test_train_on_a_dataset_missing_its_column_is_one_line(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", GSM8K)
    out = tmp_path / "out"
    argv = ["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir",
            str(out), "--prompt_column", "question", "--answer_column", "solution", *TRAIN_FLAGS]  # fmt: skip
    assert cli_main(argv) == 2
    line = last_line(capsys)
    assert line.startswith("rlsd train: format 'generic' needs column(s) ['solution']; the dataset has"), line
    with pytest.raises(ValueError, match=r"needs column\(s\) \['solution'\]"):
        cli_main([*argv, "--debug"])


def test_a_flag_value_of_the_wrong_type_is_one_line_not_the_usage(tmp_path, capsys):
    for argv, flag in ((["train", "--dataset_name", "d.jsonl", "--learning_rate", "abc"], "--learning_rate"),
                       (eval_argv(tmp_path, "--n", "abc"), "--n"),
                       (["bench", "methods", "--seeds", "abc"], "--seeds")):  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            cli_main(argv)
        assert stop.value.code == 2
        line = one_line(capsys)
        assert f"argument {flag}" in line and "'abc'" in line and "--help" in line, line
    # values that TRL's config refuses while the flags are parsed, and a misspelt flag
    assert cli_main(["train", "--dataset_name", "d.jsonl", "--use_cpu", "true", "--per_device_train_batch_size", "4",
                     "--num_generations", "3"]) == 2  # fmt: skip
    line = one_line(capsys)
    assert line == "rlsd train: the arguments: generation_batch_size (4) must be divisible by num_generations (3).\n"
    with pytest.raises(SystemExit):
        cli_main(["train", "--dataset_name", "d.jsonl", "--use_cpu", "true", "--learning_rte", "1"])
    assert "unrecognized arguments: --learning_rte 1" in one_line(capsys)


def test_bench_and_demo_refuse_an_unknown_method_in_one_line(capsys):
    assert cli_main(["bench", "methods", "--quick", "--methods", "nosuch"]) == 2
    assert one_line(capsys).startswith("rlsd bench: --methods: unknown method(s) ['nosuch']")
    assert cli_main(["demo", "--quick", "--methods", "nosuch", "--no-progress"]) == 2
    assert one_line(capsys).startswith("rlsd demo: unknown method(s) ['nosuch']")


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(args):
        return {}["missing"]

    monkeypatch.setattr("rlsd.commands.evaluate.evaluate", broken)
    with pytest.raises(KeyError):
        cli_main(eval_argv(tmp_path))
    # a ValueError that no check of rlsd raised (here the standard library's) is a bug too
    monkeypatch.setattr("rlsd.commands.evaluate.evaluate", lambda args: statistics.mean([]))
    with pytest.raises(statistics.StatisticsError):
        cli_main(eval_argv(tmp_path))


# ------------------------------------------------------------------------------------------------ flag spellings
def test_bench_and_train_flags_take_dashes_and_underscores():
    from rlsd.commands.train import make_parser as train_parser
    from rlsd.experiments.bench import make_parser as bench_parser

    for flag in ("--greedy-only", "--greedy_only"):
        assert bench_parser().parse_args(["study", flag]).greedy_only is True
    args = bench_parser().parse_args(["methods", "--eval_every", "3", "--no_progress"])
    assert args.eval_every == 3 and args.no_progress is True
    parser = train_parser()
    for flag in ("--max-prompt-length", "--max_prompt_length"):
        script, training, _ = parser.parse_args_and_config(
            args=["--dataset_name", "d.jsonl", flag, "7", "--use-cpu", "true", "--rlsd_lambda", "0.25"]
        )
        assert script.max_prompt_length == 7 and training.use_cpu is True and training.rlsd_lambda == 0.25


def test_eval_and_demo_flags_take_both_spellings(tmp_path, monkeypatch):
    from rlsd.commands.evaluate import make_parser as eval_parser

    args = eval_parser().parse_args(["--model", "m", "--dataset", "d", "--output", "o", "--max-new-tokens", "5"])
    assert args.max_new_tokens == 5
    seen = {}

    def fake_run_demo(config, progress, **kwargs):
        seen.update(config=config, progress=progress, threads=kwargs.get("threads"))
        return {}

    monkeypatch.setattr("rlsd.experiments.demo.run_demo", fake_run_demo)
    monkeypatch.setattr("rlsd.commands.cli.print_summary", lambda summary, out: None)
    argv = ["demo", "--quick", "--out", str(tmp_path / "demo"), "--eval_every", "1", "--no_progress", "--threads", "1"]
    assert cli_main(argv) == 0
    assert seen["config"].eval_every == 1 and seen["progress"] is False and seen["threads"] == 1


# ------------------------------------------------------------------------------------------------ quick benchmarks
def test_quick_benchmarks_write_under_runs_unless_told(tmp_path, monkeypatch):
    from rlsd.experiments import bench

    monkeypatch.chdir(tmp_path)
    seen = []

    def fake_run_methods(config, methods, seeds, progress, resume=False, command=None):
        seen.append(config.out)
        return {"table": {}}

    monkeypatch.setattr(bench, "run_methods", fake_run_methods)
    assert bench.main(["methods", "--quick", "--methods", "grpo", "--seeds", "1", "--no-progress"]) == 0
    assert seen == [Path("runs/bench-methods-quick")]
    for command in ("methods", "cost", "study"):
        parse = bench.make_parser().parse_args
        assert bench.output_folder(parse([command, "--quick"])) == Path(f"runs/bench-{command}-quick")
        assert bench.output_folder(parse([command])) == Path(f"benchmarks/{command}")  # the committed evidence
        assert bench.output_folder(parse([command, "--quick", "--out", "x"])) == Path("x")
    assert not (tmp_path / "benchmarks").exists()


# ------------------------------------------------------------------------------------------------ eval's progress
def test_eval_shows_a_progress_bar_over_problems_unless_told_not_to(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", GSM8K)
    argv = ["eval", "--model", str(tiny_model_dir), "--dataset", str(data), "--n", "2", "--max_new_tokens", "2",
            "--batch_size", "2", "--reward", "integer_match"]  # fmt: skip
    assert cli_main([*argv, "--output", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "problems" in err and "2/2" in err, err
    assert cli_main([*argv, "--output", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "problems" not in capsys.readouterr().err
