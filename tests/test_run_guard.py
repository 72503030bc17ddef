"""Reliability v3: a run never writes into or deletes a folder holding one of its inputs, one run at a time holds
its output folder, overlong prompts and datasets too small for one step are refused, and an unwritable output
folder is named before anything loads; end to end through `rlsd train` and function by function."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset

from rlsd.commands.train import main as train_main
from rlsd.infra import run_guard
from rlsd.infra.run_guard import (
    LOCK_FILE,
    OutputDirLockedError,
    check_dataset_makes_a_step,
    check_inputs_apart,
    check_output_writable,
    check_prompt_lengths,
    model_context_length,
    prompt_tokens,
    render_prompt,
    run_inputs,
    run_lock,
)
from rlsd.infra.validate import DatasetError, OutputDirError

ROWS = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(8)]
TINY = ["--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "8",
        "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--logging_steps", "1", "--disable_tqdm",
        "true", "--reward_funcs", "integer_match", "--max_steps", "1", "--save_strategy", "no"]  # fmt: skip


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


def train_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out), *TINY, *extra]


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    """A private copy of the tiny model folder (a test may try to have it deleted)."""
    import shutil

    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


# ------------------------------------------------------------------------------------------------ 1. inputs apart
def test_overwrite_into_the_model_folder_is_refused_and_the_model_kept(tmp_path, model_copy):
    data = write_rows(tmp_path / "d.jsonl", ROWS)
    before = tree(model_copy)
    with pytest.raises(OutputDirError, match=rf"output folder {model_copy}: is the model {model_copy}"):
        train_main(train_argv(model_copy, data, model_copy, "--overwrite_output_dir", "true"))  # N-SEC01
    assert tree(model_copy) == before


def test_output_folder_holding_the_dataset_or_inside_the_model_is_refused(tmp_path, model_copy):
    (tmp_path / "data").mkdir()
    data = write_rows(tmp_path / "data" / "d.jsonl", ROWS)
    with pytest.raises(OutputDirError, match=rf"{tmp_path}/data: holds the dataset {data}"):
        train_main(train_argv(model_copy, data, tmp_path / "data", "--overwrite_output_dir", "true"))
    with pytest.raises(OutputDirError, match=rf"lies inside the model {model_copy}"):
        train_main(train_argv(model_copy, data, model_copy / "run"))
    assert not (model_copy / "run").exists()


def test_inputs_apart_covers_teachers_checkpoints_rewards_and_symlinks(tmp_path):
    model, teacher, ckpt_run = tmp_path / "model", tmp_path / "teacher", tmp_path / "run"
    for folder in (model, teacher, ckpt_run / "checkpoint-5"):
        folder.mkdir(parents=True)
    check_inputs_apart(tmp_path / "out", run_inputs(str(model), teachers=["Qwen/Qwen3-0.6B"]))  # a hub name
    with pytest.raises(OutputDirError, match=rf"is the teacher 2 {teacher}: the run would write"):
        check_inputs_apart(teacher, run_inputs(str(model), teachers=["Qwen/Qwen3-0.6B", str(teacher)]))
    link = tmp_path / "link"
    link.symlink_to(model)
    with pytest.raises(OutputDirError, match=r"is the model"):
        check_inputs_apart(link, {"model": str(model)})
    # resuming from a checkpoint inside the output folder is the ordinary layout; writing into the checkpoint is not
    check_inputs_apart(ckpt_run, {}, resume_checkpoint=str(ckpt_run / "checkpoint-5"))
    with pytest.raises(OutputDirError, match=r"lies inside the checkpoint to resume from"):
        check_inputs_apart(ckpt_run / "checkpoint-5" / "x", {}, resume_checkpoint=str(ckpt_run / "checkpoint-5"))
    # a model that is a checkpoint of the output folder would be deleted by --overwrite_output_dir
    with pytest.raises(OutputDirError, match=r"holds the model"):
        check_inputs_apart(ckpt_run, {"model": str(ckpt_run / "checkpoint-5")})


def test_reward_file_is_an_input(tmp_path, monkeypatch):
    rewards = tmp_path / "myrewards.py"
    rewards.write_text("def fn(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import functools
    import importlib

    func = importlib.import_module("myrewards").fn
    guarded = functools.wraps(func)(lambda *a, **k: func(*a, **k))
    inputs = run_inputs("Qwen/Qwen3-0.6B", rewards={"myrewards.fn": guarded, "integer_match": len},
                        builtin_rewards=["integer_match"])  # fmt: skip
    assert inputs["reward file of 'myrewards.fn'"] == str(rewards) and "reward file of 'integer_match'" not in inputs
    with pytest.raises(OutputDirError, match=r"holds the reward file of 'myrewards.fn'"):
        check_inputs_apart(tmp_path, inputs)


# ------------------------------------------------------------------------------------------------ weak: writable
def test_uncreatable_output_folder_is_named_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch):
    data = write_rows(tmp_path / "d.jsonl", ROWS)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(OutputDirError, match=rf"output folder {blocker}/out: cannot be created: {blocker} is a file"):
        train_main(train_argv(tiny_model_dir, data, blocker / "out"))


def test_unwritable_output_folder_names_the_os_error(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_guard.tempfile, "mkdtemp", denied)
    with pytest.raises(OutputDirError, match=rf"{tmp_path}: is not writable \(Permission denied\)"):
        check_output_writable(tmp_path)
    with pytest.raises(OutputDirError, match=rf"{tmp_path}/new/out: cannot be created in {tmp_path}"):
        check_output_writable(tmp_path / "new" / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(OutputDirError, match=r"is not writable"):
        check_output_writable(folder)


# ------------------------------------------------------------------------------------------------ 2. the lock
def test_lock_refuses_a_second_holder_and_is_released_also_on_an_exception(tmp_path):
    out = tmp_path / "out"
    with run_lock(out) as lock:
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(OutputDirLockedError, match=rf"{out}: is in use by another rlsd train run \(pid "
                           rf"{os.getpid()} on host {socket.gethostname()}"), run_lock(out):  # fmt: skip
            pass
        assert lock.exists()  # the refused one did not release the holder's lock
    assert not (out / LOCK_FILE).exists()
    with pytest.raises(RuntimeError, match="boom"), run_lock(out):
        raise RuntimeError("boom")
    assert not (out / LOCK_FILE).exists() and os.listdir(out) == []
    with run_lock(out, enabled=False) as lock:  # not the saving main process
        assert lock is None and not (out / LOCK_FILE).exists()


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "started": "x"}))
    with caplog.at_level(logging.WARNING), run_lock(out) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "taking over the stale lock" in caplog.text
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead_pid(), "host": "another-host", "started": "x"}))
    with pytest.raises(OutputDirLockedError, match=r"on host another-host"), run_lock(out):
        pass


def test_lock_works_without_hard_links(tmp_path, monkeypatch):
    def no_links(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(run_guard.os, "link", no_links)
    with run_lock(tmp_path / "out") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(OutputDirLockedError), run_lock(tmp_path / "out"):
            pass
    assert os.listdir(tmp_path / "out") == []


def test_second_train_on_a_held_output_folder_is_refused_before_anything_is_touched(tmp_path, tiny_model_dir):
    data = write_rows(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "out"
    with run_lock(out):  # the first run, alive in this process
        (out / "checkpoint-1").mkdir()
        (out / "checkpoint-1" / "trainer_state.json").write_text("{}")
        before = tree(out)
        with pytest.raises(OutputDirLockedError, match=rf"output folder {out}: is in use .*pid {os.getpid()}"):
            train_main(train_argv(tiny_model_dir, data, out, "--overwrite_output_dir", "true"))  # N-K01
        assert tree(out) == before


@pytest.mark.slow
def test_a_run_takes_over_a_stale_lock_and_releases_it(tmp_path, tiny_model_dir, caplog):
    data = write_rows(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "started": "x"}))
    with caplog.at_level(logging.WARNING):
        assert train_main(train_argv(tiny_model_dir, data, out)) == 0
    assert "taking over the stale lock" in caplog.text
    assert (out / "config.json").exists() and not (out / LOCK_FILE).exists()


# ------------------------------------------------------------------------------------------------ 5. prompt lengths
def test_trl_has_no_max_prompt_length_so_train_owns_the_flag():
    from trl import GRPOConfig

    assert "max_prompt_length" not in GRPOConfig.__dataclass_fields__


def test_overlong_prompt_is_refused_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch):
    data = write_rows(tmp_path / "d.jsonl", [*ROWS[:3], {"question": "9" * 4_000_000, "answer": "#### 9"}, *ROWS])
    monkeypatch.setattr("rlsd.trainer.RLSDTrainer.__init__", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(DatasetError, match=r"row 3 of the train split: the prompt is more than 512 tokens "
                       r"\(4,0\d\d,\d\d\d characters\), over the limit of 512"):  # fmt: skip
        train_main(train_argv(tiny_model_dir, data, tmp_path / "out"))  # D15: 512 = the tiny model's context
    over_40 = r"row 0 of the train split: the prompt is \d+ tokens, over the limit of 40 "
    with pytest.raises(DatasetError, match=over_40):
        train_main(train_argv(tiny_model_dir, data, tmp_path / "out", "--max_prompt_length", "40"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_truncate_prompts_trains_on_the_cut_prompt(tmp_path, tiny_model_dir, caplog):
    data = write_rows(tmp_path / "d.jsonl", [{"question": "7" * 5000 + " What is 1 + 1?", "answer": "#### 2"}, *ROWS])
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert train_main(train_argv(tiny_model_dir, data, out, "--truncate_prompts", "true")) == 0
    assert "1 prompt(s) of the train split were cut to 512 tokens" in caplog.text and (out / "config.json").exists()


class CountingTokenizer:
    """A tokenizer wrapper recording the longest text it was asked to tokenize."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.tokenizer(text, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        return self.tokenizer.apply_chat_template(*args, **kwargs)


