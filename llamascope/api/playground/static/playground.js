// llamascope playground: talks to this server's public DashScope native API with the key typed in.
//
// Storage: the key in sessionStorage (this tab only); the conversation in localStorage; a local
// image (a data: URI, possibly megabytes) in IndexedDB, whose quota is far larger than
// localStorage's. Nothing is sent anywhere but this origin.

import { renderMarkdown } from "./markdown.js";

const API = "/api/v1";
const GENERATION = `${API}/services/aigc/multimodal-generation/generation`;
const KEY_SLOT = "llamascope.playground.key";
const STATE_SLOT = "llamascope.playground.conversation";
const IMAGE_DB = "llamascope-playground";
const PARAMETERS = ["temperature", "top_p", "top_k", "max_tokens", "seed", "stop"];
const INTEGER_PARAMETERS = new Set(["top_k", "max_tokens", "seed"]);

const $ = (id) => document.getElementById(id);

let state = emptyState();
let models = [];
let running = null; // {controller, turn} while an answer streams
let modelsTimer = null; // a model list waiting for the key's typing to pause
let modelsLoading = null; // the model list being fetched, a promise
let saveTimer = null; // a save waiting for typing to pause
const views = new WeakMap(); // turn -> its DOM nodes
const RENDER_EVERY_MS = 33; // a streaming answer is drawn at most about 30 times a second

function emptyState() {
  return { model: "", system: "", schema: "", parameters: {}, image: null, turns: [] };
}

// -- storage -------------------------------------------------------------------------------------

function openImageStore() {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open(IMAGE_DB, 1);
    request.onupgradeneeded = () => request.result.createObjectStore("images");
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

async function imageStore(mode, action) {
  const db = await openImageStore();
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction("images", mode);
      const request = action(tx.objectStore("images"));
      tx.oncomplete = () => resolve(request.result);
      tx.onerror = tx.onabort = () => reject(tx.error);
    });
  } finally {
    db.close();
  }
}

const keepImage = (src) => imageStore("readwrite", (s) => s.put(src, "current"));
const readImage = () => imageStore("readonly", (s) => s.get("current"));
const forgetImage = () => imageStore("readwrite", (s) => s.delete("current"));

function save() {
  clearTimeout(saveTimer);
  saveTimer = null;
  const { image, ...rest } = state;
  const stored = {
    ...rest,
    turns: state.turns.map((t) => ({ ...t, status: t.status === "streaming" ? "stopped" : t.status })),
    // A local image lives in IndexedDB; only its name is kept here.
    image: image && (image.kind === "url" ? image : { kind: "data", name: image.name }),
  };
  try {
    localStorage.setItem(STATE_SLOT, JSON.stringify(stored));
  } catch {
    setStatus("This browser's storage is full: the conversation will not survive a reload.", true);
  }
}

function saveSoon() {
  clearTimeout(saveTimer);
  saveTimer = setTimeout(save, 400);
}

async function restore() {
  let stored = null;
  try {
    stored = JSON.parse(localStorage.getItem(STATE_SLOT) || "null");
  } catch {
    stored = null;
  }
  if (!stored) return;
  state = { ...emptyState(), ...stored };
  if (state.image?.kind === "data") {
    const src = await readImage().catch(() => undefined);
    if (src) {
      state.image = { ...state.image, src };
    } else {
      state.image = null;
      setStatus("The image could not be kept in this browser; add it again to go on.", true);
    }
  }
}

// -- the API -------------------------------------------------------------------------------------

function apiKey() {
  return $("api-key").value.trim();
}

async function errorOf(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body.code) return { code: body.code, message: body.message, request_id: body.request_id };
  } catch {
    // not JSON: fall through
  }
  return { code: `HTTP ${response.status}`, message: text.slice(0, 300) || response.statusText };
}

// The model list follows the key as it is typed, once typing pauses; a Send waits for it (modelsSettled).
function loadModelsSoon() {
  clearTimeout(modelsTimer);
  modelsTimer = setTimeout(loadModelsNow, 350);
}

