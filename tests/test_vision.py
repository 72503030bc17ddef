"""Vision-language RLSD on a tiny Qwen2-VL built offline: refusals, the teacher seeing the student's images, parity
with TRL's GRPOTrainer on a vision batch, and a training step for every teacher mode and a distillation loss."""

from __future__ import annotations

import pytest
import torch
from conftest import config_kwargs, make_config
from datasets import Dataset
from PIL import Image
from transformers import Qwen2VLForConditionalGeneration
from trl import GRPOConfig, GRPOTrainer

from rlsd import RLSDTrainer
from rlsd.context.templates import PAPER_TEACHER_TEMPLATE, has_image_blocks, render_teacher_prompt
from rlsd.experiments.tiny_vlm import ImageOnlyQwen2VLProcessor, build_tiny_qwen2_vl, build_vl_processor

COLOURS = [(220, 20, 20), (20, 200, 20), (20, 20, 220), (230, 230, 30)]


def alternating_reward(completions, **kwargs):
    """1 on every other completion: every group has reward spread whatever the tiny model samples."""
    return [float(index % 2) for index in range(len(completions))]


@pytest.fixture(scope="module")
def processor() -> ImageOnlyQwen2VLProcessor:
    """The tiny processor with a PIL image processor that turns a 28x28 image into 4 patches, i.e. one image token
    after the 2x2 merge (at most 4 tokens per image)."""
    return build_vl_processor(max_tokens_per_image=4)


def make_vl_model(processor, seed: int = 0) -> Qwen2VLForConditionalGeneration:
    """A Qwen2-VL of about 170k parameters: text hidden 64 in 2 layers, a 1-layer vision tower of width 32."""
    return build_tiny_qwen2_vl(processor, seed=seed)


def make_vision_dataset(n: int = 4) -> Dataset:
    """Questions about a plain-coloured 28x28 image (TRL's standard vision rows: a text prompt and an `image`)."""
    rows = []
    for i in range(n):
        question = f"Q{i}: colour?"
        image = Image.new("RGB", (28, 28), COLOURS[i % len(COLOURS)])
        rows.append({"prompt": [{"role": "user", "content": question}], "image": image, "solution": str(i)})
    return Dataset.from_list(rows)


def build(processor, tmp_path, dataset=None, model=None, **config) -> RLSDTrainer:
    return RLSDTrainer(
        model if model is not None else make_vl_model(processor),
        alternating_reward,
        args=make_config(tmp_path, max_completion_length=6, **config),
        train_dataset=dataset if dataset is not None else make_vision_dataset(),
        processing_class=processor,
    )


def rollout(trainer, rows):
    """TRL's own rollout and scoring of `rows` (vision tensors included), without RLSD's additions."""
    return GRPOTrainer._generate_and_score_completions(trainer, rows)


def teacher_pass(trainer, rows, output):
    """The trainer's teacher context and teacher pass on a rollout."""
    return trainer.teacher_scores(rows, output).logps