def conversation(question: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]


def test_prompt_lengths_match_the_trainers_tokenization_and_huge_prompts_are_not_tokenized_whole(tokenizer):
    prompt = conversation("What is 2 + 2?")
    text, special = render_prompt(prompt, tokenizer)
    trl_ids = tokenizer.apply_chat_template([prompt], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert prompt_tokens(text, tokenizer, 512, special) == (len(trl_ids["input_ids"][0]), True)
    counting = CountingTokenizer(tokenizer)
    dataset = Dataset.from_list([{"prompt": conversation("x" * 4_000_000)}])
    with pytest.raises(DatasetError, match=r"row 0 of the eval split: the prompt is more than 100 tokens"):
        check_prompt_lengths(dataset, counting, 100, split="eval")
    assert counting.longest <= 101 * run_guard.SCAN_CHARS_PER_TOKEN


def test_truncate_prompts_keeps_the_end_of_the_last_turn_within_the_limit(tokenizer):
    long_question = "".join(str(i % 10) for i in range(3000)) + " END?"
    dataset = Dataset.from_list([{"prompt": conversation(long_question)}, {"prompt": conversation("short?")}])
    cut = check_prompt_lengths(dataset, tokenizer, 64, truncate=True)
    plain = check_prompt_lengths(Dataset.from_list([{"prompt": "plain " * 200 + "END"}]), tokenizer, 64, truncate=True)
    assert plain["prompt"][0].endswith("plain END")
    for prompt in [*cut["prompt"], *plain["prompt"]]:
        text, special = render_prompt(prompt, tokenizer)
        assert prompt_tokens(text, tokenizer, 64, special)[0] <= 64
    assert cut["prompt"][0][-1]["content"].endswith(" END?") and cut["prompt"][0][0]["content"] == "Be brief."
    assert cut["prompt"][1] == dataset["prompt"][1]
    with pytest.raises(DatasetError, match=r"cannot be cut to 3 tokens"):
        check_prompt_lengths(dataset.select([1]), tokenizer, 3, truncate=True)


def test_context_length_comes_from_the_config_then_a_sane_tokenizer_limit(tokenizer):
    from transformers import Qwen2Config

    assert model_context_length(Qwen2Config(max_position_embeddings=4096)) == 4096

    class Tok:
        model_max_length = int(1e30)

    assert model_context_length(None, Tok()) is None
    Tok.model_max_length = 2048
    assert model_context_length(None, Tok()) == 2048


# ------------------------------------------------------------------------------------------------ 7. one step at least
def test_one_row_dataset_is_refused_with_the_batch_arithmetic(tmp_path, tiny_model_dir):
    data = write_rows(tmp_path / "d.jsonl", ROWS[:1])
    with pytest.raises(DatasetError, match=r"the train split: has 1 row\(s\), too few for one optimizer step: a step "
                       r"takes per_device_train_batch_size 4 \* gradient_accumulation_steps 2 \* processes 1 / "
                       r"num_generations 4 = 2 prompt\(s\), so it would make 0 steps"):  # fmt: skip
        train_main(train_argv(tiny_model_dir, data, tmp_path / "out", "--gradient_accumulation_steps", "2"))  # N-B02
    assert not (tmp_path / "out").exists()


def test_step_arithmetic():
    counts = dict(per_device_train_batch_size=4, gradient_accumulation_steps=1, num_processes=2, num_generations=4)
    assert check_dataset_makes_a_step(2, **counts) == 1 and check_dataset_makes_a_step(9, **counts) == 4
    with pytest.raises(DatasetError, match=r"a generation batch 4\).*at least 4"):
        check_dataset_makes_a_step(3, **counts, generation_batch_size=16)
