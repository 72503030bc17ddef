"""TRL's colocated vLLM generation on vLLM's CPU backend: the one workaround its weight sync needs there.

TRL's colocate mode pushes the policy's weights into the engine before every generation by calling the vLLM model's
`load_weights([(name, tensor)])`, which copies each tensor into the parameter of the same name. On a CPU, vLLM 0.31's
`process_weights_after_loading` hands every unquantized linear layer (and the LM head) to
`vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`, which packs the weight into a oneDNN / sgl-kernel
handle captured by the layer's `cpu_linear` closure and (for linear layers) replaces the weight by an empty tensor.
A sync then fails (`'Parameter' object has no attribute 'weight_loader'`), and where the weight is kept (the tied LM
head) the packed copy would go on computing with the weights of the engine's start.

No vLLM setting keeps the weights: the dispatch depends only on the CPU (AMX, oneDNN, Zen) and no `VLLM_CPU_*`
variable reaches it; vLLM's own in-place update (`reload_weights(..., is_checkpoint_format=True)`) re-packs new
handles, but the compiled graph keeps calling the old closures (measured: the log-probs stay those of the start). So
`keep_cpu_linear_weights` replaces that one function, before the engine is built, by one that makes every 2-D
weight compute through `torch.nn.functional.linear` on the live parameter (vLLM's own fallback when oneDNN is missing)
and leaves the weight in place; every other layer (3-D MoE experts, convolutions) goes to vLLM's function. vLLM's
files are not edited; the cost is vLLM's plain `F.linear` speed instead of its packed kernels.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from rlsd.infra.validate import ConfigError

logger = logging.getLogger(__name__)

_PATCHED_ATTRIBUTE = "_rlsd_keeps_weights"


def keep_cpu_linear_weights() -> bool:
    """Make vLLM's CPU linear layers compute with `F.linear` on their own (reloadable) weights; idempotent. Returns
    whether the replacement is in place (False when vLLM is not importable)."""
    try:
        from vllm.model_executor.layers import utils as vllm_layer_utils
    except ImportError:
        return False
    original = vllm_layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(original, _PATCHED_ATTRIBUTE, False):
        return True

    def dispatch_keeping_weights(layer: torch.nn.Module, remove_weight: bool) -> None:
        """vLLM's CPU GEMM dispatch, except that a 2-D weight stays a parameter read by `F.linear` at every call."""
        weight = getattr(layer, "weight", None)
        if weight is None or weight.ndim != 2 or weight.is_meta:
            original(layer, remove_weight)
            return
        layer.cpu_linear = torch.nn.functional.linear

    setattr(dispatch_keeping_weights, _PATCHED_ATTRIBUTE, True)
    vllm_layer_utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_weights
    logger.info("vLLM on a CPU: linear layers keep their weights (F.linear) so that TRL's colocate sync can load them")
    return True


def vllm_runs_on_cpu() -> bool:
    """Whether vLLM is importable and its platform is the CPU backend."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return bool(current_platform.is_cpu())


def check_vllm_config(config: Any) -> None:
    """`use_vllm` in colocate mode: refuse vLLM's transformers backend (`vllm_model_impl="transformers"` patches the
    Hugging Face model classes in this process, and the trainer's own forward then fails), then, on vLLM's CPU
    backend, keep the linear weights reloadable (`keep_cpu_linear_weights`). Run by `RLSDConfig.__post_init__`, before
    TRL builds the engine from this config. Server mode runs the engine in another process (`trl vllm-serve`), where
    this cannot reach; its weight transfer needs a GPU communicator anyway."""
    if not config.use_vllm or config.vllm_mode != "colocate":
        return
    if config.vllm_model_impl == "transformers":
        raise ConfigError("--vllm_model_impl", "is 'transformers' with use_vllm in colocate mode",
                          "vLLM's transformers backend patches the Hugging Face model class that the trainer also "
                          "runs (its forward then fails): use 'vllm'")  # fmt: skip
    if vllm_runs_on_cpu():
        keep_cpu_linear_weights()
