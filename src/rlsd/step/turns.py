"""Multi-turn rollouts with a teacher: which completion tokens the model wrote.

TRL 1.16 marks the tokens an environment wrote into a completion (tool results, observations) with `tool_mask` = 0:
its tool loop fills it for `tools=` and `environment_factory`, and a rollout function returns it as `env_mask`. The
teacher scores [teacher prompt ; completion] with those tokens in place (it reads the same conversation), while the
credit, the distillation losses and TRL's loss read only the model's tokens (`rlsd.step.batch.loss_mask`). A rollout
function that returns no `env_mask`, or one that does not match its completions, would have the teacher's credit
land on environment tokens: it is refused here, naming the row."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlsd.infra.run_guard import model_context_length

RolloutFunc = Callable[[list[Any], Any], dict[str, Any]]
"""TRL's `rollout_func(prompts, trainer) -> {"prompt_ids", "completion_ids", "logprobs", ...}`."""


def check_env_mask(output: dict[str, Any], what: str) -> None:
    """Refuse a rollout function's output without a usable `env_mask`: missing, not one list per completion, a row
    whose mask is not as long as its completion, or a value other than 0 / 1 (naming the row, the position and the
    turn, counted as the model segments before it). `what`: what in the config uses the teacher."""
    completions = output["completion_ids"]
    if "env_mask" not in output:
        raise ValueError(
            f"rollout_func returned no 'env_mask' with {what}: the teacher's credit must know which completion "
            "tokens the model wrote; return env_mask with each completion (1 for the model's tokens, 0 for what the "
            "environment wrote; all 1 for a single-turn rollout)"
        )
    masks = output["env_mask"]
    if len(masks) != len(completions):
        raise ValueError(f"rollout_func returned {len(masks)} env_mask rows for {len(completions)} completions")
    for row, (mask, ids) in enumerate(zip(masks, completions, strict=True)):
        values = list(mask)
        if len(values) != len(ids):
            raise ValueError(
                f"rollout_func's env_mask of row {row} has {len(values)} values for a completion of {len(ids)} tokens"
            )
        for position, value in enumerate(values):
            if value not in (0, 1):
                turn = turn_index(values, position)
                raise ValueError(
                    f"rollout_func's env_mask of row {row} holds {value!r} at token {position} (turn {turn}): "
                    "use 1 for the model's tokens and 0 for the environment's"
                )


def turn_index(mask: list[Any], position: int) -> int:
    """The model turn of completion token `position`: how many model segments resumed after an environment segment
    before it (0 in the first turn), as `rlsd.step.assign.step_ids` counts steps."""
    return sum(1 for i in range(1, position + 1) if mask[i] != 0 and mask[i - 1] == 0)


def checked_rollout_func(rollout_func: RolloutFunc | None, teacher: bool, what: str) -> RolloutFunc | None:
    """With a `teacher`, `rollout_func` with its output checked by `check_env_mask` before TRL reads it (`what`: what
    in the config uses the teacher, for the error); without one (or without a rollout function), unchanged."""
    if rollout_func is None or not teacher:
        return rollout_func

    @functools.wraps(rollout_func)
    def checked(prompts: list[Any], trainer: Any) -> dict[str, Any]:
        output = rollout_func(prompts, trainer)
        check_env_mask(output, what)
        return output

    return checked


# ------------------------------------------------------------------------------------------- TRL's tool loop
@dataclass(frozen=True)
class ToolCall:
    """One call of TRL's tool loop: the rollout row, the model turn that made it (0 for the first), the tool and
    what it returned."""

    row: int
    turn: int
    name: str
    result: Any


def tool_message(call: ToolCall) -> dict[str, Any]:
    """The tool message TRL's loop appends for a call (a list of content blocks as is, anything else as text)."""
    return {"role": "tool", "name": call.name, "content": call.result if isinstance(call.result, list) else
            str(call.result)}  # fmt: skip


def arguments_bind(tool: Callable[..., Any], arguments: dict[str, Any]) -> bool:
    """Whether a call's `arguments` bind to the tool's signature (a call that does not is the model's mistake)."""
    try:
        inspect.signature(tool).bind(**arguments)
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): treat the call as well-formed
        return True
    return True


