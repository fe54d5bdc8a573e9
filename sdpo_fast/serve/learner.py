"""Background learning: whenever a user has `update_every` interactions not yet learned, one SDPO update of that
user's adapter (OnlinePolicy.observe -> the shared `train_step`) on the learner's own copy of the model, so
replies keep being served while it runs.

Order of a batch: the adapter directory is written atomically (UserAdapters.save), then the interactions are
marked learned with the new adapter version in one transaction. A crash between the two leaves an adapter one
update ahead of the database; `reconcile` (run before serving) marks that batch learned, so it is not learned
twice. A crash before the save leaves the previous adapter and the batch unlearned: it is learned again.
"""
from __future__ import annotations

import sys
import threading
import time

from ..online.adapters import UserAdapters
from .store import Store

RETRY_AFTER_S = 60.0
"""A user whose update failed is retried after this many seconds."""


class Learner:
    """Learns each user's pending interactions in batches of `adapters.config.update_every` on a daemon thread.

    adapters: the learning UserAdapters (writable; its model is not the one replies are sampled from).
    files_lock: held while adapter directories are read or written, shared with the replying side.
    log: called with one line per update (user, version, counts; never conversation text).
    """

    def __init__(self, store: Store, adapters: UserAdapters, files_lock: threading.Lock, *,
                 poll_s: float = 0.5, log=None):
        self.store, self.adapters, self.files_lock, self.poll_s = store, adapters, files_lock, poll_s
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._failed: dict[str, float] = {}
        self._thread: threading.Thread | None = None

    @property
    def batch(self) -> int:
        return self.adapters.config.update_every

    def reconcile(self) -> None:
        """Mark the batch an adapter on disk learned before a crash kept it from being recorded."""
        for user in self.store.users():
            if not self.adapters.path(user).exists():
                continue
            with self.files_lock:
                policy = self.adapters.policy(user)
            recorded = self.store.adapter_version(user)
            if policy.updates == recorded + 1:
                items = self.store.pending(user, self.batch)
                self.store.mark_learned(user, [i.id for i in items], policy.updates)
            elif policy.updates != recorded:
                self.log(f"learner: user {user}: adapter at update {policy.updates}, database at {recorded}; "
                         "serving the adapter on disk")

    def learn_batch(self, user: str) -> dict | None:
        """One update from the user's oldest `update_every` pending interactions (None: fewer are pending)."""
        items = self.store.pending(user, self.batch)
        if len(items) < self.batch:
            return None
        with self.files_lock:
            policy = self.adapters.policy(user)
        policy.pending.clear()  # the database, not the adapter's buffer, holds what is still to learn
        stats = None
        for item in items:
            stats = policy.observe(item.prompt, item.reply, item.followup, item.token_ids, item.logprobs)
        with self.files_lock:
            self.adapters.save(user)
        self.store.mark_learned(user, [i.id for i in items], policy.updates)
        return stats

    def run_pending(self) -> int:
        """Learn every full batch now pending (until stopped); returns the number of batches learned."""
        done = 0
        while not self._stop.is_set():
            now = time.monotonic()
            users = [u for u in self.store.users_with_pending(self.batch) if self._failed.get(u, 0.0) <= now]
            if not users:
                return done
            for user in users:
                if self._stop.is_set():
                    break
                start = time.perf_counter()
                try:
                    stats = self.learn_batch(user)
                except Exception as exc:  # noqa: BLE001 - one user's failure must not stop the others'
                    self._failed[user] = time.monotonic() + RETRY_AFTER_S
                    self.log(f"learner: update of user {user} failed ({type(exc).__name__}); retrying in "
                             f"{RETRY_AFTER_S:.0f}s")
                    continue
                if stats is not None:
                    done += 1
                    loss = f", loss {stats['loss']:.4f}" if "loss" in stats else ""
                    self.log(f"learner: user {user} adapter version {self.store.adapter_version(user)} "
                             f"({stats['interactions']} interactions{loss}, {time.perf_counter() - start:.1f}s)")
        return done

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sdpo-serve-learner", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.run_pending()
            self.wake.wait(self.poll_s)
            self.wake.clear()

    def stop(self) -> None:
        """Let the running update finish and save, then end the thread."""
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
