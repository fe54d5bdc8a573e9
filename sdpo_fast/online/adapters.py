"""Per-user LoRA adapters over one frozen base model, with the two calls a chat service needs:
`respond(user_id, messages)` and `learn(user_id, messages_with_followup)`.

Each user id has its own adapter and optimizer; an update for one user touches only that user's adapter
parameters (base weights are frozen). A user's files live in `root/<user_id>/`: the adapter as peft writes it
(`adapter_model.safetensors`, `adapter_config.json`: `PeftModel.from_pretrained(base, root/user_id)` loads it)
and `online_state.pt` (optimizer state, counters, not-yet-learned interactions, an ema teacher's tensors; tensors
and plain data only, read with `weights_only=True`). The directory is written under a temporary name, then renamed into place.
At most `max_loaded_users` adapters stay in memory; the least recently used one is saved and unloaded.
A `read_only` instance (a server's replying copy beside a learning one) never writes: unloading just frees.
"""
from __future__ import annotations

import collections
import copy
import os
import re
import shutil
from pathlib import Path

import torch

from ..data.interactions import Interaction
from ..model.generation import Sample
from ..utils.files import fsync_file, replace_dir
from ..utils.checks import check_int
from .config import OnlineConfig
from .loop import OnlinePolicy, PendingInteraction, check_messages

_USER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_FORMAT = 2
ADAPTER_FILE = "adapter_model.safetensors"
STATE_FILE = "online_state.pt"


def check_user_id(user_id) -> str:
    """`user_id` if it is safe as a file name and adapter name (1-64 of A-Z a-z 0-9 _ -, not starting with _ or -)."""
    if not isinstance(user_id, str) or not _USER_ID.fullmatch(user_id):
        raise ValueError(f"user_id must be 1-64 letters, digits, '_' or '-' starting with a letter or digit "
                         f"(it names a file), got {user_id!r}")
    return user_id


