"""Images a tool returns reach the teacher (issue 24): TRL 1.16's tool loop renders a tool's image blocks into the
completion (image-pad tokens the environment wrote, `tool_mask` 0) and adds their pixels to the rollout's images, so
the teacher, which scores [teacher prompt ; completion] with the rollout's images, sees them as the student does."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config
from datasets import Dataset
from PIL import Image
from test_agents import RESPONSE_TEMPLATE, answer_reward, captured_inputs

from rlsd.experiments.tiny_vlm import CELL, build_tiny_qwen2_vl, build_vl_processor

VL_TOOL_TEMPLATE = (
    "{%- macro show(content) %}{% if content is string %}{{ content }}{% else %}{% for part in content %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{% endmacro %}"
    "{%- if tools %}tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}assistant: {{ show(m.get('content') or '') }}"
    "{%- for c in m.get('tool_calls') or [] %}<call>{{ c['function'] | tojson }}</call>{% endfor %}<eos>\n"
    "{%- elif m['role'] == 'tool' %}tool: {{ show(m['content']) }}\n"
    "{%- else %}{{ m['role'] }}: {{ show(m['content']) }}\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}assistant: {% endif %}"
)
"""The tool-calling chat template of `test_agents`, with image blocks rendered as Qwen-VL's placeholder."""

SHOWN = Image.new("RGB", (CELL, CELL), (200, 30, 30))
"""The image the tool returns: one 28x28 cell, one image token."""


def snapshot(key: str) -> list:
    """Show the cell a key names.

    Args:
        key: the key whose cell to show.
    """
    return [{"type": "image", "image": SHOWN}, {"type": "text", "text": "7"}]


@pytest.mark.parametrize("config", [{"credit": "rlsd"}, {"credit": "grpo", "distill_loss": "jsd"}])
def test_the_teacher_scores_the_image_a_tool_returned(tmp_path, monkeypatch, config):
    """With a token-credit rule the teacher scores at rollout time; with a distillation loss, at loss time."""
    from rlsd import RLSDTrainer

    processor = build_vl_processor()
    processor.chat_template = processor.tokenizer.chat_template = VL_TOOL_TEMPLATE
    processor.tokenizer.response_template = RESPONSE_TEMPLATE
    tokenizer = processor.tokenizer
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "What is a?"}], "solution": "7"}] * 4)
    args = make_config(tmp_path, rlsd_lambda_decay_steps=0, max_completion_length=96, **config)
    trainer = RLSDTrainer(build_tiny_qwen2_vl(processor), answer_reward, args=args, train_dataset=dataset,
                          processing_class=processor, tools=[snapshot])  # fmt: skip
    call = tokenizer('<call>{"name": "snapshot", "arguments": {"key": "a"}}</call><eos>', add_special_tokens=False)
    answer = tokenizer("7<eos>", add_special_tokens=False)["input_ids"]
    turns = []

    def forced_turn(prompt_ids, *args, **kwargs):
        turns.append(len(prompt_ids))
        return [list(call["input_ids"]) if len(turns) == 1 else list(answer) for _ in prompt_ids], None

    monkeypatch.setattr(trainer, "_generate_single_turn", forced_turn)
    trainer.model.train()
    seen, handle = captured_inputs(trainer.teacher.model)
    pixels = []
    hook = trainer.teacher.model.register_forward_pre_hook(
        lambda _, args, kwargs: pixels.append(kwargs.get("pixel_values")), with_kwargs=True
    )
    output = trainer._generate_and_score_completions([dict(row) for row in dataset])
    trainer.current_gradient_accumulation_steps = 1  # set by HF's loop
    loss = trainer.compute_loss(trainer.model, output)  # the loss-time teacher pass, with a distillation loss
    handle.remove()
    hook.remove()
    assert turns == [4, 4] and torch.isfinite(loss)
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    env = output["tool_mask"] == 0
    # the tool's image token is in each completion, written by the environment (no credit on it)
    assert ((output["completion_ids"] == image_pad) & env).sum(1).tolist() == [1, 1, 1, 1]
    assert ((output["completion_ids"] == image_pad) & ~env).sum() == 0
    # the teacher's forward reads the completion with the image token and the tool's pixels, one image per row
    assert len(seen) == 1 and (seen[0] == image_pad).sum(1).tolist() == [1, 1, 1, 1]
    expected = processor.image_processor(images=[SHOWN] * 4, return_tensors="pt")["pixel_values"]
    assert pixels[0] is not None and torch.equal(pixels[0].cpu(), expected)
    if config["credit"] == "rlsd":
        advantages = trainer.token_advantages(output, trainer.score_rollout("student", output).logps)
        assert (advantages[env] == 0).all()
