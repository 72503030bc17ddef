"""`rlsd demo --task vision`: the embedded arithmetic task with the expression only in an image, a tiny Qwen2-VL warm
start cached by its configuration, and GRPO, RLSD and OPSD compared on it.

A problem `Q: 3+4*5=` becomes an image of `3+4*5` (one character per 28x28 cell, drawn from a 3x5 bitmap font, so
that each image token of the tiny vision tower sees exactly one character) and the text `Q:`; the completion is the
text task's (`<think>4*5=20;3+20=23</think><answer>23</answer>`). The self-teacher sees the same image and
`[ref 23] Q:`. Nothing is downloaded and no font file is read.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from datasets import Dataset
from PIL import Image
from transformers import PreTrainedModel

from rlsd.experiments.demo import DemoConfig
from rlsd.experiments.task import (
    TEACHER_TEMPLATE,
    Problem,
    TaskConfig,
    accuracy_reward,
    evaluation_problems,
    greedy_metrics,
    sample_problems,
)
from rlsd.experiments.task_demo import TaskDemo, run_task_demo, task_budget, viewer_of
from rlsd.experiments.tiny_vlm import CELL, ImageOnlyQwen2VLProcessor, build_tiny_qwen2_vl, build_vl_processor
from rlsd.experiments.warmstart import (
    cached_warm_start,
    config_key,
    generate_batch,
    pad_completion_rows,
    supervised_warm_start,
)

Demo = TypeVar("Demo")
"""An image or video demo's config class (`vl_quick_config`)."""

VISION_WARMSTART_FORMAT_VERSION = 1
"""Bump when the vision warm-start recipe changes in a way its configuration does not capture."""
QUESTION = "Q:"
"""The text next to the image: the problem itself is only in the image."""
IMAGE_PAD = "<|image_pad|>"
PERCEPTION_TAG = "p"
"""The perception span's tag in the vision task's SRPO format (`<p>3+4*5</p>` before the reasoning): short, since the
tiny tokenizer spends one token per character (the rule's `srpo_perception_tag`)."""

_FONT = {
    "0": ("###", "#.#", "#.#", "#.#", "###"),
    "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"),
    "3": ("###", "..#", "###", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"),
    "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"),
    "7": ("###", "..#", ".#.", ".#.", ".#."),
    "8": ("###", "#.#", "###", "#.#", "###"),
    "9": ("###", "#.#", "###", "..#", "###"),
    "+": ("...", ".#.", "###", ".#.", "..."),
    "-": ("...", "...", "###", "...", "..."),
    "*": ("#.#", ".#.", "#.#", "...", "..."),
}
"""A 3x5 bitmap font for the characters of an expression ('#' ink, '.' paper)."""
_SCALE = 4
"""Each font pixel is drawn as a 4x4 square: a 12x20 glyph centred in its 28x28 cell."""


# ------------------------------------------------------------------------------------------------------- the task
def expression(problem: Problem) -> str:
    """The expression the image shows: the prompt without `Q: ` and `=` (e.g. `3+4*5`)."""
    return problem.prompt.removeprefix("Q: ").removesuffix("=")


def render_expression(text: str) -> Image.Image:
    """A black-on-white RGB image of `text`, one 28x28 cell per character (so one image token per character)."""
    unknown = sorted(set(text) - set(_FONT))
    if not text or unknown:
        raise ValueError(f"cannot render {text!r}: the font has only {''.join(_FONT)}")
    image = Image.new("RGB", (CELL * len(text), CELL), (255, 255, 255))
    pixels = image.load()
    left, top = (CELL - 3 * _SCALE) // 2, (CELL - 5 * _SCALE) // 2
    for index, char in enumerate(text):
        for row, line in enumerate(_FONT[char]):
            for col, ink in enumerate(line):
                if ink != "#":
                    continue
                for dy in range(_SCALE):
                    for dx in range(_SCALE):
                        x, y = index * CELL + left + col * _SCALE + dx, top + row * _SCALE + dy
                        pixels[x, y] = (0, 0, 0)
    return image


