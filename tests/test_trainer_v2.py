"""Trainer v2 (issue 10): the teacher skips rows whose credit is known, the EMA teacher's fp32 shadow, the fused
head of copy teachers, AntiSD's gate in eval, the lambda warm-up, token-weighted metrics, deferred credit, dropout,
the span mask, negative_only and ZeRO-3 copy teachers."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import pytest
import torch
from conftest import build_trainer, make_config, make_dataset, make_model, parity_reward
from transformers import set_seed

from rlsd.plan import Stages

MULTIPLICATIVE = ["rlsd", "rlrt", "gear", "egrsd", "cl-egrsd"]


build = build_trainer


def mixed_reward(constant_row: int):
    """A reward constant on dataset row `constant_row` (a group with A_i = 0) and the completion's parity elsewhere."""
    constant = make_dataset()[constant_row]["solution"]

    def reward(completions, solution, **kwargs):
        texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
        parity = [float(zlib.crc32(t.encode()) % 2) for t in texts]
        return [0.5 if s == constant else p for p, s in zip(parity, solution, strict=True)]

    return reward


def rollout(trainer, row_indices, mode: str = "train"):
    """The trainer's rollout on one group per dataset row, seeded so that two calls sample the same completions."""
    trainer.model.train(mode == "train")
    dataset = make_dataset()
    rows = [dataset[i] for i in row_indices for _ in range(trainer.num_generations)]
    set_seed(0)
    return trainer._generate_and_score_completions(rows)


def count_teacher_rows(module) -> list[int]:
    """Rows of every log-prob forward (TRL's fused head) through `module`."""
    rows: list[int] = []

    def hook(_module, args, kwargs):
        if kwargs.get("fused_lm_head"):
            rows.append((kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).size(0))

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return rows


# --------------------------------------------------------------------------- defect 7: rows with A_i = 0 skipped
@pytest.mark.parametrize("credit", MULTIPLICATIVE)
@pytest.mark.parametrize("final_at_rollout", [True, False])
# rows: (scored row, constant row); the constant prompt is shorter than the scored one, then longer
@pytest.mark.parametrize("rows", [(1, 0), (0, 2)])
def test_teacher_skips_zero_advantage_rows_with_identical_advantages(tokenizer, tmp_path, credit, final_at_rollout,
                                                                     rows):  # fmt: skip
    # num_iterations=2 makes TRL compute old log-probs, so the credit is final at rollout time; otherwise it waits
    # for the loss's forward, which `token_advantages` stands for here with fixed student log-probs
    trainer = build(tokenizer, tmp_path, reward=mixed_reward(rows[1]), credit=credit, teacher="synced",
                    per_device_train_batch_size=8, num_iterations=2 if final_at_rollout else 1)  # fmt: skip
    forwarded = count_teacher_rows(trainer.teacher.model)
    skipped = rollout(trainer, rows)
    skipped_rows = sum(forwarded)
    trainer.stages = Stages(trainer.args, row_subsets=False)  # as for a vision model: every row is scored
    trainer.plan = trainer.stages.plan_for(1)
    forwarded.clear()
    full = rollout(trainer, rows)
    assert torch.equal(skipped["completion_ids"], full["completion_ids"])
    if final_at_rollout:
        ours, reference = skipped["advantages"], full["advantages"]
        known = (reference == 0).all(1)
    else:
        student = torch.randn(full["completion_mask"].shape, generator=torch.Generator().manual_seed(0)) - 3.0
        ours = trainer.token_advantages(skipped, student, "train")
        logged_delta = trainer._metrics["train"]["rlsd/delta_mean"][-1]
        reference = trainer.token_advantages(full, student, "train")
        known = full["rlsd_seq_advantages"] == 0
        # the rule's metrics are over the scored rows only
        scored_tokens = full["completion_mask"].bool() & ~known.unsqueeze(1)
        delta = (skipped["rlsd_teacher_logps"] - student).double()[scored_tokens]
        assert logged_delta == pytest.approx(delta.mean().item(), rel=1e-6)
    assert 0 < int(known.sum()) < 8, "the batch must mix zero and non-zero A_i"
    assert torch.equal(ours[known], reference[known]) and (ours[known] == 0).all()
    if rows == (1, 0):  # the scored rows are padded as in the full batch: bit for bit the same
        assert torch.equal(ours, reference)
    else:  # their teacher prompts are left-padded less: float32 rounding of the teacher forward only
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    assert (ours[~known] != 0).any()
    assert sum(forwarded) == 8  # without the skip, the teacher scores every row
    assert skipped_rows == int((~known).sum())  # with it, only the rows with A_i != 0


