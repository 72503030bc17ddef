"""A model folder written atomically (the final model of `rlsd train`, the output of `rlsd model`): saved under a
temporary name on the same file system, verified (weights and config present, every safetensors file as long as its
header says, JSON files parse, shard indexes complete), then moved into place. A save that fails or is killed while
writing leaves the destination as it was: no folder that looks like a complete model, an earlier model untouched.

Moving into place is one rename when the destination is new or empty. Otherwise (a run's output folder, which holds
its checkpoints) the earlier model's weight files are moved aside first, the new files are renamed in one by one,
and the weights come last (a shard index after its shards): until the last rename the folder holds no complete model,
and from then on only the new one."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

PARTIAL_PREFIX = ".rlsd-partial-"
"""Temporary folders start with it (as a checkpoint's do): never taken for a model or a checkpoint."""
STAGING_NAME = PARTIAL_PREFIX + "model"
"""The temporary folder, inside a run's output folder, that holds the final model while it is written (the next save
replaces a torn one)."""
WEIGHT_PATTERNS = (
    "model*.safetensors",
    "pytorch_model*.bin",
    "adapter_model*.safetensors",
    "adapter_model*.bin",
    "*.safetensors.index.json",
    "*.bin.index.json",
    "adapter_config.json",
)
"""The files that make a folder load as a model (with its config): moved aside before, installed after, the rest."""
SHARDED_STATE_PREFIXES = ("pytorch_model_fsdp", "global_step")
"""FSDP and DeepSpeed save their weights in sub-folders with these names."""


class ModelSaveError(RuntimeError):
    """A model save whose written files fail verification, or that could not be moved into place."""


def is_weight_file(name: str) -> bool:
    """Whether a file of a model folder holds (or indexes, or configures an adapter's) weights."""
    return any(fnmatch.fnmatch(name, pattern) for pattern in WEIGHT_PATTERNS)


def save_atomically(
    write: Callable[[str], None],
    target: str | Path,
    *,
    staging: str | Path | None = None,
    should_save: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """`write(folder)` a model into a temporary `folder` (under `staging`, default `target/.rlsd-partial-model`, which
    must be on `target`'s file system), verify it, then move it into `target`; returns `target`. Every process calls
    `write` (a sharded model is gathered collectively); only those with `should_save` clean up, verify and install.
    A failed write or verification removes the temporary folder and leaves `target` as it was."""
    target = Path(target)
    root = Path(staging) if staging is not None else target / STAGING_NAME
    staged = root / "model"
    if should_save:
        shutil.rmtree(root, ignore_errors=True)  # a torn save of an earlier, killed run
    barrier()
    try:
        write(str(staged))
        barrier()
        if should_save:
            check_model_folder(staged)
            _fsync_tree(staged)
    except BaseException:
        if should_save:
            shutil.rmtree(root, ignore_errors=True)
        raise
    if should_save:
        install(staged, target, root)
    barrier()
    return target


def check_model_folder(folder: Path) -> None:
    """A written model folder is whole: a config (`config.json`, or `adapter_config.json` for an adapter), weights,
    and every weight or JSON file readable to its end; raises `ModelSaveError` naming the file."""
    if not folder.is_dir():
        raise ModelSaveError(f"the model save wrote nothing into {folder}")
    names = {p.name for p in folder.iterdir()}
    if not names & {"config.json", "adapter_config.json"}:
        raise ModelSaveError(f"the model saved in {folder} has no config.json (nor adapter_config.json)")
    weights = [n for n in names if is_weight_file(n) and not n.endswith(".json")]
    if not weights and not any(n.startswith(SHARDED_STATE_PREFIXES) for n in names):
        raise ModelSaveError(f"the model saved in {folder} holds no weights ({', '.join(WEIGHT_PATTERNS[:2])}, ...)")
    for path in sorted(folder.iterdir()):
        if path.is_file():
            _check_file(path)


def _check_file(path: Path) -> None:
    """One saved file: JSON parses (an index names only shards that exist), safetensors is as long as its header
    says, torch files are whole zip archives, and weights are not empty."""
    size = path.stat().st_size
    if is_weight_file(path.name) and size == 0:
        raise ModelSaveError(f"{path} is empty (0 bytes)")
    if path.suffix == ".json":
        try:
            value = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelSaveError(f"{path} is not valid JSON ({err})") from None
        shards = value.get("weight_map", {}).values() if isinstance(value, dict) else ()
        missing = sorted(set(shards) - {p.name for p in path.parent.iterdir()})
        if missing:
            raise ModelSaveError(f"{path} names shard(s) that were not written: {', '.join(missing)}")
    elif path.suffix == ".safetensors":
        expected = safetensors_length(path)
        if expected != size:
            raise ModelSaveError(f"{path} is {size:,} bytes, but its header describes {expected:,}: it is truncated")
    elif path.suffix in (".bin", ".pt", ".pth") and not zipfile.is_zipfile(path):
        raise ModelSaveError(f"{path} is not a whole torch archive (truncated?)")


def safetensors_length(path: Path) -> int:
    """The length a safetensors file must have: 8 bytes of header length, the JSON header, and the data up to the
    furthest tensor end the header records (read from the header alone)."""
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ModelSaveError(f"{path} is shorter than a safetensors header")
        (header_length,) = struct.unpack("<Q", prefix)
        try:
            header = json.loads(f.read(min(header_length, 100 * 2**20)))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelSaveError(f"{path} has an unreadable safetensors header ({err})") from None
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    return 8 + header_length + max(ends, default=0)


def install(staged: Path, target: Path, root: Path) -> None:
    """Move a verified model folder into `target` (see the module docstring), then remove the temporary `root`."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)  # a new or empty folder: one rename
        fsync_dir(target.parent)
        shutil.rmtree(root, ignore_errors=True)
        return
    aside = root / "replaced"
    aside.mkdir()
    try:
        for old in sorted(target.iterdir()):
            if old.is_file() and is_weight_file(old.name):
                os.replace(old, aside / old.name)  # the earlier model's weights: it stops looking complete
        for new in sorted(staged.iterdir(), key=_install_order):
            destination = target / new.name
            if destination.is_dir() and not destination.is_symlink():
                os.replace(destination, aside / new.name)
            os.replace(new, destination)
        fsync_dir(target)
    except OSError as err:
        raise ModelSaveError(
            f"moving the saved model into {target} failed midway ({err}); the earlier model's weights, if any, are in "
            f"{aside}"
        ) from err
    shutil.rmtree(root, ignore_errors=True)


def _install_order(path: Path) -> tuple[int, str]:
    """Everything else first, then the weights (and an adapter's config), then shard indexes, by name within each."""
    if path.name.endswith(".index.json"):
        return 2, path.name
    weights = is_weight_file(path.name) or path.name.startswith(SHARDED_STATE_PREFIXES)
    return (1 if weights else 0), path.name


def _fsync_tree(folder: Path) -> None:
    """Flush every written file to the device before it is moved into place."""
    for path in folder.rglob("*"):
        if path.is_file():
            fsync_file(path)


def fsync_file(path: str | Path) -> None:
    """Flush one file's data to the device."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (the renames) where the platform allows it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