function loadModelsNow() {
  clearTimeout(modelsTimer);
  modelsTimer = null;
  const loading = loadModels().finally(() => {
    if (modelsLoading === loading) modelsLoading = null;
  });
  modelsLoading = loading;
  return loading;
}

// Resolves once no model list is pending: one waiting for typing to pause is fetched at once.
async function modelsSettled() {
  while (modelsTimer !== null || modelsLoading) {
    await (modelsTimer !== null ? loadModelsNow() : modelsLoading);
  }
}

async function loadModels() {
  const select = $("model");
  const key = apiKey();
  if (!key) {
    select.replaceChildren(new Option("Enter a key to list models", ""));
    select.disabled = true;
    showModelBadge();
    clearStatus("key");
    return;
  }
  try {
    const response = await fetch(`${API}/models`, { headers: { Authorization: `Bearer ${key}` } });
    if (key !== apiKey()) return; // typed on since: the list for the key as it is now follows
    if (!response.ok) {
      const error = await errorOf(response);
      models = [];
      select.replaceChildren(new Option("Key refused", ""));
      select.disabled = true;
      showModelBadge();
      setStatus(`${error.code}: ${error.message}`, true, "key");
      return;
    }
    // The playground talks to the multimodal endpoint: text-only models (takes_images false) answer elsewhere.
    models = ((await response.json()).data || []).filter((m) => m.takes_images !== false);
  } catch (error) {
    setStatus(`The server could not be reached: ${error.message}`, true, "key");
    return;
  }
  select.replaceChildren(...models.map((m) => new Option(m.model, m.model)));
  select.disabled = models.length === 0;
  if (!models.some((m) => m.model === state.model)) state.model = models[0]?.model || "";
  select.value = state.model;
  showModelBadge();
  clearStatus("key"); // what the list said about an earlier key; anything else stays until the person acts
  save();
}

function showModelBadge() {
  const model = models.find((m) => m.model === state.model);
  const badge = $("model-badge");
  badge.hidden = !model?.test_model;
  badge.title = model?.description || "";
  $("model").title = model?.description || "";
}

function parameters() {
  const out = {};
  for (const name of PARAMETERS) {
    const raw = (state.parameters[name] ?? "").toString().trim();
    if (!raw) continue;
    if (name === "stop") {
      const stops = raw.split("\n").filter((s) => s.length > 0);
      if (stops.length) out.stop = stops;
    } else {
      const value = Number(raw);
      out[name] = INTEGER_PARAMETERS.has(name) ? Math.trunc(value) : value;
    }
  }
  return out;
}

// The answer's shape: the JSON Schema field as parameters.response_format, or null for free text. Throws a
// SyntaxError when the field is not JSON.
function responseFormat() {
  const text = (state.schema || "").trim();
  if (!text) return null;
  const schema = JSON.parse(text);
  return { type: "json_schema", json_schema: { name: "answer", schema } };
}

// What a request is sent: the parameters set, and the answer's shape when one is set.
function requestParameters() {
  const format = responseFormat();
  return format ? { ...parameters(), response_format: format } : parameters();
}

function userMessage(text, image) {
  return { role: "user", content: image ? [{ image }, { text }] : [{ text }] };
}

// The messages the API is sent: the system prompt, every answered turn, the image with the first.
function history(imageRef) {
  const messages = [];
  if (state.system.trim()) messages.push({ role: "system", content: [{ text: state.system }] });
  let imageGiven = false;
  for (const turn of state.turns) {
    if (!["done", "stopped"].includes(turn.status) || !turn.answer) continue;
    messages.push(userMessage(turn.user, imageGiven ? null : imageRef));
    messages.push({ role: "assistant", content: [{ text: turn.answer }] });
    imageGiven = true;
  }
  return { messages, imageGiven };
}

// Server-sent events as DashScope frames them: "event:result" or "event:error", then "data:{json}".
function parseBlock(block) {
  let event = "message";
  let data = "";
  for (const line of block.split(/\r?\n/)) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).replace(/^ /, "");
  }
  return data ? { event, data: JSON.parse(data) } : null;
}