def test_teacher_runs_no_forward_when_every_advantage_is_zero(tokenizer, tmp_path):
    trainer = build(tokenizer, tmp_path, reward=mixed_reward(0), teacher="synced", per_device_train_batch_size=4)
    rows = count_teacher_rows(trainer.teacher.model)
    output = rollout(trainer, [0])
    assert rows == []
    student = torch.zeros(output["completion_mask"].shape)
    assert torch.equal(trainer.token_advantages(output, student, "train"), torch.zeros_like(student))


def test_teacher_rows_are_topped_up_to_the_largest_count_over_processes(tokenizer, tmp_path, monkeypatch):
    trainer = build(tokenizer, tmp_path, teacher="live")
    advantages = torch.tensor([0.0, 1.0, 0.0, 0.0, -2.0, 0.0, 0.0, 0.0])
    monkeypatch.setattr(trainer.accelerator, "gather", lambda count: torch.cat([count, count.new_tensor([5])]))
    # another process scores 5 rows: this one runs 5 too (its 2, then rows of known credit), so that both run the
    # same number of forward chunks
    assert trainer.credit.teacher_rows(advantages).tolist() == [1, 4, 0, 2, 3]
    monkeypatch.setattr(trainer.accelerator, "gather", lambda count: torch.cat([count, count.new_tensor([0])]))
    assert trainer.credit.teacher_rows(advantages).tolist() == [1, 4]


def test_teacher_scores_every_row_for_additive_rules(tokenizer, tmp_path):
    trainer = build(tokenizer, tmp_path, reward=mixed_reward(0), teacher="synced", per_device_train_batch_size=8,
                    credit="antisd")  # fmt: skip
    rows = count_teacher_rows(trainer.teacher.model)
    output = rollout(trainer, [1, 0])
    assert "rlsd_scored" not in output
    assert sum(rows) == 8


def test_with_a_distillation_loss_the_teacher_runs_once_and_scores_every_row(tokenizer, tmp_path):
    # credit=rlsd and distill_loss=jsd both need the teacher: one loss-time pass serves both (no rollout pass)
    trainer = build(tokenizer, tmp_path, reward=mixed_reward(0), teacher="synced", per_device_train_batch_size=8,
                    credit="rlsd", distill_loss="jsd")  # fmt: skip
    rows: list[int] = []
    trainer.teacher.model.model.register_forward_hook(lambda module, args, out: rows.append(out[0].size(0)))
    heads: list[int] = []
    trainer.teacher.model.lm_head.register_forward_hook(lambda module, args, out: heads.append(out.size(0)))
    output = rollout(trainer, [1, 0])
    assert rows == [] and "rlsd_teacher_logps" not in output and "rlsd_seq_advantages" in output
    trainer.current_gradient_accumulation_steps = 1  # set by HF's training loop
    trainer._compute_loss(trainer.model, output)
    assert rows == [8]  # one teacher backbone forward over every row, at loss time
    assert heads == []  # and no head projection of all positions to discard
    assert sorted(k for k in trainer._metrics["train"] if k.startswith("rlsd/delta"))  # the rule ran on its log-probs


# ------------------------------------------------------------------------- defect 4: the EMA teacher in bf16 moves
def drifting_policy(tokenizer, start: torch.nn.Module, relative: float = 5e-5):
    """An fp32 policy (as fp32 master weights are) starting at `start`'s weights, and a function that moves every
    weight by `relative` of its size in a fixed direction: one small optimizer step."""
    policy = make_model(tokenizer).float()
    policy.load_state_dict({k: v.float() for k, v in start.state_dict().items()})
    generator = torch.Generator().manual_seed(0)
    drifts = [
        torch.randn(p.shape, generator=generator).sign() * p.detach().abs() * relative for p in policy.parameters()
    ]

    def step() -> None:
        with torch.no_grad():
            for p, d in zip(policy.parameters(), drifts, strict=True):
                p.add_(d)

    return policy, step