def direct_teacher_logps(model, processor, row, completion: list[int], temperature: float, with_image: bool = True):
    """log p(y_t | teacher prompt with the row's images, y_<t) from one unpadded forward returning full logits."""
    images = (row["images"] if "images" in row else [row["image"]]) if with_image else []
    question = row["prompt"][0]["content"]
    question = question if isinstance(question, str) else next(b["text"] for b in question if b["type"] == "text")
    text = PAPER_TEACHER_TEMPLATE.format(prompt=question, answer=row["solution"])
    content = [*({"type": "image"} for _ in images), {"type": "text", "text": text}]
    rendered = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    encoded = processor(images=images or None, text=[rendered], return_tensors="pt")
    prompt_length = encoded["input_ids"].size(1)
    ids = torch.cat([encoded["input_ids"], torch.tensor([completion])], dim=1)
    extra = {k: v for k, v in encoded.items() if k in ("pixel_values", "image_grid_thw")}
    types = torch.cat([encoded["mm_token_type_ids"], torch.zeros(1, len(completion), dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, mm_token_type_ids=types, **extra).logits[0, prompt_length - 1 : -1]
    logps = torch.log_softmax(logits.double() / temperature, dim=-1)
    return logps.gather(1, torch.tensor(completion).unsqueeze(1)).squeeze(1)


def completions_of(output) -> list[list[int]]:
    """The unpadded completion ids of each rollout row."""
    return [
        ids[mask.bool()].tolist()
        for ids, mask in zip(output["completion_ids"], output["completion_mask"], strict=True)
    ]


# ------------------------------------------------------------------------------------------------------- refusals
def test_image_blocks_in_prompts_are_refused_with_a_teacher(processor, tmp_path):
    image = Image.new("RGB", (28, 28), COLOURS[0])
    prompt = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Q?"}]}]
    dataset = Dataset.from_list([{"prompt": prompt, "solution": "1"}] * 4)
    assert has_image_blocks(dataset[0]["prompt"])
    with pytest.raises(ValueError, match=r"image blocks inside its prompts and no `image`/`images` column"):
        build(processor, tmp_path, dataset=dataset, credit="rlsd")
    with pytest.raises(ValueError, match="image blocks inside its prompts"):
        build(processor, tmp_path, dataset=dataset, credit="grpo", distill_loss="jsd")


def test_image_column_with_a_tokenizer_is_refused_with_a_teacher(processor, tmp_path):
    with pytest.raises(ValueError, match=r"image column.*credit='rlsd'.*pass the model's processor"):
        RLSDTrainer(
            make_vl_model(processor), alternating_reward, args=make_config(tmp_path, credit="rlsd"),
            train_dataset=make_vision_dataset(), processing_class=processor.tokenizer,
        )  # fmt: skip


def test_image_column_with_a_rollout_function_is_refused_with_a_teacher(processor, tmp_path):
    def rollout_func(prompts, trainer):
        """Never called: the trainer is refused first."""
        raise AssertionError

    with pytest.raises(NotImplementedError, match=r"images with rollout_func and credit='rlsd'"):
        RLSDTrainer(
            make_vl_model(processor), alternating_reward, args=make_config(tmp_path, credit="rlsd"),
            train_dataset=make_vision_dataset(), processing_class=processor, rollout_func=rollout_func,
        )  # fmt: skip


def test_image_blocks_without_a_teacher_are_left_to_trl(processor, tmp_path):
    image = Image.new("RGB", (28, 28), COLOURS[0])
    prompt = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Q?"}]}]
    dataset = Dataset.from_list([{"prompt": prompt, "solution": "1"}] * 4)
    trainer = build(processor, tmp_path, dataset=dataset, credit="grpo")
    assert trainer.teacher is None


def test_teacher_prompt_keeps_image_blocks_and_rewrites_the_last_text():
    prompt = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "See"}, {"type": "image"}, {"type": "text", "text": "?"}],
        },
    ]
    rendered = render_teacher_prompt(prompt, PAPER_TEACHER_TEMPLATE, answer="42")
    assert rendered[0] == prompt[0]
    blocks = rendered[1]["content"]
    assert blocks[:2] == prompt[1]["content"][:2]
    assert blocks[2]["text"] == PAPER_TEACHER_TEMPLATE.format(prompt="?", answer="42")
    only_image = [{"role": "user", "content": [{"type": "image"}]}]
    blocks = render_teacher_prompt(only_image, PAPER_TEACHER_TEMPLATE, answer="42")[0]["content"]
    assert blocks[0] == {"type": "image"} and "42" in blocks[1]["text"]


