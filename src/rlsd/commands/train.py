"""`rlsd train`: TRL-style training script over (script arguments, RLSDConfig, ModelConfig).

Every field is settable from `--config recipe.yaml` and from flags (flags win); the script runs unchanged under
`accelerate launch` with any accelerate config (DDP, DeepSpeed ZeRO-2/3, FSDP2).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset
from trl import ModelConfig, TrlParser, get_peft_config

from rlsd.commands.parsing import command_line, one_line
from rlsd.commands.recipe_check import check_recipe
from rlsd.config import RLSDConfig
from rlsd.data.datasets import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM_PROMPT, load_cli_dataset
from rlsd.data.formats import format_help, format_names
from rlsd.data.rewards import REWARDS, resolve_reward
from rlsd.data.videos import DEFAULT_MAX_FRAMES
from rlsd.infra.model_save import save_atomically
from rlsd.infra.run_guard import (
    check_config_makes_a_step,
    check_inputs_apart,
    check_output_writable,
    check_prompt_lengths,
    check_unlocked,
    model_context_length,
    run_inputs,
    run_lock,
)
from rlsd.infra.validate import ConfigError, InputError, check_model_folder, check_output_dir, check_positive

RESUME_LATEST = ("true", "latest")
RESUME_NONE = ("", "false", "none")


@dataclass
class TrainScriptArguments:
    """Data and reward options of `rlsd train`.

    Parameters:
        dataset_name (`str`): Hub dataset name, or a local .jsonl / .json / .parquet / .csv file.
        dataset_config (`str`, *optional*): Hub dataset configuration (e.g. `main` for GSM8K).
        dataset_train_split (`str`, defaults to `"train"`): Split to train on.
        dataset_format (`str`, *optional*): A format of `rlsd.data.formats.format_names()` (those registered with
            `@dataset_format`, and `generic`); detected when not given.
        prompt_column / answer_column (`str`, *optional*): Columns of the generic format.
        system_prompt (`str`): System turn of every prompt ("" for none).
        instruction (`str`): Answer-format instruction appended to every question.
        reward_funcs (`list[str]`, defaults to `["math_accuracy"]`): Reward names, dotted import paths
            (`my_pkg.rewards.fn`, an installed module or one in the working folder), or file paths
            (`path/to/rewards.fn` loads `path/to/rewards.py`): a relative path must resolve inside the working folder
            (`..` and symbolic links followed); a file elsewhere is loaded only by its absolute path, with a warning.
            Async (`async def`) reward functions are awaited as TRL awaits them.
        max_train_samples (`int`, *optional*): Keep only the first N rows (smoke runs).
        overwrite_output_dir (`bool`, defaults to `False`): Replace a previous run found in `--output_dir` (its
            checkpoints and final model are deleted first); without it such a folder is refused unless resuming.
        max_prompt_length (`int`, *optional*): Longest prompt in tokens, as the chat template renders it (TRL 1.16's
            `GRPOConfig` has no such field); defaults to the model's context length. Longer prompts are refused.
        truncate_prompts (`bool`, defaults to `False`): Cut an overlong prompt from the start of its last turn instead
            of refusing it.
        video_max_frames (`int`, defaults to `128`): Video formats (`easyvideor1`): the most frames one row's videos
            may hold (EasyVideoR1's `video_max_frames`); a row over it is refused naming the row.
    """

    dataset_name: str = field(metadata={"help": "Hub dataset name or local .jsonl/.json/.parquet/.csv file."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_format: str | None = field(
        default=None, metadata={"help": "Dataset format (default: detected); `make_parser` lists the registered ones."}
    )
    prompt_column: str | None = field(default=None, metadata={"help": "Question column of the generic format."})
    answer_column: str | None = field(default=None, metadata={"help": "Answer column of the generic format."})
    system_prompt: str = field(default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "System turn ('' for none)."})
    instruction: str = field(default=DEFAULT_INSTRUCTION, metadata={"help": "Answer-format instruction."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["math_accuracy"],
        metadata={
            "help": f"Reward names ({', '.join(REWARDS)}), dotted import paths, or file paths PATH.fn "
            "(PATH.py inside the working folder, or absolute)."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Delete a previous run found in --output_dir instead of refusing it."}
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Longest prompt in tokens (default: the model's context length)."}
    )
    truncate_prompts: bool = field(
        default=False, metadata={"help": "Cut overlong prompts from the start of their last turn instead of refusing."}
    )
    video_max_frames: int = field(
        default=DEFAULT_MAX_FRAMES, metadata={"help": "Most frames per row of a video dataset (easyvideor1)."}
    )


def make_parser() -> TrlParser:
    """The `rlsd train` parser; `--dataset_format` takes and lists the formats registered when it is built."""
    parser = TrlParser((TrainScriptArguments, RLSDConfig, ModelConfig), prog="rlsd train")
    action = parser._option_string_actions["--dataset_format"]  # built from the dataclass: set what it cannot know
    action.choices, action.help = format_names(), format_help()
    return command_line(parser)


def run(script_args: TrainScriptArguments, training_args: RLSDConfig, model_args: ModelConfig) -> str:
    """Check every input (model folder, counts, output folder and its lock, inputs apart from it, rewards, dataset,
    prompt lengths, one step at least) before any model is loaded, then, holding the output folder's lock, train
    and save the final model; returns the output folder."""
    resume = resume_value(training_args.resume_from_checkpoint)
    if model_args.model_name_or_path is None:
        raise ValueError("--model_name_or_path is required (a hub name or a local folder)")
    check_model_folder(model_args.model_name_or_path)
    for flag, name in [("--teacher_model", training_args.teacher_model),
                       *(("--mad_opd_teachers", name) for name in training_args.mad_opd_teachers or [])]:  # fmt: skip
        if name:
            check_model_folder(name, flag)
    check_positive({"--max_train_samples": script_args.max_train_samples,
                    "--max_prompt_length": script_args.max_prompt_length,
                    "--video_max_frames": script_args.video_max_frames})  # fmt: skip
    output_dir = training_args.output_dir
    if training_args.should_save:
        check_unlocked(output_dir)
    previous = check_output_dir(
        output_dir,
        resuming=resume is not None,
        overwrite=script_args.overwrite_output_dir,
        overwrite_flag="--overwrite_output_dir",
    )
    check_output_writable(output_dir)
    reward_funcs = [resolve_reward(name, training_args.reward_timeout) for name in script_args.reward_funcs]
    teachers = [training_args.teacher_model, *(training_args.mad_opd_teachers or [])]
    inputs = run_inputs(
        model_args.model_name_or_path,
        teachers=[name for name in teachers if name],
        datasets=[script_args.dataset_name],
        rewards=dict(zip(script_args.reward_funcs, reward_funcs, strict=True)),
        builtin_rewards=list(REWARDS),
    )
    check_inputs_apart(output_dir, inputs, resume_checkpoint=resume if isinstance(resume, str) else None)
    dataset = load_cli_dataset(script_args, script_args.dataset_name, script_args.dataset_train_split)
    if script_args.max_train_samples is not None:
        dataset = dataset.select(range(min(script_args.max_train_samples, len(dataset))))
    check_teacher_inputs(dataset, training_args.teacher_transform)
    processor = image_processor_for(model_args.model_name_or_path, dataset)
    dataset = check_prompts_fit(dataset, script_args, training_args, model_args, processor)
    check_config_makes_a_step(len(dataset), training_args, split=script_args.dataset_train_split)
    with run_lock(output_dir, enabled=training_args.should_save):
        if previous and resume is None and training_args.should_save:
            remove_previous_run(Path(output_dir), previous)
        return train_and_save(script_args, training_args, model_args, reward_funcs, dataset, processor, resume)


def train_and_save(
    script_args: TrainScriptArguments,
    training_args: RLSDConfig,
    model_args: ModelConfig,
    reward_funcs: list,
    dataset: Dataset,
    processor: object | None,
    resume: str | bool | None,
) -> str:
    """Load the model through `RLSDTrainer`, train (resuming when asked) and save the final model."""
    from rlsd.trainer import RLSDTrainer

    model_init_kwargs = dict(training_args.model_init_kwargs or {})
    model_init_kwargs.setdefault("dtype", model_args.dtype)
    if model_args.attn_implementation is not None:
        model_init_kwargs.setdefault("attn_implementation", model_args.attn_implementation)
    if model_args.model_revision is not None:
        model_init_kwargs.setdefault("revision", model_args.model_revision)
    training_args.model_init_kwargs = model_init_kwargs
    trainer = RLSDTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=resume)
    save_final_model(trainer, training_args.output_dir)
    return training_args.output_dir


def save_final_model(trainer: Any, output_dir: str) -> None:
    """The trained model saved atomically into `output_dir` (`rlsd.infra.model_save`: written under a temporary name
    there, verified, then moved into place), then pushed to the Hub when `--push_to_hub` asks, as `save_model` does."""
    args = trainer.args
    save_atomically(lambda folder: trainer.save_model(folder, _internal_call=True), output_dir,
                    should_save=args.should_save, barrier=trainer.accelerator.wait_for_everyone)  # fmt: skip
    if args.push_to_hub:
        trainer.push_to_hub(commit_message="Model save", revision=args.hub_revision)


def check_prompts_fit(
    dataset: Dataset,
    script_args: TrainScriptArguments,
    training_args: RLSDConfig,
    model_args: ModelConfig,
    processor: object | None,
) -> Dataset:
    """`check_prompt_lengths` with the model's tokenizer (the processor's for images) and its limit:
    `--max_prompt_length`, else the model's context length (its config, else its tokenizer); the dataset back,
    truncated with `--truncate_prompts`. Loads the tokenizer and config only, never the model."""
    from transformers import AutoConfig, AutoTokenizer

    name, revision = model_args.model_name_or_path, model_args.model_revision
    trust = bool(getattr(training_args, "trust_remote_code", False))
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust)
    limit = script_args.max_prompt_length
    if limit is None:
        try:
            config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust)
        except (OSError, ValueError):  # an adapter folder: its base model's config is elsewhere
            config = None
        limit = model_context_length(config, tokenizer)
    if limit is None:
        return dataset
    return check_prompt_lengths(
        dataset,
        tokenizer,
        limit,
        split=script_args.dataset_train_split,
        truncate=script_args.truncate_prompts,
        chat_template_kwargs=training_args.chat_template_kwargs,
    )


def check_teacher_inputs(dataset: Dataset, transform: str | None) -> None:
    """Before any model is loaded: an image transform has images to change, a box transform a valid `teacher_box`
    on every row with images, and no transform changes an image's size (the first bad row named), as the trainer
    checks again at its start."""
    from rlsd.context.transforms import check_dataset_transform, check_images_to_transform

    try:
        check_images_to_transform(transform, bool({"image", "images"} & set(dataset.column_names)))
        check_dataset_transform(dataset, transform, "train_dataset")
    except ValueError as err:
        raise ConfigError("--teacher_transform", str(err)) from err


def image_processor_for(model: str, dataset) -> object | None:
    """The model's processor (`AutoProcessor`) when the dataset carries images, checked before training starts so
    that a folder without one fails with its name; None for text (TRL then loads the tokenizer)."""
    if not {"image", "images"} & set(dataset.column_names):
        return None
    from rlsd.data.images import load_processor

    return load_processor(model)


def resume_value(value: str | bool | None) -> str | bool | None:
    """`--resume_from_checkpoint`: `true` / `latest` resume from the newest checkpoint of the output folder (as
    `Trainer.train(True)` does), `false` / empty not at all, anything else is a checkpoint path."""
    if isinstance(value, str) and value.strip().lower() in RESUME_LATEST:
        return True
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in RESUME_NONE):
        return None
    return value


def remove_previous_run(folder: Path, entries: list[str]) -> None:
    """--overwrite_output_dir: delete the previous run's checkpoints and final files so the two runs never mix."""
    for name in entries:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    check_recipe(parser, argv)
    try:
        script_args, training_args, model_args, from_config, from_flags = parser.parse_args_and_config(
            args=argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except ValueError as err:  # the configs' own checks of the values given (transformers', TRL's, rlsd's)
        if isinstance(err, InputError):
            raise
        raise ConfigError("the arguments", one_line(str(err))) from err
    if from_flags:  # TRL raises a ValueError (a traceback) for these: one line as for any other bad flag
        parser.error(f"unrecognized arguments: {' '.join(from_flags)}")
    if from_config:
        recipe = argv[argv.index("--config") + 1] if argv and "--config" in argv[:-1] else ""
        raise ConfigError(
            f"--config {recipe}".strip(),
            f"unknown key(s) {[key.removeprefix('--') for key in from_config[::2]]}",
            "check their spelling against `rlsd train --help`, or remove them",
        )
    run(script_args, training_args, model_args)
    return 0
