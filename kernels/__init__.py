"""Triton kernels of sdpo_fast, installed as `sdpo_fast.kernels` (never as a top-level `kernels`).

One module per kernel, each with its jit function, its `launch_meta` and a host launcher of the same name:
lse_gather (forward), grad_logits and grad_weight (backward).
"""