async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = parseBlock(buffer.slice(0, end));
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      if (block) yield block;
    }
  }
  const last = parseBlock(buffer.trim());
  if (last) yield last;
}

async function ask(text) {
  if (running) return;
  await modelsSettled(); // a key typed just now: its model list is on its way
  if (running) return; // a second Send while the list came
  if (!apiKey()) return refuse("Enter an API key first.", $("api-key"));
  if (!state.model) return refuse("No model to ask: check the key.", $("api-key"));
  if (!state.image) return refuse("Add an image first: this model answers about one image per conversation.");
  let params;
  try {
    params = requestParameters();
  } catch (error) {
    $("answer-shape").open = true;
    return refuse(`The JSON Schema is not JSON: ${error.message}`, $("schema"));
  }
  const { messages, imageGiven } = history(state.image.src);
  messages.push(userMessage(text, imageGiven ? null : state.image.src));
  const turn = {
    user: text,
    answer: "",
    status: "streaming",
    withImage: !imageGiven,
    model: state.model,
    json: Boolean(params.response_format),
  };
  state.turns.push(turn);
  $("message").value = "";
  fitComposer();
  renderTurn(turn);
  save();

  const controller = new AbortController();
  running = { controller, turn };
  setBusy(true);
  setStatus("");
  const started = performance.now();
  let first = null;
  let last = null;
  try {
    const response = await fetch(GENERATION, {
      method: "POST",
      headers: {
        Authorization: `Bearer ${apiKey()}`,
        "Content-Type": "application/json",
        Accept: "text/event-stream",
        "X-DashScope-SSE": "enable",
      },
      body: JSON.stringify({
        model: state.model,
        input: { messages },
        parameters: { ...params, incremental_output: true },
      }),
      signal: controller.signal,
    });
    turn.request_id = response.headers.get("x-request-id") || undefined;
    if (!response.ok) {
      turn.error = await errorOf(response);
    } else {
      for await (const { event, data } of events(response.body)) {
        if (event === "error") {
          turn.error = { code: data.code, message: data.message, request_id: data.request_id };
          break;
        }
        last = performance.now();
        first ??= last;
        const choice = data.output?.choices?.[0];
        turn.answer += (choice?.message?.content || []).map((c) => c.text ?? "").join("");
        turn.usage = data.usage;
        turn.finish_reason = choice?.finish_reason;
        updateTurnSoon(turn);
      }
    }
    turn.status = turn.error ? "error" : "done";
  } catch (error) {
    if (error.name === "AbortError") {
      turn.status = "stopped";
    } else {
      turn.status = "error";
      turn.error =
        error instanceof TypeError
          ? { code: "NetworkError", message: `The server could not be reached or the stream broke: ${error.message}` }
          : { code: "BadStream", message: `The answer could not be read: ${error.message}` };
    }
  } finally {
    if (first !== null) {
      const output = turn.usage?.output_tokens || 0;
      const seconds = (last - first) / 1000;
      turn.ttft_ms = Math.round(first - started);
      turn.tokens_per_second = output > 1 && seconds > 0 ? (output - 1) / seconds : null;
    }
    running = null;
    setBusy(false);
    updateTurn(turn);
    save();
  }
}

function refuse(message, focus) {
  setStatus(message, true);
  focus?.focus();
}

function stop() {
  running?.controller.abort();
}

// -- the image -----------------------------------------------------------------------------------

