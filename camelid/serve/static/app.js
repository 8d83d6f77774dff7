// camelid web chat: talks to this server's OpenAI-compatible API, streams answers (SSE over
// fetch), keeps the conversation for multi-turn, and stops a generation on request (aborting
// the fetch closes the connection; the server cancels that request and frees its slot).
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), temperature: $("temperature"), temperatureValue: $("temperature-value"),
  maxTokens: $("max-tokens"), jsonMode: $("json-mode"), system: $("system"), apiKey: $("api-key"), settings: $("settings"),
  settingsToggle: $("settings-toggle"), newChat: $("new-chat"), messages: $("messages"), empty: $("empty"),
  form: $("form"), prompt: $("prompt"), send: $("send"), stop: $("stop"), status: $("status"),
};
const state = { history: [], controller: null };
const saved = (k, fallback) => localStorage.getItem("camelid." + k) ?? fallback;
const save = (k, v) => localStorage.setItem("camelid." + k, v);

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || resp.statusText;
  } catch {
    return resp.statusText || "HTTP " + resp.status;
  }
}

async function loadModels() {
  const resp = await fetch("/v1/models", { headers: headers() });
  if (!resp.ok) {
    setStatus(resp.status === 401 ? "This server needs an API key: open Settings." : await errorMessage(resp));
    if (resp.status === 401) toggleSettings(true);
    return;
  }
  const { data } = await resp.json();
  const current = saved("model", "");
  ui.model.replaceChildren(...data.map((m) => new Option(m.id, m.id, false, m.id === current)));
  setStatus("");
}

function setStatus(text) { ui.status.textContent = text; }

function toggleSettings(open) {
  const show = open ?? ui.settings.hidden;
  ui.settings.hidden = !show;
  ui.settingsToggle.setAttribute("aria-expanded", String(show));
}

function addMessage(role, text) {
  ui.empty.hidden = true;
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text; // never innerHTML: model output is untrusted text
  ui.messages.append(div);
  ui.messages.scrollTop = ui.messages.scrollHeight;
  return div;
}

function addNote(div, text) {
  const note = document.createElement("span");
  note.className = "note";
  note.textContent = text;
  div.append(note);
}

const PAINT_MS = 30;

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.prompt.disabled = busy;
  if (!busy) ui.prompt.focus();
}

// Parse a server-sent-event stream: events are separated by a blank line, payload lines start with "data: ".
async function* sseData(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) if (line.startsWith("data: ")) yield line.slice(6);
    }
  }
}

async function ask(question) {
  state.history.push({ role: "user", content: question });
  addMessage("user", question);
  const answer = addMessage("assistant", "");
  answer.classList.add("streaming");
  const messages = [...state.history];
  if (ui.system.value.trim()) messages.unshift({ role: "system", content: ui.system.value.trim() });
  const body = {
    model: ui.model.value, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number(ui.temperature.value), max_tokens: Number(ui.maxTokens.value) || undefined,
  };
  // JSON toggle: the server constrains decoding to a JSON object (OpenAI's json mode).
  if (ui.jsonMode.checked) body.response_format = { type: "json_object" };
  state.controller = new AbortController();
  setBusy(true);
  setStatus("generating...");
  const started = performance.now();
  let text = "", finish = null, tokens = 0, shown = 0, painted = performance.now();
  // Show the text as it grows, but not once per token: a fast server sends hundreds of chunks a
  // second, and replacing the text and scrolling each time (a layout each) kept the page busy
  // for the whole answer (no repaint, no clicks on Stop). So at most every PAINT_MS, then yield
  // to the browser (a task, so that painting, input and Stop run) before reading on.
  const render = () => {
    if (shown === text.length) return;
    answer.textContent = text;
    shown = text.length;
    ui.messages.scrollTop = ui.messages.scrollHeight;
  };
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    for await (const data of sseData(resp.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) text += choice.delta.content;
      if (choice.finish_reason) finish = choice.finish_reason;
      if (performance.now() - painted >= PAINT_MS) {
        render();
        await new Promise((resolve) => setTimeout(resolve, 0));
        painted = performance.now();
      }
    }
    render();
    const secs = (performance.now() - started) / 1000;
    setStatus(`${tokens} tokens in ${secs.toFixed(1)} s` + (finish === "length" ? " (hit max tokens)" : ""));
  } catch (err) {
    render();
    if (err.name === "AbortError") {
      addNote(answer, "stopped");
      setStatus("stopped");
    } else {
      addMessage("error", "Error: " + err.message);
      setStatus("");
    }
  } finally {
    answer.classList.remove("streaming");
    state.controller = null;
    setBusy(false);
  }
  // Keep what was shown (even a stopped answer) so the next turn sees the whole conversation.
  if (text) state.history.push({ role: "assistant", content: text });
  else if (!answer.textContent) answer.remove();
}

function init() {
  ui.temperature.value = saved("temperature", ui.temperature.value);
  ui.maxTokens.value = saved("maxTokens", ui.maxTokens.value);
  ui.apiKey.value = saved("apiKey", "");
  ui.system.value = saved("system", "");
  ui.jsonMode.checked = saved("json", "0") === "1";
  ui.temperatureValue.textContent = Number(ui.temperature.value).toFixed(2);

  ui.temperature.addEventListener("input", () => {
    ui.temperatureValue.textContent = Number(ui.temperature.value).toFixed(2);
    save("temperature", ui.temperature.value);
  });
  ui.maxTokens.addEventListener("change", () => save("maxTokens", ui.maxTokens.value));
  ui.jsonMode.addEventListener("change", () => save("json", ui.jsonMode.checked ? "1" : "0"));
  ui.model.addEventListener("change", () => save("model", ui.model.value));
  ui.system.addEventListener("change", () => save("system", ui.system.value));
  ui.apiKey.addEventListener("change", () => { save("apiKey", ui.apiKey.value.trim()); loadModels(); });
  ui.settingsToggle.addEventListener("click", () => toggleSettings());
  ui.newChat.addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.history = [];
    ui.messages.replaceChildren(ui.empty);
    ui.empty.hidden = false;
    setStatus("");
    ui.prompt.focus();
  });
  ui.stop.addEventListener("click", () => state.controller && state.controller.abort());
  ui.form.addEventListener("submit", (e) => {
    e.preventDefault();
    const question = ui.prompt.value.trim();
    if (!question || state.controller) return;
    ui.prompt.value = "";
    ui.prompt.style.height = "";
    ask(question);
  });
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      ui.form.requestSubmit();
    }
  });
  ui.prompt.addEventListener("input", () => {
    ui.prompt.style.height = "";
    ui.prompt.style.height = Math.min(ui.prompt.scrollHeight, 192) + "px";
  });
  loadModels();
  ui.prompt.focus();
}

init();
