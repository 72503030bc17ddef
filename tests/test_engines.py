"""The project's core without TRL (what an engine such as verl installs beside another transformers) and the verl
loss's arithmetic, pinned by hand; verl itself is exercised in tests/verl (`make test-verl`)."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from rlsd.core.credit import DEFAULT_RLSD_CLIP, DEFAULT_RLSD_LAMBDA, rlsd_advantages
from rlsd.engines.verl_loss import rlsd_distillation_losses, row_advantages

ROOT = Path(__file__).resolve().parents[1]


def test_the_core_imports_with_torch_only():
    code = (
        "import sys\n"
        "for name in ('trl', 'transformers', 'accelerate', 'datasets', 'peft'):\n"
        "    sys.modules[name] = None  # any import of them fails\n"
        "import rlsd, rlsd.core.credit, rlsd.core.rules, rlsd.engines.verl_loss, rlsd.engines.verl_plugin\n"
        "from rlsd.core.rules import RULES\n"
        "assert 'rlsd' in RULES\n"
        "try:\n"
        "    rlsd.RLSDConfig\n"
        "except ImportError:\n"
        "    print('lazy')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "lazy"  # the public classes need TRL, and only they do


def test_the_verl_entry_point_names_the_plugin_module():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["verl.plugins"]["rlsd"]
    assert target == "rlsd.engines.verl_plugin"
    assert project["optional-dependencies"]["verl"] == ["verl==0.9.1"]
    plugin = importlib.import_module(target)
    assert plugin.RLSD_LOSS == "rlsd"
    if plugin.verl_losses is None:  # without verl, registering is refused by name
        with pytest.raises(ImportError, match="verl"):
            plugin.register_rlsd_loss()


def test_the_verl_defaults_are_rlsdconfigs():
    from rlsd import RLSDConfig

    fields = RLSDConfig.__dataclass_fields__
    assert (fields["rlsd_lambda"].default, fields["rlsd_clip"].default) == (DEFAULT_RLSD_LAMBDA, DEFAULT_RLSD_CLIP)
    assert (DEFAULT_RLSD_LAMBDA, DEFAULT_RLSD_CLIP) == (0.5, 0.2)


def test_the_verl_loss_by_hand():
    # A = (1, -2); Delta = (0.1, ln 2, -1) in row 0, (0.1, -ln 2, 0) in row 1 (its last token outside the mask)
    advantages = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    student = torch.full((2, 3), -1.0)
    teacher = student + torch.tensor([[0.1, math.log(2), -1.0], [0.1, -math.log(2), 0.0]])
    losses, metrics = rlsd_distillation_losses(advantages, teacher, student, mask)
    # loss_t = A_i * lam * (1 - clip(w_t)), w_t = exp(sign(A_i) * Delta_t), lam = 0.5, clip to [0.8, 1.2]
    expected = torch.tensor(
        [
            [0.5 * (1 - math.exp(0.1)), 0.5 * (1 - 1.2), 0.5 * (1 - 0.8)],
            [-2 * 0.5 * (1 - math.exp(-0.1)), -2 * 0.5 * (1 - 1.2), 0.0],
        ]
    )
    assert torch.allclose(losses, expected, atol=1e-7)
    token_adv, _ = rlsd_advantages(advantages[:, 0], teacher, student, mask, lam=0.5, clip=0.2)
    assert torch.allclose(advantages * mask - losses, token_adv, atol=1e-7)  # verl's A_i - loss_t is RLSD's A_it
    assert metrics["distillation/rlsd_clip_high_frac"] == pytest.approx(2 / 5)
    assert metrics["distillation/rlsd_lambda"] == 0.5


def test_token_advantages_that_vary_within_a_response_are_refused():
    mask = torch.tensor([[True, True, False]])
    assert row_advantages(torch.tensor([[0.7, 0.7, 0.0]]), mask).tolist() == [pytest.approx(0.7)]
    with pytest.raises(ValueError, match="one advantage per response"):
        row_advantages(torch.tensor([[0.7, 0.5, 0.0]]), mask)
