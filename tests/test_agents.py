"""The teacher over multi-turn rollouts: a rollout function's fixed tool-calling completions (with their `env_mask`)
and an environment's `reset` observation and tool schema. The teacher reads [teacher prompt ; completion] with the
environment's tokens in place; only the model's tokens carry credit and enter the loss."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config, make_model
from datasets import Dataset

from rlsd.context.templates import render_teacher_prompt
from rlsd.experiments.tiny import build_char_tokenizer
from rlsd.step.batch import loss_mask

TOOL_TEMPLATE = (
    "{%- if tools %}tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}assistant: {{ m.get('content') or '' }}"
    "{%- for c in m.get('tool_calls') or [] %}<call>{{ c['function'] | tojson }}</call>{% endfor %}<eos>\n"
    "{%- elif m['role'] == 'tool' %}tool: {{ m['content'] }}\n"
    "{%- else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}assistant: {% endif %}"
)
"""A chat template that renders tool schemas, tool calls and tool results (TRL requires one for environments)."""

QUESTION = [{"role": "system", "content": "Use the tool."}, {"role": "user", "content": "What is a?"}]
TURN_1, ENVIRONMENT, ANSWERS = 'lookup("a")<eos>', "\ntool: 7\nassistant: ", ("7<eos>", "3<eos>")


@pytest.fixture(scope="module")
def tool_tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = TOOL_TEMPLATE
    return tokenizer


RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "assistant: ",
    "fields": {
        "tool_calls": {"open": "<call>", "close_pattern": r"</call>\s*", "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"<eos>\s*", "content": "text"},
    },
}  # fmt: skip
"""How TRL parses the tiny model's turns into tool calls (`TOOL_TEMPLATE`'s `<call>` blocks)."""


@pytest.fixture(scope="module")
def parsing_tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.response_template = RESPONSE_TEMPLATE
    return tokenizer


def lookup(key: str) -> str:
    """Look a key up.

    Args:
        key: the key to look up.
    """
    return "7" if key == "a" else "unknown"


def answer_reward(completions, **kwargs):
    """1 when the last turn answers 7."""
    return [float(c[-1]["content"].rstrip().endswith("7")) for c in completions]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render(tokenizer, prompt, tools=None) -> list[int]:
    """The ids of a conversation as TRL's `_tokenize_prompts` renders it (generation prompt, tool schema)."""
    return tokenizer.apply_chat_template(
        prompt, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]


def fixed_rollout(tokenizer, mask_of=None):
    """A rollout function whose completions call the tool, read its result and answer (7 or 3 in turn): model turn,
    environment tokens, model turn; `mask_of(row, model, env)` may replace the env_mask it returns."""

    def rollout_func(prompts, trainer):
        completions, masks = [], []
        for row, _ in enumerate(prompts):
            first, env, last = (
                encode(tokenizer, TURN_1),
                encode(tokenizer, ENVIRONMENT),
                encode(tokenizer, ANSWERS[row % 2]),
            )
            completions.append(first + env + last)
            masks.append([1] * len(first) + [0] * len(env) + [1] * len(last))
        output = {"prompt_ids": [render(tokenizer, p) for p in prompts], "completion_ids": completions,
                  "logprobs": None, "env_mask": masks}  # fmt: skip
        if mask_of is not None:
            output = mask_of(output)
        return output

    return rollout_func


def rollout_trainer(tokenizer, tmp_path, rollout_func, **config):
    from rlsd import RLSDTrainer

    dataset = Dataset.from_list([{"prompt": QUESTION, "solution": "7"}] * 4)
    args = make_config(tmp_path, rlsd_lambda_decay_steps=0, **config)
    return RLSDTrainer(make_model(tokenizer), answer_reward, args=args, train_dataset=dataset,
                       processing_class=tokenizer, rollout_func=rollout_func)  # fmt: skip


