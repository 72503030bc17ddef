"""The package's shape: the library never imports the experiments."""

from __future__ import annotations

import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

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


# --------------------------------------------------------------------------------------------- the seams table
def seams_table() -> list[dict[str, str]]:
    """The entries of the seams table in `rlsd.trainer`'s module docstring: `- names (kind): behaviour. Guarded by
    tests.`, wrapped over indented lines."""
    import rlsd.trainer

    entries = re.split(r"\n- ", rlsd.trainer.__doc__.split("Seams with TRL", 1)[1])[1:]
    rows = []
    for entry in entries:
        text = " ".join(entry.split())
        seam, rest = text.split(" (", 1)
        rows.append({"seam": seam, "guard": rest.rsplit("Guarded by", 1)[1]})
    return rows


def names_in(cell: str) -> set[str]:
    """The backquoted names of a table cell."""
    return set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", cell))


def test_the_seams_table_lists_every_override_and_every_trl_attribute_read():
    from trl import GRPOTrainer

    from rlsd.trainer import RLSDTrainer

    listed = set().union(*(names_in(row["seam"]) for row in seams_table()))
    # the trainer and its mixins (`rlsd.teacher_rollouts_mixin`, `rlsd.aligned_prompts_mixin`): every rlsd class
    # in its MRO
    ours = [cls for cls in RLSDTrainer.__mro__ if cls.__module__.startswith("rlsd.")]
    assert len(ours) >= 3, "RLSDTrainer's mixins (teacher rollouts, aligned prompts) left its MRO: update this test"
    defined = set().union(*(vars(cls) for cls in ours))
    overrides = {n for n in defined if callable(getattr(GRPOTrainer, n, None)) and not n.startswith("__")}
    assert overrides - listed == set(), "overridden TRL / HF methods missing from the seams table"
    source = "".join(Path(inspect.getsourcefile(cls)).read_text() for cls in ours)
    read = set(re.findall(r"self\.([A-Za-z_][A-Za-z0-9_]*)", source))
    assigned = set(re.findall(r"self\.([A-Za-z_][A-Za-z0-9_]*)\s*(?::[^=\n]*)?=[^=]", source))
    own = {name for name in assigned | defined if not hasattr(GRPOTrainer, name)}
    public_api = {"args", "state", "model", "accelerator", "add_callback", "remove_callback"}
    inherited = read - own - public_api
    assert inherited - listed == set(), "TRL / HF attributes read but missing from the seams table"
    assert listed - overrides - inherited - trl_helpers() == set(), "stale table rows"


def test_every_test_named_in_the_seams_table_exists():
    tests = Path(__file__).parent
    defined = set()
    for path in tests.glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), flags=re.MULTILINE))
    named = set().union(*(set(re.findall(r"`(test_\w+)`", row["guard"])) for row in seams_table()))
    assert named and named - defined == set()


def trl_helpers() -> set[str]:
    """The TRL names the library (not the experiments) imports, besides TRL's public trainer and config API."""
    imported = set()
    for path in Path(rlsd.__file__).parent.glob("*.py"):
        for names in re.findall(r"^\s*from trl[\w.]* import ([\w, ]+)", path.read_text(), flags=re.MULTILINE):
            imported |= {name.strip() for name in names.split(",")}
    return imported - {"GRPOConfig", "GRPOTrainer", "ModelConfig", "TrlParser", "get_peft_config"}


def test_every_trl_helper_the_library_imports_is_in_the_seams_table():
    listed = set().union(*(names_in(row["seam"]) for row in seams_table()))
    assert "pad" in trl_helpers() and trl_helpers() - listed == set()
