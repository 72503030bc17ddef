"""Checkpoints that cannot lie: written under a temporary name, sealed with a manifest of every file, its size and
its sha256, then renamed into place; verified file by file (content included) before a run resumes from one. Also
the files RLSD adds to a checkpoint (the teacher's state and weights, the rule's state), written and restored from
values, never the trainer."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint

from rlsd.context.sources import PrivilegedSource
from rlsd.core.rules import RuleState
from rlsd.infra.model_save import PARTIAL_PREFIX, SHARDED_STATE_PREFIXES, fsync_dir, fsync_file
from rlsd.infra.validate import CheckpointError
from rlsd.teachers import TEACHER_STATE_FILE, TEACHER_WEIGHTS_FILE, Teacher, Unwrap

logger = logging.getLogger(__name__)

MANIFEST_FILE = "rlsd_checkpoint.json"
"""Written last, atomically: a checkpoint folder without it was interrupted while being written."""
MANIFEST_FORMAT = 2
"""The manifest's `format`: 2 records `{"size": bytes, "sha256": hex}` per file; format 1 (sizes only, as integers)
is still accepted when resuming, with a log line saying that the content is not checked."""
HASH_CHUNK = 4 * 2**20
"""Files are hashed in chunks of this many bytes: a multi-GB weight file is never read whole."""
HASH_THREADS = 4
"""Files hashed at once (hashlib and file reads release the GIL): sealing and verifying each read and hash the whole
checkpoint (sha256 runs at roughly 0.5 GB/s per core)."""
# PARTIAL_PREFIX (`rlsd.infra.model_save`'s): checkpoints are written into
# `<output_dir>/.rlsd-partial-checkpoint-N/checkpoint-N`, a name that neither `get_last_checkpoint` nor checkpoint
# rotation picks up, and renamed to `<output_dir>/checkpoint-N` once sealed.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
"""Any one of these holds a checkpoint's weights."""
DISK_FULL_FREE_BYTES = 16 * 2**20
"""A failed write with less free space than this is reported as a full disk (torch's writer loses the errno)."""
RESUME_FLAGS = "resume from an earlier checkpoint, or pass --resume_weights_only true to load only its weights"
RULE_STATE_FILE = "rlsd_rule_state.json"
"""A stateful rule's state (`RuleState.state_dict`) in a checkpoint."""
SOURCE_STATE_FILE = "rlsd_source_state.json"
"""A stateful privileged source's state (`PrivilegedSource.state_dict`, RESD's playbook) in a checkpoint."""


class DiskFullError(OSError):
    """A checkpoint write failed because the disk (or quota) is full."""


def staging_root(run_dir: str, name: str) -> str:
    """The temporary folder that holds checkpoint `name` while it is being written."""
    return os.path.join(run_dir, PARTIAL_PREFIX + name)


def seal(folder: str, step: int) -> None:
    """Flush every file of a written checkpoint to disk, then write the manifest, each file's size and sha256
    (temporary name, rename)."""
    paths = [p for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != MANIFEST_FILE]
    for path in paths:
        fsync_file(path)
    digests = sha256_files(paths)
    files = {
        path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": digest}
        for path, digest in zip(paths, digests, strict=True)
    }
    temporary = os.path.join(folder, MANIFEST_FILE + ".tmp")
    with open(temporary, "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "global_step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(folder, MANIFEST_FILE))


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in `HASH_CHUNK` pieces (never whole)."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while read := f.readinto(buffer):
            digest.update(view[:read])
    return digest.hexdigest()


def sha256_files(paths: list[Path] | list[str]) -> list[str]:
    """`sha256_file` of each path, in order, `HASH_THREADS` files at a time."""
    if len(paths) <= 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(HASH_THREADS, len(paths))) as pool:
        return list(pool.map(sha256_file, paths))


