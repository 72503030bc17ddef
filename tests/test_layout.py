"""The package's shape: the library never imports the experiments."""

from __future__ import annotations

import ast
import inspect
import pkgutil
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
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
    assert "rlsd.trainer" in modules and "rlsd.data.rewards" in modules
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
    # the trainer alone reads TRL / HF attributes: it has no mixins left, and its collaborators (`COLLABORATORS`)
    # are handed what they read, so their TRL reads are the trainer file's, where each is built
    ours = [cls for cls in RLSDTrainer.__mro__ if cls.__module__.startswith("rlsd.")]
    assert ours == [RLSDTrainer], "an rlsd mixin entered RLSDTrainer's MRO: make it a collaborator (COLLABORATORS)"
    assert sorted(Path(rlsd.__file__).parent.rglob("*_mixin.py")) == []
    for module in COLLABORATORS:
        assert trainer_reads(module_files()[module].read_text()) == set(), f"{module} reads the trainer"
    defined = set().union(*(vars(cls) for cls in ours))
    overrides = {n for n in defined if callable(getattr(GRPOTrainer, n, None)) and not n.startswith("__")}
    assert overrides - listed == set(), "overridden TRL / HF methods missing from the seams table"
    source = "".join(Path(inspect.getsourcefile(cls)).read_text() for cls in ours)
    read = set(re.findall(r"self\.([A-Za-z_][A-Za-z0-9_]*)", source))
    assigned = assigned_on(ast.parse(source), is_self)
    own = {name for name in assigned | defined if not hasattr(GRPOTrainer, name)}
    own -= trl_attributes()  # an attribute TRL / HF also assign (`train_dataset`) is theirs: a seam
    public_api = {"args", "state", "model", "accelerator", "add_callback", "remove_callback"}
    inherited = read - own - public_api
    assert inherited - listed == set(), "TRL / HF attributes read but missing from the seams table"
    assert listed - overrides - inherited - trl_helpers() == set(), "stale table rows"


COLLABORATORS = (
    "rlsd.step.wiring",
    "rlsd.step.rollout_term",
    "rlsd.step.aligned_prompts",
    "rlsd.step.assign",
    "rlsd.context.prompts",
    "rlsd.step.scorer",
    "rlsd.step.distill_term",
    "rlsd.infra.guards",
    "rlsd.infra.checkpoint",
)
"""The modules of what the trainer builds from values and callables, never from itself (`RunView` and the
collaborators built from it: `TeacherRolloutTerm`, `CreditAssembler`, `TeacherPrompts`, `Scorer`, `DistillationTerm`,
`RolloutCredit`; `select_aligned_prompts`, the guards' and checkpoint files' functions)."""


def trainer_reads(source: str) -> set[str]:
    """How a collaborator's `source` would reach a trainer: an attribute of a `trainer` handle, a TRL / HF trainer
    attribute on `self` that none of its own classes defines (as a field, method or assignment), a trainer class
    imported."""
    tree = ast.parse(source)
    own = assigned_on(tree, is_self)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    own.add(item.target.id)
                elif isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    own.add(item.name)
    theirs, reads = trl_attributes(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_trainer(node.value):
            reads.add(f"trainer.{node.attr}")
        elif isinstance(node, ast.Attribute) and is_self(node.value) and node.attr in theirs - own:
            reads.add(f"self.{node.attr}")
        elif isinstance(node, ast.ImportFrom):
            names = {alias.name for alias in node.names}
            if node.module == "rlsd.trainer" or names & {"GRPOTrainer", "Trainer", "RLSDTrainer"}:
                reads |= {f"import {name}" for name in names}
    return reads


def test_trainer_reads_finds_every_way_back_to_the_trainer():
    code = textwrap.dedent("""
        from trl import GRPOTrainer
        from rlsd.trainer import RLSDTrainer

        @dataclass
        class Term:
            temperature: float

            def run(self, trainer):
                self.note = trainer.tools
                return self.temperature, self.note, self.run, self.generation_config, self.trainer.args
    """)
    # its own field (`temperature`), method and assignment are its own, though TRL names some of them too
    assert trainer_reads(code) == {"import GRPOTrainer", "import RLSDTrainer", "trainer.tools", "trainer.args",
                                   "self.generation_config"}  # fmt: skip


def test_every_test_named_in_the_seams_table_exists():
    tests = Path(__file__).parent
    defined = set()
    for path in tests.glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), flags=re.MULTILINE))
    named = set().union(*(set(re.findall(r"`(test_\w+)`", row["guard"])) for row in seams_table()))
    assert named and named - defined == set()


