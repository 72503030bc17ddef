"""The vLLM paths that need no vLLM (the main suite): the settings refused by name, the served teacher's alignment of
vLLM's prompt log-probs with the completion tokens (a fake engine, by hand), the transformers generation config of a
vLLM run, and the TRL code the integration relies on. The runs with vLLM: tests/vllm_engine (`make test-vllm`)."""

from __future__ import annotations

import inspect
import sys
import types

import pytest
import torch
from conftest import build_trainer, make_config

from rlsd.engines.generation import run_generation_config
from rlsd.engines.vllm_teacher import ServedTeacher, TeacherEngine, served_teacher
from rlsd.infra.validate import ConfigError

SERVED = {"use_vllm": True, "vllm_mode": "colocate", "teacher_backend": "vllm", "teacher": "live"}


def test_trl_builds_the_engine_we_serve_from():
    """The TRL 1.16 code behind `vllm_generation` (the seams table): the colocated engine is `vllm_generation.llm`,
    its sync loads each tensor through the vLLM model's `load_weights` (what `rlsd.engines.vllm_cpu` keeps working on
    a CPU), and with vLLM TRL builds no transformers `generation_config` (what `rlsd.engines.generation` replaces)."""
    from trl import GRPOTrainer
    from trl.generation.vllm_generation import VLLMGeneration

    init = inspect.getsource(GRPOTrainer.__init__)
    assert "self.vllm_generation = VLLMGeneration(" in init
    assert init.index("if self.use_vllm:") < init.index("self.generation_config = GenerationConfig(")
    assert "self.llm = LLM(" in inspect.getsource(VLLMGeneration._init_vllm)
    assert "model_runner.model.load_weights([(name, param)])" in inspect.getsource(VLLMGeneration.sync_weights)
    served_with = {"model", "accelerator", "processing_class", "mode", "tensor_parallel_size",  # start_teacher_engine
                   "gpu_memory_utilization", "max_model_length", "max_num_seqs", "model_impl", "trust_remote_code"}
    assert served_with <= set(inspect.signature(VLLMGeneration).parameters)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"teacher_backend": "remote"}, r"--teacher_backend: is 'remote'; use one of trainer, vllm"),
        ({"use_vllm": False}, r"--teacher_backend: is 'vllm' without use_vllm=True in colocate mode"),
        ({"vllm_mode": "server"}, r"without use_vllm=True in colocate mode"),
        ({"teacher": "near_future"}, r"teacher='near_future'; a vLLM engine serves .* live, synced, ema, initial"),
        ({"temperature": 0.7}, r"is 'vllm' with temperature=0.7; vLLM's prompt log-probs are at temperature 1"),
        ({"distill_loss": "jsd"}, r"is 'vllm' with distill_loss='jsd'; a distillation loss reads the teacher's whole"),
        ({"credit": "antisd"}, r"is 'vllm' with credit='antisd'; the rule reads teacher_entropy"),
        ({"vllm_model_impl": "transformers"}, r"--vllm_model_impl: is 'transformers' with use_vllm in colocate mode"),
    ],
)
def test_vllm_settings_a_run_cannot_use_are_refused_by_name(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, **{**SERVED, **overrides})


@pytest.mark.parametrize("teacher", ["live", "synced", "ema", "initial"])
def test_a_served_teacher_with_a_sampled_token_rule_is_accepted(tmp_path, teacher):
    config = make_config(tmp_path, **{**SERVED, "teacher": teacher}, credit="rlsd")
    assert (config.teacher_backend, config.teacher) == ("vllm", teacher)


class FakeGeneration:
    """TRL's `VLLMGeneration` as a teacher engine uses it: `sync_weights` records the model it pushes."""

    def __init__(self):
        self.model, self.pushed = None, []

    def sync_weights(self):
        self.pushed.append(self.model)


def test_a_teacher_engine_is_pushed_the_teachers_copy_only_when_it_changed():
    teacher = types.SimpleNamespace(mode="synced", model="copy-0", last_sync_step=0)
    engine = TeacherEngine(FakeGeneration(), teacher, pushes=True)
    assert engine() is engine.generation
    assert engine.follow() and engine.generation.pushed == ["copy-0"]  # the first use pushes the copy
    assert not engine.follow()  # unchanged since the push
    teacher.last_sync_step, teacher.model = 3, "copy-3"  # synced after step 3 (and the module re-placed)
    assert engine.follow() and engine.generation.pushed == ["copy-0", "copy-3"] and engine.pushed_step == 3
    external = TeacherEngine(FakeGeneration(), types.SimpleNamespace(mode="external", model="m", last_sync_step=0),
                             pushes=False)  # fmt: skip
    assert not external.follow() and external.generation.pushed == []  # loaded from its folder, never pushed


