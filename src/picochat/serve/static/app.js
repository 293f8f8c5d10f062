// picochat web chat: streams replies from /v1/chat/completions and shows, beside the chat,
// the conversation exactly as the model sees it (/v1/tokenize). Plain browser JavaScript.
// Every request fits the model's context: max tokens defaults to half of it, and each request asks
// the server to drop the oldest exchanges when the conversation would leave too little room for the
// reply ("truncation": "auto"); the page then leaves them out too, fades them, and says so once per
// drop. Only a message too long for the context on its own gets a notice (and goes back to the box).
// Tools: when the server runs them (a model's `tools` in /v1/models) and "tools" is ticked, requests
// let the model call them ("tool_choice": "auto", else "none"). Each call the server ran arrives as a
// `tool_steps` delta and shows in the reply's bubble, above its text, as a step that opens to the
// result; the page sends the steps back with the reply, so the token view shows the tool tokens.
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["system", "temperature", "top-p", "max-tokens"];  // kept in localStorage
const KEY = "picochat.api-key";  // kept in sessionStorage: this tab only, gone when it closes
const MAX_DEFAULT_REPLY = 1024;  // tokens: the default max tokens is half the context, at most this
const CONTEXT_FULL = "context_length_exceeded";  // the server's error code
const DROPPED = "X-Picochat-Dropped-Messages";  // how many of the oldest messages the server dropped

let messages = [];      // the conversation: {role, content} (and a reply's tool_steps)
let running = null;     // AbortController of the reply being streamed
let draftTimer = null;
let chatNumber = 0;     // bumped by "New chat", so a reply cut short by it is dropped
let contexts = {};      // model id -> its context length in tokens (/v1/models)
let toolsOf = {};       // model id -> the tools the server runs for it (/v1/models)
let tokenViews = 0;     // token view refreshes started, so that only the latest one is shown

class ServerError extends Error {
  constructor(message, code) { super(message); this.code = code; }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function serverError(response) {
  try {
    const body = await response.json();
    return body.error ? new ServerError(body.error.message, body.error.code) : new ServerError(JSON.stringify(body));
  } catch (e) {
    return new ServerError(response.status + " " + response.statusText);
  }
}

function setStatus(text) { $("status").textContent = text; }

function conversation(extraUserText) {
  const system = $("system").value.trim();
  const all = system ? [{ role: "system", content: system }] : [];
  all.push(...messages);
  if (extraUserText) all.push({ role: "user", content: extraUserText });
  return all;
}

// --- the chat -------------------------------------------------------------------------------
function addBubble(role, text) {
  const hint = $("empty-hint");
  if (hint) hint.remove();
  const div = document.createElement("div");
  div.className = "message " + role;
  const content = document.createElement("span");
  content.className = "content";
  content.textContent = text;
  div.appendChild(content);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function send(text) {
  const chat = chatNumber;
  messages.push({ role: "user", content: text });
  const question = addBubble("user", text);
  const bubble = addBubble("assistant", "");
  bubble.dataset.done = "false";
  running = new AbortController();
  $("send").disabled = true;
  $("stop").hidden = false;
  setStatus("thinking…");
  let reply = "", finish = null, usage = null;
  const steps = [];
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: running.signal,
      body: JSON.stringify({
        model: $("model").value, messages: conversation(), stream: true,
        stream_options: { include_usage: true },
        temperature: Number($("temperature").value), top_p: Number($("top-p").value),
        max_tokens: replyLimit(), truncation: "auto", tool_choice: toolChoice(),
      }),
    });
    if (!response.ok) throw await serverError(response);
    showContextFull(false);
    dropOldest(Number(response.headers.get(DROPPED) || 0), question);
    await readEvents(response, (event) => {
      if (event.error) throw new ServerError(event.error.message, event.error.code);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices) {
        if (choice.delta && choice.delta.content) {
          reply += choice.delta.content;
          bubble.querySelector(".content").textContent = reply;
          bubble.scrollIntoView({ block: "end" });
        }
        for (const step of (choice.delta && choice.delta.tool_steps) || []) {
          steps.push(step);
          addStep(bubble, step);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    });
  } catch (error) {
    if (error.name === "AbortError") {
      finish = "stopped";
    } else {
      bubble.remove();
      question.remove();
      messages.pop();   // the failed message leaves the conversation and goes back to the box
      $("input").value = text;
      if (error.code === CONTEXT_FULL) showContextFull(true);
      else addBubble("error", error.message);
      setStatus("");
      refreshTokens();
      return;
    }
  } finally {
    running = null;
    $("send").disabled = false;
    $("stop").hidden = true;
  }
  if (chat !== chatNumber) return;
  const blank = !reply.trim();
  if (blank) {   // the protocol has no empty messages: the exchange is left out of the conversation
    messages.pop();
    question.classList.add("dropped");
    bubble.classList.add("dropped");
  } else {
    messages.push(steps.length ? { role: "assistant", content: reply, tool_steps: steps } : { role: "assistant", content: reply });
  }
  bubble.dataset.done = "true";
  const note = document.createElement("span");
  note.className = "finish";
  note.textContent = [finish === "length" ? "(cut: max tokens or the context ran out)" : finish === "stopped" ? "(stopped)" : "",
                      blank ? "(no reply: left out of the conversation)" : ""].join(" ").trim();
  bubble.appendChild(note);
  setStatus(usage ? `${usage.prompt_tokens} prompt tokens, ${usage.completion_tokens} reply tokens` : "");
  refreshTokens();
}