def captured_inputs(module: torch.nn.Module) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    """The input ids of every forward of `module` from now on."""
    seen: list[torch.Tensor] = []

    def hook(_, args, kwargs):
        seen.append((kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).clone())

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


def test_teacher_scores_the_rollout_conversation_and_credit_skips_environment_tokens(tool_tokenizer, tmp_path):
    tokenizer = tool_tokenizer
    trainer = rollout_trainer(tokenizer, tmp_path, fixed_rollout(tokenizer), credit="rlsd")
    trainer.model.train()
    rows = [dict(row) for row in trainer.train_dataset]
    seen, handle = captured_inputs(trainer.teacher.model)
    output = trainer._generate_and_score_completions(rows)
    handle.remove()
    env = output["tool_mask"] == 0
    first, gap = len(encode(tokenizer, TURN_1)), len(encode(tokenizer, ENVIRONMENT))
    assert env.sum(1).tolist() == [gap] * 4 and env[:, first : first + gap].all()
    # the teacher's input: [teacher prompt (the rollout's conversation with the answer in its user turn) ; completion,
    # tool result included]
    teacher_prompt = render(tokenizer, render_teacher_prompt(QUESTION, trainer.args.teacher_template, answer="7"))
    expected = torch.cat([torch.tensor([teacher_prompt] * 4), output["completion_ids"]], dim=1)
    assert torch.equal(torch.cat(seen), expected)
    # credit: RLSD's token advantages are 0 on the environment's tokens and carry the verifier's sign elsewhere
    student = trainer.score_rollout("student", output).logps
    advantages = trainer.token_advantages(output, student)
    assert (advantages[env] == 0).all()
    signs = torch.sign(output["rlsd_seq_advantages"]).unsqueeze(1).expand_as(advantages)
    assert (torch.sign(advantages[~env]) == signs[~env]).all() and (advantages[~env] != 0).all()
    # the loss: the teacher's log-probs on environment tokens never reach it, on a model token they do
    trainer.current_gradient_accumulation_steps = 1  # set by HF's loop
    batch = {**output, "old_per_token_logps": student}
    loss = trainer.compute_loss(trainer.model, batch).item()
    moved = batch["rlsd_teacher_logps"].clone()
    moved[env] += 5.0
    assert trainer.compute_loss(trainer.model, {**batch, "rlsd_teacher_logps": moved}).item() == loss
    moved[:, 0] += 5.0
    assert trainer.compute_loss(trainer.model, {**batch, "rlsd_teacher_logps": moved}).item() != loss


def test_a_self_teacher_shown_nothing_gives_zero_delta_on_the_model_tokens(tool_tokenizer, tmp_path):
    trainer = rollout_trainer(tool_tokenizer, tmp_path, fixed_rollout(tool_tokenizer), credit="rlsd",
                              privileged_source="none", teacher_template="{prompt}")  # fmt: skip
    trainer.model.train()
    rows = [dict(row) for row in trainer.train_dataset]
    output = trainer._generate_and_score_completions(rows)
    mask = loss_mask(output).bool()
    delta = trainer.teacher_scores(rows, output).logps - trainer.score_rollout("student", output).logps
    assert mask.sum() > 0 and delta[mask].abs().max() < 1e-5


@pytest.mark.parametrize(
    ("mask_of", "message"),
    [
        (lambda out: {k: v for k, v in out.items() if k != "env_mask"}, r"rollout_func returned no 'env_mask' with "
         r"credit='rlsd'"),
        (lambda out: {**out, "env_mask": [m[:-1] for m in out["env_mask"]]}, r"env_mask of row 0 has \d+ values for "
         r"a completion of \d+ tokens"),
        (lambda out: {**out, "env_mask": [[*m[:-1], 2] for m in out["env_mask"]]}, r"env_mask of row 0 holds 2 at "
         r"token \d+ \(turn 1\)"),
    ],
)  # fmt: skip
def test_a_rollout_function_without_a_usable_env_mask_is_refused_naming_the_row(tool_tokenizer, tmp_path, mask_of,
                                                                                message):  # fmt: skip
    trainer = rollout_trainer(tool_tokenizer, tmp_path, fixed_rollout(tool_tokenizer, mask_of), credit="rlsd")
    trainer.model.train()
    with pytest.raises(ValueError, match=message):
        trainer._generate_and_score_completions([dict(row) for row in trainer.train_dataset])