async function setImage(image) {
  // One image per conversation: a new one starts a new conversation.
  if (state.turns.length) {
    stop();
    state.turns = [];
    renderConversation();
    setStatus("A new image starts a new conversation.");
  }
  state.image = image;
  renderImage();
  save();
  try {
    if (image?.kind === "data") await keepImage(image.src);
    else await forgetImage();
  } catch {
    setStatus("This image is too large to keep in this browser: a reload will lose it.", true);
  }
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function takeFile(file) {
  if (!file) return;
  const src = await readFile(file);
  await setImage({ kind: "data", src, name: file.name || "pasted-image.png" });
}

function takeUrl(url) {
  const value = url.trim();
  let parsed = null;
  try {
    parsed = new URL(value);
  } catch {
    parsed = null;
  }
  if (!parsed || !["http:", "https:"].includes(parsed.protocol)) {
    setStatus("An image URL starts with http:// or https://.", true);
    return;
  }
  setImage({ kind: "url", src: value, name: parsed.pathname.split("/").pop() || parsed.host });
}

function renderImage() {
  const image = state.image;
  $("image-empty").hidden = Boolean(image);
  $("image-preview").hidden = !image;
  if (!image) {
    $("thumbnail").removeAttribute("src");
    return;
  }
  $("image-name").textContent = image.name;
  $("image-name").title = image.kind === "url" ? image.src : image.name;
  // A URL image is fetched by the server only: loading it here would be a third-party request.
  const local = image.kind === "data";
  $("thumbnail").hidden = !local;
  $("url-card").hidden = local;
  if (local) $("thumbnail").src = image.src;
  else $("url-host").textContent = new URL(image.src).host;
}

// -- the conversation ----------------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function renderConversation() {
  const box = $("conversation");
  box.replaceChildren($("welcome"));
  $("welcome").hidden = state.turns.length > 0;
  for (const turn of state.turns) renderTurn(turn);
}

function renderTurn(turn) {
  $("welcome").hidden = true;
  const user = el("div", "message user");
  if (turn.withImage && state.image) {
    if (state.image.kind === "data") {
      const img = el("img", "attached");
      img.src = state.image.src;
      img.alt = state.image.name;
      user.append(img);
    } else {
      user.append(el("div", "attached-url", `image: ${state.image.src}`));
    }
  }
  user.append(el("div", "bubble", turn.user));
  const assistant = el("div", "message assistant");
  assistant.dataset.role = "answer";
  const bubble = el("div", "bubble answer");
  const error = el("div", "error");
  const stats = el("div", "stats");
  assistant.append(bubble, error, stats);
  $("conversation").append(user, assistant);
  views.set(turn, { assistant, bubble, error, stats, timer: null, drawn: 0 });
  updateTurn(turn);
  scrollToEnd(true);
}

// Re-rendering the whole answer on every token would be quadratic in its length: draw it at most
// every RENDER_EVERY_MS, the first token at once, the last one when the answer ends (updateTurn).
function updateTurnSoon(turn) {
  const view = views.get(turn);
  if (!view || view.timer) return;
  const wait = view.drawn + RENDER_EVERY_MS - performance.now();
  if (wait <= 0) updateTurn(turn);
  else view.timer = setTimeout(() => updateTurn(turn), wait);
}

function updateTurn(turn) {
  const view = views.get(turn);
  if (!view) return;
  clearTimeout(view.timer);
  view.timer = null;
  view.drawn = performance.now();
  const streaming = turn.status === "streaming";
  const stick = nearEnd();
  view.assistant.dataset.status = turn.status;
  view.assistant.setAttribute("aria-busy", String(streaming)); // screen readers: the answer once, when done
  if (turn.answer && turn.json) view.bubble.replaceChildren(el("pre", "json", prettyJson(turn.answer)));
  else if (turn.answer) renderMarkdown(view.bubble, turn.answer);
  else view.bubble.textContent = streaming ? "Thinking…" : "";
  view.bubble.classList.toggle("streaming", streaming && Boolean(turn.answer));
  view.bubble.classList.toggle("waiting", streaming && !turn.answer);
  view.bubble.hidden = !turn.answer && !streaming;
  view.error.hidden = !turn.error;
  if (turn.error) {
    view.error.replaceChildren(el("span", "error-code", turn.error.code), el("span", "error-message", turn.error.message));
    const rid = turn.error.request_id || turn.request_id;
    if (rid) view.error.append(el("span", "request-id", `request ${rid}`));
  }
  view.stats.replaceChildren(...statsOf(turn));
  if (stick) scrollToEnd();
}

// A JSON answer indented for reading; one still streaming (or cut by max tokens) as it is.
function prettyJson(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}

