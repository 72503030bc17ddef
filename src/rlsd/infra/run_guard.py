"""Guards of one training run, as functions of values (paths, configs, datasets), checked by `rlsd train` before
any model is loaded and callable from the Python API: the output folder never overlaps an input, it is writable,
one run at a time holds it (`run_lock`), every prompt fits the model, and the dataset makes at least one step."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rlsd.infra.validate import DatasetError, OutputDirError, looks_local

logger = logging.getLogger(__name__)

LOCK_FILE = ".rlsd-run.lock"
"""The lock file of a running `rlsd train` in its output folder: JSON with the holder's pid, host and start time."""
SANE_MAX_LENGTH = 10_000_000
"""A tokenizer's `model_max_length` above this is transformers' "unset" sentinel (1e30), not a context length."""
SCAN_CHARS_PER_TOKEN = 16
"""A prompt longer than `limit * 16` characters is measured on its first `limit * 16` characters only: far more than
any tokenizer's average characters per token, so a 4 MB prompt is refused without tokenizing it whole."""


# ------------------------------------------------------------------------------------------------ 1. inputs apart
def local_input(name: str | os.PathLike | None) -> Path | None:
    """The absolute, symlink-free path of an input that is a local file or folder; None for hub names and unset."""
    if name is None or str(name) == "":
        return None
    if not looks_local(str(name)):
        return None
    return Path(name).expanduser().resolve()


def check_inputs_apart(
    output_dir: str | os.PathLike, inputs: dict[str, str | None], *, resume_checkpoint: str | None = None
) -> None:
    """Refuse an output folder that is, lies inside, or contains one of the run's inputs (`inputs` maps a label such
    as "model" to a path or hub name): the run writes there and `--overwrite_output_dir` deletes there, so an input
    would be overwritten or deleted (the review's N-SEC01 deleted the model). The checkpoint a run resumes from may
    lie inside the output folder (that is where checkpoints are written), but the output folder may not lie in it."""
    out = Path(output_dir).expanduser().resolve()
    checks = [(label, local_input(name), False) for label, name in inputs.items()]
    checks.append(("checkpoint to resume from", local_input(resume_checkpoint), True))
    for label, path, may_be_inside in checks:
        if path is None:
            continue
        if out == path or path in out.parents:
            what = "is" if out == path else "lies inside"
            raise OutputDirError(
                f"output folder {output_dir}",
                f"{what} the {label} {path}: the run would write (and --overwrite_output_dir delete) there",
                "choose an --output_dir outside every input",
            )
        if out in path.parents and not may_be_inside:
            raise OutputDirError(
                f"output folder {output_dir}",
                f"holds the {label} {path}: the run would write beside it and --overwrite_output_dir could delete it",
                "choose an --output_dir that holds none of the run's inputs",
            )


def reward_source(func: Callable[..., Any]) -> str | None:
    """The file that defines a reward function (through `functools.wraps` guards), None when it has none."""
    target = inspect.unwrap(func)
    for candidate in (target, type(target)):
        with contextlib.suppress(TypeError):
            source = inspect.getsourcefile(candidate)
            if source:
                return source
    return None


def run_inputs(
    model: str | None,
    teachers: Sequence[str] = (),
    datasets: Sequence[str] = (),
    rewards: dict[str, Callable[..., Any]] | None = None,
    builtin_rewards: Sequence[str] = (),
) -> dict[str, str | None]:
    """The labelled inputs of a run for `check_inputs_apart`: model, teachers, dataset files or folders, and the file
    of every reward that is not one of `builtin_rewards` (the package's own)."""
    inputs: dict[str, str | None] = {"model": model}
    inputs.update({"teacher" + (f" {i + 1}" if i else ""): name for i, name in enumerate(teachers)})
    inputs.update({"dataset" + (f" {i + 1}" if i else ""): name for i, name in enumerate(datasets)})
    for name, func in (rewards or {}).items():
        if name not in builtin_rewards:
            inputs[f"reward file of {name!r}"] = reward_source(func)
    return inputs


# ------------------------------------------------------------------------------------------------ weak: writable
def check_output_writable(output_dir: str | os.PathLike) -> None:
    """The output folder can be created and written, probed with a temporary folder in it (or in its nearest existing
    parent) that is removed at once: an unwritable or uncreatable folder is named with the OS error before anything
    is loaded, not after the model has loaded."""
    path = Path(output_dir).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    where = f"output folder {output_dir}"
    if not existing.is_dir():
        raise OutputDirError(where, f"cannot be created: {existing} is a file", "choose another folder")
    try:
        probe = tempfile.mkdtemp(prefix=".rlsd-write-probe-", dir=existing)
        os.rmdir(probe)
    except OSError as err:
        verb = "is not writable" if existing == path else f"cannot be created in {existing}"
        raise OutputDirError(where, f"{verb} ({err.strerror or err})", "choose a folder you can write to") from None