def test_options_building_their_own_prompts_are_refused_by_name_with_a_rollout_function(tool_tokenizer, tmp_path):
    rollout_func = fixed_rollout(tool_tokenizer)
    with pytest.raises(NotImplementedError, match=r"teacher_aligned_prompts=0.5 with rollout_func"):
        rollout_trainer(tool_tokenizer, tmp_path, rollout_func, credit="rlsd", teacher_aligned_prompts=0.5)
    # without a teacher, TRL's option works as before: the rollout function is not wrapped
    assert rollout_trainer(tool_tokenizer, tmp_path, rollout_func, credit="grpo").rollout_func is rollout_func


class LookupEnv:
    """A hidden value that the `lookup` tool reveals; `reset` shows which key to ask for."""

    def reset(self, **kwargs):
        return " Observation: the key is a."

    def lookup(self, key: str) -> str:
        """Look a key up.

        Args:
            key: the key to look up.
        """
        return "7" if key == "a" else "unknown"


def test_environment_reset_observation_and_tool_schema_reach_the_teacher(parsing_tokenizer, tmp_path):
    tool_tokenizer = parsing_tokenizer
    from rlsd import RLSDTrainer

    dataset = Dataset.from_list([{"prompt": QUESTION, "solution": "7"}] * 4)

    def make(**config):
        return RLSDTrainer(make_model(tool_tokenizer), answer_reward, args=make_config(tmp_path, **config),
                           train_dataset=dataset, processing_class=tool_tokenizer,
                           environment_factory=LookupEnv)  # fmt: skip

    trainer = make(credit="rlsd", rlsd_lambda_decay_steps=0)
    assert not trainer.plan.skips_known_credit  # TRL renders each row's tool schema by its position: all rows
    trainer.model.train()
    rows = [dict(row) for row in dataset]
    seen, handle = captured_inputs(trainer.teacher.model)
    trainer._generate_and_score_completions(rows)
    handle.remove()
    observed = [*QUESTION[:-1], {**QUESTION[-1], "content": QUESTION[-1]["content"] + LookupEnv().reset()}]
    teacher_prompt = render_teacher_prompt(observed, trainer.args.teacher_template, answer="7")
    ids = render(tool_tokenizer, teacher_prompt, tools=[LookupEnv().lookup])
    assert tool_tokenizer.decode(ids).startswith("tools: lookupsystem: Use the tool.")
    assert torch.equal(torch.cat(seen)[:, : len(ids)], torch.tensor([ids] * 4))
    with pytest.raises(NotImplementedError, match=r"teacher_rollout_loss='brts' with environment_factory"):
        make(credit="rlsd", teacher_rollout_loss="brts")


