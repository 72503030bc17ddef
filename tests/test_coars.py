"""CoARS (`rlsd.coevolve`, `rlsd.experiments.coars_task`): the toy dialogue's interaction rewards, each agent's
self-distilled credit, the two policies' separate updates, resume, and bad input."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import make_model

import rlsd.coevolve as coevolve
from rlsd.coevolve import Agent, CoEvolution, CoEvolveConfig, Dialogue, InteractionError
from rlsd.experiments.coars_task import RECOMMENDER, USER, RecommendationDialogue, coars_settings, train_coars
from rlsd.step.scoring import ScoreResult


def play(turns: list[tuple[str, str]], item: str = "g2", **env_kwargs) -> RecommendationDialogue:
    """A hand-made dialogue: each (role, text) turn observed in order."""
    env = RecommendationDialogue(**env_kwargs)
    env.reset({"item": item})
    for role, text in turns:
        assert env.next_role() == role
        env.observe(role, text)
    return env


# ---------------------------------------------------------------------------------------------------- environment
def test_interaction_rewards_on_hand_made_dialogues():
    ask = [(RECOMMENDER, "c?"), (USER, "g"), (RECOMMENDER, "s?"), (USER, "2")]
    truthful_hit = play([*ask, (RECOMMENDER, "rec g2")])
    assert truthful_hit.next_role() is None
    assert truthful_hit.rewards() == {RECOMMENDER: 1.0, USER: 1.0}
    assert play([*ask, (RECOMMENDER, "rec g3")]).rewards() == {RECOMMENDER: 0.0, USER: 0.5}  # truthful, a miss
    lie = [(RECOMMENDER, "c?"), (USER, "r"), (RECOMMENDER, "s?"), (USER, "2"), (RECOMMENDER, "rec r2")]
    assert play(lie).rewards() == {RECOMMENDER: 0.0, USER: 0.25}  # t = 1/2, miss: 0.5 * 1 / 2
    # a lucky lie cannot pay: the recommender hits by guessing, the lying user still loses half its reward
    lucky = [(RECOMMENDER, "c?"), (USER, "b"), (RECOMMENDER, "rec g2")]
    assert play(lucky).rewards() == {RECOMMENDER: 1.0, USER: 0.0}
    assert play([(RECOMMENDER, "rec g2")]).rewards() == {RECOMMENDER: 1.0, USER: 0.0}  # no answer: t = 0
    assert play([(RECOMMENDER, "x?"), (USER, "?"), (RECOMMENDER, "rec b1")]).rewards()[USER] == 0.5  # `?` consistent


def test_a_question_beyond_the_limit_ends_the_dialogue_as_a_miss_and_the_teachers_see_the_outcome():
    env = play([(RECOMMENDER, "c?"), (USER, "g"), (RECOMMENDER, "c?")], max_questions=1)
    assert env.next_role() is None and env.rewards() == {RECOMMENDER: 0.0, USER: 0.5}
    assert env.privileged(RECOMMENDER) == "g2" and env.privileged(USER) == "miss"
    assert play([(RECOMMENDER, "rec g2")]).privileged(USER) == "hit"
    with pytest.raises(ValueError, match="recommender's turn, not user's"):
        play([]).observe(USER, "g")


# ---------------------------------------------------------------------------------------------------- the credit
@pytest.fixture
def pair(tokenizer):
    """Two tiny agents (different initialisations) on the toy dialogue."""
    agents = {}
    for seed, role in enumerate(RecommendationDialogue.roles):
        model = make_model(tokenizer, seed=seed)
        agents[role] = Agent(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    return agents


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def hand_dialogue(tokenizer, item: str, turns: list[tuple[str, str]], row: int) -> Dialogue:
    """A `Dialogue` laid out as `CoEvolution.rollout` lays one out, from hand-written turns."""
    env = RecommendationDialogue()
    env.reset({"item": item})
    dialogue = Dialogue(row, env)
    for role, text in turns:
        dialogue.add(encode(tokenizer, env.header(role)), None)
        dialogue.add([*encode(tokenizer, text), tokenizer.eos_token_id], role)
        dialogue.add(encode(tokenizer, "\n"), None)
        env.observe(role, text)
    dialogue.rewards = env.rewards()
    return dialogue


def test_each_agents_credit_is_rlsd_of_its_reward_and_its_teacher_on_its_own_tokens(tokenizer, pair, monkeypatch):
    """Two dialogues of one user (group of 2, advantages unscaled: +-1/2 or +-1/8). Each agent's teacher-minus-student
    gap is set by hand; RLSD (lam 0.5, eps 0.2) gives A_it = A_i * (0.5 + 0.5 * clip(exp(sign(A_i) Delta_t)))."""
    hit = [(RECOMMENDER, "c?"), (USER, "g"), (RECOMMENDER, "rec g2")]  # rewards 1 and (1 * 2 / 2) = 1
    miss = [(RECOMMENDER, "c?"), (USER, "r"), (RECOMMENDER, "rec r2")]  # rewards 0 and (0 * 1 / 2) = 0
    dialogues = [hand_dialogue(tokenizer, "g2", hit, 0), hand_dialogue(tokenizer, "g2", miss, 0)]
    config = CoEvolveConfig(group_size=2, scale_rewards="none", lam=0.5, clip=0.2)
    run = CoEvolution(pair, tokenizer, RecommendationDialogue, config)
    for role, reward in ((RECOMMENDER, [1.0, 0.0]), (USER, [1.0, 0.0])):
        batch = run.batch(role, dialogues)
        assert batch["rewards"].tolist() == reward
        mask = batch["mask"].bool()
        # the agent's own tokens: its turns' text and end-of-sequence token, nothing of the other agent or the headers
        own = [tokenizer.decode(batch["ids"][r][mask[r]]) for r in range(2)]
        expected = {RECOMMENDER: ["c?<eos>rec g2<eos>", "c?<eos>rec r2<eos>"], USER: ["g<eos>", "r<eos>"]}[role]
        assert own == expected
        assert tokenizer.decode(batch["teacher_ids"][0][batch["teacher_mask"][0].bool()]) == (
            "[g2] find\n" if role == RECOMMENDER else "[hit] like g2\n"
        )
        delta = torch.zeros(mask.shape)
        delta[0][mask[0]] = torch.linspace(-1.0, 1.0, int(mask[0].sum()))  # A = +1/2: weights e^-1 (clip) .. e^1
        delta[1][mask[1]] = 0.1  # A = -1/2: weight e^-0.1 on every token

        def fake_scores(model, prompt_ids, prompt_mask, ids, valid, batch=batch, delta=delta, role=role, **kwargs):
            assert model is pair[role].model  # the agent's own weights are its teacher
            teacher = torch.equal(prompt_ids, batch["teacher_ids"])
            return ScoreResult(logps=(delta if teacher else torch.zeros_like(delta)) * valid)

        monkeypatch.setattr(coevolve, "score_tokens", fake_scores)
        advantages, metrics = run.credit(role, batch, step=1)
        weights = delta[0].exp().clamp(0.8, 1.2)
        assert torch.allclose(advantages[0][mask[0]].double(), (0.5 * (0.5 + 0.5 * weights))[mask[0]].double())
        assert torch.allclose(
            advantages[1][mask[1]].double(), torch.tensor(-0.5 * (0.5 + 0.5 * math.exp(-0.1))).double()
        )
        assert advantages[~mask].abs().sum() == 0  # the other agent's and the environment's tokens carry nothing
        assert metrics["clip_low_frac"] > 0  # Delta = -1 on the first row is clipped


def test_one_row_of_rlsd_credit_by_hand(tokenizer, pair, monkeypatch):
    """The recommender's tokens of the first dialogue above: Delta = -1 (weight e^-1 clipped to 0.8) gives
    0.5 * 0.9 = 0.45 and Delta = +0.1 gives 0.5 * (0.5 + 0.5 e^0.1) = 0.52629."""
    hit = [(RECOMMENDER, "rec g2")]
    dialogues = [hand_dialogue(tokenizer, "g2", hit, 0), hand_dialogue(tokenizer, "r1", hit, 0)]
    run = CoEvolution(pair, tokenizer, RecommendationDialogue, CoEvolveConfig(group_size=2, scale_rewards="none"))
    batch = run.batch(RECOMMENDER, dialogues)
    delta = torch.zeros(batch["mask"].shape)
    first = batch["mask"][0].nonzero().flatten()
    delta[0, first[0]], delta[0, first[1]] = -1.0, 0.1
    monkeypatch.setattr(coevolve, "score_tokens", lambda model, prompt_ids, *a, **k: ScoreResult(
        logps=delta if torch.equal(prompt_ids, batch["teacher_ids"]) else torch.zeros_like(delta)))  # fmt: skip
    advantages, _ = run.credit(RECOMMENDER, batch, step=1)
    assert advantages[0, first[0]].item() == pytest.approx(0.45)
    assert advantages[0, first[1]].item() == pytest.approx(0.5262926, abs=1e-6)
    assert advantages[0, first[2]].item() == pytest.approx(0.5)  # Delta 0: weight 1
    assert advantages[1][batch["mask"][1].bool()].tolist() == pytest.approx([-0.5] * int(batch["mask"][1].sum()))


# --------------------------------------------------------------------------------------------------- the updates
class ParityDialogue:
    """Each agent speaks once; its reward is the parity of its turn's first character (varied rewards from an
    untrained model, so that the advantages are not all zero)."""

    roles = ("a", "b")

    def __init__(self, fail: str = "") -> None:
        self.fail, self.texts = fail, {}

    def reset(self, row):
        if self.fail == "reset" and row["id"] == 1:
            raise KeyError("no such user")
        self.texts = {}

    def prompt(self, role):
        return f"{role}{len(self.texts)}>"

    def header(self, role):
        return f"{role}: "

    def next_role(self):
        if self.fail == "never-ends":
            return "a"
        return next((role for role in self.roles if role not in self.texts), None)

    def observe(self, role, text):
        if self.fail == "observe" and role == "b":
            raise RuntimeError("the simulator crashed")
        self.texts[role] = text

    def rewards(self):
        return {role: float(ord(text[0]) % 2) if text else 0.0 for role, text in self.texts.items()}

    def privileged(self, role):
        return str(self.rewards()[role])


def parity_run(tokenizer, fail: str = "") -> CoEvolution:
    agents = {}
    for offset, role in enumerate(ParityDialogue.roles):
        model = make_model(tokenizer, seed=offset)
        agents[role] = Agent(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    config = CoEvolveConfig(group_size=4, max_turns=4, max_new_tokens=4)
    return CoEvolution(agents, tokenizer, lambda: ParityDialogue(fail), config)


ROWS = [{"id": i} for i in range(6)]


def parameters(run: CoEvolution) -> dict[str, list[torch.Tensor]]:
    return {role: [p.detach().clone() for p in agent.model.parameters()] for role, agent in run.agents.items()}


def test_a_step_changes_both_policies_each_only_through_its_own_loss(tokenizer):
    run = parity_run(tokenizer)
    dialogues = run.rollout(ROWS[:2])
    for role, other in (("a", "b"), ("b", "a")):
        batch = run.batch(role, dialogues)
        assert batch["rewards"].std() > 0  # the check below needs a non-zero advantage
        advantages, _ = run.credit(role, batch, step=1)
        run.loss(role, batch, advantages).backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in run.agents[role].model.parameters())
        assert all(p.grad is None for p in run.agents[other].model.parameters())
        run.agents[role].model.zero_grad(set_to_none=True)
    before = parameters(run)
    metrics = run.train_step(ROWS[:2])
    after = parameters(run)
    assert run.step == 1 and {"a/loss", "b/loss", "a/reward", "b/reward"} <= set(metrics)
    for role in ("a", "b"):
        assert any(not torch.equal(x, y) for x, y in zip(before[role], after[role], strict=True)), role


def test_resume_from_a_mid_run_checkpoint_equals_the_uninterrupted_run(tokenizer, tmp_path):
    whole = parity_run(tokenizer)
    whole.train(ROWS, steps=2, per_step=2)
    first = parity_run(tokenizer)
    first.train(ROWS, steps=1, per_step=2, checkpoint_dir=str(tmp_path), save_every=1)
    resumed = parity_run(tokenizer)  # the initial weights and fresh optimizers
    torch.manual_seed(123)  # another RNG state: the checkpoint's must be restored
    resumed.load(str(tmp_path))
    assert resumed.step == 1
    resumed.train(ROWS, steps=2, per_step=2)
    for role in ("a", "b"):
        for x, y in zip(whole.agents[role].model.parameters(), resumed.agents[role].model.parameters(), strict=True):
            assert torch.equal(x, y)
        moments = [s["exp_avg"] for s in whole.agents[role].optimizer.state.values()]
        again = [s["exp_avg"] for s in resumed.agents[role].optimizer.state.values()]
        assert all(torch.equal(x, y) for x, y in zip(moments, again, strict=True))
    with pytest.raises(ValueError, match=r"checkpoint holds agents \['a', 'b'\]"):
        CoEvolution({"x": whole.agents["a"], "y": whole.agents["b"]}, tokenizer,
                    lambda: type("E", (ParityDialogue,), {"roles": ("x", "y")})()).load(str(tmp_path))  # fmt: skip


# ------------------------------------------------------------------------------------------------------ bad input
def test_an_environment_that_raises_is_named_with_its_row_and_turn(tokenizer):
    with pytest.raises(InteractionError, match=r"reset failed for row 1: KeyError: 'no such user'"):
        parity_run(tokenizer, fail="reset").rollout(ROWS[:2])
    with pytest.raises(InteractionError, match=r"observe failed for row 0, turn 1 \(b\): RuntimeError: the simulator"):
        parity_run(tokenizer, fail="observe").rollout(ROWS[:2])
    with pytest.raises(InteractionError, match="row 0: the dialogue did not end within max_turns=4"):
        parity_run(tokenizer, fail="never-ends").rollout(ROWS[:1])


def test_an_empty_catalogue_or_an_unknown_item_is_refused_by_name(tokenizer, pair):
    with pytest.raises(ValueError, match="the catalogue is empty"):
        RecommendationDialogue(catalogue=())
    with pytest.raises(InteractionError, match="environment factory failed: ValueError: the catalogue is empty"):
        CoEvolution(pair, tokenizer, lambda: RecommendationDialogue(catalogue=()))
    run = CoEvolution(pair, tokenizer, RecommendationDialogue, CoEvolveConfig(group_size=2))
    with pytest.raises(InteractionError, match=r"reset failed for row 1: ValueError: the row's item 'z9' is not in"):
        run.rollout([{"item": "g2"}, {"item": "z9"}])
    with pytest.raises(ValueError, match=r"roles \('recommender', 'user'\) are not the agents \('a', 'b'\)"):
        CoEvolution({"a": pair[RECOMMENDER], "b": pair[USER]}, tokenizer, RecommendationDialogue)


# ------------------------------------------------------------------------------------------------------- the bench
def test_coars_trains_in_the_bench_and_writes_the_bench_rows(tmp_path, monkeypatch):
    from rlsd.experiments.bench import methods_table
    from rlsd.experiments.demo import quick_config
    from rlsd.experiments.methods import CATALOGUE
    from rlsd.experiments.orchestrated import ORCHESTRATED

    assert "coars" in CATALOGUE and ORCHESTRATED["coars"] is train_coars
    monkeypatch.setenv("RLSD_CACHE", str(tmp_path / "cache"))
    config = replace(quick_config(tmp_path), steps=2, eval_every=1, eval_size=8, prompts_per_step=2, num_generations=2)
    config = replace(config, warm=replace(config.warm, steps=4))  # the mechanics, not a trained warm start
    warm, settings = coars_settings(config)
    assert settings.group_size == 2 and warm.hidden_size == config.warm.hidden_size
    rows: list[dict] = []
    summary = train_coars("coars", config, rows.append, progress=False)
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2] and all(r["method"] == "coars" for r in rows)
    assert {"pass_at_1", "truthfulness", "ask_rate", "leakage_rate", "mean_length"} <= set(evals[-1])
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert summary["final_pass_at_1"] == evals[-1]["pass_at_1"]
    assert methods_table(rows, ("coars",), 2)["coars"]["seeds"] == 1


def test_a_configuration_it_cannot_honour_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"credit='egrsd' needs \['teacher_entropy'\]"):
        CoEvolveConfig(credit="egrsd")
    with pytest.raises(ValueError, match=r"teacher_template must contain \{outcome\}"):
        CoEvolveConfig(teacher_template="[ref] {prompt}")
    with pytest.raises(ValueError, match="scale_rewards must be"):
        CoEvolveConfig(scale_rewards="rank")
    assert not CoEvolveConfig(credit="grpo", teacher_template="{prompt}").uses_teacher  # GRPO needs no teacher


def test_coars_is_refused_where_one_rlsd_trainer_would_silently_stand_in_for_it(tmp_path):
    from rlsd.experiments.bench import main
    from rlsd.experiments.demo import quick_config, trainer_args
    from rlsd.infra.validate import ConfigError

    with pytest.raises(ValueError, match="method 'coars' is not an RLSDTrainer run"):
        trainer_args(quick_config(tmp_path), "coars")
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['coars'\]"):
        main(["cost", "--configs", "grpo,coars", "--quick", "--out", str(tmp_path / "cost")])
