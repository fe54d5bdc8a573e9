"""`sdpo-fast online`: online SDPO personalization experiments (win-rate curve, preference flip, sequential
preferences) and the CPU demo, writing CSV + PNG."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..demo.assets import tiny_model_path
from ..demo.report import demo_prompts
from ..loss.objectives import DISTILLATION_MODES
from ..online.config import OnlineConfig, resolve_online_config
from ..train.teachers import TEACHERS
from ..utils import write_text_atomic
from ..utils.checks import check_number
from .flags import add_dataclass_flags, given_fields

_EXPERIMENTS = ("curve", "flip", "sequential")


def _common(parser, demo: bool) -> None:
    parser.add_argument("--output-dir", default="runs/online" if not demo else "runs/online-demo",
                        help="where the CSV, PNG and adapter go (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an --output-dir that already holds results (replacing them)")
    parser.add_argument("--personas-file", help="persona YAML (default: the bundled personas)")
    parser.add_argument("--interactions", type=int, default=200, help="interactions per phase (default 200)")
    parser.add_argument("--eval-every", type=int, default=20,
                        help="evaluate every N interactions (default %(default)s)")
    parser.add_argument("--eval-prompts", type=int, default=64 if demo else 16,
                        help="held-out prompts judged (default %(default)s)")
    add_online_config_flags(parser)
    if demo:
        _flip_after(parser, "100 with --flip")
        parser.add_argument("--flip", action="store_true",
                            help="run the preference flip instead: a user who wants brief answers (--flip-after "
                                 "interactions), then one who wants fuller ones (--interactions)")


def add_online_config_flags(parser) -> None:
    """One flag per OnlineConfig field (the step, objective, LoRA and teacher options) and --config YAML."""
    add_dataclass_flags(parser, OnlineConfig, skip=("signal_clip",),
                        choices={"teacher": TEACHERS, "distillation_mode": tuple(DISTILLATION_MODES)})
    parser.add_argument("--signal-clip", type=float, default=argparse.SUPPRESS,
                        help="clip of the per-token signal (0: off; default: auto, 2 for sampled_token)")
    parser.add_argument("--no-center", dest="center_advantages", action="store_false", default=argparse.SUPPRESS,
                        help="do not mean-centre advantages per sequence (--no-center-advantages)")
    parser.add_argument("--config", metavar="YAML",
                        help="YAML mapping of OnlineConfig options (sdpo_fast/online/config.py; dashes or "
                             "underscores); precedence: defaults < --preset < file < flags")


def _flip_after(parser, default: str) -> None:
    parser.add_argument("--flip-after", type=int,
                        help=f"interactions before the preference flips (default: {default})")


def add_parser(subparsers) -> None:
    online = subparsers.add_parser("online", help=__doc__.split(":", 1)[1].strip(), description=__doc__)
    sub = online.add_subparsers(dest="online_command", required=True, metavar="EXPERIMENT")
    for name, text in (("curve", "win rate vs interactions for one persona, with the in-context oracle line"),
                       ("flip", "train on a persona, then on its opposite; judged under both"),
                       ("sequential", "train on several personas in turn; judged under each")):
        p = sub.add_parser(name, help=text, description=text)
        _common(p, demo=False)
        p.add_argument("--model", help="Hugging Face id or local path (default: the bundled tiny model)")
        p.add_argument("--persona", default="no-emojis",
                       help="persona name; for sequential a comma-separated list (default %(default)s)")
        p.add_argument("--preset", choices=["paper-personalization"], help="paper personalization settings")
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        for role in ("user", "judge"):
            p.add_argument(f"--{role}", default="rule", choices=["rule", "hf", "openai"],
                           help=f"simulated {role}: rule-based, local HF model or OpenAI-compatible endpoint")
            p.add_argument(f"--{role}-model", help=f"{role} LLM: HF path/id (hf) or endpoint model name (openai)")
            p.add_argument(f"--{role}-base-url", help=f"{role} endpoint base URL, e.g. http://127.0.0.1:8000/v1")
        p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                       help="environment variable holding the endpoint's API key (default %(default)s)")
        p.add_argument("--timeout", type=float, default=60.0, help="endpoint timeout in seconds (default 60)")
        p.add_argument("--retries", type=int, default=3, help="endpoint retries (default 3)")
        p.add_argument("--generation", default="hf", choices=["hf", "vllm"],
                       help="policy sampler: Hugging Face generate, or vLLM serving the LoRA adapter (needs vllm "
                            "and a CUDA GPU; evaluation replies still use Hugging Face generate)")
        p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3,
                       help="vLLM's share of GPU memory with --generation vllm (default %(default)s)")
        if name == "flip":
            _flip_after(p, "--interactions")
        p.set_defaults(func=run, experiment=name)
    add_demo_parser(sub)


def add_demo_parser(subparsers) -> None:
    """The CPU demo's sub-command (`sdpo-fast demo` and `sdpo-fast online demo`)."""
    demo = subparsers.add_parser(
        "demo", help="online SDPO on CPU: the bundled tiny model learns a rule-based user's hidden preference "
                     "(no emojis); prints and plots the win rate vs the base model",
        description="CPU demo of online SDPO on the bundled tiny model. Demo settings unless given: LoRA r 8, "
                    "alpha 16, lr 2e-3 (1e-3 with --flip), update every 4, replies of at most 48 tokens (96 with "
                    "--flip), signal clip 2, mean-centred advantages.")
    _common(demo, demo=True)
    demo.set_defaults(func=run_demo)