# ------------------------------------------------------------------------------------------------ 2. one run at a time
class OutputDirLockedError(OutputDirError):
    """An output folder that another live run is writing to."""


def _holder(lock: Path) -> dict[str, Any] | None:
    """The lock file's holder (pid, host, started), None when there is none; an unreadable one reads as {}."""
    try:
        return json.loads(lock.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(holder: dict[str, Any]) -> bool:
    """A lock of a dead process on this host; a lock of another host or an unreadable one cannot be judged."""
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


def _refuse(folder: Path, lock: Path, holder: dict[str, Any]) -> OutputDirLockedError:
    """The error naming the folder, the holder and how to go on."""
    who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('started', '?')}"
    return OutputDirLockedError(
        f"output folder {folder}",
        f"is in use by another rlsd train run ({who}; lock file {lock})",
        "wait for it to finish or choose another --output_dir; if that process is gone, delete the lock file",
    )


def check_unlocked(output_dir: str | os.PathLike) -> None:
    """Refuse, without touching anything, an output folder whose lock is held by a live run (or cannot be judged); a
    stale lock passes (`run_lock` takes it over)."""
    lock = Path(output_dir) / LOCK_FILE
    holder = _holder(lock)
    if holder is not None and not _is_stale(holder):
        raise _refuse(Path(output_dir), lock, holder)


@contextlib.contextmanager
def run_lock(output_dir: str | os.PathLike, *, enabled: bool = True) -> Iterator[Path | None]:
    """Hold the output folder's lock file (created with this process's pid and host) for the block, removed on exit,
    also on an exception. A second run on the folder is refused naming the holder; a stale lock of a dead process on
    this host is taken over with a warning. `enabled=False` (the processes other than the saving main process under
    accelerate) holds nothing."""
    if not enabled:
        yield None
        return
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _acquire(folder, lock, mine)
    try:
        yield lock
    finally:
        if _holder(lock) == mine:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()


def _acquire(folder: Path, lock: Path, mine: dict[str, Any]) -> None:
    """Create the lock file or refuse naming its holder; a stale lock is taken over (removed only while it still
    names the dead holder, so two runs taking it over at once cannot remove each other's fresh lock)."""
    for _attempt in range(2):
        try:
            _place(folder, lock, mine)
            return
        except FileExistsError:
            holder = _holder(lock)
            if holder is None:
                continue  # released meanwhile: try again
            if not _is_stale(holder):
                raise _refuse(folder, lock, holder) from None
            logger.warning(
                "output folder %s: taking over the stale lock of pid %s on this host (that process is gone)",
                folder, holder.get("pid"),
            )  # fmt: skip
            if _holder(lock) == holder:
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
    raise _refuse(folder, lock, _holder(lock) or {})