class ToolWatch:
    """The tools of one rollout batch (TRL's per-row tool dicts, wrapped in place by `over`), recording each call by
    row and turn. `check`, after the loop, stops the rollout on what TRL would hide: a tool that raised on a call
    whose arguments bind to its signature (TRL shows the model `{'error': ...}` and trains on it; a call that does
    not bind is the model's own mistake and keeps TRL's error result, which the model reads), and a tool result TRL
    dropped that no completion budget could hold."""

    def __init__(self, completions: list[list[dict[str, Any]]]) -> None:
        self.completions = completions  # TRL's conversation of each row, grown in place by its tool loop
        self.calls: list[ToolCall] = []
        self.faults: list[tuple[ToolCall, dict[str, Any], Exception]] = []

    @classmethod
    def over(cls, sync_dicts: list[dict[str, Any]], async_dicts: list[dict[str, Any]],
             completions: list[list[dict[str, Any]]]) -> ToolWatch:  # fmt: skip
        """A watch over TRL's per-row tool dicts, whose tools it replaces with recording wrappers."""
        watch = cls(completions)
        for dicts, is_async in ((sync_dicts, False), (async_dicts, True)):
            for row, tools in enumerate(dicts):
                for name, tool in list(tools.items()):
                    tools[name] = watch.wrapped(tool, name, row, is_async)
        return watch

    def turn(self, row: int) -> int:
        """The model turn of `row` now: its assistant messages so far, less one (the loop calls the last one's
        tools)."""
        return sum(1 for message in self.completions[row] if message.get("role") == "assistant") - 1

    def wrapped(self, tool: Callable[..., Any], name: str, row: int, is_async: bool) -> Callable[..., Any]:
        """`tool` recording its calls and faults for `row` (a coroutine function's wrapper returns its coroutine)."""

        def watched(**arguments: Any) -> Any:
            call = functools.partial(ToolCall, row, self.turn(row), name)
            try:
                result = tool(**arguments)
            except Exception as err:
                return self.settle(call(None), tool, arguments, err)
            return self.settle(call(result), tool, arguments, None)

        def watched_async(**arguments: Any) -> Any:
            call = functools.partial(ToolCall, row, self.turn(row), name)

            async def run() -> Any:
                try:
                    result = await tool(**arguments)
                except Exception as err:
                    return self.settle(call(None), tool, arguments, err)
                return self.settle(call(result), tool, arguments, None)

            return run()

        return functools.wraps(tool)(watched_async if is_async else watched)

    def settle(
        self, call: ToolCall, tool: Callable[..., Any], arguments: dict[str, Any], err: Exception | None
    ) -> Any:
        """A call's result, recorded; or its exception raised again for TRL's loop (which shows it to the model), and
        recorded as a fault when the arguments bind to the tool's signature."""
        if err is None:
            self.calls.append(call)
            return call.result
        if arguments_bind(tool, arguments):
            self.faults.append((call, arguments, err))
        raise err

    def check(
        self,
        prompt_ids: list[list[int]],
        suffix_ids: Callable[[list[dict[str, Any]]], list[int]],
        budget: int,
        model: Any,
        metrics: dict[str, dict[str, list[float]]],
    ) -> None:
        """After TRL's loop: raise on the first tool fault, and on a dropped tool result longer than the completion
        budget (`budget`, max_completion_length) or than `model`'s context after the prompt, naming the row, the turn
        and the tool. Rows whose result was dropped because earlier turns spent the budget (the rollout ends at the
        call, as a completion ends at the budget) are logged as a fraction, `rlsd/budget_dropped_tool_results`."""
        if self.faults:
            call, arguments, err = self.faults[0]
            raise RuntimeError(
                f"tool {call.name!r} raised {type(err).__name__}: {err} (rollout row {call.row}, turn {call.turn}, "
                f"arguments {arguments}); TRL would show the model {{'error': ...}} and train on it. A tool reports "
                "an expected failure by returning it (e.g. 'error: ...') and raises only on a fault; a call whose "
                "arguments do not fit the tool's signature keeps TRL's error result"
            ) from err
        spent, context = 0, model_context_length(model.config)
        for row, conversation in enumerate(self.completions):
            turn = self.turn(row)
            if conversation and conversation[-1].get("role") == "tool":  # the last turn's results were appended
                continue
            dropped = [call for call in self.calls if call.row == row and call.turn == turn]
            if not dropped:
                continue
            length = len(suffix_ids([tool_message(call) for call in dropped]))
            over_context = context is not None and len(prompt_ids[row]) + length >= context
            if length > budget or over_context:
                limit = f"max_completion_length={budget}"
                if length <= budget:
                    limit = f"the model's context of {context} after the prompt's {len(prompt_ids[row])} tokens"
                raise ValueError(
                    f"the result of tool {dropped[0].name!r} (rollout row {row}, turn {turn}) is {length:,} tokens, "
                    f"over {limit}: TRL would drop it and end the rollout at the call; shorten what the tool "
                    "returns or raise max_completion_length"
                )
            spent += 1
        mode = "train" if model.training else "eval"
        metrics[mode]["rlsd/budget_dropped_tool_results"].append(spent / max(len(self.completions), 1))


def watch_resets(factories: dict[Any, Any] | None, pool: Callable[[], dict[Any, list[Any]]],
                 environments: Callable[[], list[Any] | None]) -> dict[Any, Any] | None:  # fmt: skip
    """TRL's environment factories (by name) as new ones whose instances' `reset` raising names its rollout row (its
    position in `environments()`, the batch's instances), the instances already pooled (`pool()`) watched alike;
    None without environments. The caller's dict of factories is left as it was."""
    if factories is None:
        return None
    for instances in pool().values():
        for instance in instances:
            watch_reset(instance, environments)
    return {name: functools.partial(watched_instance, factory, environments) for name, factory in factories.items()}


def watched_instance(factory: Callable[[], Any], environments: Callable[[], list[Any] | None]) -> Any:
    """A new environment from `factory`, its `reset` watched (`watch_reset`)."""
    return watch_reset(factory(), environments)


def watch_reset(instance: Any, environments: Callable[[], list[Any] | None]) -> Any:
    """`instance` with its `reset` replaced (on the instance, once) by one whose exception names the rollout row."""
    reset = instance.reset
    if getattr(reset, "rlsd_watched", False):
        return instance

    @functools.wraps(reset)
    def watched(**kwargs: Any) -> Any:
        try:
            return reset(**kwargs)
        except Exception as err:
            rows = [row for row, env in enumerate(environments() or []) if env is instance]
            where = f"rollout row {rows[0]}" if rows else "a rollout row"
            raise RuntimeError(
                f"{type(instance).__name__}.reset raised {type(err).__name__}: {err} ({where}, turn 0: before the "
                "model's first turn); every row the dataset routes to this environment must reset, so fix the "
                "environment or drop the row"
            ) from err

    watched.rlsd_watched = True
    instance.reset = watched
    return instance