def online_config(args, **defaults):
    """The OnlineConfig of the command: `defaults` < --preset < --config file < the flags given."""
    from ..train.config import load_yaml

    values = given_fields(args, OnlineConfig)
    if "signal_clip" in values:
        values["signal_clip"] = values["signal_clip"] or None
    file_values = load_yaml(args.config) if args.config else {}
    return resolve_online_config(file_values, values, preset=getattr(args, "preset", None), defaults=defaults)


def _load(model_name: str | None, device: str, seed: int):
    from ..train.config import TrainConfig
    from ..train.setup import load_model_and_tokenizer

    if model_name is None and not (tiny_model_path() / "config.json").is_file():
        raise FileNotFoundError(f"the bundled tiny model is missing ({tiny_model_path()}); pass --model")
    config = TrainConfig(model=model_name or str(tiny_model_path()), lora_r=0, device=device, seed=seed)
    return load_model_and_tokenizer(config)


def _check_attn_backend(attn_backend: str, device_name: str) -> None:
    """Before weights load: the policy runs in `_load`'s dtype ("auto") on `device_name`."""
    from ..model.attention import check_backend
    from ..train.setup import resolve_device, resolve_dtype

    device = resolve_device(device_name)
    check_backend(attn_backend, device, resolve_dtype("auto", device))


def _backend(args, role: str):
    from ..online.users import HFChat, OpenAIChat

    name, url = getattr(args, f"{role}_model"), getattr(args, f"{role}_base_url")
    kind = getattr(args, role)
    if kind == "openai":
        if not url or not name:
            raise ValueError(f"--{role} openai needs --{role}-base-url and --{role}-model")
        return OpenAIChat(url, name, api_key_env=args.api_key_env, timeout=args.timeout, retries=args.retries)
    if not name:
        raise ValueError(f"--{role} hf needs --{role}-model (a local path or Hugging Face id)")
    chat_model, chat_tokenizer = _load(name, args.device, args.seed)
    return HFChat(chat_model.eval(), chat_tokenizer)


def _checks(args) -> None:
    for key, low in (("interactions", 1), ("eval_every", 1), ("eval_prompts", 1), ("flip_after", 1)):
        if getattr(args, key, None) is not None and getattr(args, key) < low:
            raise ValueError(f"--{key.replace('_', '-')} must be >= {low}, got {getattr(args, key)}")
    utilization = getattr(args, "vllm_gpu_memory_utilization", None)
    if utilization is not None:
        check_number("--vllm-gpu-memory-utilization", utilization, positive=True, what="a number in (0, 1]")
        if utilization > 1:
            raise ValueError(f"--vllm-gpu-memory-utilization must be a number in (0, 1], got {utilization}")


def _check_output_dir(out: Path, overwrite: bool) -> None:
    """Before any model loads: --output-dir must be a directory, and empty unless --overwrite."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {str(out)!r} is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--output-dir {str(out)!r} already holds results; pass --overwrite to replace them or "
                         "choose another --output-dir")


_RUN_OPTIONS = ("experiment", "model", "persona", "personas_file", "interactions", "flip_after", "eval_every",
                "eval_prompts", "device", "user", "user_model", "judge", "judge_model", "generation")


def _save_config(args, config, personas: list[str]) -> None:
    """--output-dir/config.yaml: the resolved OnlineConfig (loads back with --config), under comment lines
    holding the run's other options."""
    import yaml

    out = Path(args.output_dir)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    run = {key: getattr(args, key) for key in _RUN_OPTIONS if getattr(args, key, None) is not None}
    run["persona"] = ",".join(personas)
    header = "".join(f"# {line}\n" for line in yaml.safe_dump(run, sort_keys=False).splitlines())
    write_text_atomic(out / "config.yaml", "# sdpo-fast online: the run's options (comments) and its resolved "
                      "OnlineConfig (loads back with --config)\n" + header
                      + yaml.safe_dump(config.to_dict(), sort_keys=False))


def _policy(model, tokenizer, config, generator=None):
    from ..online.loop import OnlinePolicy
    from ..train.setup import apply_lora

    if config.lora_r < 1:
        raise ValueError("--lora-r must be >= 1: experiments compare the adapter against the base model")
    return OnlinePolicy(apply_lora(model, config.lora_config()), tokenizer, config, generator=generator)


