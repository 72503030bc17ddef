"""The final model of `rlsd train` and the output of `rlsd model` are written atomically: a save that fails while
writing (a full disk, injected here) or writes a truncated file leaves no folder that looks like a complete model,
and an earlier model in the same place stays byte for byte as it was; at no moment of the save does the folder look
complete with anything but a whole model."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils
from conftest import build_trainer, make_model

from rlsd.commands import convert
from rlsd.commands.train import save_final_model
from rlsd.infra import model_save
from rlsd.infra.model_save import PARTIAL_PREFIX, STAGING_NAME, ModelSaveError, install

real_save_file = transformers.modeling_utils.safe_save_file


def looks_complete(folder: Path) -> bool:
    """What a loader takes for a model: a config and a weights file (or a shard index) side by side."""
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors")
    return (folder / "config.json").exists() and any((folder / name).exists() for name in weights)


def top_files(folder: Path) -> dict[str, bytes]:
    """The files directly in `folder`, with their content."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}


def failing_write(seen: list, folder: Path, *, truncate_only: bool = False):
    """A `safe_save_file` that writes half of the weights file; it then raises ENOSPC (or, with `truncate_only`,
    returns as if all were written). `seen` records whether `folder` looked complete, and its files, at that moment:
    what a SIGKILL there would leave."""

    def save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        seen.append((looks_complete(folder), top_files(folder)))
        if not truncate_only:
            raise OSError(errno.ENOSPC, "No space left on device")

    return save_file


# ------------------------------------------------------------------------------------- rlsd train's final model
def test_the_final_save_is_verified_and_moved_into_place(tokenizer, tmp_path):
    out = tmp_path / "run"
    trainer = build_trainer(tokenizer, out)
    save_final_model(trainer, str(out))
    assert looks_complete(out) and not (out / STAGING_NAME).exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    pairs = zip(loaded.state_dict().values(), trainer.model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


@pytest.mark.parametrize("failure", ["raises", "truncated"])
def test_a_failed_final_save_keeps_the_earlier_model(tokenizer, tmp_path, monkeypatch, failure):
    out = tmp_path / "run"
    trainer = build_trainer(tokenizer, out)
    save_final_model(trainer, str(out))
    earlier = top_files(out)
    with torch.no_grad():
        next(trainer.model.parameters()).add_(1.0)  # a different model to save
    seen = []
    write = failing_write(seen, out, truncate_only=failure == "truncated")
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", write)
    error = OSError if failure == "raises" else ModelSaveError
    with pytest.raises(error, match="No space left" if failure == "raises" else r"model\.safetensors is [\d,]+ bytes"):
        save_final_model(trainer, str(out))
    assert seen == [(True, earlier)]  # while writing, the earlier model was whole and untouched
    assert top_files(out) == earlier and not (out / STAGING_NAME).exists()


def test_a_failed_first_final_save_leaves_nothing_that_looks_complete(tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "run"
    (out / "checkpoint-1").mkdir(parents=True)  # a run's folder: checkpoints, no final model yet
    trainer = build_trainer(tokenizer, out)
    seen = []
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", failing_write(seen, out))
    with pytest.raises(OSError, match="No space left"):
        save_final_model(trainer, str(out))
    assert seen == [(False, {})]
    assert not looks_complete(out) and sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]


# ------------------------------------------------------------------------------------------- rlsd model's output
@pytest.fixture
def tiny_conversion(tokenizer, tmp_path, monkeypatch) -> Path:
    """`convert_gguf` on a stand-in file whose loading gives the tiny Qwen2 and tokenizer (the GGUF reading itself is
    tested in test_convert.py); returns the stand-in file."""
    monkeypatch.setattr(convert, "require_gguf", lambda: None)
    monkeypatch.setattr(convert, "load_gguf", lambda path: (make_model(tokenizer).eval(), tokenizer))
    source = tmp_path / "tiny.gguf"
    source.write_bytes(convert.GGUF_MAGIC + b"\0" * 16)
    return source


def test_a_conversion_is_written_beside_its_folder_then_renamed(tiny_conversion, tmp_path):
    output = tmp_path / "models" / "tiny"
    assert convert.convert_gguf(tiny_conversion, output) == output
    assert looks_complete(output) and json.loads((output / "rlsd_conversion.json").read_text())["parameters"] > 0
    assert sorted(p.name for p in output.parent.iterdir()) == ["tiny"]  # the temporary folder is gone


def test_a_failed_conversion_leaves_no_folder(tiny_conversion, tmp_path, monkeypatch):
    output = tmp_path / "models" / "tiny"
    seen = []
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", failing_write(seen, output))
    with pytest.raises(OSError, match="No space left"):
        convert.convert_gguf(tiny_conversion, output)
    assert seen == [(False, {})] and not output.exists()
    assert list(output.parent.iterdir()) == []  # nor its temporary folder


def test_a_failed_overwrite_keeps_the_earlier_conversion(tiny_conversion, tmp_path, monkeypatch):
    output = tmp_path / "tiny"
    convert.convert_gguf(tiny_conversion, output)
    earlier = top_files(output)
    seen = []
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", failing_write(seen, output))
    with pytest.raises(OSError, match="No space left"):
        convert.convert_gguf(tiny_conversion, output, overwrite=True)
    assert seen == [(True, earlier)] and top_files(output) == earlier
    assert not list(tmp_path.glob(PARTIAL_PREFIX + "*"))


# ----------------------------------------------------------------------------------- moving a model into place
def write_sharded(folder: Path) -> None:
    """A two-shard model folder (config, shards, index) as save_pretrained writes one."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    for index in (1, 2):
        tensors = {f"w{index}": torch.full((2,), float(index))}
        real_save_file(tensors, str(folder / f"model-0000{index}-of-00002.safetensors"))
    weight_map = {"w1": "model-00001-of-00002.safetensors", "w2": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_moving_in_puts_the_weights_last_and_takes_the_earlier_ones_out_first(tmp_path, monkeypatch):
    target, root = tmp_path / "run", tmp_path / "run" / STAGING_NAME
    target.mkdir()
    real_save_file({"w": torch.zeros(2)}, str(target / "model.safetensors"))  # an earlier, single-file model
    (target / "config.json").write_text('{"earlier": true}')
    write_sharded(root / "model")
    model_save.check_model_folder(root / "model")
    moves, real_replace = [], model_save.os.replace

    def replace(source, destination):
        real_replace(source, destination)
        if Path(destination).parent == target:
            moves.append((Path(destination).name, looks_complete(target)))

    monkeypatch.setattr(model_save.os, "replace", replace)
    install(root / "model", target, root)
    assert moves == [  # a kill after any of these renames leaves no folder that looks complete but the last
        ("config.json", False),
        ("model-00001-of-00002.safetensors", False),
        ("model-00002-of-00002.safetensors", False),
        ("model.safetensors.index.json", True),
    ]
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]


def test_an_index_naming_a_missing_shard_is_refused(tmp_path):
    folder = tmp_path / "model"
    write_sharded(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelSaveError, match=r"index\.json names shard\(s\) that were not written: model-00002"):
        model_save.check_model_folder(folder)