function statsOf(turn) {
  const items = [];
  const add = (text, className) => items.push(el("span", className, text));
  const n = (x) => (x ?? 0).toLocaleString("en-US");
  if (turn.status === "stopped") add("stopped", "stopped");
  if (turn.ttft_ms !== undefined) add(`TTFT ${turn.ttft_ms.toLocaleString("en-US")} ms`, "ttft");
  if (turn.tokens_per_second) add(`${turn.tokens_per_second.toFixed(1)} tokens/s`, "speed");
  if (turn.usage) {
    add(`input ${n(turn.usage.input_tokens)}`, "input-tokens");
    add(`output ${n(turn.usage.output_tokens)}`, "output-tokens");
    add(`image ${n(turn.usage.image_tokens)}`, "image-tokens");
  }
  if (turn.status === "done" && turn.finish_reason === "length") add("finish: length", "finish");
  return items;
}

function nearEnd() {
  const box = $("conversation");
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

function scrollToEnd(force = false) {
  const box = $("conversation");
  if (force || nearEnd()) box.scrollTop = box.scrollHeight;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

// `about` names what a message reports, so that only news of the same thing replaces it (clearStatus).
function setStatus(text, bad = false, about = "") {
  $("status").textContent = text;
  $("status").classList.toggle("bad", bad);
  $("status").dataset.about = about;
}

function clearStatus(about) {
  if ($("status").dataset.about === about) setStatus("");
}

function fitComposer() {
  const box = $("message");
  box.style.height = "auto";
  box.style.height = `${Math.min(box.scrollHeight + 2, 192)}px`;
}

function newChat() {
  stop();
  state.turns = [];
  renderConversation();
  save();
  setStatus("");
  $("message").focus();
}

// -- get code ------------------------------------------------------------------------------------

const IMAGE_TOKEN = "\u2063IMAGE\u2063"; // stands for the image in generated code, replaced below
let codeLanguage = "curl";

function codeMessages() {
  const { messages, imageGiven } = history(IMAGE_TOKEN);
  const pending = $("message").value.trim();
  if (pending) messages.push(userMessage(pending, imageGiven ? null : IMAGE_TOKEN));
  else if (messages.at(-1)?.role === "assistant") messages.pop(); // asks the last question again
  if (!messages.some((m) => m.role === "user")) messages.push(userMessage("What is in this image?", IMAGE_TOKEN));
  return messages;
}

function fileName() {
  const name = (state.image?.name || "image.png").split(/[\\/]/).pop();
  return name.replace(/[^\w.+-]/g, "_") || "image.png";
}

function imageMime() {
  return state.image?.src.match(/^data:([^;,]+)/)?.[1] || "image/png";
}

// JSON as Python's json.dumps writes it (", " and ": "): valid Python too for these values.
function compact(value) {
  if (Array.isArray(value)) return `[${value.map(compact).join(", ")}]`;
  if (value && typeof value === "object") {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${compact(v)}`).join(", ")}}`;
  }
  return JSON.stringify(value);
}

// The same as a Python literal: true, false and null are Python's True, False and None (a JSON Schema has them).
function pyLiteral(value) {
  if (Array.isArray(value)) return `[${value.map(pyLiteral).join(", ")}]`;
  if (value && typeof value === "object") {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${pyLiteral(v)}`).join(", ")}}`;
  }
  if (value === true || value === false) return value ? "True" : "False";
  return value === null ? "None" : JSON.stringify(value);
}

// A list one item a line, as people write a conversation by hand.
const listing = (items, indent) => `[\n${items.map((m) => `${indent}${compact(m)},\n`).join("")}${indent.slice(4)}]`;
const py = (value) => pyLiteral(value);
const pyKwargs = (entries) => entries.map(([k, v]) => `    ${k}=${pyLiteral(v)},\n`).join("");
const sq = (text) => `'${text.replace(/'/g, "'\\''")}'`;

function curlCode(messages, params) {
  const body = [
    `{"model": ${compact(state.model || "MODEL")},`,
    ` "input": {"messages": ${listing(messages, "    ").replace(/,\n(\s*\])$/, "\n$1")}},`,
    ` "parameters": ${compact({ ...params, incremental_output: true })}}`,
  ].join("\n");
  const local = state.image?.kind === "data";
  let heredoc = body;
  let marker = "'EOF'";
  if (local) {
    // An unquoted here-document expands $(...): escape what the shell would read in the JSON itself.
    heredoc = body.replace(/[\\$`]/g, (c) => `\\${c}`);
    heredoc = heredoc.replace(IMAGE_TOKEN, `data:${imageMime()};base64,$(base64 < ${sq(fileName())} | tr -d '\\n')`);
    marker = "EOF";
  } else {
    heredoc = heredoc.replace(IMAGE_TOKEN, imageUrl());
  }
  return [
    `curl -N ${location.origin}${GENERATION} \\`,
    '  -H "Authorization: Bearer $DASHSCOPE_API_KEY" \\',
    "  -H 'Content-Type: application/json' \\",
    "  -H 'X-DashScope-SSE: enable' \\",
    `  --data-binary @- <<${marker}`,
    heredoc,
    "EOF",
    "",
  ].join("\n");
}

function imageUrl() {
  return state.image?.kind === "url" ? state.image.src : "https://example.com/your-image.jpg";
}

function dashscopeCode(messages, params) {
  const local = state.image?.kind === "data";
  const imageExpr = local ? "image" : py(imageUrl());
  const literal = listing(messages, "    ").replace(py(IMAGE_TOKEN), imageExpr);
  return [
    "import os",
    ...(local ? ["from pathlib import Path"] : []),
    "",
    "import dashscope",
    "",
    `dashscope.base_http_api_url = ${py(location.origin + API)}`,
    ...(local ? [`image = Path(${py(fileName())}).resolve().as_uri()  # the SDK uploads the file to the server`] : []),
    `messages = ${literal}`,
    "responses = dashscope.MultiModalConversation.call(",
    '    api_key=os.getenv("DASHSCOPE_API_KEY"),',
    `    model=${py(state.model || "MODEL")},`,
    "    messages=messages,",
    "    stream=True,",
    "    incremental_output=True,",
    pyKwargs(Object.entries(params)) + ")",
    "for response in responses:",
    "    if response.status_code != 200:",
    '        raise SystemExit(f"{response.code}: {response.message}")',
    "    for item in response.output.choices[0].message.content:",
    '        print(item.get("text", ""), end="", flush=True)',
    "print()",
    "",
  ].join("\n");
}

function openaiCode(messages, params) {
  const local = state.image?.kind === "data";
  const converted = messages.map((m) => {
    const text = m.content.filter((c) => "text" in c).map((c) => c.text).join("");
    if (m.role !== "user" || !m.content.some((c) => "image" in c)) return { role: m.role, content: text };
    return {
      role: "user",
      content: [
        { type: "image_url", image_url: { url: IMAGE_TOKEN } },
        { type: "text", text },
      ],
    };
  });
  const literal = listing(converted, "    ").replace(py(IMAGE_TOKEN), local ? "image" : py(imageUrl()));
  const { top_k: topK, ...standard } = params;
  const extra = topK === undefined ? "" : `    extra_body={"top_k": ${topK}},\n`;
  return [
    ...(local ? ["import base64"] : []),
    "import os",
    ...(local ? ["from pathlib import Path"] : []),
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(api_key=os.getenv("DASHSCOPE_API_KEY"), base_url=${py(`${location.origin}/compatible-mode/v1`)})`,
    ...(local
      ? [`image = "data:${imageMime()};base64," + base64.b64encode(Path(${py(fileName())}).read_bytes()).decode()`]
      : []),
    `messages = ${literal}`,
    "stream = client.chat.completions.create(",
    `    model=${py(state.model || "MODEL")},`,
    "    messages=messages,",
    "    stream=True,",
    pyKwargs(Object.entries(standard)) + extra + ")",
    "for chunk in stream:",
    "    if chunk.choices and chunk.choices[0].delta.content:",
    '        print(chunk.choices[0].delta.content, end="", flush=True)',
    "print()",
    "",
  ].join("\n");
}

function showCode() {
  const messages = codeMessages();
  let params;
  try {
    params = requestParameters();
  } catch {
    params = parameters(); // the schema field is not JSON yet: the code leaves it out
  }
  const code = { curl: curlCode, dashscope: dashscopeCode, openai: openaiCode }[codeLanguage](messages, params);
  $("code-text").textContent = code;
  for (const tab of document.querySelectorAll(".tabs [role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.lang === codeLanguage));
  }
  const notes = ["The key is read from $DASHSCOPE_API_KEY."];
  if (state.image?.kind === "data") notes.push(`Save the image as ${fileName()} beside it.`);
  if (!state.image) notes.push("Add an image, or put its URL in place of the example.");
  $("code-note").textContent = notes.join(" ");
}

// -- wiring --------------------------------------------------------------------------------------

function wire() {
  const key = $("api-key");
  key.addEventListener("input", () => {
    sessionStorage.setItem(KEY_SLOT, key.value.trim());
    loadModelsSoon();
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    loadModelsNow();
  });
  $("model").addEventListener("change", () => {
    state.model = $("model").value;
    showModelBadge();
    save();
  });
  $("system").addEventListener("input", () => {
    state.system = $("system").value;
    saveSoon();
  });
  $("schema").addEventListener("input", () => {
    state.schema = $("schema").value;
    saveSoon();
  });
  for (const name of PARAMETERS) {
    $(`p-${name}`).addEventListener("input", (event) => {
      state.parameters[name] = event.target.value;
      saveSoon();
    });
  }

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("message").value.trim();
    if (text) ask(text);
  });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("message").addEventListener("input", fitComposer);
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);

  $("image-file").addEventListener("change", (event) => {
    takeFile(event.target.files[0]);
    event.target.value = "";
  });
  $("url-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if ($("image-url").value.trim()) takeUrl($("image-url").value);
    $("image-url").value = "";
  });
  $("remove-image").addEventListener("click", () => setImage(null));
  $("dropzone").addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      $("image-file").click();
    }
  });
  document.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
    if (file) {
      event.preventDefault();
      takeFile(file);
    }
  });
  // Dropping anywhere on the page takes the image (and never navigates away to the file).
  let depth = 0;
  document.addEventListener("dragenter", (event) => {
    event.preventDefault();
    depth += 1;
    $("dropzone").classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) $("dropzone").classList.remove("dragging");
  });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    $("dropzone").classList.remove("dragging");
    const file = [...(event.dataTransfer?.files || [])].find((f) => f.type.startsWith("image/"));
    if (file) return takeFile(file);
    const url = event.dataTransfer?.getData("text/uri-list") || event.dataTransfer?.getData("text/plain");
    if (url) takeUrl(url.split("\n")[0]);
  });

  $("get-code").addEventListener("click", () => {
    showCode();
    $("code-dialog").showModal();
  });
  $("close-code").addEventListener("click", () => $("code-dialog").close());
  for (const tab of document.querySelectorAll(".tabs [role=tab]")) {
    tab.addEventListener("click", () => {
      codeLanguage = tab.dataset.lang;
      showCode();
    });
  }
  $("copy-code").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText($("code-text").textContent);
      $("copy-code").textContent = "Copied";
    } catch {
      $("copy-code").textContent = "Select and copy";
    }
    setTimeout(() => ($("copy-code").textContent = "Copy"), 1500);
  });
  window.addEventListener("pagehide", () => saveTimer && save());
}

async function start() {
  wire();
  $("api-key").value = sessionStorage.getItem(KEY_SLOT) || "";
  await restore();
  $("system").value = state.system;
  $("schema").value = state.schema;
  if (state.schema.trim()) $("answer-shape").open = true;
  for (const name of PARAMETERS) $(`p-${name}`).value = state.parameters[name] ?? "";
  if (Object.values(state.parameters).some((v) => `${v}`.trim())) $("parameters").open = true;
  renderImage();
  renderConversation();
  await loadModelsNow();
  document.body.dataset.ready = "true";
  $(apiKey() ? "message" : "api-key").focus();
}

start();