def problem_image(problem: Problem) -> Image.Image:
    """The image of a problem's expression."""
    return render_expression(expression(problem))


def make_vision_rl_dataset(config: TaskConfig, count: int, seed: int, split: str = "train") -> Dataset:
    """Rows for `RLSDTrainer` with a processor: a conversational `prompt` holding only `Q:`, the `image` of the
    expression (TRL puts its image block before the text) and the reference answer in `solution`."""
    problems = sample_problems(config, count, seed, split)
    return Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": QUESTION}], "image": problem_image(p), "solution": str(p.answer)}
            for p in problems
        ]
    )


def messages(text: str, images: int = 1) -> list[dict[str, Any]]:
    """A user turn with the image blocks first (one; a clip's frames: one a frame) and `text` after them, as TRL
    1.16 builds it from an `image` (`images`) column."""
    return [{"role": "user", "content": [*({"type": "image"} for _ in range(images)), {"type": "text", "text": text}]}]


def vision_solution(problem: Problem, cite_hint: bool = False, perception: bool = False) -> str:
    """The target completion; with `perception` it first transcribes the image (`<p>3+4*5</p>`: SRPO's perception
    span, the reasoning span `<think>` after it)."""
    seen = f"<{PERCEPTION_TAG}>{expression(problem)}</{PERCEPTION_TAG}>" if perception else ""
    return seen + problem.solution(cite_hint=cite_hint)


def perception_length(task: TaskConfig) -> int:
    """The most tokens the perception span adds (its tags and the longest expression, one token per character)."""
    return 2 * len(PERCEPTION_TAG) + 5 + task.num_operands * (task.operand_digits + 1) - 1


def teacher_text(problem: Problem) -> str:
    """The teacher's text block: the reference answer before the question (the image is the same)."""
    return TEACHER_TEMPLATE.format(prompt=QUESTION, answer=problem.answer)


# ------------------------------------------------------------------------------------------------- the warm start
@dataclass(frozen=True)
class VLWarmStartConfig:
    """The recipe of every tiny Qwen2-VL warm start (image, video, GUI): a task's subclass sets its format `version`
    and the defaults that differ; the hash of the fields (`key`) names the cache entry."""

    version: ClassVar[int]  # bump a task's when its recipe changes in a way the fields do not capture
    task: Any = field(default_factory=lambda: TaskConfig(num_operands=3))
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    vision_width: int = 64
    vision_depth: int = 1
    steps: int = 400
    batch_size: int = 48
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"  # after `warmup_steps` linear warm-up: "constant", or "cosine" (decay to 10%)
    warmup_steps: int = 20
    teacher_share: float = 0.3  # share of examples in the teacher format (`[ref 23] Q:`)
    hint_share: float = 0.2  # share of teacher-format solutions that cite the hint
    train_pool: int = 4000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")

    def key_fields(self) -> dict[str, Any]:
        """The fields the cache key hashes (all of them; a subclass leaves out the later-added ones at defaults)."""
        return asdict(self)

    def key(self) -> str:
        return config_key(self.version, self.key_fields())


@dataclass(frozen=True)
class VisionWarmStartConfig(VLWarmStartConfig):
    """Everything that determines the warm-started tiny Qwen2-VL of the image task; its hash names the cache entry."""

    version: ClassVar[int] = VISION_WARMSTART_FORMAT_VERSION
    perception: bool = False  # completions first transcribe the image in a perception span (SRPO's format)

    def key_fields(self) -> dict[str, Any]:
        fields = asdict(self)
        if not fields["perception"]:  # added later: the key of a warm start without it is unchanged
            del fields["perception"]
        return fields


