"""`rlsd demo --task gui`: the embedded GUI-grounding task (`rlsd.experiments.gui_task`) with a tiny Qwen2-VL warm
start cached by its configuration, and GRPO, RLSD and GUI-SD compared on it through the shared task-demo runner
(`rlsd.experiments.task_demo`).

The warm start is supervised on three formats of the same screens: the student's (the screen and `click 37` ->
`<answer>98,42</answer>`), RLSD's teacher (the same with the reference click before the instruction, `[ref 98,42]
click 37`) and GUI-SD's teacher (the screen with the target's box as a visual hint, `box_hint`, and the student's
text). So each self-teacher reads its privileged input from the first step, as the vision demo's teacher reads its
reference. The evaluation is greedy click accuracy (the box reward) on held-out screens; the credit viewer shows the
screen with the sampled click marked. Nothing is downloaded.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image, ImageDraw

from rlsd.context.transforms import BOX_COLUMN, apply_transform
from rlsd.experiments.demo import DemoConfig
from rlsd.experiments.gui_task import (
    GuiTaskConfig,
    Screen,
    click_reward,
    make_gui_rl_dataset,
    parse_click,
    render_screen,
    sample_screens,
)
from rlsd.experiments.methods import check_known
from rlsd.experiments.task import TEACHER_TEMPLATE, greedy_metrics
from rlsd.experiments.task_demo import TaskDemo, run_task_demo, task_budget, viewer_of
from rlsd.experiments.tiny_vlm import build_tiny_qwen2_vl, build_vl_processor
from rlsd.experiments.vision_task import (
    VLWarmStartConfig,
    _data_uri,
    add_images_to_report,
    collate_supervised,
    generate_vision,
    load_vision_warm_start,
    sequence_logps,
    viewer_picks,
)
from rlsd.experiments.warmstart import cached_warm_start, supervised_warm_start

GUI_WARMSTART_FORMAT_VERSION = 1
"""Bump when the GUI warm-start recipe changes in a way its configuration does not capture."""
HINT_TRANSFORM = "box_hint"
"""The visual hint GUI-SD's teacher sees (and the warm start's hint format shows)."""
CLICK_COLOUR = (0, 170, 0)
"""The colour of the click marker the credit viewer draws on the screen."""


def teacher_text(screen: Screen) -> str:
    """RLSD's teacher text: the reference click before the instruction (`[ref 98,42] click 37`)."""
    x, y = screen.goal.centre()
    return TEACHER_TEMPLATE.format(answer=f"{x},{y}", prompt=screen.instruction())


def hint_image(screen: Screen, image: Image.Image) -> Image.Image:
    """The screen as GUI-SD's teacher sees it: the target's box as a visual hint (`HINT_TRANSFORM`)."""
    return apply_transform(HINT_TRANSFORM, "", [image], {BOX_COLUMN: screen.goal.box()}, "the warm start")[1][0]


# ------------------------------------------------------------------------------------------------- the warm start
@dataclass(frozen=True)
class GuiWarmStartConfig(VLWarmStartConfig):
    """Everything that determines the warm-started tiny Qwen2-VL of the GUI task; its hash names the cache entry."""

    version: ClassVar[int] = GUI_WARMSTART_FORMAT_VERSION
    task: GuiTaskConfig = field(default_factory=GuiTaskConfig)
    steps: int = 300
    batch_size: int = 32
    teacher_share: float = 0.25  # share of examples in RLSD's teacher format (`[ref x,y] click L`)
    hint_share: float = 0.25  # share of examples in GUI-SD's teacher format (the screen with the box hint)
    train_pool: int = 2000

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.teacher_share + self.hint_share <= 1.0:
            raise ValueError(f"teacher_share + hint_share must lie in [0, 1], got {self}")


def gui_warm_start(config: GuiWarmStartConfig, progress: bool = True) -> Path:
    """Path of the warm-started model and processor for `config`, training and caching them on first use."""
    return cached_warm_start("gui-warmstart", config, lambda: train_gui_warm_start(config, progress=progress))


def train_gui_warm_start(config: GuiWarmStartConfig, progress: bool = True):
    """Next-token cross-entropy on the completion tokens of [screen, text] -> click examples in the student's,
    RLSD's teacher's and GUI-SD's teacher's formats; returns the model, the processor and the seconds it took."""
    start = time.perf_counter()
    task = config.task
    processor = build_vl_processor(max_tokens_per_image=task.columns * task.rows)
    model = build_tiny_qwen2_vl(
        processor, hidden_size=config.hidden_size, num_layers=config.num_layers, num_heads=config.num_heads,
        intermediate_size=config.intermediate_size, vision_width=config.vision_width,
        vision_depth=config.vision_depth, seed=config.seed,
    )  # fmt: skip
    pool = sample_screens(task, config.train_pool, config.seed, "train")
    images = [render_screen(screen) for screen in pool]

    def draw(rng: random.Random) -> tuple[Image.Image, str, str]:
        index = rng.randrange(len(pool))
        screen, image, share = pool[index], images[index], rng.random()
        if share < config.teacher_share:
            return image, teacher_text(screen), screen.solution()
        if share < config.teacher_share + config.hint_share:
            return hint_image(screen, image), screen.instruction(), screen.solution()
        return image, screen.instruction(), screen.solution()

    supervised_warm_start(
        model, config, draw, lambda examples: collate_supervised(examples, processor), "gui warm start", progress
    )
    return model, processor, time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ the evaluation
