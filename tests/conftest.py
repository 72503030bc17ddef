"""Shared fixtures: a tiny tokenizer, a tiny Qwen2 and a small dataset, all built locally."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from datasets import Dataset

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

from rlsd import RLSDConfig  # noqa: E402
from rlsd.experiments.tiny import build_char_tokenizer, build_tiny_qwen2  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return build_char_tokenizer()


def make_model(tokenizer, seed: int = 0):
    """A very small Qwen2 (about 40k parameters) so that a training step takes well under a second."""
    return build_tiny_qwen2(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=seed)


@pytest.fixture
def model(tokenizer):
    return make_model(tokenizer)


def make_dataset(n: int = 8, conversational: bool = False) -> Dataset:
    """Arithmetic prompts of different lengths with their answers in the `solution` column."""
    rows = []
    for i in range(n):
        a, b = i + 1, (i * 7) % 13
        question = f"Q: {a}+{b}*{'1' * (1 + i % 3)}="
        prompt = (
            [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]
            if conversational
            else question
        )
        rows.append({"prompt": prompt, "solution": str(a + b)})
    return Dataset.from_list(rows)


def record_prompt_logprobs(llm, calls: list) -> None:
    """Wrap a vLLM engine's `generate` so that each call appends its sampling parameters' `prompt_logprobs` to
    `calls` (None: a generation; 0: a served teacher's scoring), for the vLLM tests to count engine calls."""
    generate = llm.generate

    def recorded(*args, **kwargs):
        params = kwargs.get("sampling_params", args[1] if len(args) > 1 else None)
        calls.append(getattr(params, "prompt_logprobs", None))
        return generate(*args, **kwargs)

    llm.generate = recorded


def parity_reward(completions, **kwargs):
    """A deterministic reward with spread inside every group: the parity of a checksum of the completion."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(zlib.crc32(t.encode()) % 2) for t in texts]


def config_kwargs(tmp_path, **overrides) -> dict:
    """Arguments of a CPU config for one or a few optimizer steps on the tiny model."""
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=1,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return values


def rule_overrides(name: str) -> dict:
    """The config of credit rule `name` in a generic test: a rule that contrasts the teacher after negative contexts
    (RLCSD) needs the source that gives them; SRPO contrasts the plain prompt with a corrupted one (on text: its
    digits masked)."""
    from rlsd.core.rules import get_rule

    if name == "srpo":
        return {"credit": name, "privileged_source": "none", "teacher_template": "{prompt}",
                "teacher_transform": "mask_digits"}  # fmt: skip
    contrast = "teacher_contrast_logps" in get_rule(name).needs
    return {"credit": name, **({"privileged_source": "contrast"} if contrast else {})}


def make_config(tmp_path, **overrides) -> RLSDConfig:
    """`RLSDConfig` over `config_kwargs`."""
    return RLSDConfig(**config_kwargs(tmp_path, **overrides))


def build_trainer(tokenizer, tmp_path, reward=parity_reward, dataset=None, model=None, **config):
    """An `RLSDTrainer` on the tiny model and dataset unless given, with `make_config(tmp_path, **config)`."""
    from rlsd import RLSDTrainer

    return RLSDTrainer(
        model if model is not None else make_model(tokenizer),
        reward,
        args=make_config(tmp_path, **config),
        train_dataset=dataset if dataset is not None else make_dataset(),
        processing_class=tokenizer,
    )


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """The tiny model and tokenizer saved as a local model folder, once per module."""
    folder = tmp_path_factory.mktemp("tiny-model")
    make_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer):
    """A different tiny Qwen2 (hidden 48, 3 layers, seed 7: other weights) over the student's vocabulary, saved with
    the student's tokenizer as an external teacher's model folder, once per module."""
    from rlsd.experiments.tiny import build_tiny_qwen2

    folder = tmp_path_factory.mktemp("external-teacher")
    model = build_tiny_qwen2(tokenizer, hidden_size=48, num_layers=3, num_heads=2, intermediate_size=96, seed=7)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_head64_model(tokenizer, seed: int = 0):
    """A tiny Qwen2 with head_dim 64 (hidden 128, 2 heads, 2 layers): vLLM's CPU attention refuses smaller heads, so
    the model of the vLLM tests (tests/vllm_engine)."""
    return build_tiny_qwen2(tokenizer, hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256, seed=seed)


@pytest.fixture(scope="module")
def head64_model_dir(tmp_path_factory, tokenizer):
    """`make_head64_model` and the character tokenizer saved as a model folder (what vLLM loads), once per module."""
    folder = tmp_path_factory.mktemp("tiny-head64")
    make_head64_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def registries():
    """Every extension registry (rules, losses, terms, sources, transforms, formats, teacher kinds and their knobs)
    restored after the test: registrations made by test code, as a user would make them, are undone."""
    from rlsd.context.generated import GENERATORS
    from rlsd.context.sources import SOURCE_KNOBS, SOURCES
    from rlsd.context.transforms import TRANSFORMS
    from rlsd.core.distill import LOSS_KNOBS, LOSSES
    from rlsd.core.rules import KNOBS, RULES
    from rlsd.data.formats import FORMATS
    from rlsd.step.rollout_term import TERM_KNOBS, TERMS
    from rlsd.teachers import TEACHER_KINDS

    tables = (RULES, KNOBS, LOSSES, LOSS_KNOBS, TERMS, TERM_KNOBS, SOURCES, SOURCE_KNOBS, GENERATORS, TRANSFORMS,
              FORMATS, TEACHER_KINDS)  # fmt: skip
    saved = [(table, dict(table)) for table in tables]
    yield
    for table, items in saved:
        table.clear()
        table.update(items)


CHILD_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import rlsd  # before transformers: in the [vllm] venv it hides vLLM's CUDA torchvision (rlsd.infra.torch_extensions)
import torch
from transformers import TrainerCallback
from conftest import make_config, make_model
from {module} import {reward}, {dataset}
from rlsd import RLSDTrainer
from rlsd.experiments.tiny import build_char_tokenizer

CALLBACKS = []
{hook}
tokenizer = build_char_tokenizer()
trainer = RLSDTrainer(make_model(tokenizer), {reward}, args=make_config({out!r}, **{settings!r}),
                      train_dataset={dataset}(), processing_class=tokenizer)
for callback in CALLBACKS:
    trainer.add_callback(callback)
trainer.train()
"""
"""A training run in a child process; `hook` (code) patches what it needs and may append callbacks to CALLBACKS."""

KILL_WHILE_SAVING = """
real_save = torch.save


def save_then_die(obj, path, *args, **kwargs):
    real_save(obj, path, *args, **kwargs)
    if str(path).endswith("rlsd_teacher.pt") and "checkpoint-{step}" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)  # killed while checkpoint-{step} is being written


torch.save = save_then_die
"""


def run_child(
    tmp_path: Path,
    out: Path,
    settings: dict,
    hook: str,
    *,
    module: str = "conftest",
    reward: str = "parity_reward",
    dataset: str = "make_dataset",
) -> subprocess.CompletedProcess:
    """Train in a child process (`reward` and `dataset` imported from the test `module`, `hook` run before the trainer
    is built: `CHILD_RUN`) writing into `out`; returns the finished process."""
    script = tmp_path / "run.py"
    script.write_text(
        CHILD_RUN.format(
            tests=str(Path(__file__).resolve().parent),
            out=str(out),
            settings=settings,
            hook=hook,
            module=module,
            reward=reward,
            dataset=dataset,
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)


def run_killed_while_saving(
    tmp_path: Path,
    out: Path,
    settings: dict,
    *,
    step: int = 4,
    module: str = "conftest",
    reward: str = "parity_reward",
    dataset: str = "make_dataset",
) -> subprocess.CompletedProcess:
    """Train in a child process (`run_child`) that is killed with SIGKILL while checkpoint-`step` is being written,
    after its teacher file; returns the finished process."""
    hook = KILL_WHILE_SAVING.format(step=step)
    return run_child(tmp_path, out, settings, hook, module=module, reward=reward, dataset=dataset)
