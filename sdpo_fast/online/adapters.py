"""Per-user LoRA adapters over one frozen base model, with the two calls a chat service needs:
`respond(user_id, messages)` and `learn(user_id, messages_with_followup)`.

Each user id has its own adapter and optimizer; an update for one user touches only that user's adapter
parameters (base weights are frozen). A user's adapter, optimizer state, counters and not-yet-learned
interactions are saved in `root/<user_id>.pt` (written to a temporary file, fsynced, then renamed).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..data.interactions import Interaction
from .loop import OnlineConfig, OnlinePolicy, _check_messages, lora_config

_USER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_FORMAT = 1


def check_user_id(user_id) -> str:
    """`user_id` if it is safe as a file name and adapter name (1-64 of A-Z a-z 0-9 _ -, not starting with _ or -)."""
    if not isinstance(user_id, str) or not _USER_ID.match(user_id):
        raise ValueError(f"user_id must be 1-64 letters, digits, '_' or '-' starting with a letter or digit "
                         f"(it names a file), got {user_id!r}")
    return user_id


class UserAdapters:
    """One base model, one LoRA adapter per user id, saved under `root`.

    model: a transformers causal LM (not yet peft-wrapped); its weights are frozen. config.lora_r must be > 0.
    """

    def __init__(self, model, tokenizer, root: str | os.PathLike, config: OnlineConfig | None = None):
        self.config = (config or OnlineConfig()).validate()
        if self.config.lora_r < 1:
            raise ValueError("per-user adapters need lora_r >= 1")
        self.base, self.tokenizer = model, tokenizer
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".*.pt.tmp*"):
            stale.unlink()
        self.model = None
        self.policies: dict[str, OnlinePolicy] = {}
        for p in model.parameters():
            p.requires_grad_(False)

    def path(self, user_id: str) -> Path:
        return self.root / f"{check_user_id(user_id)}.pt"

    def _add_adapter(self, user_id: str) -> None:
        if self.model is None:
            from peft import get_peft_model

            self.model = get_peft_model(self.base, lora_config(self.config), adapter_name=user_id)
        else:
            self.model.add_adapter(user_id, lora_config(self.config))

    def policy(self, user_id: str) -> OnlinePolicy:
        """The user's policy, loaded from disk or created fresh (a new adapter starts equal to the base model)."""
        check_user_id(user_id)
        if user_id in self.policies:
            return self.policies[user_id]
        path = self.path(user_id)
        state = None
        if path.exists():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
                raise ValueError(f"{path}: cannot read the adapter file of user {user_id!r} ({exc})") from None
            if not isinstance(state, dict) or state.get("format") != _FORMAT:
                raise ValueError(f"{path}: not an adapter file of this version")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self._add_adapter(user_id)
        policy = OnlinePolicy(self.model, self.tokenizer, self.config, adapter_name=user_id)
        if state is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, state["adapter"], adapter_name=user_id)
            policy.optimizer.load_state_dict(state["optimizer"])
            policy.generations, policy.updates = state["generations"], state["updates"]
            policy.pending = [Interaction(i["history"], i["completion"], i["followup"]) for i in state["pending"]]
        self.policies[user_id] = policy
        return policy

    def respond(self, user_id: str, messages: list[dict]) -> str:
        """The user's adapted model's reply to `messages` (ending with a user message)."""
        return self.policy(user_id).respond(messages)

    def learn(self, user_id: str, messages_with_followup: list[dict]) -> dict | None:
        """Learn from a conversation ending [..., user x, assistant y, user u]; updates the user's adapter once
        `update_every` such interactions are collected, then saves it. Returns the update's stats or None."""
        _check_messages(messages_with_followup, "messages_with_followup", last_role="user")
        if len(messages_with_followup) < 3 or messages_with_followup[-2]["role"] != "assistant" \
                or messages_with_followup[-3]["role"] != "user":
            raise ValueError("messages_with_followup must end with user, assistant, user messages")
        policy = self.policy(user_id)
        stats = policy.observe(messages_with_followup[:-2], messages_with_followup[-2]["content"],
                               messages_with_followup[-1]["content"])
        self.save(user_id)
        return stats

    def save(self, user_id: str) -> Path:
        """Write the user's adapter, optimizer state, counters and pending interactions atomically."""
        from peft import get_peft_model_state_dict

        policy = self.policy(user_id)
        adapter = {k: v.detach().cpu().clone()
                   for k, v in get_peft_model_state_dict(self.model, adapter_name=user_id).items()}
        state = {"format": _FORMAT, "adapter": adapter, "optimizer": policy.optimizer.state_dict(),
                 "generations": policy.generations, "updates": policy.updates,
                 "pending": [{"history": i.history, "completion": i.completion, "followup": i.followup}
                             for i in policy.pending]}
        final = self.path(user_id)
        tmp = self.root / f".{user_id}.pt.tmp{os.getpid()}"
        try:
            torch.save(state, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final