def vision_warm_start(config: VisionWarmStartConfig, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Path of the warm-started model and processor for `config`, training and caching them on first use."""
    return cached_warm_start(
        "vision-warmstart", config, lambda: train_vision_warm_start(config, progress=progress), cache_dir
    )


def load_vision_warm_start(path: Path) -> tuple[PreTrainedModel, ImageOnlyQwen2VLProcessor]:
    """The cached model (`from_pretrained`) and its image-only processor."""
    from transformers import Qwen2VLForConditionalGeneration

    from rlsd.experiments.tiny_vlm import load_vl_processor

    return Qwen2VLForConditionalGeneration.from_pretrained(path), load_vl_processor(path)


def train_vision_warm_start(
    config: VisionWarmStartConfig, progress: bool = True
) -> tuple[PreTrainedModel, ImageOnlyQwen2VLProcessor, float]:
    """Next-token cross-entropy on the completion tokens of [image, question] -> solution examples (student format,
    or teacher format with an optional hint citation); returns the seconds it took."""
    start = time.perf_counter()
    task = config.task
    processor = build_vl_processor(max_tokens_per_image=task.num_operands * (task.operand_digits + 1) - 1)
    model = build_tiny_qwen2_vl(
        processor, hidden_size=config.hidden_size, num_layers=config.num_layers, num_heads=config.num_heads,
        intermediate_size=config.intermediate_size, vision_width=config.vision_width,
        vision_depth=config.vision_depth, seed=config.seed,
    )  # fmt: skip
    pool = sample_problems(config.task, config.train_pool, config.seed, "train")
    images = {p.prompt: problem_image(p) for p in pool}

    def draw(rng: random.Random) -> tuple[Image.Image, str, str]:
        problem = rng.choice(pool)
        teacher = rng.random() < config.teacher_share
        cite = teacher and rng.random() < config.hint_share
        solution = vision_solution(problem, cite_hint=cite, perception=config.perception)
        return images[problem.prompt], teacher_text(problem) if teacher else QUESTION, solution

    supervised_warm_start(
        model, config, draw, lambda examples: collate_supervised(examples, processor), "vision warm start", progress
    )
    return model, processor, time.perf_counter() - start


def prompt_ids(processor: ImageOnlyQwen2VLProcessor, text: str, image_tokens: int) -> list[int]:
    """The token ids of the chat-rendered [image, text] user turn with its image placeholder expanded to
    `image_tokens` tokens, exactly as the processor expands it."""
    rendered = processor.apply_chat_template(messages(text), add_generation_prompt=True)
    return processor.tokenizer(rendered.replace(IMAGE_PAD, IMAGE_PAD * image_tokens))["input_ids"]


def collate_supervised(
    examples: list[tuple[Image.Image, str, str]], processor: ImageOnlyQwen2VLProcessor
) -> dict[str, torch.Tensor]:
    """Right-padded model inputs (ids, mask, token types, pixel values, grids) and labels that score only the
    completion and its end-of-sequence token."""
    vision = processor.image_processor(images=[image for image, _, _ in examples], return_tensors="pt")
    merge = processor.image_processor.merge_size**2
    prompts = [prompt_ids(processor, text, int(grid.prod()) // merge)
               for (_, text, _), grid in zip(examples, vision["image_grid_thw"], strict=True)]  # fmt: skip
    return vl_batch(processor, prompts, [completion for _, _, completion in examples], vision)


def vl_batch(
    processor: ImageOnlyQwen2VLProcessor, prompts: list[list[int]], completions: list[str], vision: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """The supervised model inputs of expanded prompt ids + completions with their images' `pixel_values` and
    `image_grid_thw` (the image and the video warm starts' batch): right-padded, completion-only labels."""
    batch = pad_completion_rows(prompts, completions, processor.tokenizer)
    image_token = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    return {**batch, "mm_token_type_ids": (batch["input_ids"] == image_token).long(),
            "pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}  # fmt: skip


def generate_vision(
    model: PreTrainedModel, processor: ImageOnlyQwen2VLProcessor, images: list[Image.Image], texts: list[str], **kwargs
) -> list[str]:
    """Completions of [image, text] prompts (`generate_frames` with one-image clips)."""
    return generate_frames(model, processor, [[image] for image in images], texts, **kwargs)


@torch.no_grad()
def generate_frames(
    model: PreTrainedModel,
    processor: ImageOnlyQwen2VLProcessor,
    clips: list[list[Image.Image]],
    texts: list[str],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    batch_size: int = 64,
) -> list[str]:
    """Completions of [frames, text] prompts, left-padded in batches (greedy unless `do_sample`, then T = 1)."""
    was_training = model.training
    model.eval()
    tokenizer = processor.tokenizer
    completions: list[str] = []
    for start in range(0, len(texts), batch_size):
        chunk = clips[start : start + batch_size]
        rendered = [processor.apply_chat_template(messages(t, len(c)), add_generation_prompt=True)
                    for c, t in zip(chunk, texts[start : start + batch_size], strict=True)]  # fmt: skip
        batch = processor(images=[f for c in chunk for f in c], text=rendered, return_tensors="pt", padding=True,
                          padding_side="left")  # fmt: skip
        completions += generate_batch(model, tokenizer, batch, max_new_tokens, do_sample)
    model.train(was_training)
    return [c.replace(tokenizer.pad_token, "").replace(tokenizer.eos_token, "") for c in completions]


def evaluate_vision(
    model: PreTrainedModel, processor: ImageOnlyQwen2VLProcessor, problems: list[Problem], max_new_tokens: int
) -> dict[str, Any]:
    """Greedy pass@1 on held-out image problems, the share of completions citing an unseen reference, mean length
    and the per-problem outcomes as a 0/1 string."""
    images = [problem_image(p) for p in problems]
    completions = generate_vision(model, processor, images, [QUESTION] * len(problems), max_new_tokens=max_new_tokens)
    rewards = accuracy_reward(completions, [str(p.answer) for p in problems])
    return greedy_metrics(completions, rewards, processor.tokenizer)


# ------------------------------------------------------------------------------------------------------- the demo
@dataclass
class VisionDemoConfig:
    """One vision comparison: the same warm start, budget and seed for every method (sized for 2 CPU cores)."""

    methods: tuple[str, ...] = ("grpo", "rlsd", "opsd")
    steps: int = 80
    seed: int = 0
    eval_every: int = 10
    eval_size: int = 200  # the first `eval_size` problems of the fixed held-out set
    prompts_per_step: int = 4
    num_generations: int = 8
    learning_rate: float = 5e-5
    lambda_decay_steps: int = 50  # RLSD's lam decays from 0.5 to 0 over this many steps (the paper's 50)
    max_completion_length: int = 32
    train_size: int = 1000
    out: Path = Path("runs/vision-demo")
    warm: VisionWarmStartConfig = field(default_factory=VisionWarmStartConfig)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.eval_every < 1 or self.eval_size < 1:
            raise ValueError("steps, eval_every and eval_size must be >= 1")
        if "srpo" in self.methods and not self.warm.perception:  # every method from the same (perception) warm start
            self.warm = replace(self.warm, perception=True)

    def completion_length(self) -> int:
        """`max_completion_length`, plus the perception span's tokens when the warm start writes one."""
        extra = perception_length(self.warm.task) if self.warm.perception else 0
        return self.max_completion_length + extra

    def budget(self) -> DemoConfig:
        """The text demo's config carrying this budget, for the shared `trainer_args`."""
        return task_budget(self, self.completion_length())


def vl_quick_config(demo: type[Demo], warm_start: type[VLWarmStartConfig], out: Path, seed: int = 0) -> Demo:
    """A smoke run of an image or video demo for tests: a very small warm start and two steps per method, every
    file still written."""
    warm = warm_start(
        task=TaskConfig(num_operands=3), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
        vision_width=16, steps=10, batch_size=8, train_pool=200,
    )  # fmt: skip
    return demo(
        steps=2, eval_every=1, eval_size=8, prompts_per_step=2, num_generations=4, lambda_decay_steps=2,
        max_completion_length=16, train_size=16, out=out, warm=warm, seed=seed,
    )  # fmt: skip


def vision_quick_config(out: Path, seed: int = 0) -> VisionDemoConfig:
    """A smoke run for tests: a very small warm start and two steps per method, every file still written."""
    return vl_quick_config(VisionDemoConfig, VisionWarmStartConfig, out, seed)


def vision_demo(config: VisionDemoConfig) -> TaskDemo:
    """The vision task as the shared runner takes it: greedy pass@1 and leakage on held-out image problems, the
    credit viewer of RLSD's policy (else of the last method) with each completion's image."""
    problems = evaluation_problems(config.warm.task, config.eval_size)
    return TaskDemo(
        task="vision", warm_namespace="vision-warmstart", warm_config=config.warm, warm_steps=config.warm.steps,
        warm_start=lambda progress: vision_warm_start(config.warm, progress=progress),
        load=load_vision_warm_start,
        dataset=lambda: make_vision_rl_dataset(config.warm.task, config.train_size, seed=config.seed, split="train"),
        evaluate=lambda policy, processor: evaluate_vision(policy, processor, problems, config.completion_length()),
        evaluation=f"greedy pass@1 on {len(problems)} problems", reward=accuracy_reward,
        viewer=lambda trainer: vision_credit_examples(trainer, trainer.processing_class, problems, config),
        viewer_from=viewer_of("rlsd", config.methods),
        finish_report=add_images_to_report,
    )  # fmt: skip


def run_vision_demo(config: VisionDemoConfig, progress: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Train every method from the same vision warm start; write metrics.jsonl, summary.json, curves.png and
    report.html (curves, table and the token-credit viewer with each completion's image): `run_task_demo`."""
    return run_task_demo(config, vision_demo(config), progress, threads)


# ------------------------------------------------------------------------------------------- the token-credit viewer
def sequence_logps(model, processor, image: Image.Image, text: str, completion_ids: list[int], temperature: float):
    """(1, T) log-probs of the completion tokens after the [image, text] prompt, temperature-scaled as in sampling."""
    vision = processor.image_processor(images=[image], return_tensors="pt")
    prompt = prompt_ids(
        processor, text, int(vision["image_grid_thw"][0].prod()) // processor.image_processor.merge_size**2
    )
    return prompted_logps(model, processor, prompt, completion_ids, vision, temperature)


def prompted_logps(model, processor, prompt: list[int], completion_ids: list[int], vision: dict, temperature: float):
    """(1, T) log-probs of the completion tokens after the expanded `prompt` ids with the images' `pixel_values` and
    `image_grid_thw` (one image or a clip's frames), temperature-scaled as in sampling."""
    ids = torch.tensor([prompt + completion_ids])
    types = (ids == processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)).long()
    logits = model(
        input_ids=ids, mm_token_type_ids=types, pixel_values=vision["pixel_values"],
        image_grid_thw=vision["image_grid_thw"],
    ).logits[0, len(prompt) - 1 : -1]  # fmt: skip
    logps = torch.log_softmax(logits.double() / temperature, -1)
    return logps.gather(1, torch.tensor(completion_ids).unsqueeze(1)).T


@torch.no_grad()
def vision_credit_examples(trainer, processor, problems: list[Problem], config: VisionDemoConfig) -> dict[str, Any]:
    """A correct and a wrong sampled completion of the trained policy, each token with its Delta (the teacher sees
    the same image and the answer) and RLSD weight (under SRPO: the policy on the corrupted image, and SRPO's weight),
    and the image as a PNG data URI, for the viewer."""
    from rlsd.core.credit import rlsd_advantages

    model = trainer.accelerator.unwrap_model(trainer.model)
    teacher = getattr(trainer.teacher, "model", None) or model
    images = [problem_image(p) for p in problems]
    with torch.random.fork_rng():
        torch.manual_seed(3_000 + config.seed)
        completions = generate_vision(
            model, processor, images, [QUESTION] * len(problems), max_new_tokens=config.completion_length(),
            do_sample=True,
        )  # fmt: skip
    rewards = accuracy_reward(completions, [str(p.answer) for p in problems])
    examples: dict[str, Any] = {}
    for label, index, ids, sign in viewer_picks(rewards, completions, processor.tokenizer):
        problem, temperature = problems[index], trainer.args.temperature
        student = sequence_logps(model, processor, images[index], QUESTION, ids, temperature)
        tokens = [processor.tokenizer.decode([t]) for t in ids]
        if trainer.args.credit == "srpo":
            delta, weight, clipped = srpo_credit(trainer.args, teacher, processor, images[index], tokens, ids, student,
                                                 sign)  # fmt: skip
        else:
            tutor = sequence_logps(teacher, processor, images[index], teacher_text(problem), ids, temperature)
            advantages, _ = rlsd_advantages(
                torch.tensor([sign], dtype=torch.float64), tutor, student, torch.ones_like(student), lam=1.0,
                clip=trainer.args.rlsd_clip,
            )  # fmt: skip
            delta = (tutor - student)[0]
            weight, clipped = torch.exp(sign * delta), advantages[0] / sign
        examples[label] = {
            "prompt": f"[image: {expression(problem)}] {QUESTION}",
            "answer": problem.answer,
            "advantage_sign": sign,
            "tokens": tokens,
            "delta": delta.tolist(),
            "weight": weight.tolist(),
            "clipped_weight": clipped.tolist(),
            "image": _data_uri(images[index]),
        }
    return examples


def viewer_picks(
    rewards: list[float], completions: list[str], tokenizer: Any
) -> list[tuple[str, int, list[int], float]]:
    """The credit viewer's examples: the first correct and the first wrong sampled completion, each as (label, index,
    token ids, advantage sign); one that is missing or has no tokens is left out."""
    picks = []
    for label, wanted in (("correct", 1.0), ("wrong", 0.0)):
        index = next((i for i, r in enumerate(rewards) if r == wanted), None)
        ids = tokenizer(completions[index])["input_ids"] if index is not None else []
        if ids:
            picks.append((label, index, ids, 1.0 if wanted else -1.0))
    return picks


def srpo_credit(args, model, processor, image, tokens, ids, student, sign: float):
    """SRPO's view of one completion: Delta = log p(corrupted image) - log p(image), the raw weights exp(z - b) and
    the clipped ones at lam = 1 (1 outside the perception and reasoning spans)."""
    from rlsd.context.annotation import span_token_labels, token_char_offsets
    from rlsd.context.transforms import apply_transform
    from rlsd.core.rules import RuleParams, Signals, get_rule
    from rlsd.core.srpo_rule import centred_scores, role_char_spans

    corrupted = apply_transform(args.teacher_transform, QUESTION, [image], {}, "the viewer's completion")[1][0]
    tutor = sequence_logps(model, processor, corrupted, QUESTION, ids, args.temperature)
    spans = role_char_spans("".join(tokens), args.srpo_perception_tag, args.srpo_reasoning_tag)
    roles = torch.tensor([span_token_labels(token_char_offsets(tokens), spans)])
    signals = Signals(
        seq_advantages=torch.tensor([sign], dtype=torch.float64), mask=torch.ones_like(roles), teacher_logps=tutor,
        student_logps=student, role_ids=roles,
    )  # fmt: skip
    advantages, _ = get_rule("srpo").fn(signals, RuleParams(lam=1.0, clip=args.rlsd_clip))
    delta = tutor - student
    weight = torch.exp(centred_scores(delta, roles, torch.ones_like(roles).bool()))
    return delta[0], weight[0], advantages[0] / sign


def _data_uri(image: Image.Image) -> str:
    """A PNG data URI of an image, for a self-contained report."""
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def add_images_to_report(path: Path, viewer: dict[str, Any]) -> None:
    """Put each viewer example's image (scaled up 3x, pixelated) before its prompt line in report.html."""
    import html as html_lib

    page = path.read_text()
    for example in viewer.values():
        line = f'<p class="prompt">{html_lib.escape(example["prompt"])}'
        image = (
            f'<img alt="problem image" src="{example["image"]}" '
            f'style="height:84px;image-rendering:pixelated;border:1px solid #ccc">'
        )
        page = page.replace(line, image + line, 1)
    path.write_text(page)
