"""Rewards named by a file path (`--reward_funcs path/to/rewards.fn`): the file they load, kept inside the working
folder unless the path was given absolute (issue 27: `../x.fn` loaded a file from anywhere without saying so)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rlsd.infra.validate import ConfigError

logger = logging.getLogger("rlsd.data.rewards")


def reward_file(module_path: str, reward: str) -> str:
    """The file of a reward named by path: `PATH.py` (or the package `PATH/__init__.py`), relative to the working
    folder unless absolute; one that resolves outside the working folder is refused unless given absolute."""
    given = Path(module_path).expanduser()
    base = given if given.is_absolute() else Path.cwd() / given
    candidates = [base.with_name(base.name + ".py"), base / "__init__.py"]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise ConfigError(f"reward {reward!r}", f"no file {candidates[0]} (nor {candidates[1]})",
                          "a reward named with '/' is PATH.function, PATH a .py file without its suffix, relative "
                          "to the working folder or absolute")  # fmt: skip
    if given.is_absolute():
        resolved = found.resolve()
        inside = resolved.is_relative_to(Path.cwd().resolve())
        (logger.info if inside else logger.warning)("reward %r: loading %s", reward, resolved)
        return str(found)
    return str(inside_working_folder(found, reward))


def inside_working_folder(path: Path, reward: str) -> Path:
    """`path`, once its resolved form (`..` and symbolic links followed) is found inside the working folder: a
    relative name must not load code from elsewhere without saying so. Logs the resolved file."""
    resolved, folder = path.resolve(), Path.cwd().resolve()
    if not resolved.is_relative_to(folder):
        absolute = str(resolved.with_suffix("")) if resolved.name != "__init__.py" else str(resolved.parent)
        raise ConfigError(
            f"reward {reward!r}",
            f"its file {path} resolves to {resolved}, outside the working folder {folder}",
            f"to load it anyway name it by its absolute path ({absolute}.{reward.rsplit('.', 1)[-1]})",
        )
    logger.info("reward %r: loading %s", reward, resolved)
    return path


def check_working_folder_spec(spec: Any, reward: str) -> None:
    """A module found on the module path in the working folder itself (the folder `python -m` puts first) must
    resolve inside it too, as a module loaded from there by its file must: a link there to code elsewhere is
    refused. Modules of other folders (installed packages) are not this check's business."""
    folder = Path.cwd()
    locations = [spec.origin, *(spec.submodule_search_locations or [])] if spec.origin != "frozen" else []
    for location in locations:
        if location and location not in ("built-in", "namespace") and Path(location).parent == folder:
            inside_working_folder(Path(location), reward)
