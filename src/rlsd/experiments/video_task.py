"""`rlsd demo --task video`: the embedded arithmetic task as a short clip, the expression revealed one character per
frame, fed to a tiny Qwen2-VL as its frames given as images; GRPO, RLSD and VISD compared on it.

A problem `Q: 3+4*5=` becomes 5 frames, each a 28x28 image of one character drawn in the vision task's bitmap font
(so one image token per frame), and the text `Q:`; the completion is the text task's
(`<think>4*5=20;3+20=23</think><answer>23</answer>`), rewarded by the task's verifier. The model must read the frames
in order: no frame holds more than one character. The self-teacher sees the same frames and `[ref 23] Q:` (RLSD), or
`[ref 23|answer: wrong; logic: step 2 should be 3+20=23; grounding: ok] Q:` (VISD, the judge's feedback on the
completion: `rlsd.experiments.video_judge`).

Frames as images, not Qwen2-VL's video input: TRL 1.16's `GRPOTrainer` reads only `prompt`, `image` and `images`
columns and puts only image blocks in a prompt, so a clip reaches the model as its frames in the `images` column
(Qwen2-VL's image path, one image per frame, no temporal patching), the path EasyVideoR1-format data takes
(`rlsd.data.videos`). Every row's frames are checked before any step (`rlsd.data.videos.check_frame_rows`): a clip
with no frames or over the frame budget (`max_frames`), or rows with and without a clip mixed, fail naming the row.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from datasets import Dataset
from PIL import Image
from transformers import PreTrainedModel

from rlsd.data.videos import check_frame_rows
from rlsd.experiments.demo import DemoConfig
from rlsd.experiments.task import (
    HELDOUT_SIZE,
    Problem,
    TaskConfig,
    accuracy_reward,
    evaluation_problems,
    greedy_metrics,
    is_heldout,
    sample_problems,
)
from rlsd.experiments.task_demo import TaskDemo, run_task_demo, task_budget, viewer_of
from rlsd.experiments.tiny_vlm import CELL, ImageOnlyQwen2VLProcessor, build_tiny_qwen2_vl, build_vl_processor
from rlsd.experiments.video_judge import FRAME_COLUMN, judge_clip
from rlsd.experiments.vision_task import (
    IMAGE_PAD,
    QUESTION,
    VLWarmStartConfig,
    _data_uri,
    add_images_to_report,
    expression,
    generate_frames,
    load_vision_warm_start,
    messages,
    prompted_logps,
    render_expression,
    teacher_text,
    viewer_picks,
    vl_batch,
    vl_quick_config,
)
from rlsd.experiments.warmstart import cached_warm_start, supervised_warm_start

VIDEO_WARMSTART_FORMAT_VERSION = 1
"""Bump when the video warm-start recipe changes in a way its configuration does not capture."""
MAX_FRAMES = 16
"""The demo's frame budget per clip (a clip of 3 one-digit operands has 5 frames)."""


# ------------------------------------------------------------------------------------------------------- the task
def clip_frames(problem: Problem) -> list[Image.Image]:
    """The clip of a problem: one 28x28 frame per character of its expression, in order."""
    return [render_expression(char) for char in expression(problem)]


def video_rows(clips: list[list[Image.Image] | None], problems: list[Problem], max_frames: int, label: str) -> Dataset:
    """Rows for `RLSDTrainer` with a processor: a conversational `prompt` holding only `Q:`, the clip's frames as
    `images` (TRL puts one image block per frame before the text), the reference answer in `solution` and what each
    frame shows in `frame_text` (the scripted judge's input). The clips are checked first, each failure naming its
    row of `label`."""
    check_frame_rows(clips, max_frames, label)
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": QUESTION}],
                "images": frames,
                "solution": str(p.answer),
                FRAME_COLUMN: expression(p),
            }
            for frames, p in zip(clips, problems, strict=True)
        ]
    )


def make_video_rl_dataset(
    config: TaskConfig, count: int, seed: int, split: str = "train", max_frames: int = MAX_FRAMES
) -> Dataset:
    """The video task's rows for `count` problems of `split` (`video_rows`)."""
    problems = sample_problems(config, count, seed, split)
    return video_rows([clip_frames(p) for p in problems], problems, max_frames, f"the video task's {split} clips")