def test_the_teacher_reads_trl_s_tool_loop_and_scores_only_the_model_turns(parsing_tokenizer, tmp_path, monkeypatch):
    """TRL's own tool loop (`tools=`): the model's turns are forced (a tool call, then an answer after the result)."""
    from rlsd import RLSDTrainer

    tokenizer = parsing_tokenizer
    dataset = Dataset.from_list([{"prompt": QUESTION, "solution": "7"}] * 4)
    args = make_config(tmp_path, credit="rlsd", rlsd_lambda_decay_steps=0, max_completion_length=96)
    trainer = RLSDTrainer(make_model(tokenizer), answer_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, tools=[lookup])  # fmt: skip
    call = encode(tokenizer, '<call>{"name": "lookup", "arguments": {"key": "a"}}</call><eos>')
    turns = []

    def forced_turn(prompt_ids, *args, **kwargs):
        turns.append(len(prompt_ids))
        if len(turns) == 1:
            return [list(call) for _ in prompt_ids], None
        return [encode(tokenizer, ANSWERS[row % 2]) for row in range(len(prompt_ids))], None

    monkeypatch.setattr(trainer, "_generate_single_turn", forced_turn)
    trainer.model.train()
    seen, handle = captured_inputs(trainer.teacher.model)
    output = trainer._generate_and_score_completions([dict(row) for row in dataset])
    handle.remove()
    assert turns == [4, 4]  # every row called the tool, then answered
    text = tokenizer.decode(output["completion_ids"][0][output["completion_mask"][0].bool()])
    assert text == tokenizer.decode(call) + "tool: 7assistant: " + "7<eos>"
    env = output["tool_mask"] == 0
    assert env.sum(1).tolist() == [len(encode(tokenizer, "tool: 7assistant: "))] * 4
    teacher_prompt = render(tokenizer, render_teacher_prompt(QUESTION, args.teacher_template, answer="7"), [lookup])
    assert torch.equal(torch.cat(seen), torch.cat([torch.tensor([teacher_prompt] * 4), output["completion_ids"]], 1))
    advantages = trainer.token_advantages(output, trainer.score_rollout("student", output).logps)
    assert (advantages[env] == 0).all() and (advantages[~env & output["completion_mask"].bool()] != 0).all()


def test_sod_weights_each_assistant_turn_of_a_multi_turn_rollout(tool_tokenizer, tmp_path):
    """SOD's step weights over the turns the env_mask separates: w_k = min((d_1 + eps) / (d_k + eps), 1 + delta),
    d_k the mean |Delta| over turn k, computed here row by row."""
    trainer = rollout_trainer(tool_tokenizer, tmp_path, fixed_rollout(tool_tokenizer), credit="sod", sod_c=0.5,
                              sod_delta=0.2, sod_eps=1e-6)  # fmt: skip
    trainer.model.train()
    rows = [dict(row) for row in trainer.train_dataset]
    output = trainer._generate_and_score_completions(rows)
    student = trainer.score_rollout("student", output).logps
    delta = (trainer.teacher_scores(rows, output).logps - student).double()
    ours = trainer.token_advantages(output, student).double()
    first = len(encode(tool_tokenizer, TURN_1))
    start = first + len(encode(tool_tokenizer, ENVIRONMENT))
    later = []
    for row in range(4):
        length = int(output["completion_mask"][row].sum())
        turns = [list(range(first)), list(range(start, length))]
        d = [sum(abs(delta[row, t].item()) for t in turn) / len(turn) for turn in turns]
        weights = [min((d[0] + 1e-6) / (dk + 1e-6), 1.2) for dk in d]
        a = output["rlsd_seq_advantages"][row].item()
        for weight, turn in zip(weights, turns, strict=True):
            for t in turn:
                assert ours[row, t].item() == pytest.approx(a + 0.5 * weight * delta[row, t].item(), abs=1e-6)
        assert (ours[row, first:start] == 0).all()
        later.append(weights[1])
    assert any(weight != pytest.approx(1.0) for weight in later)  # the second turn is weighted, not GRPO + OPSD