@pytest.fixture
def accelerator():
    """The accelerate state that TRL's sync helpers read, as a trainer would have set it up."""
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_bf16_ema_teacher_moves_as_far_as_the_exact_ema(tokenizer, accelerator):
    from rlsd.teachers import SelfTeacher

    start = make_model(tokenizer).to(torch.bfloat16)
    teacher = SelfTeacher("ema", start, sync_steps=1, ema_decay=0.95, temperature=1.0)
    initial = [p.detach().double() for p in teacher.model.parameters()]
    exact = [p.clone() for p in initial]
    policy, step = drifting_policy(tokenizer, start)
    for k in range(1, 101):
        step()
        teacher.on_optimizer_step(k, policy)
        for e, p in zip(exact, policy.parameters(), strict=True):
            e.mul_(0.95).add_(p.detach().double(), alpha=0.05)
    # the exact EMA (float64) rounded once to bf16 is the best a bf16 teacher can hold
    best = [e.to(torch.bfloat16).double() for e in exact]
    moved = sum((p.double() - i).abs().sum() for p, i in zip(teacher.model.parameters(), initial, strict=True))
    expected = sum((b - i).abs().sum() for b, i in zip(best, initial, strict=True))
    assert expected > 0
    assert moved / expected == pytest.approx(1.0, abs=0.01)  # averaged in bf16 itself, it moves about 5% as far
    for p, e in zip(teacher.model.parameters(), exact, strict=True):
        assert p.dtype == torch.bfloat16  # the teacher itself stays bf16: it is the shadow's rounding
        torch.testing.assert_close(p.double(), e.to(torch.bfloat16).double(), rtol=2**-8, atol=1e-12)


def test_ema_shadow_survives_a_checkpoint(tokenizer, tmp_path, accelerator):
    from rlsd.teachers import SelfTeacher

    start = make_model(tokenizer).to(torch.bfloat16)
    straight = SelfTeacher("ema", start, sync_steps=1, ema_decay=0.95, temperature=1.0)
    policy, step = drifting_policy(tokenizer, start, relative=2e-4)
    for k in range(1, 21):
        step()
        straight.on_optimizer_step(k, policy)
    straight.save(str(tmp_path), lambda m: m)
    resumed = SelfTeacher("ema", start, sync_steps=1, ema_decay=0.95, temperature=1.0)
    resumed.load(str(tmp_path), lambda m: m)
    for k in range(21, 81):  # restarting the shadow from the bf16 weights would change hundreds of them by now
        step()
        straight.on_optimizer_step(k, policy)
        resumed.on_optimizer_step(k, policy)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- defect 9: smaller ones
def test_eval_rollouts_do_not_move_the_antisd_gate(tokenizer, tmp_path):
    trainer = build(tokenizer, tmp_path, credit="antisd", teacher="live", antisd_warmup_steps=2,
                    per_device_eval_batch_size=4)  # fmt: skip
    rollout(trainer, [1], mode="eval")
    assert trainer.rule_state.history == [] and trainer.rule_state.on
    rollout(trainer, [1], mode="train")
    assert len(trainer.rule_state.history) == 1  # training rollouts do feed it


@pytest.mark.parametrize(
    ("warmup", "decay", "expected"),
    [
        (3, 5, [0.5 / 3, 1.0 / 3, 0.5, 0.4, 0.3, 0.2]),  # lam_0 once, at k = W, then 1/D of it less per step
        (1, 2, [0.5, 0.25, 0.0, 0.0]),
        (0, 5, [0.5, 0.4, 0.3]),  # without warm-up: unchanged, lam_0 at k = 1
    ],
)
def test_lambda_warmup_reaches_lam0_once_and_decays_from_the_next_step(warmup, decay, expected):
    from rlsd.core.credit import rlsd_lambda

    values = [rlsd_lambda(k, lam0=0.5, warmup_steps=warmup, decay_steps=decay) for k in range(1, warmup + 4)]
    assert values == pytest.approx(expected[: warmup + 3], abs=1e-12)