// A tool step the server ran, shown above the reply's text: "⚙ calc: 4 * 2 → 8", opening to the result.
function addStep(bubble, step) {
  let list = bubble.querySelector(".steps");
  if (!list) {
    list = document.createElement("div");
    list.className = "steps";
    bubble.insertBefore(list, bubble.querySelector(".content"));
  }
  const details = document.createElement("details");
  details.className = "tool-step";
  const summary = document.createElement("summary");
  summary.textContent = stepSummary(step);
  const result = document.createElement("pre");
  result.textContent = step.result === null ? "(no result: no tool ran)" : step.result;
  details.append(summary, result);
  list.appendChild(details);
}

// The call and what came of it: a search's number of passages, else the result (shortened).
function stepSummary(step) {
  const tool = step.call.split(":")[0].trim();
  const passages = step.result === null ? null : step.result.match(/^\[\d+\] /gm);
  let outcome;
  if (step.result === null) outcome = "no result";
  else if (passages) outcome = `${passages.length} passage${passages.length === 1 ? "" : "s"}`;
  else outcome = step.result.length > 60 ? step.result.slice(0, 60) + "…" : step.result;
  return `${tool === "search" ? "🔎" : "⚙"} ${step.call.trim()} → ${outcome}`;
}

// The server dropped the `count` oldest messages to fit the model's context: they leave the
// conversation here too, their bubbles fade, and a notice above `question` says so.
function dropOldest(count, question) {
  if (count < 1) return;
  messages.splice(0, count);
  const kept = document.querySelectorAll("#messages .message.user:not(.dropped), #messages .message.assistant:not(.dropped)");
  for (const bubble of Array.from(kept).slice(0, count)) bubble.classList.add("dropped");
  const context = contextLength();
  const notice = document.createElement("p");
  notice.className = "notice";
  notice.textContent = `${count} older message${count === 1 ? " was" : "s were"} dropped to fit the model's ` +
    (context ? `${context}-token context.` : "context.");
  $("messages").insertBefore(notice, question);
}

// --- the model's context --------------------------------------------------------------------
function contextLength() { return contexts[$("model").value]; }

function defaultMaxTokens(context) { return Math.min(MAX_DEFAULT_REPLY, Math.floor(context / 2)); }

function showContextFull(full) { $("context-full").hidden = !full; }

// --- the server's tools ---------------------------------------------------------------------
function toolChoice() { return $("use-tools").checked && !$("use-tools").disabled ? "auto" : "none"; }

function applyModelTools() {
  const names = toolsOf[$("model").value] || [];
  $("use-tools").disabled = names.length === 0;
  $("tools-note").textContent = names.length ? `${names.join(", ")}: the server runs them; each call shows as a step` :
    "this server runs no tools";
}

// The max tokens field of the chosen model: at most its context less one token, and half of it
// unless the user has set another value.
function applyModelLimits() {
  const context = contextLength();
  if (!context) return;
  $("max-tokens").max = context - 1;
  if (localStorage.getItem("picochat.max-tokens") === null) $("max-tokens").value = defaultMaxTokens(context);
  showContextFull(false);
}