EVAL_SETS = ("heldout", "pilot")
"""The evaluation sets: the held-out screens every reported number uses, and a disjoint pilot set for choosing a
regime without touching them."""


def evaluation_screens(config: GuiTaskConfig, count: int, eval_set: str = "heldout") -> list[Screen]:
    """The fixed held-out screens (the test split of seed 0, whatever the run's seed), or the pilot set: test-split
    screens of seed 1 that are not among the first 1000 held-out ones."""
    if eval_set not in EVAL_SETS:
        raise ValueError(f"eval_set must be one of {EVAL_SETS}, got {eval_set!r}")
    if eval_set == "heldout":
        return sample_screens(config, count, seed=0, split="test")
    held = set(sample_screens(config, 1000, seed=0, split="test"))
    fresh = [screen for screen in sample_screens(config, 2 * count + 100, seed=1, split="test") if screen not in held]
    if len(fresh) < count:
        raise ValueError(f"only {len(fresh)} pilot screens outside the held-out set; ask for fewer than {count}")
    return fresh[:count]


def evaluate_gui(model, processor, screens: list[Screen], max_new_tokens: int) -> dict[str, Any]:
    """Greedy click accuracy on held-out screens (`pass_at_1`: the share of clicks inside the target's box), the
    share of completions citing an unseen reference, mean length and the per-screen outcomes as a 0/1 string."""
    images = [render_screen(screen) for screen in screens]
    completions = generate_vision(
        model, processor, images, [screen.instruction() for screen in screens], max_new_tokens=max_new_tokens
    )
    rewards = click_reward(completions, teacher_box=[screen.goal.box() for screen in screens])
    return greedy_metrics(completions, rewards, processor.tokenizer)


# ------------------------------------------------------------------------------------------------------- the demo
@dataclass
class GuiDemoConfig:
    """One GUI comparison: the same warm start, budget and seed for every method (sized for 2 CPU cores)."""

    methods: tuple[str, ...] = ("grpo", "rlsd", "gui-sd")
    steps: int = 80
    seed: int = 0
    eval_every: int = 10
    eval_size: int = 200  # the first `eval_size` screens of the fixed held-out set
    eval_set: str = "heldout"  # "pilot": a disjoint set, for choosing a regime without touching the held-out one
    prompts_per_step: int = 4
    num_generations: int = 8
    learning_rate: float = 5e-5
    lambda_decay_steps: int = 50  # RLSD's lam decays from 0.5 to 0 over this many steps (the paper's 50)
    max_completion_length: int = 12  # `<answer>98,42</answer>` and its end is 8 tokens
    train_size: int = 1000
    out: Path = Path("runs/gui-demo")
    warm: GuiWarmStartConfig = field(default_factory=GuiWarmStartConfig)

    def __post_init__(self) -> None:
        check_known(self.methods)  # before the warm start, not at the first method's trainer
        if self.eval_set not in EVAL_SETS:
            raise ValueError(f"eval_set must be one of {EVAL_SETS}, got {self.eval_set!r}")
        if self.steps < 1 or self.eval_every < 1 or self.eval_size < 1:
            raise ValueError("steps, eval_every and eval_size must be >= 1")

    def budget(self) -> DemoConfig:
        """The text demo's config carrying this budget, for the shared `trainer_args`."""
        return task_budget(self)


def gui_quick_config(out: Path, seed: int = 0) -> GuiDemoConfig:
    """A smoke run for tests: a very small warm start and two steps per method, every file still written."""
    warm = GuiWarmStartConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vision_width=16,
                              steps=10, batch_size=8, train_pool=100)  # fmt: skip
    return GuiDemoConfig(steps=2, eval_every=1, eval_size=8, prompts_per_step=2, num_generations=4,
                         lambda_decay_steps=2, train_size=16, out=out, warm=warm, seed=seed)  # fmt: skip