def _place(folder: Path, lock: Path, mine: dict[str, Any]) -> None:
    """Create the lock file atomically with its content: a written temporary file hard-linked into place, so no
    reader sees it empty; on a file system without hard links, an exclusive create. FileExistsError when held."""
    fd, temp = tempfile.mkstemp(prefix=".rlsd-lock-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        try:
            os.link(temp, lock)
            return
        except FileExistsError:
            raise
        except OSError:  # no hard links here (some network and FUSE file systems)
            pass
        with os.fdopen(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w") as f:
            json.dump(mine, f)
    finally:
        os.unlink(temp)


# ------------------------------------------------------------------------------------------------ 5. prompt lengths
def model_context_length(config: Any, tokenizer: Any = None) -> int | None:
    """The model's context length: `max_position_embeddings` of its (text) config, else the tokenizer's
    `model_max_length` when it is a real value (not transformers' 1e30 sentinel); None when neither says."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text_config, "max_position_embeddings", None)
    if isinstance(value, int) and value > 0:
        return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value <= SANE_MAX_LENGTH:
        return value
    return None


def render_prompt(prompt: Any, tokenizer: Any, chat_template_kwargs: dict[str, Any] | None = None) -> tuple[str, bool]:
    """The text the trainer tokenizes for a prompt, and whether it adds special tokens: a conversation rendered by the
    chat template with the generation prompt (as TRL's `_tokenize_prompts`), a plain string as it is."""
    if isinstance(prompt, str):
        return prompt, True
    text = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=False, **(chat_template_kwargs or {})
    )
    return text, False


def prompt_tokens(text: str, tokenizer: Any, limit: int, add_special_tokens: bool) -> tuple[int, bool]:
    """(token count, exact): the exact count of a text up to `limit * SCAN_CHARS_PER_TOKEN` characters; a longer one
    is tokenized on that prefix only, and when the prefix alone is over the limit its count is returned, not exact."""
    scan = (limit + 1) * SCAN_CHARS_PER_TOKEN
    if len(text) > scan:
        count = len(tokenizer(text[:scan], add_special_tokens=add_special_tokens)["input_ids"])
        if count > limit:
            return count, False
    return len(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]), True


def check_prompt_lengths(
    dataset: Any,
    tokenizer: Any,
    limit: int,
    *,
    split: str = "train",
    truncate: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    column: str = "prompt",
) -> Any:
    """Every prompt fits `limit` tokens, measured as the trainer renders it, before any batch is formed (a 4 MB prompt
    exhausted memory): an overlong one is refused naming the split, row and length, or, with `truncate`, cut from the
    start of its last turn (TRL's left truncation) until it fits. Returns the dataset (truncated rows replaced)."""
    overlong: dict[int, Any] = {}
    for row, prompt in enumerate(dataset[column]):
        text, special = render_prompt(prompt, tokenizer, chat_template_kwargs)
        count, exact = prompt_tokens(text, tokenizer, limit, special)
        if count <= limit:
            continue
        if not truncate:
            length = f"{count:,} tokens" if exact else f"more than {limit:,} tokens ({len(text):,} characters)"
            raise DatasetError(
                f"row {row} of the {split} split",
                f"the prompt is {length}, over the limit of {limit:,} (--max_prompt_length, default: the model's "
                "context length)",
                "shorten or drop the row, raise --max_prompt_length, or pass --truncate_prompts true",
            )
        overlong[row] = truncate_prompt(prompt, tokenizer, limit, chat_template_kwargs, where=f"row {row} of {split}")
    if not overlong:
        return dataset
    logger.warning("%d prompt(s) of the %s split were cut to %d tokens (--truncate_prompts)", len(overlong), split,
                   limit)  # fmt: skip
    return dataset.map(lambda r, i: {column: overlong.get(i, r[column])}, with_indices=True)


def truncate_prompt(
    prompt: Any, tokenizer: Any, limit: int, chat_template_kwargs: dict[str, Any] | None = None, *, where: str = ""
) -> Any:
    """The prompt with the start of its last text turn (a plain string: its start) dropped until it renders to at most
    `limit` tokens; refused when even an empty turn is over the limit (the template and other turns alone)."""
    messages = None if isinstance(prompt, str) else [dict(m) for m in prompt]
    index = None
    if messages is not None:
        index = next((i for i in reversed(range(len(messages))) if isinstance(messages[i].get("content"), str)), None)
        if index is None:
            raise DatasetError(where, "the prompt is over the limit and has no text turn to cut", "shorten it")
    content = prompt if messages is None else messages[index]["content"]
    content = content[-(limit + 1) * SCAN_CHARS_PER_TOKEN :]
    for _ in range(64):
        candidate = content if messages is None else [*messages[:index], {**messages[index], "content": content},
                                                       *messages[index + 1 :]]  # fmt: skip
        text, special = render_prompt(candidate, tokenizer, chat_template_kwargs)
        count, _ = prompt_tokens(text, tokenizer, limit, special)
        if count <= limit:
            return candidate
        if not content:
            break
        keep = int(len(content) * max(0.0, 1 - (count - limit) / max(count, 1)) * 0.95)
        content = content[len(content) - keep :] if keep < len(content) else content[1:]
    raise DatasetError(where, f"the prompt cannot be cut to {limit:,} tokens", "shorten its other turns")


# ------------------------------------------------------------------------------------------------ 7. one step at least
def check_dataset_makes_a_step(
    rows: int,
    *,
    per_device_train_batch_size: int,
    gradient_accumulation_steps: int,
    num_processes: int,
    num_generations: int,
    generation_batch_size: int | None = None,
    split: str = "train",
) -> int:
    """Refuse a dataset too small for one optimizer step (it would train 0 steps and exit 0), with the arithmetic:
    each step draws per_device_train_batch_size * gradient_accumulation_steps * processes / num_generations prompts,
    and TRL's sampler drops a last generation batch that is incomplete. Returns the steps one epoch makes."""
    completions = per_device_train_batch_size * gradient_accumulation_steps * num_processes
    per_step = max(1, completions // num_generations)
    per_generation = max(per_step, (generation_batch_size or completions) // num_generations)
    steps = (rows // per_generation) * max(1, per_generation // per_step)
    if steps == 0:
        raise DatasetError(
            f"the {split} split",
            f"has {rows:,} row(s), too few for one optimizer step: a step takes per_device_train_batch_size "
            f"{per_device_train_batch_size} * gradient_accumulation_steps {gradient_accumulation_steps} * processes "
            f"{num_processes} / num_generations {num_generations} = {per_step} prompt(s)"
            + (f" (a generation batch {per_generation})" if per_generation != per_step else "")
            + f", so it would make {steps} steps",
            f"add rows (at least {per_generation}) or lower --per_device_train_batch_size / "
            "--gradient_accumulation_steps",
        )
    return steps


def check_config_makes_a_step(rows: int, args: Any, split: str = "train") -> int:
    """`check_dataset_makes_a_step` with the counts of a `GRPOConfig` (processes: its world size)."""
    return check_dataset_makes_a_step(
        rows,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_processes=args.world_size,
        num_generations=args.num_generations,
        generation_batch_size=args.generation_batch_size,
        split=split,
    )
