"""A checkpoint's manifest records each file's size and sha256 (format 2), and resuming checks both: a file whose
content changed at the same size is refused by name; a format-1 manifest (sizes only) is still accepted, with a log
line saying that the content is not checked."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import build_trainer

from rlsd.infra import checkpoint as checkpoint_files
from rlsd.infra.checkpoint import MANIFEST_FILE, CheckpointError, resume_plan, sha256_file

SAVED = dict(max_steps=1, save_strategy="steps", save_steps=1)


@pytest.fixture(scope="module")
def sealed(tmp_path_factory, tokenizer) -> Path:
    """checkpoint-1 of a one-step run, shared by the cases (each works on a copy)."""
    out = tmp_path_factory.mktemp("sealed")
    build_trainer(tokenizer, out, **SAVED).train()
    return out / "checkpoint-1"


@pytest.fixture
def checkpoint(sealed, tmp_path) -> Path:
    copy = tmp_path / "checkpoint-1"
    shutil.copytree(sealed, copy)
    return copy


def flip_one_byte(path: Path, offset: int) -> None:
    """Invert the bits of one byte in place: the size stays the same."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_manifest_records_every_files_size_and_sha256(checkpoint):
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    assert manifest["format"] == 2 and manifest["global_step"] == 1
    files = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [name for name in files if name != MANIFEST_FILE]
    for name, entry in manifest["files"].items():
        data = (checkpoint / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def test_a_flipped_byte_in_the_weights_is_refused_naming_the_file(tokenizer, tmp_path, checkpoint):
    weights = checkpoint / "model.safetensors"
    size = weights.stat().st_size
    flip_one_byte(weights, size - 5)  # inside a tensor's data: the header and the size still read as written
    assert weights.stat().st_size == size
    trainer = build_trainer(tokenizer, tmp_path / "run", **{**SAVED, "max_steps": 2})
    with pytest.raises(CheckpointError, match=r"checkpoint-1: model\.safetensors has changed since it was written"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 0


def test_a_same_size_change_to_any_file_is_refused_by_name(checkpoint):
    flip_one_byte(checkpoint / "optimizer.pt", 100)
    with pytest.raises(CheckpointError, match=r"optimizer\.pt has changed since it was written: its sha256 is"):
        resume_plan(str(checkpoint), str(checkpoint.parent), expected=[], weights_only=False, log_to=None)


def test_a_format_1_manifest_is_accepted_on_sizes_and_says_so(checkpoint, caplog):
    manifest_path = checkpoint / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    sizes = {name: entry["size"] for name, entry in manifest["files"].items()}
    manifest_path.write_text(json.dumps({"format": 1, "global_step": 1, "files": sizes}))
    flip_one_byte(checkpoint / "model.safetensors", -5)  # not seen without checksums: that is what the log says
    with caplog.at_level("WARNING", logger="rlsd.infra.checkpoint"):
        plan = resume_plan(str(checkpoint), str(checkpoint.parent), expected=[], weights_only=False, log_to=None)
    assert plan.checkpoint == str(checkpoint)
    assert "format 1 (file sizes only, no checksums): the files' sizes are checked, their content is not" in (
        caplog.text
    )
    (checkpoint / "optimizer.pt").write_bytes(b"short")  # sizes are still checked
    with pytest.raises(CheckpointError, match=r"optimizer\.pt is 5 bytes, but [\d,]+ were written"):
        resume_plan(str(checkpoint), str(checkpoint.parent), expected=[], weights_only=False, log_to=None)


@pytest.mark.parametrize(
    ("manifest", "words"),
    [
        ({"format": 3, "global_step": 1, "files": {}}, r"format 3, which this rlsd does not read \(formats 1 and 2\)"),
        ({"format": 2, "global_step": 1, "files": {"a.json": 12}}, r"records a\.json as 12, not a size and a sha256"),
    ],
)
def test_an_unknown_manifest_format_or_entry_is_refused(checkpoint, manifest, words):
    (checkpoint / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=words):
        resume_plan(str(checkpoint), str(checkpoint.parent), expected=[], weights_only=False, log_to=None)


def test_files_are_hashed_in_chunks(tmp_path, monkeypatch):
    data = bytes(range(256)) * 41  # 10,496 bytes
    path = tmp_path / "blob"
    path.write_bytes(data)
    reads = []
    real_open = open

    class Recording:
        def __init__(self, f):
            self.f = f

        def readinto(self, buffer):
            reads.append(len(buffer))
            return self.f.readinto(buffer)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(checkpoint_files, "HASH_CHUNK", 1000)
    monkeypatch.setattr(checkpoint_files, "open", lambda *a, **k: Recording(real_open(*a, **k)), raising=False)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert reads == [1000] * 12  # 10 full chunks, one of 496 bytes, one empty read at the end
