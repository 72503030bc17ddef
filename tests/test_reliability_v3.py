"""Reliability v3 (issue 27), the weak and newcomer cases other than checkpoints and SIGTERM: rewards beyond float32,
async rewards, a missing teacher folder, recipe values of the wrong type, reward files outside the working folder,
the report's legend, recipes that run as written, and the README's real-model cost."""

from __future__ import annotations

import asyncio
import glob
import logging
import math
import re
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_trainer, parity_reward
from test_command_line import TRAIN_FLAGS, one_line, write_jsonl
from test_data_rewards import GSM8K

from rlsd.commands.cli import main as cli_main
from rlsd.data.reward_range import check_reward_statistics, group_statistics
from rlsd.data.rewards import call_reward, guard_reward, resolve_reward
from rlsd.infra.validate import ConfigError, ModelFolderError, RewardError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ rewards ±1e308
def huge(completions, **kwargs):
    """1e308 on the second row: finite as a Python float, inf as TRL's float32."""
    return [0.0, 1e308, 0.0, 0.0][: len(completions)]


def huge_negative(completions, **kwargs):
    return [-1e308] * len(completions)


def wide(completions, **kwargs):
    """1e20 on the first completion of each group of 4: within float32, but its square (the group variance) is not."""
    return [1e20 if i % 4 == 0 else 0.0 for i in range(len(completions))]


def test_a_reward_beyond_float32_is_refused_naming_the_function_and_the_row():
    with pytest.raises(RewardError, match=r"'huge' returned 1e\+308 at row 1, beyond float32's range"):
        guard_reward(huge, timeout_s=None)(["a", "b", "c", "d"])
    with pytest.raises(RewardError, match=r"'huge_negative' returned -1e\+308 at row 0"):
        guard_reward(huge_negative, timeout_s=None)(["a"])
    with pytest.raises(RewardError, match=r"returned an integer of 401 digits at row 0"):
        guard_reward(lambda completions, **kw: [10**400], timeout_s=None)(["a"])
    assert guard_reward(lambda completions, **kw: [3e38, -3e38], timeout_s=None)(["a", "b"]) == [3e38, -3e38]


def test_group_statistics_pin_trl_formulas_by_hand():
    # one group of 4, rewards 1, 0, 1, 0: mean 0.5, std (Bessel) sqrt(1/3) = 0.57735, advantages +-0.5 / (std + 1e-4)
    stats = group_statistics(torch.tensor([[1.0], [0.0], [1.0], [0.0]]), torch.tensor([1.0]), 4)
    assert stats["group means"].tolist() == [0.5] * 4
    assert stats["standard deviations"][0].item() == pytest.approx(math.sqrt(1 / 3), rel=1e-6)
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert stats["advantages"].tolist() == pytest.approx([expected, -expected, expected, -expected], rel=1e-6)
    # weights 2 and 1 sum to totals 2*1 + 1*0 = 2 and 2*0 + 1*3 = 3; scale_rewards="none": advantages = totals - mean
    stats = group_statistics(torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.tensor([2.0, 1.0]), 2, "none")
    assert stats["weighted totals"].tolist() == [2.0, 3.0] and stats["advantages"].tolist() == [-0.5, 0.5]


def test_rewards_whose_group_statistics_overflow_name_the_function_and_the_rows():
    rewards = torch.tensor([[0.0, 1e20], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0],
                            [1.0, 0.0]])  # fmt: skip
    with pytest.raises(RewardError, match=r"'wide' gave rewards whose standard deviations overflow float32 at rows "
                                          r"0, 1, 2, 3 \(largest \|reward\| there 1e\+20\)"):  # fmt: skip
        check_reward_statistics(rewards, torch.tensor([1.0, 1.0]), ["ok", "wide"], 4)
    check_reward_statistics(rewards[:, :1], torch.tensor([1.0]), ["ok"], 4)  # the other function alone is fine
    # an inf that reached TRL's float32 rewards unguarded (a reward model, a function given to TRL directly)
    with pytest.raises(RewardError, match=r"'rm' gave rewards beyond float32's range .* at row 2"):
        check_reward_statistics(torch.tensor([[0.0], [1.0], [math.inf], [0.0]]), torch.tensor([1.0]), ["rm"], 4)
    # NaN (every function abstained) is TRL's own business, as is a group with one scored row
    check_reward_statistics(torch.tensor([[math.nan], [1.0], [math.nan], [math.nan]]), torch.tensor([1.0]), ["a"], 4)