// The max_tokens to send: the setting (half the context by default), at most the context less one
// token; undefined (the server's default) when the context is unknown. The server keeps room for it,
// or for half the context if that is less, by dropping the oldest messages.
function replyLimit() {
  const context = contextLength();
  if (!context) return undefined;
  const setting = Math.floor(Number($("max-tokens").value));
  return Math.min(setting >= 1 ? setting : defaultMaxTokens(context), context - 1);
}

// Server-sent events: "data: {json}" blocks separated by blank lines, ending with "data: [DONE]".
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

function newChat() {
  if (running) running.abort();
  chatNumber += 1;
  messages = [];
  showContextFull(false);
  $("messages").innerHTML = '<p id="empty-hint">New conversation.</p>';
  setStatus("");
  refreshTokens();
}

// --- the token view -------------------------------------------------------------------------
async function refreshTokens() {
  const mine = ++tokenViews;
  const draft = $("input").value.trim();
  const all = conversation(draft);
  if (all.length === 0 || all[all.length - 1].role === "system") {
    showTokens({ tokens: [], count: 0, text: "" }, "");
    return;
  }
  const response = await fetch("/v1/tokenize", {
    method: "POST", headers: headers(), body: JSON.stringify({ messages: all, tool_choice: toolChoice() }),
  });
  const view = response.ok ? await response.json() : null;
  if (mine !== tokenViews) return;  // a later refresh has started: this conversation is out of date
  if (!view) {
    showTokens({ tokens: [], count: 0, text: "" }, "");
    $("token-count").textContent = (await serverError(response)).message;
    return;
  }
  showTokens(view, draft ? " (with the message you are typing)" : "");
}

function showTokens(view, note) {
  const box = $("tokens");
  box.innerHTML = "";
  const showIds = $("show-ids").checked;
  view.tokens.forEach((token, n) => {
    const span = document.createElement("span");
    span.className = "tok " + (token.special ? "special" : "c" + (n % 6));
    span.title = `id ${token.id}`;
    span.dataset.id = token.id;
    span.textContent = token.piece.replace(/\n/g, "↵\n");
    if (showIds) {
      const sub = document.createElement("sub");
      sub.textContent = token.id;
      span.appendChild(sub);
    }
    box.appendChild(span);
  });
  $("token-count").textContent = `${view.count} tokens${note}`;
  $("rendered").textContent = view.text;
}

// --- models and settings --------------------------------------------------------------------
async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    setStatus((await serverError(response)).message + (response.status === 401 ? " (enter the API key in Settings)" : ""));
    return;
  }
  const select = $("model");
  const current = select.value;
  select.innerHTML = "";
  for (const model of (await response.json()).data) {
    const option = document.createElement("option");
    option.value = option.textContent = model.id;
    select.appendChild(option);
    contexts[model.id] = model.context_length;
    toolsOf[model.id] = model.tools || [];
  }
  if (current) select.value = current;
  applyModelLimits();
  applyModelTools();
  setStatus("");
}

function restoreSettings() {
  for (const id of SETTINGS) {
    const saved = localStorage.getItem("picochat." + id);
    if (saved !== null) $(id).value = saved;
    $(id).addEventListener("change", () => localStorage.setItem("picochat." + id, $(id).value));
  }
  localStorage.removeItem(KEY);  // where earlier versions of this page kept it
  $("api-key").value = sessionStorage.getItem(KEY) || "";
  $("api-key").addEventListener("change", () => sessionStorage.setItem(KEY, $("api-key").value));
  for (const id of ["temperature", "top-p"]) {
    const show = () => { $(id + "-value").textContent = $(id).value; };
    $(id).addEventListener("input", show);
    show();
  }
}

function submit() {
  const text = $("input").value.trim();
  if (!text || running) return;
  $("input").value = "";
  send(text);
}

restoreSettings();
$("composer").addEventListener("submit", (event) => { event.preventDefault(); submit(); });
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); submit(); }
});
$("input").addEventListener("input", () => { clearTimeout(draftTimer); draftTimer = setTimeout(refreshTokens, 300); });
$("stop").addEventListener("click", () => { if (running) running.abort(); });
$("new-chat").addEventListener("click", newChat);
$("show-ids").addEventListener("change", refreshTokens);
$("system").addEventListener("change", refreshTokens);
$("api-key").addEventListener("change", loadModels);
$("use-tools").addEventListener("change", refreshTokens);
$("model").addEventListener("change", () => { applyModelLimits(); applyModelTools(); refreshTokens(); });
loadModels();
