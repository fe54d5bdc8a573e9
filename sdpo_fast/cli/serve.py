"""`sdpo-fast serve`: an OpenAI-compatible chat service that learns each user's preferences from their follow-ups
(add-user, remove-user, list-users, run, export)."""
from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

from ..demo.assets import tiny_model_path
from ..train.setup import importable
from .online import add_online_config_flags, online_config

DEFAULT_STATE_DIR = "./sdpo-serve"
TINY_MODEL_NAME = "sdpo-fast-tiny"
NO_SERVE = "serve run needs fastapi and uvicorn: pip install 'sdpo_fast[serve]'"


def _state_dir(parser) -> None:
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                        help="the service's database and adapters (default %(default)s)")


def add_parser(subparsers) -> None:
    serve = subparsers.add_parser("serve", help=__doc__.split(":", 1)[1].strip(), description=__doc__)
    sub = serve.add_subparsers(dest="serve_command", required=True, metavar="ACTION")
    add = sub.add_parser("add-user", help="create a user; prints their new API key (one line)")
    add.add_argument("name", help="1-64 letters, digits, '_' or '-'")
    _state_dir(add)
    add.set_defaults(func=add_user)
    remove = sub.add_parser("remove-user", help="delete a user with their conversations and adapter")
    remove.add_argument("name")
    _state_dir(remove)
    remove.set_defaults(func=remove_user)
    listing = sub.add_parser("list-users", help="users and their counts (no keys)")
    _state_dir(listing)
    listing.set_defaults(func=list_users)

    run_parser = sub.add_parser(
        "run", help="serve the OpenAI-compatible API; learns each user's adapter in the background",
        description="Serve one base model with one LoRA adapter per user. Default model: the bundled tiny model "
                    "with `sdpo-fast demo`'s settings (LoRA r 8, lr 2e-3, update every 4, 48 new tokens).")
    _state_dir(run_parser)
    run_parser.add_argument("--model", help="Hugging Face id or local path (default: the bundled tiny model)")
    run_parser.add_argument("--served-model-name",
                            help=f"the name clients send as `model` (default: --model, or {TINY_MODEL_NAME})")
    run_parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    run_parser.add_argument("--port", type=int, default=8000, help="port (0: a free one; default %(default)s)")
    run_parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    run_parser.add_argument("--generator", default="hf", choices=["hf", "vllm"],
                            help="reply sampler: Hugging Face generate, or vLLM with per-user LoRA (needs vllm "
                                 "and a CUDA GPU)")
    run_parser.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3,
                            help="vLLM's share of GPU memory with --generator vllm (default %(default)s)")
    run_parser.add_argument("--max-body-bytes", type=int, default=1 << 20,
                            help="largest request body accepted (default %(default)s)")
    run_parser.add_argument("--rate-limit", type=int, default=120,
                            help="chat completions per user per minute (0: no limit; default %(default)s)")
    run_parser.add_argument("--max-loaded-users", type=int, default=16,
                            help="adapters kept in memory at once (default %(default)s)")
    add_online_config_flags(run_parser)
    run_parser.set_defaults(func=run)

    export = sub.add_parser("export", help="write the stored conversations as WildChat-format JSONL rows "
                                           "(`sdpo-fast train` reads them)")
    _state_dir(export)
    export.add_argument("--out", required=True, help="the JSONL file to write")
    export.add_argument("--user", help="only this user's conversations")
    export.set_defaults(func=run_export)


def _store(args, *, create: bool):
    from ..serve.store import DB_FILE, Store

    if not create and not (Path(args.state_dir) / DB_FILE).is_file():
        raise ValueError(f"--state-dir {args.state_dir!r} holds no service state; create a user with "
                         "`sdpo-fast serve add-user NAME --state-dir DIR` first")
    return Store(args.state_dir)


def add_user(args) -> int:
    print(_store(args, create=True).add_user(args.name))
    return 0


def remove_user(args) -> int:
    from ..online.adapters import check_user_id

    store = _store(args, create=False)
    store.remove_user(check_user_id(args.name))
    shutil.rmtree(store.adapters_dir / args.name, ignore_errors=True)
    print(f"removed user {args.name}")
    return 0


def list_users(args) -> int:
    store = _store(args, create=False)
    print("user\tconversations\treplies\tinteractions\tlearned\tadapter_version")
    for name in store.users():
        c = store.counts(name)
        print(f"{name}\t{c['conversations']}\t{c['replies']}\t{c['interactions']}\t{c['learned']}\t"
              f"{c['adapter_version']}")
    return 0


def run_export(args) -> int:
    from ..serve.export import export

    _store(args, create=False)
    export(args.state_dir, args.out, user=args.user)
    return 0


def _checks(args) -> None:
    """Before weights load: the flags and the optional packages."""
    if not (importable("fastapi") and importable("uvicorn")):
        raise ValueError(NO_SERVE)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    for key, low in (("max_body_bytes", 1024), ("rate_limit", 0), ("max_loaded_users", 1)):
        if getattr(args, key) < low:
            raise ValueError(f"--{key.replace('_', '-')} must be >= {low}, got {getattr(args, key)}")
    if args.generator == "vllm" and not importable("vllm"):
        raise ValueError("--generator vllm needs vllm (pip install vllm) and a CUDA GPU; or use --generator hf")
    if not 0 < args.vllm_gpu_memory_utilization <= 1:
        raise ValueError("--vllm-gpu-memory-utilization must be a number in (0, 1], got "
                         f"{args.vllm_gpu_memory_utilization}")


def run(args) -> int:
    import os

    import torch

    from ..demo import online_demo_settings
    from .online import _check_attn_backend, _load

    _checks(args)
    config = online_config(args, **(online_demo_settings(False) if args.model is None else {}))
    if config.lora_r < 1:
        raise ValueError("--lora-r must be >= 1: each user gets their own LoRA adapter")
    _check_attn_backend(config.attn_backend, args.device)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); choose another --port "
                         "(0: a free one)") from None
    os.umask(0o077)
    generator = None
    if args.generator == "vllm":
        from ..online.vllm_generator import VLLMGenerator

        generator = VLLMGenerator(args.model or str(tiny_model_path()), max_lora_rank=config.lora_r,
                                  seed=config.seed, gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                                  adapter_dir=Path(args.state_dir) / "vllm-adapters",
                                  behavior_logprobs=config.importance_clip is not None)
    if args.model is None:
        torch.set_num_threads(1)  # the tiny model's ops are too small to gain from threads (demo/threads.py)
    model, tokenizer = _load(args.model, args.device, config.seed)
    return _serve(args, sock, model, tokenizer, config, generator)


def _serve(args, sock, model, tokenizer, config, generator) -> int:
    import uvicorn

    from ..serve.app import Service, create_app

    service = Service(args.state_dir, model, tokenizer, config,
                      model_name=args.served_model_name or args.model or TINY_MODEL_NAME, generator=generator,
                      max_body_bytes=args.max_body_bytes, rate_limit=args.rate_limit,
                      max_loaded_users=args.max_loaded_users)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if not self.should_exit:
                print(f"listening on http://{shown}:{port}", flush=True)

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            # a signal asks for the clean stop this server just did, not for the process to die afterwards
            getattr(self, "_captured_signals", []).clear()

    server = Server(uvicorn.Config(create_app(service), log_level="warning", access_log=False,
                                   timeout_graceful_shutdown=30))
    server.run(sockets=[sock])
    print("stopped", file=sys.stderr, flush=True)
    return 0

