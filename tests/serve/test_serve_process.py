"""`sdpo-fast serve run` as a process driven by the official `openai` client: kill -9 during requests and during
an update, then a restart, keeps every acknowledged turn and learns each batch exactly once; SIGTERM stops it
cleanly; no conversation text reaches its output."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

import torch  # noqa: E402

import sdpo_fast  # noqa: E402
from sdpo_fast.cli import main  # noqa: E402
from sdpo_fast.online.adapters import STATE_FILE  # noqa: E402
from sdpo_fast.serve.store import Store  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "sdpo-fast-tiny"
ROOT = Path(sdpo_fast.__file__).resolve().parent.parent


class ServerProcess:
    """`sdpo-fast serve run --port 0` in a subprocess; `url` once it printed its listening line."""

    def __init__(self, state_dir, *flags: str, log_dir: Path):
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.out = open(log_dir / f"out{time.monotonic_ns()}.txt", "w+")
        self.err = open(log_dir / f"err{time.monotonic_ns()}.txt", "w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sdpo_fast.cli", "serve", "run", "--state-dir", str(state_dir), "--port", "0",
             *flags], stdout=self.out, stderr=self.err, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            match = re.search(r"^listening on (http://127\.0\.0\.1:\d+)$", Path(self.out.name).read_text(), re.M)
            if match:
                self.url = match.group(1)
                return
            assert self.process.poll() is None, Path(self.err.name).read_text()
            time.sleep(0.1)
        self.process.kill()
        raise AssertionError("the server did not print its listening line in 120 s")

    def client(self, key: str):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def output(self) -> str:
        return Path(self.out.name).read_text() + Path(self.err.name).read_text()

    def stop(self, sig=signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        code = self.process.wait(timeout=60)
        self.out.close()
        self.err.close()
        return code


def add_user(state_dir, name: str, capsys) -> str:
    capsys.readouterr()
    assert main(["serve", "add-user", name, "--state-dir", str(state_dir)]) == 0
    return capsys.readouterr().out.strip()


def me(server, key: str) -> dict:
    import httpx

    return httpx.get(server.url + "/v1/me", headers={"Authorization": f"Bearer {key}"}).json()


def converse(client, prompt: str, followup: str) -> list[tuple[list, str]]:
    """A request and its follow-up (whose own reply is capped at one token); the acknowledged (prompt, reply)s."""
    x = [{"role": "user", "content": prompt}]
    y = client.chat.completions.create(model=MODEL, messages=x).choices[0].message.content
    history = x + [{"role": "assistant", "content": y}, {"role": "user", "content": followup}]
    y2 = client.chat.completions.create(model=MODEL, messages=history, max_tokens=1).choices[0].message.content
    return [(x, y), (history, y2)]


def test_kill9_mid_request_and_mid_update_then_restart(tmp_path, capsys):
    state = tmp_path / "state"
    keys = {name: add_user(state, name, capsys) for name in ("alice", "bob")}
    server = ServerProcess(state, log_dir=tmp_path)
    alice, bob = server.client(keys["alice"]), server.client(keys["bob"])
    acknowledged = {"alice": [], "bob": []}
    prompts = ["Tell me about volcanoes.", "Give me tips for saving money.", "Explain chess to me.",
               "Any advice on cooking rice?"]
    for prompt in prompts:
        acknowledged["alice"] += converse(alice, prompt, "Please stop using emojis.")

    def bob_chats():  # requests in flight when the server dies
        for i in range(1000):
            try:
                acknowledged["bob"] += converse(bob, f"Tell me about tea {i}.", "Thanks.")
            except openai.APIConnectionError:
                return

    thread = threading.Thread(target=bob_chats)
    thread.start()
    time.sleep(0.3)  # alice's update (woken by her 4th follow-up) and bob's requests are running
    server.stop(signal.SIGKILL)
    thread.join()

    server = ServerProcess(state, log_dir=tmp_path)
    store = Store(state)
    for user, turns in acknowledged.items():
        for prompt, reply in turns:
            assert store.find_reply(user, prompt, reply) is not None, (user, prompt)
    deadline = time.monotonic() + 60
    while me(server, keys["alice"])["learned"] < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert me(server, keys["alice"]) == {"user": "alice", "interactions": 4, "learned": 4, "adapter_version": 1}
    state_file = torch.load(state / "adapters" / "alice" / STATE_FILE, weights_only=True)
    assert state_file["updates"] == 1  # learned once, whether the kill came before or after its save
    assert me(server, keys["bob"])["learned"] == 0 and me(server, keys["bob"])["adapter_version"] == 0
    after = converse(server.client(keys["alice"]), "Tell me about the moon.", "Please stop using emojis.")
    assert store.find_reply("alice", *after[1]) is not None

    assert server.stop(signal.SIGTERM) == 0
    output = server.output()
    assert "listening on" in output and "stopped" in output
    for turns in acknowledged.values():
        for prompt, reply in turns:
            assert prompt[-1]["content"] not in output and (len(reply) < 12 or reply not in output)