def library_files() -> list[Path]:
    """Every module of the library: the `rlsd` source tree without the experiments wing."""
    root = Path(rlsd.__file__).parent
    return [path for path in sorted(root.rglob("*.py")) if "experiments" not in path.relative_to(root).parts]


def trl_helpers() -> set[str]:
    """The TRL names the library (not the experiments) imports, besides TRL's public trainer and config API."""
    imported = set()
    for path in library_files():
        for names in re.findall(r"^\s*from trl[\w.]* import ([\w, ]+)", path.read_text(), flags=re.MULTILINE):
            imported |= {name.strip() for name in names.split(",")}
    return imported - {"GRPOConfig", "GRPOTrainer", "ModelConfig", "TrlParser", "get_peft_config"}


def test_every_trl_helper_the_library_imports_is_in_the_seams_table():
    listed = set().union(*(names_in(row["seam"]) for row in seams_table()))
    assert "pad" in trl_helpers() and trl_helpers() - listed == set()


# --------------------------------------------------------------------------------------------- import circles
def module_files() -> dict[str, Path]:
    """Every module of the `rlsd` source tree by dotted name (a package by its `__init__.py`)."""
    root = Path(rlsd.__file__).parent
    files = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The `rlsd` modules that `name` imports anywhere, function-level (lazy) imports included: `from a import b`
    counts as `a.b` when that is a module, else as `a`; relative imports are resolved against `name`'s package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return (found & known) - {name}


def import_circles(graph: dict[str, set[str]]) -> list[str]:
    """`a -> ... -> a` for every module that reaches itself through the import graph (shortest way back)."""
    circles = []
    for start in sorted(graph):
        paths, seen = {m: [start, m] for m in graph[start]}, set(graph[start])
        frontier = sorted(graph[start])
        while frontier and start not in paths:
            step = []
            for module in frontier:
                for nxt in sorted(graph[module] - seen):
                    seen.add(nxt)
                    paths[nxt] = [*paths[module], nxt]
                    step.append(nxt)
            frontier = step
        if start in paths:
            circles.append(" -> ".join(paths[start]))
    return circles


def test_import_circles_are_found_through_lazy_and_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (package / "b.py").write_text("from . import c\n")
    (package / "c.py").write_text("import pkg.a\n")
    (package / "d.py").write_text("from pkg import a\n")
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d"}
    graph = {f"pkg.{m}": imported_modules(f"pkg.{m}", package / f"{m}.py", known) for m in "abcd"}
    assert graph["pkg.b"] == {"pkg.c"} and graph["pkg.d"] == {"pkg.a"}
    assert import_circles(graph) == ["pkg.a -> pkg.b -> pkg.c -> pkg.a", "pkg.b -> pkg.c -> pkg.a -> pkg.b",
                                     "pkg.c -> pkg.a -> pkg.b -> pkg.c"]  # fmt: skip


def test_no_module_imports_one_that_imports_it_back():
    """Dependencies go one way: no `rlsd` module imports (even lazily, inside a function) a module that, directly or
    through others, imports it back."""
    files = module_files()
    assert "rlsd.experiments.bench" in files and "rlsd.trainer" in files
    graph = {name: imported_modules(name, path, set(files)) for name, path in files.items()}
    assert "rlsd.experiments.evidence" in graph["rlsd.experiments.bench"]
    assert import_circles(graph) == []


# ------------------------------------------------------------------------- TRL / HF attributes the trainer assigns
def assigned_on(tree: ast.AST, is_owner: Callable[[ast.expr], bool]) -> set[str]:
    """The attribute names assigned on an object `is_owner` accepts: `x.a = `, `x.a: T = `, `x.a += `, tuple and
    starred targets, `setattr(x, "a", ...)`; `x.a.b = ` mutates `x.a` and does not count."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            if len(node.args) > 1 and is_owner(node.args[0]) and isinstance(node.args[1], ast.Constant):
                names.add(node.args[1].value)
            continue
        else:
            continue
        while targets:
            target = targets.pop()
            if isinstance(target, ast.Tuple | ast.List):
                targets.extend(target.elts)
            elif isinstance(target, ast.Starred):
                targets.append(target.value)
            elif isinstance(target, ast.Attribute) and is_owner(target.value):
                names.add(target.attr)
    return names


def is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def is_trainer(node: ast.expr) -> bool:
    """A collaborator's handle on the trainer: a name or an attribute called `trainer`."""
    return (isinstance(node, ast.Name) and node.id == "trainer") or (
        isinstance(node, ast.Attribute) and node.attr == "trainer"
    )


