"""`rlsd.step.scoring.score_tokens`: the plain path against TRL and a hand-written forward, the prefix-reuse path
against the plain one, the prompt run once per group, and the fallbacks."""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
from conftest import make_model

from rlsd.step.scoring import ScoreResult, prefix_reuse_blocker, score_tokens

GROUP = 4
ROWS = 12
PROMPT_LENGTHS = (11, 6, 8)  # one per group: left padding differs across groups
PROMPT_WIDTH = 11
COMPLETION_WIDTH = 7
TEMPERATURE = 0.7
ATOL = 1e-5


def make_batch(tokenizer, seed: int = 0) -> dict[str, torch.Tensor]:
    """B=12 rows, G=4: left-padded prompts of different lengths across groups (identical within a group) and
    right-padded completions of different lengths (one of them full width)."""
    gen = torch.Generator().manual_seed(seed)
    low, high = 3, len(tokenizer)
    prompts = torch.randint(low, high, (ROWS // GROUP, PROMPT_WIDTH), generator=gen).repeat_interleave(GROUP, 0)
    lengths = torch.tensor(PROMPT_LENGTHS).repeat_interleave(GROUP)
    prompt_mask = (torch.arange(PROMPT_WIDTH)[None] >= PROMPT_WIDTH - lengths[:, None]).long()
    completions = torch.randint(low, high, (ROWS, COMPLETION_WIDTH), generator=gen)
    completion_lengths = torch.randint(1, COMPLETION_WIDTH + 1, (ROWS,), generator=gen)
    completion_lengths[0] = COMPLETION_WIDTH
    completion_mask = (torch.arange(COMPLETION_WIDTH)[None] < completion_lengths[:, None]).long()
    return {
        "prompt_ids": prompts.masked_fill(prompt_mask == 0, tokenizer.pad_token_id),
        "prompt_mask": prompt_mask,
        "completion_ids": completions.masked_fill(completion_mask == 0, tokenizer.pad_token_id),
        "completion_mask": completion_mask,
    }


@pytest.fixture
def scored_model(tokenizer) -> torch.nn.Module:
    return make_model(tokenizer).eval()


def score(model: torch.nn.Module, batch: dict[str, torch.Tensor], **kwargs) -> ScoreResult:
    """`score_tokens` on `batch` with every output on, at the test temperature."""
    options = {"temperature": TEMPERATURE, "batch_size": 5, "with_entropy": True, "with_hidden": True, **kwargs}
    return score_tokens(model, **batch, **options)


def assert_close_on_mask(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> None:
    """Equal within ATOL on the completion-mask positions."""
    keep = mask.bool()
    torch.testing.assert_close(actual[keep], expected[keep], atol=ATOL, rtol=0)


@contextlib.contextmanager
def counted_tokens(model: torch.nn.Module) -> Iterator[list[int]]:
    """The number of input tokens (rows x columns) of every backbone forward while open."""
    counts: list[int] = []

    def hook(_module, _args, kwargs):
        counts.append(kwargs["input_ids"].numel())

    handle = model.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counts
    finally:
        handle.remove()


def reference_scores(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hand-written: one full forward on [prompt ; completion], logits at the T positions before each completion
    token, / temperature, log_softmax, gather; the backbone's output at the same positions."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    width = batch["completion_ids"].size(1)
    logprobs = torch.log_softmax(logits[:, -width - 1 : -1].float() / TEMPERATURE, dim=-1)
    logps = logprobs.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logps, entropy, hidden[:, -width - 1 : -1]


def test_plain_path_matches_reference_forward(tokenizer, scored_model):
    batch = make_batch(tokenizer)
    result = score(scored_model, batch)
    logps, entropy, hidden = reference_scores(scored_model, batch)
    mask = batch["completion_mask"]
    assert result.logps.shape == (ROWS, COMPLETION_WIDTH) and result.logps.dtype == torch.float32
    assert result.hidden.shape == (ROWS, COMPLETION_WIDTH, scored_model.config.hidden_size)
    assert_close_on_mask(result.logps, logps, mask)
    assert_close_on_mask(result.entropy, entropy, mask)
    assert_close_on_mask(result.hidden, hidden, mask)
    assert (result.logps[mask == 0] == 0).all() and (result.entropy[mask == 0] == 0).all()


def test_plain_path_matches_trl_scoring(tokenizer, scored_model):
    """Against TRL's own `_get_per_token_logps_and_entropies` (fused LM head), called unbound with a stub trainer;
    both of our paths also run on the patched model, whose plain forward is the original one."""
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    batch = make_batch(tokenizer)
    patched = copy.deepcopy(scored_model)
    add_fused_lm_head(patched, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))
    stub = SimpleNamespace(accelerator=SimpleNamespace(autocast=contextlib.nullcontext))
    trl_scores = inspect.unwrap(GRPOTrainer._get_per_token_logps_and_entropies)  # past the profiling decorator
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with torch.no_grad():
        trl_logps, trl_entropy, _ = trl_scores(
            stub, patched, input_ids, attention_mask, COMPLETION_WIDTH, batch_size=5, compute_entropy=True
        )
    for group_size in (1, GROUP):
        result = score(patched, batch, group_size=group_size)
        torch.testing.assert_close(result.logps, trl_logps, atol=ATOL, rtol=0)
        torch.testing.assert_close(result.entropy, trl_entropy, atol=ATOL, rtol=0)


@pytest.mark.parametrize("batch_size", [1, 4, 5, 8, 12])
def test_prefix_path_matches_plain_path(tokenizer, scored_model, batch_size):
    """Chunks of whole groups, whatever batch_size (1 still takes one group of 4 per chunk)."""
    batch = make_batch(tokenizer)
    plain = score(scored_model, batch, batch_size=batch_size)
    prefix = score(scored_model, batch, batch_size=batch_size, group_size=GROUP)
    mask = batch["completion_mask"]
    assert prefix.logps.shape == plain.logps.shape and prefix.hidden.shape == plain.hidden.shape
    assert_close_on_mask(prefix.logps, plain.logps, mask)
    assert_close_on_mask(prefix.entropy, plain.entropy, mask)
    assert_close_on_mask(prefix.hidden, plain.hidden, mask)
    assert (prefix.logps[mask == 0] == 0).all()


def test_outputs_left_off_are_none(tokenizer, scored_model):
    batch = make_batch(tokenizer)
    for group_size in (1, GROUP):
        result = score_tokens(scored_model, **batch, temperature=1.0, batch_size=ROWS, group_size=group_size)
        assert result.entropy is None and result.hidden is None


def test_prefix_path_runs_each_prompt_once_per_group(tokenizer, scored_model):
    batch = make_batch(tokenizer)
    with counted_tokens(scored_model) as plain_counts:
        score(scored_model, batch, batch_size=ROWS)
    with counted_tokens(scored_model) as prefix_counts:
        score(scored_model, batch, batch_size=ROWS, group_size=GROUP)
    plain_tokens = ROWS * (PROMPT_WIDTH + COMPLETION_WIDTH)
    prompt_tokens, completion_tokens = ROWS // GROUP * PROMPT_WIDTH, ROWS * COMPLETION_WIDTH
    assert plain_counts == [plain_tokens]
    assert prefix_counts == [prompt_tokens, completion_tokens]  # the prompts once per group, then the completions
    assert (plain_tokens - completion_tokens) / prompt_tokens == GROUP


def test_rows_of_a_group_with_different_prompts_raise(tokenizer, scored_model):
    batch = make_batch(tokenizer)
    batch["prompt_ids"][6, -1] = (batch["prompt_ids"][6, -1] + 1) % len(tokenizer)
    with pytest.raises(ValueError, match=r"group 1 \(rows 4\.\.7\)"):
        score(scored_model, batch, group_size=GROUP)
    batch = make_batch(tokenizer)
    batch["prompt_mask"][9, 0] = 1  # same ids, different mask
    with pytest.raises(ValueError, match="group 2"):
        score(scored_model, batch, group_size=GROUP)


def test_rows_not_whole_groups_raise(tokenizer, scored_model):
    batch = {k: v[:10] for k, v in make_batch(tokenizer).items()}
    with pytest.raises(ValueError, match="whole groups"):
        score(scored_model, batch, group_size=GROUP)


def test_config_opt_out_falls_back_to_plain_path(tokenizer, scored_model):
    batch = make_batch(tokenizer)
    scored_model.config.rlsd_prefix_reuse = False
    assert prefix_reuse_blocker(scored_model) == "config.rlsd_prefix_reuse is False"
    with counted_tokens(scored_model) as counts:
        result = score(scored_model, batch, batch_size=ROWS, group_size=GROUP)
    assert counts == [ROWS * (PROMPT_WIDTH + COMPLETION_WIDTH)]
    logps, _, _ = reference_scores(scored_model, batch)
    assert_close_on_mask(result.logps, logps, batch["completion_mask"])


def test_blockers(tokenizer, scored_model):
    assert prefix_reuse_blocker(scored_model) is None
    assert "pixel_values" in prefix_reuse_blocker(scored_model, {"pixel_values": torch.zeros(1)})
    sliding = copy.deepcopy(scored_model)
    sliding.config.layer_types = ["sliding_attention", "full_attention"]
    assert "sliding_attention" in prefix_reuse_blocker(sliding)
    sliding.config.layer_types = ["full_attention", "full_attention"]
    sliding.config.use_sliding_window, sliding.config.sliding_window = True, 4
    assert prefix_reuse_blocker(sliding) == "sliding-window attention"


def test_model_kwargs_take_the_plain_path(tokenizer, scored_model):
    """Per-row tensors of model_kwargs are chunked with the rows and disable prefix reuse."""
    batch = make_batch(tokenizer)
    width = PROMPT_WIDTH + COMPLETION_WIDTH
    positions = {"position_ids": torch.arange(width).expand(ROWS, -1)}  # the default positions, made explicit
    with counted_tokens(scored_model) as counts:
        result = score(scored_model, batch, group_size=GROUP, model_kwargs=positions)
    assert sum(counts) == ROWS * width
    assert_close_on_mask(result.logps, score(scored_model, batch).logps, batch["completion_mask"])


@pytest.mark.parametrize("batch_size", [1, 8, 12])
def test_prefix_path_through_trls_fused_head_matches_the_plain_path(tokenizer, scored_model, batch_size):
    """With `fused_head`, the shared prefix scores through TRL's fused head (no logits tensor) and still equals the
    plain path: log-probs, entropy and hidden states."""
    import copy

    from trl.trainer.utils import add_fused_lm_head

    batch = make_batch(tokenizer)
    plain = score(scored_model, batch, batch_size=batch_size)
    patched = copy.deepcopy(scored_model)
    add_fused_lm_head(patched, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))
    logits_built = []
    patched.lm_head.register_forward_hook(lambda module, args, out: logits_built.append(out.shape))
    fused = score(patched, batch, batch_size=batch_size, group_size=GROUP, fused_head=True)
    mask = batch["completion_mask"]
    assert_close_on_mask(fused.logps, plain.logps, mask)
    assert_close_on_mask(fused.entropy, plain.entropy, mask)
    assert_close_on_mask(fused.hidden, plain.hidden, mask)
    assert all(shape[1] == 1 for shape in logits_built)  # only the prefix's last position, never (rows, T, V)


def make_tiny_opt(tokenizer) -> torch.nn.Module:
    """A tiny OPT (random weights): learned absolute positions indexed by `cumsum(attention_mask) - 1`."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=tokenizer.pad_token_id, dropout=0.0,
        attention_dropout=0.0,
    )  # fmt: skip
    return OPTForCausalLM(config).eval()


@pytest.mark.parametrize("fused_head", [False, True])
def test_mask_derived_positions_take_the_plain_path(tokenizer, fused_head):
    """OPT counts positions over the mask, so left-padded prompts start at 0 where the prefix path's `arange` would
    start them at the padding width (0.16 nat off before the blocker): the blocker names the positional table, one
    plain forward scores, and the result equals a hand-written full forward (the Qwen2 model keeps the prefix path:
    `test_blockers`, `test_prefix_path_runs_each_prompt_once_per_group`)."""
    from trl.trainer.utils import add_fused_lm_head

    model = make_tiny_opt(tokenizer)
    batch = make_batch(tokenizer)
    logps, entropy, _ = reference_scores(model, batch)
    if fused_head:  # the trainer's configuration: TRL's fused head, only log-probs
        add_fused_lm_head(model, temperature=TEMPERATURE, outputs=("log_probs",))
    assert "OPTLearnedPositionalEmbedding" in prefix_reuse_blocker(model)
    options = {"temperature": TEMPERATURE, "batch_size": ROWS, "with_entropy": not fused_head}
    with counted_tokens(SimpleNamespace(base_model=model.model.decoder)) as counts:  # OPT's forward calls the decoder
        result = score_tokens(model, **batch, group_size=GROUP, fused_head=fused_head, **options)
    assert counts == [ROWS * (PROMPT_WIDTH + COMPLETION_WIDTH)]
    assert_close_on_mask(result.logps, logps, batch["completion_mask"])
    if not fused_head:
        assert_close_on_mask(result.entropy, entropy, batch["completion_mask"])


def test_a_blocked_prefix_path_is_logged_once(tokenizer, monkeypatch, caplog):
    import rlsd.step.scoring as scoring

    monkeypatch.setattr(scoring, "_LOGGED_FALLBACKS", set())
    model, batch = make_tiny_opt(tokenizer), make_batch(tokenizer)
    with caplog.at_level("WARNING", logger="rlsd.step.scoring"):
        for _ in range(2):
            score_tokens(model, **batch, temperature=1.0, batch_size=ROWS, group_size=GROUP)
    messages = [record.getMessage() for record in caplog.records if record.name == "rlsd.step.scoring"]
    assert len(messages) == 1
    assert "OPTForCausalLM" in messages[0] and "positions derived from the attention mask" in messages[0]
