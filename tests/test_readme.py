"""The README's extension examples run as written: each registers into its registry and the config accepts them."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import rlsd
from rlsd.context.sources import SOURCES
from rlsd.context.transforms import TRANSFORMS
from rlsd.core.distill import LOSSES
from rlsd.core.rules import RULES
from rlsd.data.datasets import detect_format
from rlsd.data.formats import FORMATS
from rlsd.step.rollout_term import TERMS
from rlsd.teachers import TEACHER_KINDS

README = Path(__file__).parent.parent / "README.md"


def extending_block() -> str:
    """The first python block after the README's **Extending.** paragraph."""
    text = README.read_text()
    start = text.index("**Extending.**")
    return re.search(r"```python\n(.*?)```", text[start:], re.DOTALL).group(1)


def test_the_extending_examples_register_and_configure(tmp_path, registries, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the example is written for a GPU machine (bf16 by default): on this CPU-only one, its config runs on the CPU
    monkeypatch.setattr(rlsd, "RLSDConfig", functools.partial(rlsd.RLSDConfig, use_cpu=True))
    namespace: dict = {}
    exec(compile(extending_block(), "README.md", "exec"), namespace)
    config = namespace["config"]
    assert {"my_shifted"} <= set(RULES) and {"my_scaled_kl"} <= set(LOSSES) and "my_reflection" in SOURCES
    assert "my_hint" in TRANSFORMS and "my_qa" in FORMATS
    assert "my_live_copy" in TEACHER_KINDS and "my_first_nll" in TERMS
    assert (config.credit, config.my_shift, config.distill_loss, config.my_kl_scale) == (
        "my_shifted",
        0.5,
        "my_scaled_kl",
        2.0,
    )
    assert config.teacher_template == SOURCES["my_reflection"].default_template
    rollouts = namespace["with_rollouts"]
    assert (rollouts.teacher, rollouts.teacher_rollout_loss, rollouts.my_nll_scale) == (
        "my_live_copy",
        "my_first_nll",
        1.0,
    )
    assert detect_format(["question", "final"]) == "my_qa"