def hand_batch(lengths: list[int], advantages: list[float], delta: float):
    """A credit batch of rows with `lengths` completion tokens, sequence advantages A_i and Delta on every token."""
    width = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    student = torch.full(mask.shape, -1.0)
    batch = {
        "completion_mask": mask,
        "completion_ids": torch.full(mask.shape, 10),
        "rlsd_has_context": torch.ones(len(lengths), dtype=torch.bool),
        "rlsd_teacher_logps": student + delta,
        "rlsd_seq_advantages": torch.tensor(advantages),
        "rlsd_lam": torch.tensor(0.5, dtype=torch.float64),
    }
    return batch, student


def test_rule_metrics_are_token_weighted_across_processes(tokenizer, tmp_path, monkeypatch):
    import math

    trainer = build(tokenizer, tmp_path, teacher="live")
    remote: dict[str, torch.Tensor] = {}

    def keep(tensor):  # "process 1" computes its metrics: keep what it would send
        remote["sent"] = tensor
        return tensor

    monkeypatch.setattr(trainer.accelerator, "gather", keep)
    trainer.token_advantages(*hand_batch([1], [1.0], math.log(2.0)), "train")  # 1 token, Delta = log 2, w = 2
    trainer._metrics["train"].clear()
    monkeypatch.setattr(trainer.accelerator, "gather", lambda tensor: torch.cat([tensor, remote["sent"]]))
    trainer.token_advantages(*hand_batch([3], [1.0], 0.0), "train")  # "process 0": 3 tokens, Delta = 0, w = 1
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    assert metrics["rlsd/delta_mean"] == pytest.approx(math.log(2.0) / 4)  # not the mean of means, log(2) / 2
    assert metrics["rlsd/weight_mean"] == pytest.approx((2.0 + 3 * 1.0) / 4)
    assert metrics["rlsd/clip_high_frac"] == pytest.approx(1 / 4)
    assert metrics["rlsd/adv_mean"] == pytest.approx((1.1 + 3 * 1.0) / 4)
    assert metrics["rlsd/nonfinite_count"] == 0.0


def test_deferred_credit_without_the_scoring_hook_raises(tokenizer, tmp_path, monkeypatch):
    from trl import GRPOTrainer

    trainer = build(tokenizer, tmp_path, teacher="live")
    batch = rollout(trainer, [1])
    trainer.current_gradient_accumulation_steps = 1
    assert "rlsd_teacher_logps" in batch  # the credit waits for the loss's forward
    plain = GRPOTrainer._get_per_token_logps_and_entropies.__get__(trainer)
    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", plain)  # a loss that never calls the hook
    with pytest.raises(RuntimeError, match="sequence advantages"):
        trainer._compute_loss(trainer.model, batch)


def test_dropout_is_disabled_when_a_teacher_is_used(tokenizer, tmp_path):
    model = make_model(tokenizer)
    model.model.add_module("extra_dropout", torch.nn.Dropout(0.3))
    trainer = build(tokenizer, tmp_path, model=model, teacher="synced")
    assert trainer.args.disable_dropout
    for module in (trainer.model, trainer.teacher.model):
        assert all(m.p == 0 for m in module.modules() if isinstance(m, torch.nn.Dropout))
    grpo_model = make_model(tokenizer)
    grpo_model.model.add_module("extra_dropout", torch.nn.Dropout(0.3))
    grpo = build(tokenizer, tmp_path / "grpo", model=grpo_model, credit="grpo")
    assert not grpo.args.disable_dropout and grpo.model.model.extra_dropout.p == 0.3  # GRPO: TRL's choice


def test_attention_dropout_with_a_teacher_is_refused(tokenizer, tmp_path):
    model = make_model(tokenizer)
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.1
    with pytest.raises(ValueError, match=r"attention_dropout=0\.1"):
        build(tokenizer, tmp_path, model=model, teacher="live")


def test_think_span_mask_by_hand():
    from rlsd.core.credit import think_span_mask

    pieces = [
        ["<think>", "a", "b", "</think>", "c"],  # the tags' tokens are outside the span
        list("<think>ab</think>c"),  # a character vocabulary: tags spread over tokens
        ["a", "b", "</think>", "c"],  # the prompt opened the span
        ["<think>", "a", "b"],  # truncated inside the span
        ["a", "b", "c"],  # no reasoning span: nothing is reweighted
        ["<th", "ink>a", "b", "</think>"],  # a token straddling the tag's end is outside
    ]
    mask = think_span_mask(pieces, width=19)
    expected = [
        [0, 1, 1, 0, 0],
        [0] * 7 + [1, 1] + [0] * 9,
        [1, 1, 0, 0],
        [0, 1, 1],
        [0, 0, 0],
        [0, 0, 1, 0],
    ]
    for row, values in enumerate(expected):
        assert mask[row].tolist() == [bool(v) for v in values] + [False] * (19 - len(values)), row