def class_tree(cls: type) -> ast.AST:
    return ast.parse(textwrap.dedent(inspect.getsource(cls)))


def trl_attributes() -> set[str]:
    """What TRL's `GRPOTrainer` and HF's `Trainer` define on a trainer: their class attributes and every attribute
    their own classes assign on `self` (instance attributes such as `train_dataset` are not on the class)."""
    from trl import GRPOTrainer

    theirs = [cls for cls in GRPOTrainer.__mro__ if cls is not object]
    return set(dir(GRPOTrainer)).union(*(assigned_on(class_tree(cls), is_self) for cls in theirs))


def trainer_assignments() -> set[str]:
    """The attributes the project assigns on the trainer: on `self` in the rlsd classes of `RLSDTrainer`'s MRO, and
    on a `trainer` in any library module (a collaborator handed the trainer)."""
    from rlsd.trainer import RLSDTrainer

    ours = [cls for cls in RLSDTrainer.__mro__ if cls.__module__.startswith("rlsd.")]
    names = set().union(*(assigned_on(class_tree(cls), is_self) for cls in ours))
    for path in library_files():
        names |= assigned_on(ast.parse(path.read_text()), is_trainer)
    return names


def unlisted_trl_assignments() -> set[str]:
    """TRL / HF attributes the project assigns that the seams table does not list."""
    listed = set().union(*(names_in(row["seam"]) for row in seams_table()))
    return (trainer_assignments() & trl_attributes()) - listed


def test_assigned_on_sees_every_form_of_assignment():
    code = textwrap.dedent("""
        self.a = 1
        self.b: int = 2
        self.c += 3
        self.d, (self.e, *self.f) = g()
        self.h.i = 4
        other.j = 5
        setattr(self, "k", 6)
        trainer.m = self.n = 7
        self.trainer.p = 8
    """)
    assert assigned_on(ast.parse(code), is_self) == {"a", "b", "c", "d", "e", "f", "k", "n"}
    assert assigned_on(ast.parse(code), is_trainer) == {"m", "p"}


def test_every_trl_attribute_the_trainer_assigns_is_in_the_seams_table():
    """Replacing an attribute TRL / HF define and read (`train_dataset`) is a seam, though the project's code assigns
    it: the read check above would count it as the project's own. A method is overridden, never patched on the
    instance (`_get_output_dir` once was)."""
    replaced = trainer_assignments() & trl_attributes()
    assert "train_dataset" in replaced  # the check sees what it is for
    assert "_get_output_dir" not in replaced  # an override that returns the staging folder, not an instance patch
    assert "rule_state" in trainer_assignments() - replaced  # the project's own attributes are not TRL's
    assert unlisted_trl_assignments() == set(), "TRL / HF attributes assigned but missing from the seams table"


def test_the_assignment_check_fails_without_the_train_dataset_row(monkeypatch):
    import rlsd.trainer

    doc = rlsd.trainer.__doc__
    row = re.search(r"\n- `train_dataset` \(.*?(?=\n- )", doc, flags=re.DOTALL)
    assert row is not None
    monkeypatch.setattr(rlsd.trainer, "__doc__", doc.replace(row.group(0), ""))
    assert unlisted_trl_assignments() == {"train_dataset"}


def test_only_rlsd_entries_names_the_rlsd_batch_keys():
    """What travels from rollout to loss is read and written through `RLSDEntries` (`rlsd.step.batch`) alone: no other
    library module names one of its `rlsd_*` keys (as `inputs["rlsd_distill_weight"]` once did)."""
    from dataclasses import fields

    from rlsd.step.batch import PREFIX, RLSDEntries

    keys = {PREFIX + item.name for item in fields(RLSDEntries)}
    named = {
        (name, key)
        for name, path in module_files().items()
        for key in keys
        if name != "rlsd.step.batch" and re.search(rf"\b{key}\b", path.read_text())
    }
    assert "rlsd_distill_weight" in keys and named == set()