def test_reward_overflow_named(tokenizer, tmp_path):
    """A training step whose group variance overflows float32 stops naming the reward (trainer's seams table)."""
    trainer = build_trainer(tokenizer, tmp_path, reward=[parity_reward, wide], reward_timeout=0)  # in process
    with pytest.raises(RewardError, match=r"'wide' gave rewards whose standard deviations overflow float32 at rows"):
        trainer.train()


# ------------------------------------------------------------------------------------------------ async rewards
async def async_parity(completions, **kwargs):
    """`parity_reward`, awaited."""
    await asyncio.sleep(0)
    return parity_reward(completions, **kwargs)


class AsyncJudge:
    """An async callable instance (TRL's third reward form)."""

    async def __call__(self, completions, **kwargs):
        await asyncio.sleep(0)
        return [float(zlib.crc32(c.encode()) % 2) for c in completions]


async def async_sleeper(completions, **kwargs):
    await asyncio.sleep(30)
    return [0.0] * len(completions)


async def async_nan(completions, **kwargs):
    return [0.0, math.nan][: len(completions)]


async def async_row_two_fails(completions, **kwargs):
    if any(c == "bad" for c in completions):
        raise KeyError("bad row")
    return [1.0] * len(completions)


def test_async_rewards_score_as_their_sync_versions_in_a_training_step(tokenizer, tmp_path):
    by_name = resolve_reward("test_reliability_v3.async_parity", timeout_s=30)  # the CLI's path: guarded, bounded
    trainer = build_trainer(tokenizer, tmp_path, reward=[parity_reward, by_name, AsyncJudge()], reward_timeout=0)
    assert trainer.reward_func_names == ["parity_reward", "async_parity", "AsyncJudge"]
    trainer.train()
    logged = trainer._logs["rewards"]
    assert len(logged["parity_reward"]) == 4
    assert logged["async_parity"] == logged["parity_reward"] == logged["AsyncJudge"]


def test_async_rewards_are_bounded_checked_and_named():
    guarded = resolve_reward("test_reliability_v3.async_parity", timeout_s=5)
    assert asyncio.iscoroutinefunction(guarded)
    assert asyncio.run(guarded(["ab", "abc"])) == parity_reward(["ab", "abc"])
    assert call_reward(guarded, ["ab", "abc"]) == parity_reward(["ab", "abc"])  # `rlsd eval`'s synchronous call
    with pytest.raises(RewardError, match=r"'async_sleeper' did not return within 0.2 s \(1 completions\)"):
        asyncio.run(guard_reward(async_sleeper, timeout_s=0.2)(["a"]))
    with pytest.raises(RewardError, match=r"'async_nan' returned nan at row 1"):
        asyncio.run(guard_reward(async_nan, timeout_s=5)(["a", "b"]))
    with pytest.raises(RewardError, match=r"'async_row_two_fails' raised on row 2: KeyError"):
        asyncio.run(guard_reward(async_row_two_fails, timeout_s=5)(["a", "b", "bad"]))