def publish(staged: str, final: str) -> None:
    """Rename a sealed checkpoint into place; a previous folder of the same name is moved aside first, then
    removed (a rename cannot replace a non-empty folder)."""
    root = os.path.dirname(staged)
    if os.path.exists(final):
        replaced = os.path.join(root, "replaced")
        os.rename(final, replaced)
    os.rename(staged, final)
    fsync_dir(os.path.dirname(final))
    shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def staged(
    run_dir: str,
    name: str,
    step: int,
    *,
    should_save: bool,
    barrier: Callable[[], None],
    before_seal: Callable[[str], None] = lambda root: None,
) -> Iterator[str]:
    """Checkpoint `name` of `run_dir` written inside the block under a temporary root (yielded), then, once every
    process is done (`barrier`), `before_seal(root)`, sealed with a manifest and renamed into place: a run killed
    while saving leaves no `checkpoint-N` that looks complete. A failed write is removed; a full disk is reported
    as one. `should_save`: this process writes files (the main one)."""
    root = staging_root(run_dir, name)
    if should_save:
        discard(root)  # a torn write of this step by an earlier, killed run
    barrier()
    try:
        yield root
        barrier()
        if should_save:
            before_seal(root)
            seal(os.path.join(root, name), step)
    except Exception as err:
        if should_save:
            discard(root)
        if is_disk_full(err, run_dir):
            raise disk_full_error(name, run_dir) from err
        raise
    if should_save:
        publish(os.path.join(root, name), os.path.join(run_dir, name))


def unstage_best(state: Any, root: str, run_dir: str, name: str) -> None:
    """HF records the best checkpoint (`state.best_model_checkpoint`, HF's `TrainerState`) where it was written, under
    the staging `root`: point it at its final place under `run_dir`, in the state and in checkpoint `name`'s file."""
    best = state.best_model_checkpoint
    if best and best.startswith(root):
        state.best_model_checkpoint = run_dir + best[len(root) :]
        state.save_to_json(os.path.join(root, name, TRAINER_STATE_NAME))


def discard(root: str) -> None:
    """Remove a temporary checkpoint folder (a failed or torn write)."""
    shutil.rmtree(root, ignore_errors=True)


def is_disk_full(error: BaseException, folder: str) -> bool:
    """Whether a failed write ran out of space: ENOSPC / EDQUOT anywhere in the chain, or (for writers that lose the
    errno, such as torch's) almost no free space left under `folder`."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < DISK_FULL_FREE_BYTES
    except OSError:
        return False


def disk_full_error(name: str, run_dir: str) -> DiskFullError:
    """The error that reports a full disk, with the free space left."""
    try:
        free = f"{shutil.disk_usage(run_dir).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on the device while writing {name} into {run_dir} ({free}); the partial checkpoint was "
        "removed and the previous ones are intact: free space, lower --save_total_limit, or choose another "
        "--output_dir, then resume",
    )


def verify(folder: str, *, required: Iterable[str], expected: Iterable[str], weights_only: bool) -> list[str]:
    """Check a checkpoint before resuming: sealed, every file of its manifest present with its written size, readable
    and with its written sha256, plus the files this run needs (`required` always; `expected` unless `weights_only`).
    Returns what a weights-only resume starts fresh; anything else wrong raises `CheckpointError` naming the file."""
    where = f"checkpoint {folder}"
    if not os.path.isdir(folder):
        raise CheckpointError(where, "no such folder", "pass a checkpoint-N folder, or true for the latest one")
    manifest = _read_manifest(folder, weights_only)
    files = manifest_entries(where, manifest) if manifest else {}
    if not any(os.path.exists(os.path.join(folder, name)) for name in WEIGHT_FILES) and not _has_sharded_state(folder):
        raise CheckpointError(where, f"holds no model weights ({', '.join(WEIGHT_FILES[:2])}, ...)", RESUME_FLAGS)
    fresh = []
    for name in sorted({*files, *required, *expected}):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            if weights_only and name not in required:
                fresh.append(name)
                continue
            raise CheckpointError(where, f"{name} is missing", RESUME_FLAGS)
        _check_file(where, path, name, files.get(name, {}).get("size"))
    _check_checksums(where, folder, {name: entry["sha256"] for name, entry in files.items() if "sha256" in entry})
    return fresh


def manifest_entries(where: str, manifest: dict) -> dict[str, dict[str, Any]]:
    """The manifest's files as `{name: {"size": ..., "sha256": ...}}`: format 2 as written, format 1 (sizes only)
    with a log line saying that their content is not checked; any other format is refused."""
    version, files = manifest.get("format"), manifest.get("files")
    if version not in (1, MANIFEST_FORMAT) or not isinstance(files, dict):
        raise CheckpointError(
            where,
            f"has a {MANIFEST_FILE} of format {version!r}, which this rlsd does not read (formats 1 and "
            f"{MANIFEST_FORMAT})",
            "resume with the rlsd version that wrote it, or pass --resume_weights_only true",
        )
    if version == 1:
        logger.warning("%s: its %s is of format 1 (file sizes only, no checksums): the files' sizes are checked, "
                       "their content is not", where, MANIFEST_FILE)  # fmt: skip
        entries = {name: {"size": size} for name, size in files.items()}
    else:
        entries = files
    for name, entry in entries.items():
        if not _valid_entry(entry):
            raise CheckpointError(where, f"its {MANIFEST_FILE} records {name} as {entry!r}, not a size and a sha256",
                                  "resume from another checkpoint")  # fmt: skip
    return entries


def _valid_entry(entry: Any) -> bool:
    """A manifest entry: an integer size, and a sha256 string where one is recorded."""
    return isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256", ""), str)


def _check_checksums(where: str, folder: str, expected: dict[str, str]) -> None:
    """Every file's sha256 as the manifest recorded it (hashed in parallel, in chunks): a file whose content changed
    at the same size (a flipped bit, a file swapped for another of the same size) is refused by name."""
    names = sorted(name for name in expected if os.path.isfile(os.path.join(folder, name)))
    actual = sha256_files([os.path.join(folder, name) for name in names])
    for name, digest in zip(names, actual, strict=True):
        if digest != expected[name]:
            raise CheckpointError(
                where,
                f"{name} has changed since it was written: its sha256 is {digest[:16]}..., the manifest recorded "
                f"{expected[name][:16]}... (same size: corrupted on disk or replaced)",
                RESUME_FLAGS,
            )


def _read_manifest(folder: str, weights_only: bool) -> dict | None:
    """The checkpoint's manifest; a missing one is refused unless the resume is weights-only."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.exists(path):
        if weights_only:
            return None
        raise CheckpointError(
            f"checkpoint {folder}",
            f"is incomplete: it has no {MANIFEST_FILE}, which RLSD writes last, so it was interrupted while being "
            "written (or was not written by RLSDTrainer)",
            RESUME_FLAGS,
        )
    _check_file(f"checkpoint {folder}", path, MANIFEST_FILE, None)
    with open(path) as f:
        return json.load(f)


