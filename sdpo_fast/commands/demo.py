"""`sdpo-fast demo`: self-distill a random student toward a hindsight teacher with `sdpo_loss` on CPU."""
from __future__ import annotations

import time


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help=__doc__.split(":", 1)[1].strip(), description=__doc__)
    parser.add_argument("--tokens", type=int, default=512, help="completion tokens (default 512)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size d (default 64)")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size V (default 4096)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default 0.05)")
    parser.add_argument("--backend", default="auto", help="sdpo_loss backend (default auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from ..loss import sdpo_loss

    for name in ("tokens", "hidden", "vocab", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    torch.manual_seed(args.seed)
    n, d, v = args.tokens, args.hidden, args.vocab
    weight = torch.randn(v, d) / d**0.5
    teacher_hidden = torch.randn(n, d)
    student_hidden = (teacher_hidden + 0.8 * torch.randn(n, d)).requires_grad_()
    targets = torch.distributions.Categorical(logits=teacher_hidden @ weight.T).sample()

    check, check_stats = sdpo_loss(student_hidden, weight, targets, teacher_hidden=teacher_hidden,
                                   backend="reference", return_stats=True)
    start = time.perf_counter()
    optimizer = torch.optim.Adam([student_hidden], lr=args.lr)
    first_gap = None
    for step in (bar := tqdm(range(args.steps), desc="sdpo demo", unit="step")):
        loss, stats = sdpo_loss(student_hidden, weight, targets, teacher_hidden=teacher_hidden,
                                backend=args.backend, return_stats=True)
        if step == 0:
            print(f"loss {loss.item():.6f} vs reference {check.item():.6f}; "
                  f"max |Δ advantage| {(stats.advantages - check_stats.advantages).abs().max().item():.2e}")
        gap = stats.advantages.abs().mean().item()
        first_gap = gap if first_gap is None else first_gap
        bar.set_postfix(loss=f"{loss.item():.4f}", mean_abs_adv=f"{gap:.4f}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    elapsed = time.perf_counter() - start
    print(f"{n} tokens x {v} vocab x {d} hidden, {args.steps} steps in {elapsed:.2f}s: "
          f"mean |log q - log pi| on the logged tokens {first_gap:.4f} -> {gap:.4f} "
          f"(the student moved toward its hindsight teacher)")
    return 0