# ------------------------------------------------------------------------------------------- the teacher's view
@pytest.mark.parametrize("teacher", ["live", "synced"])
def test_teacher_logps_equal_a_direct_forward_with_the_image(processor, tmp_path, teacher):
    trainer = build(processor, tmp_path, teacher=teacher, temperature=0.7, per_device_train_batch_size=2,
                    num_generations=2)  # fmt: skip
    dataset = make_vision_dataset()
    rows = [dataset[0], dataset[0], dataset[1], dataset[1]]
    output = rollout(trainer, rows)
    assert output["pixel_values"].size(0) == 4 * 4 and output["num_images"] == [1, 1, 1, 1]
    logps = teacher_pass(trainer, rows, output)
    model = trainer.teacher.model if trainer.teacher.model is not None else trainer.model
    for index, completion in enumerate(completions_of(output)):
        expected = direct_teacher_logps(model, processor, rows[index], completion, temperature=0.7)
        torch.testing.assert_close(logps[index, : len(completion)].double(), expected, atol=1e-5, rtol=1e-5)
        without = direct_teacher_logps(model, processor, rows[index], completion, 0.7, with_image=False)
        assert (expected - without).abs().max() > 1e-4, "the image does not change the teacher: test is vacuous"


def image_placeholders(count: int, question: str) -> list[dict]:
    """A user turn holding `count` empty image placeholders (filled by TRL from the `images` column) and the text."""
    return [*({"type": "image"} for _ in range(count)), {"type": "text", "text": question}]


@pytest.mark.parametrize("placeholders", [False, True])
def test_rows_with_several_images_share_a_batch(processor, tmp_path, placeholders):
    counts = [2, 1, 3, 1]
    rows = [
        {
            "prompt": [
                {
                    "role": "user",
                    "content": image_placeholders(count, f"Q{i}: colours?") if placeholders else f"Q{i}: colours?",
                }
            ],
            "images": [Image.new("RGB", (28, 28), COLOURS[(i + j) % len(COLOURS)]) for j in range(count)],
            "solution": str(i),
        }
        for i, count in enumerate(counts)
    ]
    dataset = Dataset.from_list(rows)
    trainer = build(processor, tmp_path, dataset=dataset, teacher="live", per_device_train_batch_size=2,
                    num_generations=2)  # fmt: skip
    rows = [dataset[i] for i in range(len(counts))]
    output = rollout(trainer, rows)
    assert output["num_images"] == counts
    logps = teacher_pass(trainer, rows, output)
    _, _, types, _ = trainer.teacher_inputs(rows, output)
    assert types["mm_token_type_ids"].sum(1).tolist() == counts  # one token per 28x28 image
    for index, completion in enumerate(completions_of(output)):
        expected = direct_teacher_logps(trainer.model, processor, rows[index], completion, temperature=1.0)
        torch.testing.assert_close(logps[index, : len(completion)].double(), expected, atol=1e-5, rtol=1e-5)


def test_delta_changes_when_the_image_is_removed_from_the_teachers_input(processor, tmp_path):
    trainer = build(processor, tmp_path, teacher="live")
    dataset = make_vision_dataset()
    rows = [dataset[i] for i in range(4)]
    output = rollout(trainer, rows)
    mask = output["completion_mask"].bool()
    student = trainer.score_rollout("student", output).logps
    with_image = teacher_pass(trainer, rows, dict(output))
    text_rows = [{k: v for k, v in row.items() if k != "image"} for row in rows]
    text_output = {k: v for k, v in output.items() if k not in ("pixel_values", "image_grid_thw", "num_images")}
    without_image = teacher_pass(trainer, text_rows, text_output)
    delta_with, delta_without = (with_image - student)[mask], (without_image - student)[mask]
    assert (delta_with - delta_without).abs().max() > 1e-4


def test_the_vision_encoder_runs_in_the_teacher_pass(processor, tmp_path):
    trainer = build(processor, tmp_path, teacher="synced", per_device_train_batch_size=2, num_generations=2)
    dataset = make_vision_dataset()
    rows = [dataset[i] for i in range(4)]
    output = rollout(trainer, rows)
    grids = []
    handle = trainer.teacher.model.model.visual.register_forward_hook(
        lambda module, args, kwargs, out: grids.append(kwargs.get("grid_thw")), with_kwargs=True
    )
    try:
        teacher_pass(trainer, rows, output)
    finally:
        handle.remove()
    assert len(grids) == 2  # one per scoring chunk of 2 rows, each with its 2 images
    assert all(grid is not None and grid.size(0) == 2 for grid in grids)


