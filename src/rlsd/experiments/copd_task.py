"""CoPD (`rlsd.copd`) on the embedded task: the domains (operator families of the arithmetic problems) and the
factory `rlsd bench methods --methods copd` trains with (`builder`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from datasets import Dataset

from rlsd.copd import CoPDConfig, CoPDTrainer
from rlsd.experiments.demo import DemoConfig, train_method, trainer_args
from rlsd.experiments.task import accuracy_reward, evaluation_problems
from rlsd.experiments.warmstart import warm_start

COPD_BRANCH = {"credit": "grpo"}
"""What every branch trains with in its RL phase (the demo's shared budget otherwise)."""
COPD_SCHEDULE = {"copd_rl_steps": 1, "copd_distill_steps": 1}
"""The bench's rounds: one GRPO step, then one distillation step from the other branch (so that every evaluation
step of the demo, `--quick`'s included, ends a phase and the quick run holds both phases twice)."""


def operator_domains(dataset: Dataset) -> dict[str, Dataset]:
    """The task's two domains by operator family: problems with a product (`products`) and problems of sums and
    differences only (`sums`), in the dataset's order."""
    products = ["*" in prompt for prompt in dataset["prompt"]]
    return {
        "products": dataset.select([i for i, has in enumerate(products) if has]),
        "sums": dataset.select([i for i, has in enumerate(products) if not has]),
    }


def copd_builder(config: DemoConfig) -> Callable[..., CoPDTrainer]:
    """A factory of `CoPDTrainer` with the demo's budget (each branch trains `config.steps` steps); the `copd_*` keys
    of `method_overrides["copd"]` set `CoPDConfig`, the others the branches' `RLSDConfig`."""
    overrides = config.method_overrides.get("copd", {})
    copd = CoPDConfig(**{**COPD_SCHEDULE, **{k: v for k, v in overrides.items() if k.startswith("copd_")}})
    branch = {**COPD_BRANCH, **{k: v for k, v in overrides.items() if not k.startswith("copd_")}}
    args = trainer_args(replace(config, method_overrides={"copd": branch}), "copd")

    def build(model, tokenizer, train_dataset, callbacks) -> CoPDTrainer:
        domains = operator_domains(train_dataset)
        return CoPDTrainer(model, accuracy_reward, args, domains, tokenizer, copd=copd, callbacks=callbacks)

    return build


def train_copd(method: str, config: DemoConfig, record: Callable[[dict[str, Any]], None],
               progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """`rlsd bench methods --methods copd`: CoPD from the demo's warm start, evaluated like every method (greedy
    pass@1 of the merged branches at the end of each phase that reaches an evaluation step); the run's summary."""
    warm_path = warm_start(config.warm, progress=progress)
    problems = evaluation_problems(config.warm.task, config.eval_size, config.eval_set)
    _, summary = train_method(method, config, warm_path, problems, record, progress=progress,
                              build_trainer=copd_builder(config))  # fmt: skip
    return summary
