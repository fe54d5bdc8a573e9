"""Triton kernels of sdpo_fast, installed as `sdpo_fast.kernels` (never as a top-level `kernels`).

One module per kernel, each with its jit function, its `launch_meta`, a `*_launch` builder (the exact `Launch` it
issues) and a host launcher of the same name: lse_gather (forward), grad_logits and grad_weight (backward).
`fused` lists one loss step's launches; `check` compiles them ahead of time, `model` predicts their HBM traffic
and TFLOP/s bound from `gpus` (architecture limits and datasheet figures).
"""