@pytest.mark.parametrize("credit", ["rlsd", "egrsd"])
def test_span_think_reweights_only_tokens_inside_the_reasoning_span(tokenizer, tmp_path, credit):
    import math

    trainer = build(tokenizer, tmp_path, teacher="live", credit=credit, rlsd_span="think")
    text = "<think>ab</think>c"
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    batch, student = hand_batch([ids.size(1)], [1.0], math.log(2.0))
    batch["completion_ids"] = ids
    batch["rlsd_teacher_entropy"] = torch.zeros(ids.shape)
    adv = trainer.token_advantages(batch, student, "train")
    assert ids.size(1) == 5  # the tiny tokenizer's tags are single tokens
    inside = torch.tensor([False, True, True, False, False])  # "a" and "b"
    assert torch.equal(adv[0, ~inside], torch.ones(int((~inside).sum())))  # A_it = A_i outside the span
    torch.testing.assert_close(adv[0, inside], torch.full((2,), 1.1))  # w = 2 clipped to 1.2, 0.5 + 0.5 * 1.2


@pytest.mark.parametrize("credit", ["rlsd", "egrsd", "cl-egrsd"])
def test_span_and_negative_only_run_a_training_step(tokenizer, tmp_path, credit):
    trainer = build(tokenizer, tmp_path, teacher="live", credit=credit, rlsd_span="think", rlsd_negative_only=True)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


@pytest.mark.parametrize("credit", ["grpo", "opsd", "grpo+opsd", "rlrt", "antisd", "sod", "uni-opd", "gear"])
@pytest.mark.parametrize("option", [{"rlsd_negative_only": True}, {"rlsd_span": "think"}])
def test_rules_that_cannot_honour_negative_only_or_the_span_refuse_them(tmp_path, credit, option):
    with pytest.raises(ValueError, match=re.escape(f"credit={credit!r} does not honour")):
        make_config(tmp_path, credit=credit, **option)


@pytest.mark.parametrize("credit", ["egrsd", "cl-egrsd"])
def test_entropy_gated_rules_honour_negative_only(credit):
    import math

    from rlsd.core.rules import RuleParams, Signals, get_rule

    entropy = torch.full((2, 2), math.log(100) / 2, dtype=torch.float64)  # gate 0.5 everywhere
    student = torch.full((2, 2), -1.0, dtype=torch.float64)
    signals = Signals(seq_advantages=torch.tensor([1.0, -2.0], dtype=torch.float64), mask=torch.ones(2, 2),
                      teacher_logps=student + math.log(2.0), student_logps=student, teacher_entropy=entropy,
                      vocab_size=100)  # fmt: skip
    adv, _ = get_rule(credit).fn(signals, RuleParams(negative_only=True))
    # A = +1 keeps A_i (no RLSD weight, no gate); A = -2: w = 1/2 clipped to 0.8, -2 * (0.5 + 0.4) * 0.5
    torch.testing.assert_close(adv, torch.tensor([[1.0, 1.0], [-0.9, -0.9]], dtype=torch.float64))