def _has_sharded_state(folder: str) -> bool:
    """FSDP and DeepSpeed checkpoints keep their weights in sub-folders."""
    return any(name.startswith(SHARDED_STATE_PREFIXES) for name in os.listdir(folder))


def _check_file(where: str, path: str, name: str, size: int | None) -> None:
    """One file of a checkpoint: the size written, not empty, and for JSON and torch files, readable."""
    if os.path.isdir(path):
        return
    actual = os.path.getsize(path)
    if size is not None and actual != size:
        raise CheckpointError(
            where, f"{name} is {actual:,} bytes, but {size:,} were written: it was truncated or replaced", RESUME_FLAGS
        )
    if actual == 0:
        raise CheckpointError(where, f"{name} is empty (0 bytes)", RESUME_FLAGS)
    if name.endswith(".json"):
        try:
            with open(path) as f:
                json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(where, f"{name} is not valid JSON ({err})", RESUME_FLAGS) from None
    elif name.endswith((".pt", ".pth")) and not zipfile.is_zipfile(path):
        raise CheckpointError(where, f"{name} is not a readable torch file (truncated?)", RESUME_FLAGS)


# ------------------------------------------------------------------------------------------------ resuming
@dataclass(frozen=True)
class ResumePlan:
    """What `RLSDTrainer.train` verified before HF's loop starts, for its `_load_optimizer_and_scheduler`: the
    checkpoint to resume from (None: no resume) and the state files a weights-only resume starts fresh."""

    checkpoint: str | None = None
    fresh: frozenset[str] = frozenset()