# ------------------------------------------------------------------------------------------------ teacher folder
def test_a_missing_teacher_folder_is_named_with_its_flag(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", GSM8K)
    base = ["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir",
            str(tmp_path / "out"), *TRAIN_FLAGS]  # fmt: skip
    missing = tmp_path / "no-such-teacher"
    assert cli_main([*base, "--teacher_model", str(missing)]) == 2
    line = one_line(capsys)
    assert line.startswith(f"rlsd train: --teacher_model folder {missing}: does not exist;"), line
    assert cli_main([*base, "--teacher_model", str(tiny_model_dir), "--credit", "grpo", "--distill_loss", "jsd",
                     "--mad_opd_teachers", f"{tmp_path}/gone"]) == 2  # fmt: skip
    assert f"--mad_opd_teachers folder {tmp_path}/gone: does not exist" in one_line(capsys)
    assert cli_main([*base, "--teacher_model", "teacher-folder/"]) == 2  # relative, one slash: no hub id ends in "/"
    assert "--teacher_model folder teacher-folder/: does not exist" in one_line(capsys)


def test_the_library_names_a_missing_teacher_folder_before_any_hub_lookup():
    from rlsd.teachers.external import load_external_teacher

    with pytest.raises(ModelFolderError, match=r"teacher_model folder ./no-such-teacher: does not exist"):
        load_external_teacher("./no-such-teacher", {}, None, None, [])


# ------------------------------------------------------------------------------------------------ recipe types
@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('learning_rate: "abc"', "key 'learning_rate' is 'abc' (a string); expected a number"),
        ("num_generations: 2.5", "key 'num_generations' is 2.5 (a number); expected an integer"),
        ("use_peft: maybe", "key 'use_peft' is 'maybe' (a string); expected true or false"),
        ("reward_funcs: math_accuracy", "key 'reward_funcs' is 'math_accuracy' (a string); expected a list"),
        ("eval_strategy: no", "key 'eval_strategy' is False (a boolean); expected one of no, steps, epoch; quote"),
        ("credit: bogus", "key 'credit' is 'bogus' (a string); expected one of grpo, rlsd,"),
        ("num_generations: null", "key 'num_generations' is None (null); expected an integer (its default is 8)"),
    ],
)
def test_a_recipe_value_of_the_wrong_type_is_refused_naming_key_value_and_type(tmp_path, capsys, line, words):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"dataset_name: d.jsonl\nuse_cpu: true\n{line}\n")
    assert cli_main(["train", "--config", str(recipe)]) == 2
    said = one_line(capsys)
    assert said.startswith(f"rlsd train: --config {recipe}: {words}"), said


def test_recipe_values_of_the_right_type_pass_the_check(tmp_path):
    from rlsd.commands.recipe_check import check_recipe
    from rlsd.commands.train import make_parser

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 1e-5\nwarmup_steps: 0\nepsilon_high: null\nuse_peft: 'true'\n"
                      "reward_funcs: [math_accuracy]\nmodel_init_kwargs: {dtype: bfloat16}\nreport_to: [none]\n"
                      "max_steps: '12'\nenv: {FOO: bar}\n")  # fmt: skip
    check_recipe(make_parser(), ["--config", str(recipe)])
    recipe.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping of flag names to values, not a list"):
        check_recipe(make_parser(), ["--config", str(recipe)])


# ------------------------------------------------------------------------------------------------ reward files
@pytest.fixture
def reward_folders(tmp_path, monkeypatch):
    """A working folder (with `sub/good.py` and a link to a folder outside) and `outside/evil.py` beside it."""
    body = "def fn(completions, **kwargs):\n    return [1.0] * len(completions)\n"
    work, outside = tmp_path / "work", tmp_path / "outside"
    (work / "sub").mkdir(parents=True)
    outside.mkdir()
    (work / "sub" / "good.py").write_text(body)
    (outside / "evil.py").write_text(body)
    (work / "link").symlink_to(outside)
    (work / "linked.py").symlink_to(outside / "evil.py")
    monkeypatch.chdir(work)
    return work, outside


def test_a_reward_file_outside_the_working_folder_needs_its_absolute_path(reward_folders, caplog):
    work, outside = reward_folders
    for name in ("../outside/evil.fn", "link/evil.fn", "sub/../../outside/evil.fn", "linked.fn"):
        with pytest.raises(ConfigError, match=rf"reward {re.escape(repr(name))}: its file .* resolves to "
                                              rf"{re.escape(str(outside / 'evil.py'))}, outside the working folder "
                                              rf"{re.escape(str(work))}; .*absolute path"):  # fmt: skip
            resolve_reward(name, timeout_s=None)
    with caplog.at_level(logging.INFO, logger="rlsd.data.rewards"):
        assert resolve_reward("sub/good.fn", timeout_s=None)(["a"]) == [1.0]
        assert f"loading {work / 'sub' / 'good.py'}" in caplog.text
        assert resolve_reward(f"{outside}/evil.fn", timeout_s=None)(["a"]) == [1.0]  # absolute: loaded, and said
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(outside / "evil.py") in r.getMessage() for r in warned)
    with pytest.raises(ConfigError, match=r"reward 'sub/none.fn': no file .*sub/none.py"):
        resolve_reward("sub/none.fn", timeout_s=None)