# ------------------------------------------------------------------ defect 5: copies get the policy's fp32 head
def untied_bf16_model(tokenizer):
    """make_model's tiny Qwen2 with an untied LM head (TRL casts only an untied head to fp32), in bf16."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@pytest.mark.parametrize("teacher", ["synced", "ema", "initial"])
def test_copy_teacher_with_fp32_head_scores_exactly_like_the_policy(tokenizer, tmp_path, teacher):
    trainer = build(tokenizer, tmp_path, model=untied_bf16_model(tokenizer), teacher=teacher,
                    cast_lm_head_to_fp32=True)  # fmt: skip
    dataset = make_dataset()
    rows = [dataset[i] for i in (0, 1, 2, 3)]
    output = rollout(trainer, [0])  # step 1: the teacher's weights are the policy's
    prompt_ids, prompt_mask, _, _ = trainer.teacher_inputs(rows, output)
    completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
    teacher_logps = trainer.teacher_scores(rows, output).logps
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([prompt_mask, completion_mask], dim=1)
    with torch.no_grad():
        policy_logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention,
                                                                        completion_ids.size(1))  # fmt: skip
    delta = (teacher_logps - policy_logps)[completion_mask.bool()]
    assert delta.numel() > 0 and torch.equal(delta, torch.zeros_like(delta))  # |Delta| = 0 on every token
    head = trainer.teacher.model.get_output_embeddings()
    assert head.weight.dtype == torch.float32
    assert head.weight.data_ptr() != trainer.model.get_output_embeddings().weight.data_ptr()
    hidden = torch.randn(2, 32, dtype=torch.bfloat16)
    torch.testing.assert_close(head(hidden), torch.nn.functional.linear(hidden.float(), head.weight), rtol=0, atol=0)


# -------------------------------------------------------------------- defect 1: ZeRO-3 and full-model copies
def zero3_partitioned(model: torch.nn.Module) -> torch.nn.Module:
    """What DeepSpeed's zero.Init leaves of each parameter (simulated): `ds_*` attributes, an empty `.data`."""
    for index, param in enumerate(model.parameters()):
        param.ds_id, param.ds_numel, param.ds_shape = index, param.numel(), param.shape
        param.ds_tensor = param.data.flatten()[:2].clone()
        param.data = torch.empty(0, dtype=param.dtype)
    return model


@pytest.mark.parametrize("mode", ["synced", "ema", "initial"])
def test_copy_teachers_of_a_zero3_partitioned_policy_are_refused(tokenizer, mode):
    from rlsd.teachers import SelfTeacher

    policy = zero3_partitioned(make_model(tokenizer))
    with pytest.raises(ValueError, match=r"ZeRO-3 partitioned.*teacher='live'"):
        SelfTeacher(mode, policy, sync_steps=1, ema_decay=0.9, temperature=1.0)
    assert SelfTeacher("live", policy, sync_steps=1, ema_decay=0.9, temperature=1.0).model is None


def test_the_zero3_recipe_uses_a_teacher_without_a_copy():
    import yaml

    path = Path(__file__).parent.parent / "recipes" / "qwen3-1.7b-gsm8k-zero3-8gpu.yaml"
    recipe = yaml.safe_load(path.read_text())
    assert recipe["teacher"] == "live"


# ------------------------------------------------------------------ defect 8: Uni-OPD groups on TRL's global layout
def test_uni_opd_groups_straddling_processes_follow_the_global_layout(tokenizer, tmp_path, monkeypatch):
    from rlsd.core.rules import RuleParams, Signals, get_rule

    trainer = build(tokenizer, tmp_path, credit="uni-opd", teacher="live")  # groups of 4
    width = 3
    mask = torch.ones(4, width, dtype=torch.long)
    student = torch.full((4, width), -1.0)
    teacher = student + torch.tensor([0.3, -0.2, 0.1, 0.0]).unsqueeze(1)  # per-row Delta
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    # the whole batch is one group of 4; this is process 1 of 2 and holds rows 2 and 3
    local = {"completion_mask": mask[2:], "completion_ids": torch.full((2, width), 10),
             "rlsd_has_context": torch.ones(2, dtype=torch.bool), "rlsd_teacher_logps": teacher[2:],
             "rlsd_seq_advantages": advantages[2:], "rlsd_lam": torch.tensor(0.5, dtype=torch.float64)}  # fmt: skip
    remote = [advantages[:2], mask[:2], teacher[:2], student[:2], torch.zeros(2, width, dtype=torch.long)]
    monkeypatch.setattr(trainer.accelerator, "gather", lambda t: torch.cat([remote.pop(0), t]) if remote else t)
    monkeypatch.setattr(type(trainer.accelerator), "process_index", property(lambda self: 1))
    ours = trainer.token_advantages(local, student[2:], "train")
    signals = Signals(advantages, mask, teacher, student, group_ids=torch.zeros(4, dtype=torch.long))
    expected, _ = get_rule("uni-opd").fn(signals, RuleParams(uniopd_margin=trainer.args.uniopd_margin))
    torch.testing.assert_close(ours, expected[2:].to(ours.dtype))
    # the local rows alone form a different group: the old, local grouping would not give this
    alone, _ = get_rule("uni-opd").fn(
        Signals(advantages[2:], mask[2:], teacher[2:], student[2:], group_ids=torch.zeros(2, dtype=torch.long)),
        RuleParams(uniopd_margin=trainer.args.uniopd_margin),
    )
    assert not torch.allclose(alone.to(ours.dtype), ours)