def gui_demo(config: GuiDemoConfig) -> TaskDemo:
    """The GUI task as the shared runner takes it: greedy click accuracy on held-out screens, the box reward, and the
    credit viewer of GUI-SD's policy (else RLSD's, else the last method's) with the screen and the sampled click."""
    screens = evaluation_screens(config.warm.task, config.eval_size, config.eval_set)
    return TaskDemo(
        task="gui", warm_namespace="gui-warmstart", warm_config=config.warm, warm_steps=config.warm.steps,
        warm_start=lambda progress: gui_warm_start(config.warm, progress=progress), load=load_vision_warm_start,
        dataset=lambda: make_gui_rl_dataset(config.warm.task, config.train_size, seed=config.seed, split="train"),
        evaluate=lambda policy, processor: evaluate_gui(policy, processor, screens, config.max_completion_length),
        evaluation=f"greedy click accuracy on {len(screens)} screens", reward=click_reward,
        viewer=lambda trainer: gui_credit_examples(trainer, screens, config),
        viewer_from=viewer_of("gui-sd", config.methods),
        finish_report=add_images_to_report,
    )  # fmt: skip


def run_gui_demo(config: GuiDemoConfig, progress: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Train every method from the same GUI warm start; write metrics.jsonl, summary.json, curves.png and
    report.html (curves, table and the credit viewer with the screen and the click): `run_task_demo`."""
    return run_task_demo(config, gui_demo(config), progress, threads)


# ------------------------------------------------------------------------------------------- the token-credit viewer
def marked_click(image: Image.Image, click: tuple[int, int] | None) -> Image.Image:
    """The screen with the click marked by a small cross (`CLICK_COLOUR`); unchanged when there is no click."""
    marked = image.copy()
    if click is not None:
        x, y = click
        draw = ImageDraw.Draw(marked)
        draw.line((x - 3, y, x + 3, y), fill=CLICK_COLOUR, width=1)
        draw.line((x, y - 3, x, y + 3), fill=CLICK_COLOUR, width=1)
    return marked


@torch.no_grad()
def gui_credit_examples(trainer: Any, screens: list[Screen], config: GuiDemoConfig) -> dict[str, Any]:
    """A correct and a wrong sampled click of the trained policy, each token with its Delta against the method's
    teacher (shown what the run's config shows it: the hint image and/or the reference text) and its weight (under
    GUI-SD: digit significance x the teacher's probability of the token; otherwise RLSD's clipped weight at lam 1),
    and the screen with the click marked."""
    from rlsd.core.credit import rlsd_advantages
    from rlsd.core.gui_sd import digit_significance

    args, processor = trainer.args, trainer.processing_class
    model = trainer.accelerator.unwrap_model(trainer.model)
    teacher = getattr(trainer.teacher, "model", None) or model
    images = [render_screen(screen) for screen in screens]
    with torch.random.fork_rng():
        torch.manual_seed(3_000 + config.seed)
        completions = generate_vision(model, processor, images, [s.instruction() for s in screens],
                                      max_new_tokens=config.max_completion_length, do_sample=True)  # fmt: skip
    rewards = click_reward(completions, teacher_box=[screen.goal.box() for screen in screens])
    examples: dict[str, Any] = {}
    for label, index, ids, sign in viewer_picks(rewards, completions, processor.tokenizer):
        screen = screens[index]
        x, y = screen.goal.centre()
        shown = images[index]
        if args.teacher_transform is not None:
            row = {BOX_COLUMN: screen.goal.box()}
            shown = apply_transform(args.teacher_transform, "", [shown], row, "the viewer's completion")[1][0]
        text = args.teacher_template.format(prompt=screen.instruction(), answer=f"{x},{y}")
        student = sequence_logps(model, processor, images[index], screen.instruction(), ids, args.temperature)
        tutor = sequence_logps(teacher, processor, shown, text, ids, args.temperature)
        tokens = [processor.tokenizer.decode([t]) for t in ids]
        delta = (tutor - student)[0]
        if args.distill_loss == "gui_sd":
            significance = torch.tensor(digit_significance(tokens, args.gui_sd_text_weight), dtype=torch.float64)
            weight = clipped = significance * tutor[0].exp()
        else:
            advantages, _ = rlsd_advantages(torch.tensor([sign], dtype=torch.float64), tutor, student,
                                            torch.ones_like(student), lam=1.0, clip=args.rlsd_clip)  # fmt: skip
            weight, clipped = torch.exp(sign * delta), advantages[0] / sign
        examples[label] = {
            "prompt": f"[screen] {screen.instruction()} (click at {parse_click(completions[index])}, "
            f"target box {screen.goal.box()})",
            "answer": f"{x},{y}",
            "advantage_sign": sign,
            "tokens": tokens,
            "delta": delta.tolist(),
            "weight": weight.tolist(),
            "clipped_weight": clipped.tolist(),
            "image": _data_uri(marked_click(images[index], parse_click(completions[index]))),
        }
    return examples