def test_a_gear_segment_runs_across_the_tool_result_into_the_next_turn():
    """GEAR's segment from a divergence spike in turn 1 covers turn 2 (up to the next spike); the environment's
    tokens between them, outside the mask, get 0. Spike |Delta| = 1 (threshold 0.703 = mean 0.109 + 2 std 0.297),
    weight clip(e^1) = 1.2, so A_it = 1 * (0.5 + 0.5 * 1.2) = 1.1 after it and 1 before it."""
    from rlsd.core.rules import RuleParams, Signals, get_rule

    delta = torch.tensor([[0.01, 0.01, 1.0, 0.01, 9.0, 9.0, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1]])  # turn 1, two environment tokens, turn 2
    student = torch.full_like(delta, -2.0)
    signals = Signals(torch.tensor([1.0]), mask, teacher_logps=student + delta, student_logps=student)
    advantages, _ = get_rule("gear").fn(signals, RuleParams(lam=0.5, clip=0.2, gear_spike_std=2.0))
    expected = [1.0, 1.0, 1.1, 1.1, 0.0, 0.0, 1.1, 1.1, 1.1, 1.1, 1.1, 1.1]
    torch.testing.assert_close(advantages[0].double(), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.slow  # an end-to-end run: warm start, three methods, report
def test_agent_demo_quick_trains_grpo_rlsd_and_sod_through_the_tool_loop(tmp_path, monkeypatch, capsys):
    import json

    from rlsd.commands.cli import main as cli_main

    monkeypatch.setenv("RLSD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "agent"
    assert cli_main(["demo", "--task", "agent", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "agent warm start: 10 supervised steps" in printed and "credit viewer" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "agent" and set(summary["methods"]) == {"grpo", "rlsd", "sod"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert {r["method"] for r in train} == {"grpo", "rlsd", "sod"}
    assert all("tools/call_frequency" in r for r in train)  # TRL's tool loop ran
    assert any("rlsd/lambda" in r for r in train if r["method"] == "rlsd")
    for row in (r for r in rows if r["kind"] == "eval"):
        assert len(row["correct"]) == 8 and 0.0 <= row["tool_call_rate"] <= 1.0
    page = (out / "report.html").read_text()
    assert 'class="tok"' in page  # the credit viewer over a sampled episode


def test_the_agent_task_s_environment_and_parser_round_trip():
    """The embedded agent task: the tool schema renders, the model's call parses into TRL's tool call, the tool
    answers only the row's key, and the reward reads the last turn."""
    from trl.chat_template_utils import parse_response, supports_tool_calling

    from rlsd.experiments.agent_task import (
        LookupEnv,
        agent_reward,
        build_agent_tokenizer,
        question,
        render_prompt,
        tool_suffix,
    )

    tokenizer = build_agent_tokenizer()
    assert supports_tool_calling(tokenizer)
    prompt = render_prompt(tokenizer, question("c"))
    assert tokenizer.decode(prompt) == "tools: lookup\nU: key c?\nA: "
    call = parse_response(tokenizer, encode(tokenizer, "[lookup key=c]<eos>"), prefix=prompt)
    assert call["tool_calls"] == [{"type": "function", "function": {"name": "lookup", "arguments": {"key": "c"}}}]
    env = LookupEnv()
    env.reset(prompt=question("c"), key="c", solution="5")
    assert (env.lookup("c"), env.lookup("d")) == ("5", "none")
    assert tokenizer.decode(tool_suffix(tokenizer, "5")) == "\nT: 5\nA: "
    turns = [[call, {"role": "tool", "content": "5"}, {"role": "assistant", "content": "5"}], [{"content": "3"}]]
    assert agent_reward(turns, solution=["5", "5"]) == [1.0, 0.0]


def test_tools_with_a_dataset_image_column_are_still_refused_with_a_teacher(tmp_path):
    """Images a tool returns reach the teacher (`tests/test_agent_tool_images.py`), so tools with a processor are not
    refused; a dataset's image column with tools is (the teacher prompt would be rebuilt from the dataset row)."""
    from PIL import Image

    from rlsd.infra.guards import check_rollout_supported, check_vision_supported

    args = make_config(tmp_path, credit="rlsd")
    check_rollout_supported(args, environment_factory=True, rollout_func=True)  # text rollouts are supported
    dataset = Dataset.from_list([{"prompt": QUESTION, "image": Image.new("RGB", (28, 28)), "solution": "7"}])
    with pytest.raises(NotImplementedError, match=r"images with tools and credit='rlsd'"):
        check_vision_supported({"train_dataset": dataset}, args, has_images=True, is_vlm=True, tools=True,
                               environment_factory=False, rollout_func=False)  # fmt: skip