# ------------------------------------------------------- defect 10: teacher prompts from the prompts TRL actually used
def test_rollout_functions_with_a_teacher_refuse_only_options_that_build_their_own_prompts(tokenizer, tmp_path):
    """A teacher reads a rollout function's conversation (`tests/test_agents.py`); teacher rollouts, which generate
    from the dataset prompts outside it, are refused by name."""
    from rlsd import RLSDTrainer

    def rollout_func(prompts, trainer):
        raise AssertionError("never called: only construction is checked")

    def make(**config):
        args = make_config(tmp_path, **config)
        return RLSDTrainer(make_model(tokenizer), parity_reward, args=args, train_dataset=make_dataset(),
                           processing_class=tokenizer, rollout_func=rollout_func)  # fmt: skip

    with pytest.raises(NotImplementedError, match=r"teacher_rollout_loss='brts' with rollout_func"):
        make(credit="rlsd", teacher_rollout_loss="brts")
    assert make(credit="grpo", distill_loss="jsd").rollout_func is not rollout_func  # wrapped: its env_mask is checked
    assert make(credit="grpo").rollout_func is rollout_func  # without a teacher, TRL's option works as before


# ------------------------------------------------------------------ cost: a live teacher computes no entropy
@pytest.mark.parametrize(("credit", "outputs"), [("rlsd", ("log_probs",)), ("egrsd", ("log_probs", "entropy"))])
def test_a_live_teacher_asks_the_fused_head_only_for_what_the_rule_reads(tokenizer, tmp_path, monkeypatch, credit,
                                                                          outputs):  # fmt: skip
    import trl.trainer.utils as trl_utils

    trainer = build(tokenizer, tmp_path, teacher="live", credit=credit)
    rows = [make_dataset()[0]] * trainer.num_generations
    output = rollout(trainer, [0])
    asked = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", lambda *a: asked.append(a[-1]) or apply(*a))
    scores = trainer.teacher_scores(rows, output)
    assert asked == [outputs]  # TRL's head on the policy computes the entropy on every call
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
    mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    with torch.no_grad():  # the policy's own forward is back after the teacher pass, entropy included
        trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, output["completion_ids"].size(1),
                                                   compute_entropy=True)  # fmt: skip
    assert asked[-1] == ("log_probs", "entropy")
    assert scores.logps.shape == output["completion_ids"].shape


# ------------------------------------------------------------- cost: the teacher prompt computed once per group
def test_prefix_sharing_scores_like_the_plain_pass_and_runs_each_teacher_prompt_once(tokenizer, tmp_path):
    from rlsd.step.scorer import whole_groups

    plain = build(tokenizer, tmp_path / "plain", teacher="live")
    shared = build(tokenizer, tmp_path / "shared", teacher="live", teacher_prefix_sharing=True)
    shared.model.load_state_dict(plain.model.state_dict())
    output = rollout(plain, [0, 1])  # two groups of 4, different prompts
    rows = [make_dataset()[i] for i in (0, 1) for _ in range(4)]
    seen: list[int] = []
    shared.model.model.register_forward_hook(lambda module, args, out: seen.append(out[0].shape[:2]))
    expected = plain.teacher_scores(rows, output).logps
    got = shared.teacher_scores(rows, output).logps
    mask = output["completion_mask"].bool()
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=0)
    # a chunk of per_device_train_batch_size = 4 rows is one group: its prompt once, then its 4 completions
    assert [rows for rows, _ in seen] == [1, 4, 1, 4]
    # through TRL's fused head: the prompt but its last token, then that token and the completion per row
    assert all(length == output["completion_ids"].size(1) + 1 for _, length in seen[1::2])
    assert whole_groups(torch.tensor([4, 5, 6, 7]), 4) and not whole_groups(torch.tensor([1, 2, 3, 4]), 4)
