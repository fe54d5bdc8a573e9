"""`sdpo-fast eval`: a trained checkpoint against its base model (lm-eval tasks, pairwise judged win rate)."""
from __future__ import annotations

from pathlib import Path

from ..utils.checks import check_int, check_number
from .online import _backend


def add_parser(subparsers) -> None:
    text = "evaluate a trained checkpoint (full model or LoRA adapter dir) against its base model"
    p = subparsers.add_parser("eval", help=text, description=text)
    p.add_argument("checkpoint", help="checkpoint directory (e.g. runs/x/checkpoint-N)")
    p.add_argument("--base", help="base model (default: the adapter's base, else the run's config.yaml model)")
    p.add_argument("--out", required=True, help="results directory (reused: finished benchmarks are not rerun)")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval tasks, e.g. ifeval,mmlu_pro,truthfulqa_mc1,"
                                               "hellaswag,commonsense_qa (needs pip install lm-eval)")
    p.add_argument("--include-path", help="folder of local lm-eval task YAMLs")
    p.add_argument("--limit", type=float, help="documents per task (a number < 1: a fraction)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-length", type=int, help="lm-eval context length (default: the model's)")
    p.add_argument("--log-samples", action="store_true", help="keep each document's response in the JSON")
    p.add_argument("--prompts", help="held-out prompts for the pairwise win rate (.txt lines, or .json/.jsonl "
                                     "with 'instruction'/'prompt'); 'demo': the bundled tiny model's held-out requests")
    p.add_argument("--n-prompts", type=int, default=64, help="with --prompts demo (default %(default)s)")
    p.add_argument("--judge", default="rule", choices=["rule", "hf", "openai"],
                   help="pairwise judge: rule-based (needs a persona with rules), local HF model or endpoint")
    p.add_argument("--judge-model", help="judge LLM: HF path/id (hf) or endpoint model name (openai)")
    p.add_argument("--judge-base-url", help="judge endpoint base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--persona", help="judge's persona (personas.yaml name); default: a general-quality judge")
    p.add_argument("--personas-file", help="persona YAML (default: the bundled one)")
    p.add_argument("--length-control", action="store_true", help="also report the length-controlled win rate")
    p.add_argument("--alpaca-eval", action="store_true",
                   help="also the official alpaca_eval LC win rate (needs pip install alpaca-eval and its API)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="reply length for the win rate")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature of the win-rate replies (default greedy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto")
    p.set_defaults(func=run)


def _check_numbers(args) -> None:
    """Every number flag finite and in range, before anything loads."""
    check_number("--limit", args.limit, positive=True, optional=True)
    if args.limit is not None and args.limit > 1 and args.limit != int(args.limit):
        raise ValueError(f"--limit must be a fraction < 1 or a whole number of documents, got {args.limit}")
    check_number("--temperature", args.temperature)
    check_number("--timeout", args.timeout, positive=True)
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--n-prompts", args.n_prompts, 1),
                             ("--max-new-tokens", args.max_new_tokens, 1), ("--retries", args.retries, 0),
                             ("--max-length", args.max_length, 1), ("--seed", args.seed, 0)):
        check_int(flag, value, low, optional=flag == "--max-length")


def run(args) -> int:
    from ..demo.report import demo_prompts
    from ..eval import evaluate_checkpoint, load_eval_prompts
    from ..online.judge import LLMJudge, RuleJudge
    from ..online.personas import load_personas
    from ..online.users import EndpointError

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks and not args.prompts:
        raise ValueError("nothing to evaluate: pass --tasks and/or --prompts")
    _check_numbers(args)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    prompts = judge = persona = None
    if args.prompts:
        prompts = (demo_prompts(args.seed, args.n_prompts)[1] if args.prompts == "demo"
                   else load_eval_prompts(args.prompts))
        if args.persona:
            personas = load_personas(args.personas_file)
            if args.persona not in personas:
                raise ValueError(f"--persona {args.persona!r} is not defined; available: {sorted(personas)}")
            persona = personas[args.persona]
        if args.judge == "rule" and persona is None:
            raise ValueError("--judge rule needs --persona (a persona with rules, e.g. no-emojis)")
        judge = RuleJudge() if args.judge == "rule" else LLMJudge(_backend(args, "judge"))
    try:
        records = evaluate_checkpoint(
            args.checkpoint, args.out, base=args.base, tasks=tasks, limit=limit, seed=args.seed,
            include_path=args.include_path, batch_size=args.batch_size, max_length=args.max_length,
            log_samples=args.log_samples, prompts=prompts, judge=judge, persona=persona,
            length_control=args.length_control, alpaca_eval=args.alpaca_eval, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            device=args.device, dtype=args.dtype)
    except (EndpointError, ImportError) as exc:
        raise ValueError(str(exc)) from None
    print((Path(args.out) / "results.md").read_text(encoding="utf-8"), end="")
    print(f"{len(records)} benchmarks; wrote {args.out}/results.md, results.png and one JSON per benchmark")
    return 0