def test_a_module_of_the_working_folder_on_the_module_path_must_resolve_inside_it(reward_folders, monkeypatch):
    """Under `python -m` the working folder is on the module path: a linked folder there is refused all the same."""
    work, _ = reward_folders
    monkeypatch.syspath_prepend(str(work))
    with pytest.raises(ConfigError, match=r"reward 'link.evil.fn': its file .*link resolves to .*outside"):
        resolve_reward("link.evil.fn", timeout_s=None)


# ------------------------------------------------------------------------------------------------ report legend
def test_the_report_has_a_legend_for_the_viewer_and_says_what_leakage_counts(tmp_path):
    from rlsd.experiments.report import write_report

    rows = [{"kind": "eval", "method": "rlsd", "step": s, "pass_at_1": 0.5, "leakage_rate": 0.0} for s in (0, 1)]
    stats = {"initial_pass_at_1": 0.5, "final_pass_at_1": 0.5, "peak_pass_at_1": 0.5, "peak_step": 0,
             "final_leakage_rate": 0.0, "seconds_per_step": 1.0, "wall_seconds": 2.0}  # fmt: skip
    example = {"advantage_sign": 1, "prompt": "Q: 1+1=", "answer": 2, "tokens": ["2"], "delta": [0.1],
               "weight": [1.1], "clipped_weight": [1.1]}  # fmt: skip
    write_report(tmp_path, rows, {"methods": {"rlsd": stats}, "config": {}}, {"positive": example})
    page = (tmp_path / "report.html").read_text()
    legend = page[page.index('id="viewer-legend"') :]
    for entry in ("green</span> clipped weight above 1", "no colour</span> weight 1", "red</span> weight below 1"):
        assert entry in legend
    assert "counts, at each evaluation, the share of the\nstudent's greedy completions" in page
    assert "cite a reference answer they were never shown" in page


# ------------------------------------------------------------------------------------------------ recipes as written
RECIPES = sorted(glob.glob(str(ROOT / "recipes" / "*.yaml")))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: Path(path).name)
def test_each_recipe_builds_its_configs_with_no_overrides(recipe, monkeypatch):
    """The recipe parsed as written into the three configs, on the hardware it names (a GPU with bf16, simulated:
    no model is loaded), with its values type-checked, no unknown key, the required values set, its rewards and
    dataset format known, and its header naming the hardware and an accelerate config that exists."""
    import transformers.training_args

    from rlsd.commands.recipe_check import check_recipe
    from rlsd.commands.train import make_parser
    from rlsd.data.formats import format_names

    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    parser = make_parser()
    check_recipe(parser, ["--config", recipe])
    script, training, model, unknown, _ = parser.parse_args_and_config(
        args=["--config", recipe], return_remaining_strings=True, separate_remaining_strings=True
    )
    assert unknown == [], unknown
    assert model.model_name_or_path and script.dataset_name and training.output_dir
    for name in script.reward_funcs:
        resolve_reward(name, training.reward_timeout)
    assert script.dataset_format is None or script.dataset_format in format_names()
    header = Path(recipe).read_text().split("\nmodel_name_or_path")[0]
    assert re.search(r"^# Hardware: .*GPU", header, re.M), header
    for config in re.findall(r"--config_file (\S+)", header):
        assert (ROOT / config).is_file(), config
    keys = set(yaml.safe_load(Path(recipe).read_text()))
    assert "use_cpu" not in keys


# ------------------------------------------------------------------------------------------------ README
def test_the_readme_says_what_the_real_model_commands_show_and_cost_before_them():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Real model, offline") :]
    before = section[: section.index("```bash")]
    assert "they do not show learning" in before and "reward 0" in before and "about 40 minutes" in before
