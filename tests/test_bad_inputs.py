"""The reliability matrix (issue 15): every bad input is a named error raised before expensive work, checkpoints
cannot lie, rewards cannot hang, and nothing is written or lost on the way."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_config, make_dataset, make_model, parity_reward, run_killed_while_saving
from datasets import Dataset
from test_data_rewards import GSM8K

from rlsd import RLSDConfig, RLSDTrainer
from rlsd.commands.cli import main as rlsd_cli_main
from rlsd.data.datasets import load_rlsd_dataset, to_rlsd_rows
from rlsd.data.rewards import format_reward, guard_reward, math_accuracy, resolve_reward
from rlsd.infra.checkpoint import MANIFEST_FILE, PARTIAL_PREFIX, DiskFullError
from rlsd.infra.validate import (
    CheckpointError,
    ConfigError,
    DatasetError,
    ModelFolderError,
    NonFiniteError,
    OutputDirError,
    RewardError,
)


def cli_main(argv: list[str]) -> int:
    """The `rlsd` command line with `--debug`: these cases check the named errors themselves (without it each is one
    line on stderr and exit status 2, as `tests/test_command_line.py` checks)."""
    return rlsd_cli_main([*argv, "--debug"])


TINY = ["--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "8",
        "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--logging_steps", "1", "--disable_tqdm",
        "true", "--reward_funcs", "integer_match"]  # fmt: skip


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the sha256 of its bytes: a folder compared before and after is unchanged."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------------ 1. datasets
GOOD = jsonl(GSM8K)
DATASET_CASES = [
    # (case, file name, content, keyword arguments, error, words naming the culprit)
    ("D7 answer is a JSON list", "d.jsonl", jsonl([{"question": "q?", "answer": ["#### 1"]}]), {}, DatasetError,
     r"row 0 of .*d\.jsonl, column 'answer': holds a list"),
    ("D17 CSV with unquoted commas", "d.csv", b"question,answer\nIf a, b, and c are 0, what is a+b?,#### 0\n", {},
     DatasetError, r"d\.csv line 2: 5 fields, but the header has 2 \(question, answer\).*quote"),
    ("D10 malformed JSON line", "d.jsonl", GOOD + b'{"question": "q", "answer": "#### 1"} x\n' + GOOD, {},
     DatasetError, r"d\.jsonl line 3 column \d+: malformed JSON"),
    ("D11 not JSON at all", "d.jsonl", b"question answer\n", {}, DatasetError, r"line 1 column 1: malformed JSON"),
    ("D12 non-UTF-8 bytes", "d.jsonl", GOOD + b'{"question": "\xff\xfe", "answer": "#### 1"}\n', {}, DatasetError,
     r"d\.jsonl line 3 column 15: byte 0xff is not UTF-8"),
    ("D9 empty file", "d.jsonl", b"", {}, DatasetError, r"d\.jsonl: the file is empty"),
    ("blank lines only", "d.jsonl", b"\n\n  \n", {}, DatasetError, r"d\.jsonl: the file has no rows"),
    ("JSON line that is a list", "d.jsonl", b'["q", "#### 1"]\n', {}, DatasetError, r"line 1: a JSON list, not an"),
    ("JSON array with a non-object", "d.json", b'[{"question": "q", "answer": "#### 1"}, 3]', {}, DatasetError,
     r"d\.json row 1: a JSON int, not an object"),
    ("CSV header without rows", "d.csv", b"question,answer\n", {}, DatasetError, r"d\.csv: the file has a header"),
    ("Parquet that is not Parquet", "d.parquet", b"not parquet at all", {}, DatasetError,
     r"d\.parquet: is not a readable Parquet file"),
    ("D22 .txt is not a hub name", "d.txt", GOOD, {}, DatasetError, r"d\.txt: unsupported file type '\.txt'"),
    ("D2 integer answer in gsm8k", "d.jsonl", jsonl([{"question": "q?", "answer": 1}]), {}, DatasetError,
     r"row 0 of .*, column 'answer': holds the number 1.*--answer_column answer"),
    ("D6 null question", "d.jsonl", jsonl([*GSM8K, {"question": None, "answer": "#### 7"}]), {}, DatasetError,
     r"row 2 of .*, column 'question': is null"),
    ("question is a dict", "d.jsonl", jsonl([{"question": {"text": "q"}, "answer": "#### 7"}]), {}, DatasetError,
     r"row 0 of .*, column 'question': holds a dict"),
    ("D19 no #### names the fix", "d.jsonl", jsonl([{"question": "q?", "answer": "7"}]), {}, DatasetError,
     r"row 0 of the gsm8k dataset .*has no final answer.*'####'"),
    ("D14 overlong final answer", "d.jsonl", jsonl([{"question": "q?", "answer": "#### " + "9" * 5000}]), {},
     DatasetError, r"row 0 of .*: the final answer is 5,000 characters long"),
    ("generic answer is a list", "d.jsonl", jsonl([{"q": "q?", "a": [1]}]),
     {"prompt_column": "q", "answer_column": "a"}, DatasetError, r"row 0 of .*, column 'a': holds a list"),
    ("generic answer is NaN", "d.jsonl", b'{"q": "q?", "a": NaN}\n', {"prompt_column": "q", "answer_column": "a"},
     DatasetError, r"column 'a': holds nan"),
    ("deepmath answer is a list", "d.jsonl", jsonl([{"question": "q?", "final_answer": ["0"]}]), {}, DatasetError,
     r"column 'final_answer': holds a list"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "error", "words"),
    [case[1:] for case in DATASET_CASES],
    ids=[case[0] for case in DATASET_CASES],
)
def test_bad_dataset_is_named(tmp_path, name, content, kwargs, error, words):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(error, match=words):
        load_rlsd_dataset(str(path), **kwargs)


def test_good_files_still_load_and_integer_answers_work_in_the_generic_format(tmp_path):
    (tmp_path / "ok.csv").write_bytes(b'question,answer\n"If a, b, and c are 0, what is a+b+c?",#### 0\n')
    rows = load_rlsd_dataset(str(tmp_path / "ok.csv"))
    assert rows[0]["prompt"][-1]["content"].startswith("If a, b, and c are 0, what is a+b+c?")  # D16 kept intact
    (tmp_path / "int.jsonl").write_bytes(jsonl([{"question": "q?", "answer": 7}]))
    rows = load_rlsd_dataset(str(tmp_path / "int.jsonl"), prompt_column="question", answer_column="answer")
    assert rows[0]["solution"] == "7"  # D3


def test_rows_handed_in_directly_are_type_checked_too():
    dataset = Dataset.from_list([{"question": "q?", "answer": "#### 1"}, {"question": "q2?", "answer": "#### 1"}])
    dataset = dataset.map(lambda r, i: {"answer": "#### " + "1" * 2000 if i == 1 else r["answer"]}, with_indices=True)
    with pytest.raises(DatasetError, match=r"row 1 of the gsm8k dataset: the final answer is 2,000 characters"):
        to_rlsd_rows(dataset)


def test_train_refuses_a_bad_dataset_before_writing_anything(tmp_path, tiny_model_dir):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(jsonl([{"question": "q?", "answer": ["#### 1"]}]))
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=r"column 'answer': holds a list"):
        cli_main(["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data),
                  "--output_dir", str(out), "--max_steps", "1", *TINY])  # fmt: skip
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ 2. knobs and flags
FLOAT_KNOBS = sorted(
    [name for name, spec in RLSDConfig.__dataclass_fields__.items() if spec.init and isinstance(spec.default, float)]
    + ["distill_coef"]  # float or None
)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_every_float_knob_must_be_finite(tmp_path, value):
    checked = 0
    for knob in FLOAT_KNOBS:
        with pytest.raises(ConfigError, match=rf"^--{knob}: must be a finite number, got {value}"):
            make_config(tmp_path, **{knob: value})
        checked += 1
    assert checked >= 25 and {"opsd_beta", "sod_c", "rlsd_lambda", "learning_rate"} <= set(FLOAT_KNOBS)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--opsd_beta", "nan"], r"--opsd_beta: must be a finite number, got nan"),  # C28 (was a NaN model)
        (["--distill_coef", "nan"], r"--distill_coef: must be a finite number"),
        (["--sod_c", "inf"], r"--sod_c: must be a finite number, got inf"),
        (["--max_completion_length", "0"], r"--max_completion_length: must be >= 1, got 0"),
        (["--num_generations", "0"], r"--num_generations: must be >= 1, got 0"),
        (["--reward_timeout", "-1"], r"--reward_timeout: must be >= 0"),
    ],
)
def test_train_flags_are_checked_before_anything_is_written(tmp_path, tiny_model_dir, flags, words):
    data = tmp_path / "d.jsonl"
    data.write_bytes(GOOD)
    out = tmp_path / "out"
    argv = ["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data),
            "--output_dir", str(out), "--max_steps", "1", *TINY, *flags]  # fmt: skip
    with pytest.raises(ConfigError, match=words):
        cli_main(argv)
    assert not out.exists()


def test_missing_model_folder_and_folder_without_tokenizer_are_named(tmp_path, tokenizer):
    data = tmp_path / "d.jsonl"
    data.write_bytes(GOOD)
    base = ["train", "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"), *TINY]
    with pytest.raises(ModelFolderError, match=r"model .*nosuch: no such local folder"):  # E9
        cli_main([*base, "--model_name_or_path", str(tmp_path / "nosuch")])
    notok = tmp_path / "notok"
    make_model(tokenizer).save_pretrained(notok)
    with pytest.raises(ModelFolderError, match=r"notok: has no tokenizer files.*tokenizer\.save_pretrained"):  # E4
        cli_main([*base, "--model_name_or_path", str(notok)])
    assert not (tmp_path / "out").exists()


def test_output_dir_holding_another_run_is_refused_and_left_intact(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_bytes(GOOD)
    out = tmp_path / "out"
    (out / "checkpoint-8").mkdir(parents=True)
    (out / "checkpoint-8" / "trainer_state.json").write_text('{"global_step": 8}')
    (out / "model.safetensors").write_bytes(b"old weights")
    (out / "notes.txt").write_text("precious")
    before = tree(out)
    argv = ["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data),
            "--output_dir", str(out), "--max_steps", "1", "--save_strategy", "no", *TINY]  # fmt: skip
    with pytest.raises(OutputDirError, match=r"already holds a run \(checkpoint-8, model\.safetensors\).*"
                       r"--resume_from_checkpoint true.*--overwrite_output_dir true"):  # fmt: skip
        cli_main(argv)  # F20
    assert tree(out) == before
    assert cli_main([*argv, "--overwrite_output_dir", "true"]) == 0
    assert not (out / "checkpoint-8").exists() and (out / "notes.txt").read_text() == "precious"
    assert (out / "model.safetensors").read_bytes() != b"old weights"


def test_resume_true_without_a_checkpoint_is_named(tmp_path, tokenizer):
    trainer = build(tokenizer, tmp_path)
    with pytest.raises(CheckpointError, match=r"holds no checkpoint-N folder to resume from"):  # F4
        trainer.train(resume_from_checkpoint=True)


# ------------------------------------------------------------------------------------------------ 3. eval
def eval_argv(model, data, out, *extra) -> list[str]:
    return ["eval", "--model", str(model), "--dataset", str(data), "--max_new_tokens", "4", "--max_samples", "2",
            "--output", str(out), *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "error", "words"),
    [
        (["--n", "0"], ConfigError, r"--n: must be >= 1, got 0"),  # E5
        (["--batch_size", "0"], ConfigError, r"--batch_size: must be >= 1, got 0"),  # E7
        (["--max_samples", "0"], ConfigError, r"--max_samples: must be >= 1"),
        (["--temperature", "-1"], ConfigError, r"--temperature: must be >= 0, got -1"),  # E11
        (["--top_p", "0"], ConfigError, r"--top_p: must lie in \(0, 1\]"),
        (["--reward", "bogus"], ValueError, r"unknown reward 'bogus'"),  # E10
    ],
)
def test_eval_checks_every_argument_before_loading_a_model(tmp_path, tiny_model_dir, monkeypatch, extra, error, words):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_model)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", no_model)
    data = tmp_path / "d.jsonl"
    data.write_bytes(GOOD)
    with pytest.raises(error, match=words):
        cli_main(eval_argv(tiny_model_dir, data, tmp_path / "eval", *extra))
    assert not (tmp_path / "eval").exists()


def test_eval_output_that_is_a_file_or_holds_results_is_refused(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_bytes(GOOD)
    afile = tmp_path / "afile.txt"
    afile.write_text("keep")
    with pytest.raises(OutputDirError, match=r"--output .*afile\.txt: is a file"):  # E6
        cli_main(eval_argv(tiny_model_dir, data, afile))
    results = tmp_path / "results"
    results.mkdir()
    (results / "summary.json").write_text("{}")
    with pytest.raises(OutputDirError, match=r"already holds summary\.json.*--overwrite"):  # E12
        cli_main(eval_argv(tiny_model_dir, data, results))
    assert afile.read_text() == "keep" and (results / "summary.json").read_text() == "{}"
    with pytest.raises(ModelFolderError, match=r"no such local folder"):
        cli_main(eval_argv(tmp_path / "nosuch", data, tmp_path / "eval"))


def test_eval_writes_generations_as_it_goes(tmp_path, tiny_model_dir, monkeypatch):
    calls = []

    def fails_on_second_batch(completions, solution, **kwargs):
        calls.append(len(completions))
        if len(calls) == 2:
            raise ValueError("scorer crashed")
        return [0.0] * len(completions)

    failing = guard_reward(fails_on_second_batch, None)
    monkeypatch.setattr("rlsd.commands.evaluate.resolve_reward", lambda name: failing)
    data = tmp_path / "d.jsonl"
    data.write_bytes(GOOD)
    out = tmp_path / "eval"
    with pytest.raises(RewardError, match="scorer crashed"):
        cli_main(eval_argv(tiny_model_dir, data, out, "--n", "2", "--batch_size", "2"))
    kept = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [(row["problem"], row["sample"]) for row in kept] == [(0, 0), (0, 1)]  # the first batch survived


# ------------------------------------------------------------------------------------------------ 4. rewards
def sleeps(completions, **kwargs):
    time.sleep(30)
    return [0.0] * len(completions)


REWARD_CASES = [
    ("R12 hangs", sleeps, r"'sleeps' did not return within 0\.2 s.*--reward_timeout"),
    ("R6 NaN", lambda completions, **kw: [0.0, math.nan], r"returned nan at row 1.*None"),
    ("R8 inf", lambda completions, **kw: [math.inf, 0.0], r"returned inf at row 0"),
    ("R10 strings", lambda completions, **kw: ["1.0", "0.0"], r"returned a str \('1\.0'\) at row 0"),
    ("R11 scalar", lambda completions, **kw: 0.5, r"returned a float \(0\.5\), not a list"),
    ("R9 wrong length", lambda completions, **kw: [1.0], r"returned 1 rewards for 2 completions"),
    ("dict", lambda completions, **kw: {"a": 1.0}, r"returned a dict"),
    ("R1 raises", lambda completions, **kw: [1 / 0 for _ in completions], r"raised on row 0: ZeroDivisionError"),
]


@pytest.mark.parametrize(("func", "words"), [c[1:] for c in REWARD_CASES], ids=[c[0] for c in REWARD_CASES])
def test_bad_reward_is_named(func, words):
    guarded = guard_reward(func, 0.2)
    with pytest.raises(RewardError, match=words):
        guarded(["a", "b"], solution=["1", "2"])


def test_time_bound_works_off_the_main_thread_and_good_outputs_pass():
    errors = []
    worker = threading.Thread(target=lambda: errors.extend(_catch(guard_reward(sleeps, 0.2), ["a"])))
    worker.start()
    worker.join()
    assert len(errors) == 1 and isinstance(errors[0], RewardError) and "'sleeps' did not return" in str(errors[0])
    assert guard_reward(lambda c, **k: np.array([1, 0]), 5)(["a", "b"]) == [1.0, 0.0]
    assert guard_reward(lambda c, **k: [None, True], 5)(["a", "b"]) == [None, 1.0]


def _catch(func, completions) -> list[BaseException]:
    try:
        func(completions)
    except BaseException as err:
        return [err]
    return []


def test_trainer_applies_the_configured_reward_timeout(tokenizer, tmp_path):
    trainer = RLSDTrainer(make_model(tokenizer), sleeps, args=make_config(tmp_path, credit="grpo", reward_timeout=0.2),
                          train_dataset=make_dataset(), processing_class=tokenizer)  # fmt: skip
    with pytest.raises(RewardError, match=r"'sleeps' did not return within 0\.2 s"):
        trainer.train()
    assert not list(tmp_path.glob("checkpoint-*"))


def test_math_accuracy_works_off_the_main_thread():
    results = []
    worker = threading.Thread(target=lambda: results.append(math_accuracy(["\\boxed{42}", "\\boxed{41}"], ["42"] * 2)))
    worker.start()
    worker.join()
    assert results == [[1.0, 0.0]]  # R15 raised a ValueError here


def test_math_accuracy_never_parses_an_overlong_reference():
    logged = {}
    reward = math_accuracy(["\\boxed{1}"], ["9" * 5_000_000], log_metric=lambda k, v: logged.update({k: v}))
    assert reward == [0.0] and logged == {"rewards/math_unparseable": 1.0}  # D14 / R17: counted, not parsed


def test_format_reward_is_linear_and_unchanged():
    pathological = "<think>" + "</think>\\boxed{" * 4000  # 60 KB: the old regex took 88 s (R16)
    assert format_reward([pathological, pathological + "}", "<think>a</think>b</think> <answer>x</answer>"]) == [
        0.0,
        1.0,
        1.0,
    ]
    old = re.compile(r"^\s*<think>.*?</think>\s*(?:.*\\boxed\{.*\}|<answer>.*?</answer>)\s*$", re.DOTALL)
    pieces = ["<think>", "</think>", "\\boxed{", "}", "<answer>", "</answer>", " ", "\n", "x"]
    generator = np.random.default_rng(0)
    texts = ["".join(generator.choice(pieces, size=generator.integers(0, 8))) for _ in range(3000)]
    texts = texts + ["<think>" + t for t in texts]
    assert format_reward(texts) == [1.0 if old.match(t) else 0.0 for t in texts]
    assert sum(format_reward(texts)) > 20


# ------------------------------------------------------------------------------------------------ 5. security
def test_dotted_reward_import_does_not_let_the_current_folder_shadow_packages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    (tmp_path / "math_verify.py").write_text("raise ImportError('planted math_verify executed')\n")
    (tmp_path / "myrewards_s9.py").write_text(
        "def parity(completions, **kwargs):\n    return [0.0] * len(completions)\n"
    )
    monkeypatch.delitem(sys.modules, "myrewards_s9", raising=False)
    path_before = list(sys.path)
    reward = resolve_reward("myrewards_s9.parity")
    assert reward(["a"]) == [0.0]
    assert sys.path == path_before  # S9: the folder was not put on the module path
    import importlib.util

    assert "site-packages" in importlib.util.find_spec("math_verify").origin
    assert math_accuracy(["\\boxed{2}"], ["2"]) == [1.0]


# ------------------------------------------------------------------------------------------------ 6. training guards
def build(tokenizer, out, reward=parity_reward, **config) -> RLSDTrainer:
    return RLSDTrainer(make_model(tokenizer), reward, args=make_config(out, **config), train_dataset=make_dataset(),
                       processing_class=tokenizer)  # fmt: skip


def test_nan_knob_bypassing_the_config_stops_at_step_one_before_any_save(tokenizer, tmp_path):
    trainer = build(tokenizer, tmp_path, credit="grpo+opsd", teacher="live", save_strategy="steps", save_steps=1)
    trainer.args.opsd_beta = math.nan  # as if set after construction: the loop guard still catches it
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(NonFiniteError, match=r"training step 1: the loss is nan.*opsd_beta=nan"):
        trainer.train()
    assert not list(tmp_path.glob("checkpoint-*")) and not list(tmp_path.glob(PARTIAL_PREFIX + "*"))
    assert all(torch.equal(a, b) for a, b in zip(initial, trainer.model.parameters(), strict=True))


def test_nan_gradient_stops_before_the_optimizer_step_naming_the_parameter(tokenizer, tmp_path):
    trainer = build(tokenizer, tmp_path, credit="grpo", save_strategy="steps", save_steps=1)
    embedding = trainer.model.get_input_embeddings().weight
    embedding.register_hook(lambda grad: grad * math.nan)
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(NonFiniteError, match=r"training step 1: the gradient norm is nan \(first in .*embed_tokens"):
        trainer.train()
    assert not list(tmp_path.glob("checkpoint-*"))
    assert all(torch.equal(a, b) for a, b in zip(initial, trainer.model.parameters(), strict=True))


# ------------------------------------------------------------------------------------------------ 7. checkpoints
RESUME = dict(teacher="synced", teacher_sync_steps=3, rlsd_lambda_decay_steps=0, max_steps=4, save_strategy="steps",
              save_steps=2)  # fmt: skip


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tokenizer):
    """A 2-step run with checkpoint-2 (teacher included), shared by the checkpoint cases (each works on a copy)."""
    out = tmp_path_factory.mktemp("saved")
    build(tokenizer, out, **{**RESUME, "max_steps": 2}).train()
    return out / "checkpoint-2"


def truncate_to_zero(path: Path) -> None:
    path.write_bytes(b"")


def break_json_keeping_size(path: Path) -> None:
    size = path.stat().st_size
    path.write_bytes(b"{" + b"x" * (size - 1))


CHECKPOINT_CASES = [
    ("F13 optimizer.pt deleted", "optimizer.pt", Path.unlink, r"optimizer\.pt is missing.*--resume_weights_only"),
    ("F14 rng_state.pth deleted", "rng_state.pth", Path.unlink, r"rng_state\.pth is missing"),
    ("F6 teacher weights deleted", "rlsd_teacher.pt", Path.unlink, r"rlsd_teacher\.pt is missing"),
    ("F8 zero-byte teacher", "rlsd_teacher.pt", truncate_to_zero, r"rlsd_teacher\.pt is 0 bytes, but [\d,]+ were"),
    ("F10 broken teacher JSON", "rlsd_teacher.json", break_json_keeping_size, r"rlsd_teacher\.json is not valid JSON"),
    ("F15 broken trainer_state", "trainer_state.json", break_json_keeping_size, r"trainer_state\.json is not valid"),
    ("F12 truncated weights", "model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100]),
     r"model\.safetensors is 100 bytes, but"),
    ("F16 torn: no manifest", MANIFEST_FILE, Path.unlink, r"is incomplete: it has no rlsd_checkpoint\.json"),
    ("F11 weights deleted", "model.safetensors", Path.unlink, r"holds no model weights"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("file", "damage", "words"), [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES]
)
def test_damaged_checkpoint_is_refused_naming_the_file(tokenizer, tmp_path, saved_run, file, damage, words):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(saved_run, checkpoint)
    damage(checkpoint / file)
    before = tree(tmp_path)
    trainer = build(tokenizer, tmp_path / "run", **RESUME)
    with pytest.raises(CheckpointError, match=words):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert tree(tmp_path) == before  # nothing written, nothing lost
    assert trainer.state.global_step == 0


def test_weights_only_resume_starts_the_missing_state_fresh_and_says_so(tokenizer, tmp_path, saved_run, caplog):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(saved_run, checkpoint)
    for name in ("optimizer.pt", "rlsd_teacher.pt", "rlsd_teacher.json", MANIFEST_FILE):
        (checkpoint / name).unlink()
    trainer = build(tokenizer, tmp_path / "run", **{**RESUME, "resume_weights_only": True})
    with caplog.at_level("WARNING", logger="rlsd.trainer"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 4
    assert "optimizer.pt" in caplog.text and "rlsd_teacher.pt" in caplog.text
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing|holds no model weights"):
        (checkpoint / "model.safetensors").unlink()
        build(tokenizer, tmp_path / "run2", **{**RESUME, "resume_weights_only": True}).train(str(checkpoint))


@pytest.mark.parametrize("failure", ["iostream", "enospc"])
def test_full_disk_is_reported_as_such_and_leaves_the_previous_checkpoint(tokenizer, tmp_path, monkeypatch, failure):
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if str(path).endswith("rlsd_teacher.pt") and "checkpoint-4" in str(path):
            real_save(obj, path, *args, **kwargs)
            if failure == "enospc":
                raise OSError(28, "No space left on device")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 38400 vs 38288")  # F22
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    if failure == "iostream":  # torch's writer loses the errno: the free space tells
        real_usage = shutil.disk_usage
        monkeypatch.setattr("rlsd.infra.checkpoint.shutil.disk_usage", lambda p: real_usage(p)._replace(free=4096))
    trainer = build(tokenizer, tmp_path, **RESUME)
    with pytest.raises(DiskFullError, match=r"no space left on the device while writing checkpoint-4") as info:
        trainer.train()
    assert info.value.errno == 28
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("checkpoint", PARTIAL_PREFIX))) == [
        "checkpoint-2"
    ]
    assert (tmp_path / "checkpoint-2" / MANIFEST_FILE).exists()


def test_kill_while_writing_a_checkpoint_then_resume_exactly_from_the_previous_one(tokenizer, tmp_path):
    settings = {**RESUME, "max_steps": 6}
    killed = tmp_path / "killed"
    result = run_killed_while_saving(tmp_path, killed, settings)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    torn = killed / f"{PARTIAL_PREFIX}checkpoint-4" / "checkpoint-4"
    assert (torn / "rlsd_teacher.pt").exists() and not (torn / MANIFEST_FILE).exists()
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-2"]  # nothing that looks complete

    with pytest.raises(CheckpointError, match=r"checkpoint-4: is incomplete: it has no rlsd_checkpoint\.json"):
        build(tokenizer, killed, **settings).train(resume_from_checkpoint=str(torn))

    resumed = build(tokenizer, killed, **settings)
    resumed.train(resume_from_checkpoint=True)  # the latest complete checkpoint: checkpoint-2
    straight = build(tokenizer, tmp_path / "straight", **settings)
    straight.train()
    assert resumed.state.global_step == straight.state.global_step == 6
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), straight.model.parameters(), strict=True))
    teachers = zip(resumed.teacher.model.parameters(), straight.teacher.model.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in teachers)
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert not list(killed.glob(PARTIAL_PREFIX + "*"))  # the torn write was replaced by the resumed run's


def test_rule_state_is_sealed_in_the_checkpoint_and_verified(tokenizer, tmp_path):
    settings = {**RESUME, "credit": "antisd", "max_steps": 2}
    build(tokenizer, tmp_path / "a", **settings).train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    assert manifest["global_step"] == 2
    assert {"rlsd_rule_state.json", "rlsd_teacher.pt", "rlsd_teacher.json", "optimizer.pt"} <= set(manifest["files"])
    (checkpoint / "rlsd_rule_state.json").unlink()
    resumed = build(tokenizer, tmp_path / "b", **{**settings, "max_steps": 4})
    with pytest.raises(CheckpointError, match=r"rlsd_rule_state\.json is missing"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