def _run_experiment(args, policy, personas_by_name, names, make_user, judge, train_prompts, eval_prompts):
    from ..online import experiments

    personas = [personas_by_name[n] for n in names]
    options = dict(eval_every=args.eval_every, train_prompts=train_prompts, eval_prompts=eval_prompts,
                   log=print, overwrite=args.overwrite)
    _save_config(args, policy.config, names)
    if args.experiment == "flip" and personas[0].opposite is None:
        raise ValueError(f"persona {personas[0].name!r} has no opposite; set `opposite` in the persona file")
    start = time.perf_counter()
    try:
        if args.experiment == "curve":
            rows = experiments.win_rate_curve(policy, personas[0], make_user, judge, args.output_dir,
                                              args.interactions, **options)
        elif args.experiment == "flip":
            rows = experiments.preference_flip(policy, personas[0], personas_by_name[personas[0].opposite],
                                               make_user, judge, args.output_dir, args.interactions,
                                               flip_after=args.flip_after, **options)
        else:
            rows = experiments.sequential_preferences(policy, personas, make_user, judge, args.output_dir,
                                                      args.interactions, **options)
    finally:  # the adapter trained so far is kept even when an endpoint fails
        if policy.updates:
            policy.model.save_pretrained(Path(args.output_dir) / "adapter")
    seconds = time.perf_counter() - start
    name = {"curve": "win_rate_curve", "flip": "preference_flip", "sequential": "sequential_preferences"}
    print(f"{policy.generations} policy replies, {policy.updates} updates in {seconds:.1f}s "
          f"(evaluation included); wrote {Path(args.output_dir) / name[args.experiment]}.csv/.png")
    return rows


def run(args) -> int:
    from ..online.experiments import EVAL_PROMPTS, TRAIN_PROMPTS
    from ..online.judge import LLMJudge, RuleJudge
    from ..online.personas import load_personas
    from ..online.users import EndpointError, LLMUser, RuleUser

    _checks(args)
    _check_output_dir(Path(args.output_dir), args.overwrite)
    personas = load_personas(args.personas_file)
    names = [n.strip() for n in args.persona.split(",") if n.strip()]
    if not names or (args.experiment != "sequential" and len(names) != 1):
        what = "personas, comma-separated," if args.experiment == "sequential" else "one persona"
        raise ValueError(f"--persona must name {what} from {sorted(personas)}, got {args.persona!r}")
    for n in names:
        if n not in personas:
            raise ValueError(f"--persona {n!r} is not defined; available: {sorted(personas)}")
    config = online_config(args)
    args.seed = config.seed
    _check_attn_backend(config.attn_backend, args.device)
    generator = None
    if args.generation == "vllm":  # first: vLLM sizes its share of the GPU before training takes memory
        from ..online.vllm_generator import VLLMGenerator

        generator = VLLMGenerator(args.model or str(tiny_model_path()), max_lora_rank=config.lora_r, seed=args.seed,
                                  gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                                  adapter_dir=Path(args.output_dir) / "vllm-adapters",
                                  behavior_logprobs=config.importance_clip is not None)
    model, tokenizer = _load(args.model, args.device, args.seed)
    user_backend = None if args.user == "rule" else _backend(args, "user")
    judge = RuleJudge() if args.judge == "rule" else LLMJudge(_backend(args, "judge"))

    def make_user(persona):
        return RuleUser(persona) if user_backend is None else LLMUser(persona, user_backend)

    policy = _policy(model, tokenizer, config, generator)
    if args.model is None:
        train_prompts, eval_prompts = demo_prompts(args.seed, args.eval_prompts)
    else:
        train_prompts, eval_prompts = list(TRAIN_PROMPTS), list(EVAL_PROMPTS[:args.eval_prompts])
    try:
        _run_experiment(args, policy, personas, names, make_user, judge, train_prompts, eval_prompts)
    except EndpointError as exc:  # reported like other bad input: one line, exit status 2
        raise ValueError(str(exc)) from None
    return 0


def run_demo(args) -> int:
    from ..online.judge import RuleJudge
    from ..online.personas import load_personas
    from ..online.users import RuleUser
    from ..demo import online_demo_settings, single_thread

    _checks(args)
    _check_output_dir(Path(args.output_dir), args.overwrite)
    personas = load_personas(args.personas_file)
    config = online_config(args, **online_demo_settings(args.flip))
    args.seed = config.seed
    model, tokenizer = _load(None, "cpu", args.seed)
    policy = _policy(model, tokenizer, config)
    train_prompts, eval_prompts = demo_prompts(args.seed, args.eval_prompts)
    args.experiment = "flip" if args.flip else "curve"
    if args.flip and args.flip_after is None:
        args.flip_after = 100
    persona = "brief" if args.flip else "no-emojis"
    if persona not in personas:
        raise ValueError(f"the demo needs persona {persona!r} in --personas-file; it has {sorted(personas)}")
    who = "who wants brief answers, then fuller ones" if args.flip else "who dislikes emojis"
    counts = f"{args.flip_after} + {args.interactions}" if args.flip else str(args.interactions)
    print(f"online SDPO demo: bundled tiny model, rule-based user {who}, {counts} interactions, "
          f"update every {config.update_every}")
    with single_thread():
        _run_experiment(args, policy, personas, [persona], RuleUser, RuleJudge(), train_prompts, eval_prompts)
    return 0
