"""The chat page served at `/`: one self-contained HTML document (inline CSS, one inline script allowed by its hash in
the page's CSP, no external assets). A person pastes their API key, chats through POST /v1/chat/completions (sending
the whole history each turn, as OpenAI clients do, so the server sees follow-ups) and sees from GET /v1/me how many of
their follow-ups have been learned. The key lives in the script's memory, or in sessionStorage (this tab only) when
"keep for this tab" is ticked; no message text is written to the console; every text is inserted as textContent."""
from __future__ import annotations

import base64
import hashlib

_CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:0;color:#111;background:#fafafa;display:flex;flex-direction:column;
  height:100vh}
header{background:#fff;border-bottom:1px solid #ddd;padding:8px 16px}
h1{font-size:18px;margin:0 0 4px;display:inline-block;margin-right:12px}
.status{color:#444}
form{margin:6px 0}
#log{flex:1;overflow:auto;padding:8px 16px}
.msg{white-space:pre-wrap;border-radius:8px;padding:6px 10px;margin:6px 0;max-width:80%}
.msg[data-role=user]{background:#dbeafe;margin-left:auto}
.msg[data-role=assistant]{background:#fff;border:1px solid #ddd}
.error{color:#b00020}
footer{background:#fff;border-top:1px solid #ddd;padding:8px 16px}
#chat-form{display:flex;gap:8px}
#input{flex:1;min-height:3em;font:inherit}
[hidden]{display:none !important}
"""

_SCRIPT = """
(function () {
  "use strict";
  var STORE = "sdpo-serve-key", POLL_MS = 5000;
  var key = "", model = null, history = [], poll = null, busy = false;
  function $(id) { return document.getElementById(id); }
  function headers() { return {"Authorization": "Bearer " + key, "Content-Type": "application/json"}; }
  function showError(text) { $("error").textContent = text; $("error").hidden = !text; }

  function call(method, path, body) {
    return fetch(path, {method: method, headers: headers(), cache: "no-store", credentials: "omit",
                        body: body === undefined ? undefined : JSON.stringify(body)})
      .then(function (response) {
        return response.json().catch(function () { return {}; }).then(function (data) {
          if (!response.ok) {
            var message = data && data.error && data.error.message;
            throw new Error(message || ("HTTP " + response.status));
          }
          return data;
        });
      });
  }

  function showMe(me) {
    $("user").textContent = me.user;
    var learned = $("learned");
    learned.dataset.learned = me.learned;
    learned.dataset.interactions = me.interactions;
    learned.dataset.adapterVersion = me.adapter_version;
    learned.textContent = me.learned + " of " + me.interactions + " follow-ups learned · adapter version " +
      me.adapter_version;
  }

  function refresh() {
    if (!key) { return Promise.resolve(); }
    return call("GET", "/v1/me").then(showMe, function (error) { showError(error.message); });
  }

  function addMessage(role, content) {
    var div = document.createElement("div");
    div.className = "msg";
    div.dataset.role = role;
    div.textContent = content;
    $("log").appendChild(div);
    $("log").scrollTop = $("log").scrollHeight;
  }

  function setBusy(value) {
    busy = value;
    $("send").disabled = value;
    $("new").disabled = value;
  }

  function useKey(candidate, remember) {
    key = candidate;
    showError("");
    return Promise.all([call("GET", "/v1/me"), call("GET", "/v1/models")]).then(function (answers) {
      model = answers[1].data[0].id;
      showMe(answers[0]);
      if (remember) { sessionStorage.setItem(STORE, key); }
      $("key").value = "";
      $("key-form").hidden = true;
      $("signed-in").hidden = false;
      $("chat-form").hidden = false;
      if (poll === null) { poll = setInterval(refresh, POLL_MS); }
    }).catch(function (error) {
      forget();
      showError(error.message);
    });
  }

  function forget() {
    key = "";
    model = null;
    sessionStorage.removeItem(STORE);
    if (poll !== null) { clearInterval(poll); poll = null; }
    $("key-form").hidden = false;
    $("signed-in").hidden = true;
    $("chat-form").hidden = true;
    newConversation();
  }

  function newConversation() {
    history = [];
    $("log").textContent = "";
  }

  function send() {
    var text = $("input").value;
    if (busy || !key || !model || !text.trim()) { return; }
    showError("");
    history.push({role: "user", content: text});
    addMessage("user", text);
    $("input").value = "";
    setBusy(true);
    call("POST", "/v1/chat/completions", {model: model, messages: history}).then(function (data) {
      var reply = data.choices[0].message.content;
      history.push({role: "assistant", content: reply});
      addMessage("assistant", reply);
      return refresh();
    }).catch(function (error) {
      history.pop();
      $("log").removeChild($("log").lastChild);
      $("input").value = text;
      showError(error.message);
    }).then(function () { setBusy(false); });
  }

  $("key-form").addEventListener("submit", function (event) {
    event.preventDefault();
    var candidate = $("key").value.trim();
    if (candidate) { useKey(candidate, $("remember").checked); }
  });
  $("forget").addEventListener("click", forget);
  $("new").addEventListener("click", newConversation);
  $("chat-form").addEventListener("submit", function (event) { event.preventDefault(); send(); });
  $("input").addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); send(); }
  });
  var kept = sessionStorage.getItem(STORE);
  if (kept) { useKey(kept, true); }
})();
"""
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
CSP = (f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{_SCRIPT_HASH}'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'")
"""The page's Content-Security-Policy (in its <meta>, and in PAGE_HEADERS): only its own inline script runs, it talks
only to the server that served it, no other resource loads."""
PAGE_HEADERS = {"Content-Security-Policy": f"{CSP}; frame-ancestors 'none'", "X-Frame-Options": "DENY",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
"""Headers to serve the page with: the CSP again with frame-ancestors 'none' (a <meta> CSP cannot forbid framing, and
a framed page could be overlaid to trick a person pasting their key), no MIME sniffing, no referrer, no caching."""

_BODY = """
<header><h1>SDPO chat</h1><span class="status" id="signed-in" hidden>signed in as <b id="user"></b> ·
<span id="learned"></span> <button type="button" id="forget">Forget key</button></span>
<form id="key-form" autocomplete="off"><label>API key <input id="key" type="password" size="40" autocomplete="off"
spellcheck="false"></label> <label><input id="remember" type="checkbox"> keep for this tab</label>
<button type="submit" id="use-key">Use key</button></form>
<div class="error" id="error" role="alert" hidden></div></header>
<main id="log" aria-live="polite"></main>
<footer><form id="chat-form" hidden>
<textarea id="input" placeholder="Message (Enter sends, Shift+Enter: new line)"></textarea>
<button type="submit" id="send">Send</button><button type="button" id="new">New conversation</button>
</form></footer>
"""

_PAGE = (
    "<!DOCTYPE html>\n"
    '<html lang="en"><head><meta charset="utf-8">'
    f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
    '<meta name="referrer" content="no-referrer">'
    '<meta name="viewport" content="width=device-width, initial-scale=1">'
    f"<title>SDPO chat</title><style>{_CSS}</style></head><body>{_BODY}"
    f"<script>{_SCRIPT}</script></body></html>\n"
)


def page_html() -> str:
    """The chat page as one HTML document (the same text every call; nothing in it depends on a user)."""
    return _PAGE