def test_rescoring_passes_get_the_vision_inputs(processor, tmp_path):
    # uni-opd re-scores the rollout with the student, SDPG's anchor scores it with the initial model
    trainer = build(processor, tmp_path, credit="uni-opd", distill_loss="sdpg", teacher="live")
    dataset = make_vision_dataset()
    rows = [dataset[i] for i in range(4)]
    output = rollout(trainer, rows)
    calls = []
    visual = trainer.model.model.visual
    handle = visual.register_forward_hook(lambda *args: calls.append("student"))
    reference = trainer.reference.model.model.visual.register_forward_hook(lambda *args: calls.append("reference"))
    try:
        trainer.score_rollout("student", output)
        trainer.score_rollout("reference", output)
    finally:
        handle.remove()
        reference.remove()
    assert calls == ["student", "reference"]


# --------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("overrides", [{"credit": "grpo"}, {"credit": "rlsd", "rlsd_clip": 0.0}])
def test_parity_with_trl_grpo_trainer_on_a_vision_batch(processor, tmp_path, overrides):
    ours = build(processor, tmp_path / "ours", **overrides)
    ours.train()
    peer_args = GRPOConfig(**config_kwargs(tmp_path / "peer", max_completion_length=6))
    peer = GRPOTrainer(
        make_vl_model(processor), alternating_reward, args=peer_args, train_dataset=make_vision_dataset(),
        processing_class=processor,
    )  # fmt: skip
    peer.train()
    loss = next(entry["loss"] for entry in ours.state.log_history if "loss" in entry)
    peer_loss = next(entry["loss"] for entry in peer.state.log_history if "loss" in entry)
    assert abs(loss - peer_loss) <= 1e-6
    for (name, p_ours), (_, p_peer) in zip(ours.model.named_parameters(), peer.model.named_parameters(), strict=True):
        assert (p_ours - p_peer).abs().max().item() <= 1e-6, name
    initial = make_vl_model(processor)
    assert any(not torch.equal(a, b) for a, b in zip(ours.model.parameters(), initial.parameters(), strict=True))


def lora_vl_model(processor):
    """The tiny Qwen2-VL with a LoRA adapter on the language model's attention (the vision tower stays frozen)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        make_vl_model(processor), LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"teacher": "synced"},
        {"teacher": "live"},
        {"teacher": "ema"},
        {"teacher": "initial", "lora": True},
        {"teacher": "synced", "frozen_vision": True},
        {"teacher": "live", "credit": "uni-opd"},
        {"teacher": "synced", "credit": "grpo", "distill_loss": "jsd"},
        {"teacher": "live", "credit": "rlsd", "distill_loss": "sdpg"},
    ],
)
def test_a_training_step_on_images(processor, tmp_path, overrides):
    overrides = dict(overrides)
    lora, frozen_vision = overrides.pop("lora", False), overrides.pop("frozen_vision", False)
    model = lora_vl_model(processor) if lora else make_vl_model(processor)
    if frozen_vision:
        model.model.visual.requires_grad_(False)
    trainer = build(processor, tmp_path, model=model, max_steps=2, **overrides)
    teacher = trainer.teacher.model if trainer.teacher.model is not None else trainer.model
    teacher = teacher.get_base_model() if lora else teacher
    counted = []
    handle = teacher.model.visual.register_forward_hook(lambda *args: counted.append(1))
    initial = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    try:
        trainer.train()
    finally:
        handle.remove()
    history = {key: value for entry in trainer.state.log_history for key, value in entry.items()}
    assert torch.isfinite(torch.tensor(history["loss"]))
    moved = [
        name for name, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, initial[name])
    ]
    assert moved, "no trainable parameter moved"
    assert counted, "the teacher's vision tower never ran"
    if "distill_loss" in overrides:
        assert "rlsd/distill_loss" in history
    if frozen_vision:
        assert not any("visual" in name for name in moved)