def clip_prompt_ids(processor: ImageOnlyQwen2VLProcessor, text: str, frame_tokens: list[int]) -> list[int]:
    """The token ids of the chat-rendered [frames, text] user turn, each frame's placeholder expanded to its number of
    image tokens (`frame_tokens`), exactly as the processor expands them."""
    rendered = processor.apply_chat_template(messages(text, len(frame_tokens)), add_generation_prompt=True)
    pieces = rendered.split(IMAGE_PAD)
    expanded = pieces[0] + "".join(IMAGE_PAD * n + piece for n, piece in zip(frame_tokens, pieces[1:], strict=True))
    return processor.tokenizer(expanded)["input_ids"]


def frame_inputs(processor: ImageOnlyQwen2VLProcessor, clips: list[list[Image.Image]]) -> dict[str, Any]:
    """Pixel values and grids of every frame of `clips` (flattened in order) and each clip's image-token counts."""
    vision = processor.image_processor(images=[f for clip in clips for f in clip], return_tensors="pt")
    tokens = (vision["image_grid_thw"].prod(-1) // processor.image_processor.merge_size**2).tolist()
    counts, start = [], 0
    for clip in clips:
        counts.append(tokens[start : start + len(clip)])
        start += len(clip)
    return {"pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"], "tokens": counts}


# ------------------------------------------------------------------------------------------------- the warm start
@dataclass(frozen=True)
class VideoWarmStartConfig(VLWarmStartConfig):
    """Everything that determines the warm-started tiny Qwen2-VL of the video task; its hash names the cache entry."""

    version: ClassVar[int] = VIDEO_WARMSTART_FORMAT_VERSION