def test_the_served_teacher_pushes_before_it_scores(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=lambda **kw: kw))
    engine, order = FakeEngine(), []
    generate = engine.generate
    engine.generate = lambda *a, **k: order.append("score") or generate(*a, **k)
    served = ServedTeacher(lambda: engine, follow=lambda: order.append("follow") or False)
    served(torch.tensor([[5]]), torch.tensor([[1]]), torch.tensor([[3]]), torch.tensor([[1]]))
    assert order == ["follow", "score"]


def test_which_engine_serves_which_teacher_and_what_cannot_be_served():
    args = types.SimpleNamespace(teacher_backend="vllm")
    live = types.SimpleNamespace(mode="live", model=None)
    served = served_teacher(args, live, "the generation engine", None, None, sharded=False)
    assert served.engine == "the generation engine" and served.follow is None
    in_trainer = types.SimpleNamespace(teacher_backend="trainer")
    assert served_teacher(in_trainer, live, None, None, None, sharded=False) is None
    assert served_teacher(args, None, None, None, None, sharded=False) is None  # credit="grpo": no teacher
    synced = types.SimpleNamespace(mode="synced", model=torch.nn.Linear(1, 1))
    with pytest.raises(ConfigError, match="teacher='synced' under FSDP or DeepSpeed"):
        served_teacher(args, synced, None, None, None, sharded=True)
    with pytest.raises(ConfigError, match="teacher='synced' on a PEFT policy; the teacher is an adapter"):
        served_teacher(args, types.SimpleNamespace(mode="synced", model=None), None, None, None, sharded=False)


class FakeEngine:
    """vLLM's `LLM.generate` with `prompt_logprobs=0` as the served teacher calls it, on a made-up model: the log-prob
    of token `tok` at position `j` of a request is -(100 * j + tok); position 0 has none (None), as in vLLM."""

    def __init__(self):
        self.llm = self
        self.requests = []
        self.max_model_length = None  # TRL's `vllm_max_model_length`

    def generate(self, requests, params, use_tqdm=False):
        assert params == {"max_tokens": 1, "prompt_logprobs": 0} and use_tqdm is False
        self.requests += [r["prompt_token_ids"] for r in requests]
        logprob = types.SimpleNamespace
        return [
            types.SimpleNamespace(
                prompt_logprobs=[None] + [{tok: logprob(logprob=-(100.0 * j + tok))} for j, tok in enumerate(ids) if j]
            )
            for ids in (r["prompt_token_ids"] for r in requests)
        ]


def test_the_served_teacher_reads_each_completion_tokens_log_prob_by_hand(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=lambda **kw: kw))
    engine = FakeEngine()
    # row 0: teacher prompt [5, 6] (left-padded), completion [3, 4] (right-padded); row 1: [7, 8, 9] then [1, 2, 2]
    prompt_ids, prompt_mask = torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    completion_ids, completion_mask = torch.tensor([[3, 4, 0], [1, 2, 2]]), torch.tensor([[1, 1, 0], [1, 1, 1]])
    logps = ServedTeacher(lambda: engine)(prompt_ids, prompt_mask, completion_ids, completion_mask)
    assert engine.requests == [[5, 6, 3, 4], [7, 8, 9, 1, 2, 2]]  # unpadded [teacher prompt ; completion]
    # row 0: positions 2, 3 of its request -> -(200 + 3), -(300 + 4); row 1: positions 3, 4, 5
    assert logps.tolist() == [[-203.0, -304.0, 0.0], [-301.0, -402.0, -502.0]]
    assert logps.dtype == torch.float32
    engine.max_model_length = 5  # row 1 is 6 tokens long
    with pytest.raises(ValueError, match="reaches 6 tokens, beyond vllm_max_model_length=5"):
        ServedTeacher(lambda: engine)(prompt_ids, prompt_mask, completion_ids, completion_mask)
    with pytest.raises(ValueError, match="right-padded completions"):
        ServedTeacher(lambda: engine)(prompt_ids, prompt_mask, completion_ids, torch.tensor([[1, 0, 1], [1, 1, 1]]))


def test_the_generation_config_of_a_vllm_run_is_the_one_trl_builds_without_vllm(tokenizer, tmp_path):
    trainer = build_trainer(tokenizer, tmp_path, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                            generation_kwargs={"no_repeat_ngram_size": 3})  # fmt: skip
    built = run_generation_config(trainer.args, trainer._tokenizer, trainer.eos_token_ids, trainer.temperature)
    assert built.to_dict() == trainer.generation_config.to_dict()