class UserAdapters:
    """One base model, one LoRA adapter per user id, saved under `root`.

    model: a transformers causal LM (not yet peft-wrapped); its weights are frozen. config.lora_r must be > 0.
    max_loaded_users: adapters (with their optimizers) kept in memory at once.
    read_only: never write the adapters (`save` and `learn` refuse; `unload` only frees memory).
    """

    def __init__(self, model, tokenizer, root: str | os.PathLike, config: OnlineConfig | None = None, *,
                 max_loaded_users: int = 16, generator=None, read_only: bool = False):
        self.config = (config or OnlineConfig()).validate()
        if self.config.lora_r < 1:
            raise ValueError("per-user adapters need lora_r >= 1")
        check_int("max_loaded_users", max_loaded_users, 1)
        self.base, self.tokenizer, self.generator = model, tokenizer, generator
        self.max_loaded_users, self.read_only = max_loaded_users, read_only
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not read_only:
            _recover(self.root)
        self.model = None
        self.policies: collections.OrderedDict[str, OnlinePolicy] = collections.OrderedDict()
        for p in model.parameters():
            p.requires_grad_(False)

    def path(self, user_id: str) -> Path:
        """The directory of the user's adapter."""
        return self.root / check_user_id(user_id)

    def _add_adapter(self, user_id: str) -> None:
        if self.model is None:
            from peft import get_peft_model

            self.model = get_peft_model(self.base, self.config.lora_config(), adapter_name=user_id)
        else:
            self.model.add_adapter(user_id, self.config.lora_config())

    def policy(self, user_id: str) -> OnlinePolicy:
        """The user's policy, loaded from disk or created fresh (a new adapter starts equal to the base model)."""
        check_user_id(user_id)
        if user_id in self.policies:
            self.policies.move_to_end(user_id)
            return self.policies[user_id]
        path = self.path(user_id)
        adapter, state = _read(path, user_id) if path.exists() else (None, None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self._add_adapter(user_id)
        policy = OnlinePolicy(self.model, self.tokenizer, self.config, adapter_name=user_id,
                              generator=self.generator)
        if adapter is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, adapter, adapter_name=user_id)
            policy.teacher = policy.new_teacher()  # an EMA starts from the loaded adapter unless one was saved
            if policy.teacher.ema and state.get("teacher"):
                policy.teacher.load_state_dict(state["teacher"])
            policy.optimizer.load_state_dict(state["optimizer"])
            policy.generations, policy.updates = state["generations"], state["updates"]
            policy.pending = [PendingInteraction(Interaction(i["history"], i["completion"], i["followup"]),
                                                 _tuple(i["completion_ids"]), _tuple(i.get("completion_logprobs")))
                              for i in state["pending"]]
            policy.recent.update((text, Sample(text, tuple(ids), _tuple(rest[0] if rest else None)))
                                 for text, ids, *rest in state["recent"])
        self.policies[user_id] = policy
        while len(self.policies) > self.max_loaded_users:
            self.unload(next(iter(self.policies)))
        return policy

    def unload(self, user_id: str) -> None:
        """Save the user's adapter (unless read_only) and free it (and its optimizer) from memory; a later call
        loads it again."""
        if user_id not in self.policies:
            return
        if not self.read_only:
            self.save(user_id)
        del self.policies[user_id]
        self.model.delete_adapter(user_id)

    def respond(self, user_id: str, messages: list[dict]) -> str:
        """The user's adapted model's reply to `messages` (ending with a user message)."""
        return self.policy(user_id).respond(messages)

    def learn(self, user_id: str, messages_with_followup: list[dict]) -> dict | None:
        """Learn from a conversation ending [..., user x, assistant y, user u]; updates the user's adapter once
        `update_every` such interactions are collected, then saves it. Returns the update's stats or None.

        When y is one of this user's recent `respond` replies, the update uses its sampled token ids."""
        if self.read_only:
            raise ValueError("these adapters are read-only; learn through the instance that saves them")
        check_messages(messages_with_followup, "messages_with_followup", last_role="user")
        if len(messages_with_followup) < 3 or messages_with_followup[-2]["role"] != "assistant" \
                or messages_with_followup[-3]["role"] != "user":
            raise ValueError("messages_with_followup must end with user, assistant, user messages")
        policy = self.policy(user_id)
        stats = policy.observe(messages_with_followup[:-2], messages_with_followup[-2]["content"],
                               messages_with_followup[-1]["content"])
        self.save(user_id)
        return stats

    def save(self, user_id: str) -> Path:
        """Write the user's adapter directory (adapter, optimizer state, counters, pending interactions)."""
        if self.read_only:
            raise ValueError("these adapters are read-only; save them through the instance that learns")
        policy = self.policy(user_id)
        state = {"format": _FORMAT, "optimizer": policy.optimizer.state_dict(),
                 "generations": policy.generations, "updates": policy.updates,
                 "pending": [{"history": p.interaction.history, "completion": p.interaction.completion,
                              "followup": p.interaction.followup,
                              "completion_ids": _list(p.completion_ids),
                              "completion_logprobs": _list(p.completion_logprobs)}
                             for p in policy.pending],
                 "recent": [[text, list(s.token_ids), _list(s.logprobs)] for text, s in policy.recent.items()],
                 "teacher": policy.teacher.state_dict()}

        def write(tmp: Path) -> None:
            write_adapter(self.model, user_id, tmp)
            torch.save(state, tmp / STATE_FILE)

        return replace_dir(self.path(user_id), write)


def write_adapter(model, adapter_name: str, directory: Path) -> None:
    """Write peft adapter `adapter_name` of `model` into a new `directory` as `PeftModel.from_pretrained` reads it
    (adapter_model.safetensors, adapter_config.json with its target modules sorted)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory.mkdir(exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous()
               for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
    save_file(tensors, directory / ADAPTER_FILE, metadata={"format": "pt"})
    fsync_file(directory / ADAPTER_FILE)
    _sorted_targets(model.peft_config[adapter_name]).save_pretrained(directory)


def _sorted_targets(config):
    """A copy of a peft config whose target module set is a sorted list, so that equal adapters save equal files."""
    if isinstance(config.target_modules, (set, frozenset)):
        config = copy.copy(config)
        config.target_modules = sorted(config.target_modules)
    return config


def _tuple(values) -> tuple | None:
    return None if values is None else tuple(values)


def _list(values) -> list | None:
    return None if values is None else list(values)


def _read(path: Path, user_id: str) -> tuple[dict, dict]:
    """The adapter tensors and online state in `path`; ValueError naming the user when unreadable."""
    from safetensors.torch import load_file

    try:
        adapter = load_file(path / ADAPTER_FILE)
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path}: cannot read the adapter of user {user_id!r} ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"{path}: not an online adapter directory of this version")
    return adapter, state


def _recover(root: Path) -> None:
    """Finish or undo saves that were interrupted: a directory renamed aside whose replacement never arrived
    is put back; temporary and superseded directories are removed."""
    for aside in root.glob(".*.old*"):
        user_id = aside.name[1:].rsplit(".old", 1)[0]
        if _USER_ID.match(user_id) and not (root / user_id).exists():
            aside.rename(root / user_id)
        else:
            shutil.rmtree(aside, ignore_errors=True)
    for tmp in root.glob(".*.tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)