def video_warm_start(config: VideoWarmStartConfig, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Path of the warm-started model and processor for `config`, training and caching them on first use."""
    return cached_warm_start(
        "video-warmstart", config, lambda: train_video_warm_start(config, progress=progress), cache_dir
    )


def train_video_warm_start(
    config: VideoWarmStartConfig, progress: bool = True
) -> tuple[PreTrainedModel, ImageOnlyQwen2VLProcessor, float]:
    """Next-token cross-entropy on the completion tokens of [frames, question] -> solution examples (student format,
    or teacher format with an optional hint citation); returns the seconds it took."""
    start = time.perf_counter()
    processor = build_vl_processor(max_tokens_per_image=1)
    model = build_tiny_qwen2_vl(
        processor, hidden_size=config.hidden_size, num_layers=config.num_layers, num_heads=config.num_heads,
        intermediate_size=config.intermediate_size, vision_width=config.vision_width,
        vision_depth=config.vision_depth, seed=config.seed,
    )  # fmt: skip
    pool = sample_problems(config.task, config.train_pool, config.seed, "train")
    clips = {p.prompt: clip_frames(p) for p in pool}

    def draw(rng: random.Random) -> tuple[list[Image.Image], str, str]:
        problem = rng.choice(pool)
        teacher = rng.random() < config.teacher_share
        cite = teacher and rng.random() < config.hint_share
        text = teacher_text(problem) if teacher else QUESTION
        return clips[problem.prompt], text, problem.solution(cite_hint=cite)

    supervised_warm_start(
        model, config, draw, lambda examples: collate_clips(examples, processor), "video warm start", progress
    )
    return model, processor, time.perf_counter() - start


def collate_clips(
    examples: list[tuple[list[Image.Image], str, str]], processor: ImageOnlyQwen2VLProcessor
) -> dict[str, torch.Tensor]:
    """Right-padded model inputs (ids, mask, token types, pixel values, grids) and labels that score only the
    completion and its end-of-sequence token."""
    vision = frame_inputs(processor, [frames for frames, _, _ in examples])
    prompts = [clip_prompt_ids(processor, text, tokens)
               for (_, text, _), tokens in zip(examples, vision["tokens"], strict=True)]  # fmt: skip
    return vl_batch(processor, prompts, [completion for _, _, completion in examples], vision)


def evaluate_video(
    model: PreTrainedModel, processor: ImageOnlyQwen2VLProcessor, problems: list[Problem], max_new_tokens: int
) -> dict[str, Any]:
    """Greedy pass@1 on held-out clips, the share of completions citing an unseen reference, mean length and the
    per-problem outcomes as a 0/1 string."""
    clips = [clip_frames(p) for p in problems]
    completions = generate_frames(model, processor, clips, [QUESTION] * len(problems), max_new_tokens=max_new_tokens)
    rewards = accuracy_reward(completions, [str(p.answer) for p in problems])
    return greedy_metrics(completions, rewards, processor.tokenizer)


def pilot_problems(task: TaskConfig, count: int) -> list[Problem]:
    """The first `count` (in a fixed shuffled order) of every test-split problem outside the 500-problem held-out set:
    the pilot set of a pre-registered pilot. The task's own pilot set (`evaluation_problems(..., "pilot")`) draws
    500 + count test problems, more than a 3-operand task has (675), so these are enumerated; too many asked for is
    refused with the number there are."""
    if task.operand_digits != 1 or task.max_operands:
        raise ValueError("pilot_problems enumerates tasks of one-digit operands and a fixed operand count only")
    held = {p.prompt for p in evaluation_problems(task, HELDOUT_SIZE)}
    pool = []
    for operators in itertools.product(task.operators, repeat=task.num_operands - 1):
        if task.semantics == "products-first" and "**" in "".join(operators):
            continue  # the task never draws two products in a row
        ranges = [range(10)] + [range(2, 10) if task.semantics == "products-first" and op == "*" else range(10)
                                for op in operators]  # fmt: skip
        for operands in itertools.product(*ranges):
            problem = Problem(operands, operators, task.semantics)
            if is_heldout(problem, task) and problem.prompt not in held:
                pool.append(problem)
    if count > len(pool):
        raise ValueError(f"the pilot set of {task} has {len(pool)} problems, {count} requested")
    random.Random("video-pilot").shuffle(pool)
    return pool[:count]


# ------------------------------------------------------------------------------------------------------- the demo
@dataclass
class VideoDemoConfig:
    """One video comparison: the same warm start, budget and seed for every method (sized for 2 CPU cores).
    `eval_set`: "heldout" (every reported number) or "pilot" (the disjoint set a pre-registered pilot uses,
    `pilot_problems`: at most 175 problems for 3 operands)."""

    methods: tuple[str, ...] = ("grpo", "rlsd", "visd")
    steps: int = 80
    seed: int = 0
    eval_every: int = 10
    eval_size: int = 200  # the first `eval_size` problems of the fixed held-out (or pilot) set
    eval_set: str = "heldout"
    prompts_per_step: int = 4
    num_generations: int = 8
    learning_rate: float = 5e-5
    lambda_decay_steps: int = 50  # RLSD's lam decays from 0.5 to 0 over this many steps (the paper's 50)
    max_completion_length: int = 32
    train_size: int = 1000
    max_frames: int = MAX_FRAMES
    out: Path = Path("runs/video-demo")
    warm: VideoWarmStartConfig = field(default_factory=VideoWarmStartConfig)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.eval_every < 1 or self.eval_size < 1:
            raise ValueError("steps, eval_every and eval_size must be >= 1")
        if self.eval_set not in ("heldout", "pilot"):
            raise ValueError(f"eval_set must be 'heldout' or 'pilot', got {self.eval_set!r}")

    def budget(self) -> DemoConfig:
        """The text demo's config carrying this budget, for the shared `trainer_args`."""
        return task_budget(self)


def video_quick_config(out: Path, seed: int = 0) -> VideoDemoConfig:
    """A smoke run for tests: a very small warm start and two steps per method, every file still written."""
    return vl_quick_config(VideoDemoConfig, VideoWarmStartConfig, out, seed)


def video_demo(config: VideoDemoConfig) -> TaskDemo:
    """The video task as the shared runner takes it: greedy pass@1 and leakage on held-out clips, the credit viewer
    of VISD's policy (else RLSD's, else the last method's) with each completion's frames."""
    task = config.warm.task
    problems = (
        evaluation_problems(task, config.eval_size)
        if config.eval_set == "heldout"
        else pilot_problems(task, config.eval_size)
    )
    return TaskDemo(
        task="video", warm_namespace="video-warmstart", warm_config=config.warm, warm_steps=config.warm.steps,
        warm_start=lambda progress: video_warm_start(config.warm, progress=progress), load=load_vision_warm_start,
        dataset=lambda: make_video_rl_dataset(config.warm.task, config.train_size, config.seed, "train",
                                              config.max_frames),
        evaluate=lambda policy, processor: evaluate_video(policy, processor, problems, config.max_completion_length),
        evaluation=f"greedy pass@1 on {len(problems)} {config.eval_set} clips", reward=accuracy_reward,
        viewer=lambda trainer: video_credit_examples(trainer, trainer.processing_class, problems, config),
        viewer_from=viewer_of("visd", config.methods), finish_report=add_images_to_report,
    )  # fmt: skip


def run_video_demo(config: VideoDemoConfig, progress: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Train every method from the same video warm start; write metrics.jsonl, summary.json, curves.png and
    report.html (curves, table and the token-credit viewer with each completion's frames): `run_task_demo`."""
    return run_task_demo(config, video_demo(config), progress, threads)


# ------------------------------------------------------------------------------------------- the token-credit viewer
def clip_logps(model, processor, frames: list[Image.Image], text: str, completion_ids: list[int], temperature: float):
    """(1, T) log-probs of the completion tokens after the [frames, text] prompt, temperature-scaled as in sampling."""
    vision = frame_inputs(processor, [frames])
    prompt = clip_prompt_ids(processor, text, vision["tokens"][0])
    return prompted_logps(model, processor, prompt, completion_ids, vision, temperature)


def viewer_teacher_text(args: Any, problem: Problem, completion: str) -> str:
    """The teacher's text block for the viewer: under the judge source, the template filled with the scripted judge's
    feedback on `completion`; otherwise the task's `[ref 23] Q:`."""
    if args.privileged_source == "judge":
        feedback = judge_clip(problem, expression(problem), completion)
        return args.teacher_template.format(prompt=QUESTION, answer=problem.answer, feedback=feedback)
    return teacher_text(problem)


def frame_strip(frames: list[Image.Image]) -> Image.Image:
    """The clip's frames side by side with a 4-pixel grey gap between frames, for the report."""
    gap = 4
    strip = Image.new("RGB", (len(frames) * (CELL + gap) - gap, CELL), (160, 160, 160))
    for index, frame in enumerate(frames):
        strip.paste(frame, (index * (CELL + gap), 0))
    return strip


@torch.no_grad()
def video_credit_examples(trainer, processor, problems: list[Problem], config: VideoDemoConfig) -> dict[str, Any]:
    """A correct and a wrong sampled completion of the trained policy, each token with its Delta (the teacher sees
    the same frames, the answer and, under VISD, the judge's feedback) and RLSD weight, and the frames as a PNG data
    URI."""
    from rlsd.core.credit import rlsd_advantages

    model = trainer.accelerator.unwrap_model(trainer.model)
    teacher = getattr(trainer.teacher, "model", None) or model
    clips = [clip_frames(p) for p in problems]
    with torch.random.fork_rng():
        torch.manual_seed(3_000 + config.seed)
        completions = generate_frames(model, processor, clips, [QUESTION] * len(problems),
                                      max_new_tokens=config.max_completion_length, do_sample=True)  # fmt: skip
    rewards = accuracy_reward(completions, [str(p.answer) for p in problems])
    examples: dict[str, Any] = {}
    for label, index, ids, sign in viewer_picks(rewards, completions, processor.tokenizer):
        problem, temperature = problems[index], trainer.args.temperature
        student = clip_logps(model, processor, clips[index], QUESTION, ids, temperature)
        text = viewer_teacher_text(trainer.args, problem, completions[index])
        tutor = clip_logps(teacher, processor, clips[index], text, ids, temperature)
        advantages, _ = rlsd_advantages(torch.tensor([sign], dtype=torch.float64), tutor, student,
                                        torch.ones_like(student), lam=1.0, clip=trainer.args.rlsd_clip)  # fmt: skip
        delta = (tutor - student)[0]
        examples[label] = {
            "prompt": f"[clip: {' '.join(expression(problem))}] {text}",
            "answer": problem.answer,
            "advantage_sign": sign,
            "tokens": [processor.tokenizer.decode([t]) for t in ids],
            "delta": delta.tolist(),
            "weight": torch.exp(sign * delta).tolist(),
            "clipped_weight": (advantages[0] / sign).tolist(),
            "image": _data_uri(frame_strip(clips[index])),
        }
    return examples
