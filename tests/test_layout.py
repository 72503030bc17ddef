"""The package's shape: the library never imports the experiments."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import rlsd


def library_modules() -> list[str]:
    """Every `rlsd` module outside `rlsd.experiments`."""
    return [
        info.name
        for info in pkgutil.walk_packages(rlsd.__path__, "rlsd.")
        if not info.name.startswith("rlsd.experiments")
    ]


def test_the_library_never_imports_the_experiments():
    modules = library_modules()
    assert "rlsd.trainer" in modules and "rlsd.rewards" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('rlsd.experiments')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