def resume_plan(
    resume: str | bool | None,
    output_dir: str,
    *,
    expected: list[str],
    weights_only: bool,
    log_to: logging.Logger | None,
) -> ResumePlan:
    """The checkpoint to resume from (True: the latest `checkpoint-N` of `output_dir`), refused when it is torn, misses
    a file (HF's trainer state; `expected` unless `weights_only`) or holds an unreadable one; a weights-only resume
    names what it starts fresh in a warning on `log_to` (the trainer's logger on the main process, else None)."""
    if resume is None or resume is False:
        return ResumePlan()
    if resume is True:
        resume = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if resume is None:
            raise CheckpointError(f"output folder {output_dir}", "holds no checkpoint-N folder to resume from",
                                  "train without resuming, or pass the path of a checkpoint")  # fmt: skip
    fresh = verify(str(resume), required=[TRAINER_STATE_NAME], expected=expected, weights_only=weights_only)
    if fresh and log_to is not None:
        log_to.warning("resume_weights_only: %s lacks %s; that state starts fresh", resume, ", ".join(fresh))
    return ResumePlan(str(resume), frozenset(fresh))


def hf_state_files(args: Any, sharded: bool) -> list[str]:
    """The optimizer, scheduler and RNG files HF writes into a checkpoint of a run with `TrainingArguments` `args`
    (none with `save_only_model`; DeepSpeed and FSDP, `sharded`, keep theirs in sub-folders, which the manifest
    covers)."""
    if args.save_only_model or sharded:
        return []
    rng = "rng_state.pth" if args.world_size <= 1 else f"rng_state_{args.process_index}.pth"
    return ["optimizer.pt", "scheduler.pt", rng]


def rlsd_state_files(
    teacher: Teacher | None, rule_state: RuleState | None, source: PrivilegedSource | None = None
) -> list[str]:
    """The files RLSD adds to a checkpoint of a run: the teacher's state and weights, the rule's state, the
    privileged source's state (a source whose `state_dict` is not None)."""
    files = []
    if teacher is not None:
        files.append(TEACHER_STATE_FILE)
        if teacher.has_weights:
            files.append(TEACHER_WEIGHTS_FILE)
    if rule_state is not None:
        files.append(RULE_STATE_FILE)
    if source is not None and source.state_dict() is not None:
        files.append(SOURCE_STATE_FILE)
    return files


def save_rlsd_state(
    folder: str,
    teacher: Teacher | None,
    rule_state: RuleState | None,
    unwrap: Unwrap,
    *,
    write: bool,
    source: PrivilegedSource | None = None,
) -> None:
    """Write the teacher's weights and sync state, the rule's state and the privileged source's state into checkpoint
    `folder`; every process calls it (gathering a sharded, FSDP2, teacher is a collective), only those with `write`
    write. The source's state (the same on every process) is written under a temporary name, then renamed."""
    if teacher is not None:
        teacher.save(folder, unwrap, write=write)
    if rule_state is not None and write:
        with open(os.path.join(folder, RULE_STATE_FILE), "w") as f:
            json.dump(rule_state.state_dict(), f)
    state = source.state_dict() if source is not None else None
    if state is not None and write:
        write_json_atomically(os.path.join(folder, SOURCE_STATE_FILE), state)


def write_json_atomically(path: str, value: Any) -> None:
    """`value` as JSON at `path`: written and flushed under a temporary name, then renamed into place, so that the
    file is either absent or complete."""
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def load_rlsd_state(
    checkpoint: str | None,
    teacher: Teacher | None,
    rule_state: RuleState | None,
    *,
    fresh: frozenset[str],
    policy: nn.Module,
    unwrap: Unwrap,
    source: PrivilegedSource | None = None,
) -> None:
    """Restore the teacher, the rule state and the privileged source's state from `checkpoint` (verified before,
    `resume_plan`); what a weights-only resume starts `fresh` is skipped, and a missing teacher restarts from the
    resumed `policy` (unwrapped)."""
    if teacher is not None and checkpoint is not None:
        if fresh & {TEACHER_STATE_FILE, TEACHER_WEIGHTS_FILE}:
            teacher.follow(policy)  # a hard copy of the weights it keeps, if any (an external teacher: nothing)
        else:
            teacher.load(checkpoint, unwrap)
    if rule_state is not None and checkpoint is not None and RULE_STATE_FILE not in fresh:
        with open(os.path.join(checkpoint, RULE_STATE_FILE)) as f:
            rule_state.load_state_dict(json.load(f))
    stateful = source is not None and source.state_dict() is not None
    if stateful and checkpoint is not None and SOURCE_STATE_FILE not in fresh:
        with open(os.path.join(checkpoint, SOURCE_STATE_FILE)) as f:
            source.load_state_dict(json.load(f))
