"""The chat page in headless Chromium against a real `sdpo-fast serve run` on the bundled tiny model: paste a key,
chat two turns, see the replies the service stored and the learned count GET /v1/me reports."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import httpx
import pytest

from browser import CHROMIUM, Browser
from sdpo_fast.serve.page import CSP, PAGE_HEADERS, page_html
from sdpo_fast.serve.store import Store

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)")


def test_page_is_self_contained():
    page = page_html()
    assert CSP in page and "default-src 'none'" in CSP and "connect-src 'self'" in CSP
    for external in ("http://", "https://", "//cdn", " src=", "localStorage", "console."):
        assert external not in page, external
    assert page.count("<script>") == 1


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """(url, state_dir, {"alice": key, "bob": key}) of a `serve run` that learns after every follow-up."""
    state_dir = tmp_path_factory.mktemp("serve") / "state"
    store = Store(state_dir)
    keys = {name: store.add_user(name) for name in ("alice", "bob")}
    store.close()
    process = subprocess.Popen([sys.executable, "-m", "sdpo_fast.cli", "serve", "run", "--state-dir", str(state_dir),
                                "--port", "0", "--update-every", "1", "--max-new-tokens", "12"],
                               stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.startswith("listening on http://127.0.0.1:"), line
    yield line.split()[-1], state_dir, keys
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0


@pytest.fixture
def browser(tmp_path):
    browser = Browser(tmp_path / "profile", timeout=60)
    yield browser
    browser.close()


def dom(browser, tab, expression):
    return browser.evaluate(tab, f"(() => {{ const $ = id => document.getElementById(id); return {expression}; }})()")


@pytest.mark.slow
def test_paste_key_chat_and_see_learned(service, browser):
    url, state_dir, keys = service
    served = httpx.get(url + "/")
    assert served.text == page_html()
    assert {k: served.headers.get(k) for k in PAGE_HEADERS} == PAGE_HEADERS
    tab = browser.open(url + "/")
    assert dom(browser, tab, "!$('key-form').hidden && $('chat-form').hidden")

    browser.type_into(tab, "key", "sk-sdpo-not-a-key")
    browser.click(tab, "use-key")
    error = browser.wait_for(tab, "document.getElementById('error').textContent")
    assert "API key" in error and dom(browser, tab, "$('chat-form').hidden")

    browser.type_into(tab, "key", keys["alice"])
    browser.click(tab, "use-key")
    browser.wait_for(tab, "!document.getElementById('chat-form').hidden")
    assert dom(browser, tab, "$('user').textContent") == "alice"
    assert dom(browser, tab, "$('key').value") == ""

    for turn, text in enumerate(["Tell me about coffee. <img src=x>", "No emojis, please."], start=1):
        browser.type_into(tab, "input", text)
        browser.click(tab, "send")
        browser.wait_for(tab, f"document.querySelectorAll('.msg[data-role=assistant]').length === {turn} && "
                              "!document.getElementById('send').disabled")
    shown = dom(browser, tab, "Array.from(document.querySelectorAll('.msg')).map(m => [m.dataset.role, m.textContent])")

    assert shown[0] == ["user", "Tell me about coffee. <img src=x>"]
    assert dom(browser, tab, "document.images.length") == 0, "a message's text was parsed as HTML"
    store = Store(state_dir)
    (conversation,) = store.conversations("alice")
    assert [list(m) for m in shown] == [[m["role"], m["content"]] for m in conversation["messages"]]
    assert store.counts("alice")["interactions"] == 1, "the page did not send the whole history"
    assert store.counts("bob")["replies"] == 0

    browser.wait_for(tab, "document.getElementById('learned').dataset.learned === '1'", timeout=120)
    me = httpx.get(f"{url}/v1/me", headers={"Authorization": f"Bearer {keys['alice']}"}).json()
    assert me["learned"] == 1 and me["adapter_version"] >= 1
    learned = dom(browser, tab, "Object.assign({text: $('learned').textContent}, $('learned').dataset)")
    assert learned["interactions"] == "1" and learned["adapterVersion"] == str(me["adapter_version"])
    assert learned["text"].startswith("1 of 1 follow-ups learned")

    storage = dom(browser, tab, "JSON.stringify([sessionStorage.length, localStorage.length, document.cookie])")
    assert json.loads(storage) == [0, 0, ""], "the key was stored although 'keep for this tab' was not ticked"
    console = [e for e in browser.events if e["method"] == "Runtime.consoleAPICalled"]
    assert console == []
    csp = [e for e in browser.events if "Content Security Policy" in json.dumps(e)]
    assert csp == []

    browser.click(tab, "forget")
    assert dom(browser, tab, "!$('key-form').hidden && $('chat-form').hidden && $('log').children.length === 0")


@pytest.mark.slow
def test_key_kept_for_the_tab_only_when_asked(service, browser):
    url, _, keys = service
    tab = browser.open(url + "/")
    browser.type_into(tab, "key", keys["bob"])
    browser.click(tab, "remember")
    browser.click(tab, "use-key")
    browser.wait_for(tab, "!document.getElementById('chat-form').hidden")
    browser.evaluate(tab, "window.beforeReload = true")
    browser.send("Page.reload", tab)
    browser.wait_for(tab, "!window.beforeReload && document.readyState === 'complete' && "
                          "document.getElementById('user').textContent")
    assert dom(browser, tab, "$('user').textContent") == "bob"
    assert dom(browser, tab, "$('learned').dataset.interactions") == "0"

    browser.evaluate(tab, "document.getElementById('input').value = 'a bell \\u0007'")
    browser.click(tab, "send")
    error = browser.wait_for(tab, "!document.getElementById('send').disabled && "
                                  "document.getElementById('error').textContent")
    assert "control characters" in error
    assert dom(browser, tab, "[$('log').children.length, $('input').value]") == [0, "a bell \u0007"]
    browser.click(tab, "forget")
    assert dom(browser, tab, "sessionStorage.length") == 0
