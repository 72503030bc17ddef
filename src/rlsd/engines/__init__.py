"""The engines users train with, next to TRL's accelerate loop: vLLM generation and a vLLM-served teacher on a CPU
(`rlsd.engines.vllm_cpu`, `rlsd.engines.vllm_teacher`) and the verl plug-in (`rlsd.engines.verl_plugin`,
`rlsd.engines.verl_loss`). Importing this package imports neither vLLM nor verl (nor TRL): each module is imported by
name where it is used."""
