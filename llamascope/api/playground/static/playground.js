// llamascope playground: talks to this server's public DashScope native API with the key typed in.
//
// Storage: the key in sessionStorage (this tab only); the conversation in sessionStorage (this tab's, kept
// over a reload) and in localStorage (the last saved, where a new tab starts); local images (data: URIs,
// possibly megabytes each) in IndexedDB by id, whose quota is far larger than localStorage's, shared by the
// tabs: each open tab lists the ids it holds (HELD_SLOT), and no tab forgets an image another holds.
// Nothing is sent anywhere but this origin.
//
// Images: the tray (state.pending) holds those for the next message; sending takes them into the
// turn, which keeps them. A conversation carries each turn's images in that turn's user message.

import { renderMarkdown } from "./markdown.js";

const API = "/api/v1";
const GENERATION = `${API}/services/aigc/multimodal-generation/generation`;
const KEY_SLOT = "llamascope.playground.key";
const STATE_SLOT = "llamascope.playground.conversation";
const HELD_SLOT = "llamascope.playground.held"; // {page id: {ids, at}}: the stored images each open tab holds
const HELD_DAYS = 30; // a tab that vanished without a word (a crash) stops holding its images after this
const PAGE = newId(); // this page's entry in HELD_SLOT (a duplicated tab gets its own)
const IMAGE_DB = "llamascope-playground";
const PARAMETERS = ["temperature", "top_p", "top_k", "max_tokens", "seed", "stop"];
const INTEGER_PARAMETERS = new Set(["top_k", "max_tokens", "seed"]);
// What to do about a request body over the server's limit: the images are in it, each turn, as base64.
const TOO_LARGE =
  "Every message sends the conversation's images again, as data: URIs a third larger than their files: " +
  "remove some, use smaller ones or image URLs, start a New chat, or raise the server's MAX_BODY_BYTES.";

const $ = (id) => document.getElementById(id);

let state = emptyState();
let models = [];
let running = null; // {controller, turn} while an answer streams
let leaving = false; // the page is being left (a reload, a closed tab): a stream that ends then was stopped
let modelsTimer = null; // a model list waiting for the key's typing to pause
let modelsLoading = null; // the model list being fetched, a promise
let saveTimer = null; // a save waiting for typing to pause
const views = new WeakMap(); // turn -> its DOM nodes
const RENDER_EVERY_MS = 33; // a streaming answer is drawn at most about 30 times a second

function emptyState() {
  return { model: "", system: "", schema: "", parameters: {}, pending: [], turns: [] };
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

const keepImage = (id, src) => imageStore("readwrite", (s) => s.put(src, id));
const readImage = (id) => imageStore("readonly", (s) => s.get(id));

// Every image the page holds: the conversation's, in order, then the tray's.
function allImages() {
  return [...state.turns.flatMap((t) => t.images), ...state.pending];
}

function heldByTabs() {
  try {
    return JSON.parse(localStorage.getItem(HELD_SLOT) || "{}") || {};
  } catch {
    return {};
  }
}

// Says which stored images this page holds (none: it is being left), for the other tabs' pruning.
function hold(images) {
  const held = heldByTabs();
  const since = Date.now() - HELD_DAYS * 86_400_000;
  for (const [page, entry] of Object.entries(held)) if (!(entry?.at > since)) delete held[page];
  if (images) held[PAGE] = { ids: images.filter((i) => i.kind === "data").map((i) => i.id), at: Date.now() };
  else delete held[PAGE];
  try {
    localStorage.setItem(HELD_SLOT, JSON.stringify(held));
  } catch {
    // storage full: save() says so
  }
}

// Forgets the stored images that no turn or tray holds any more: this tab's, another open tab's, or the
// last saved conversation's (where a new tab starts).
async function pruneImages() {
  const used = new Set(allImages().map((i) => i.id));
  for (const entry of Object.values(heldByTabs())) for (const id of entry?.ids || []) used.add(id);
  try {
    const last = JSON.parse(localStorage.getItem(STATE_SLOT) || "null");
    for (const t of [...(last?.turns || []), { images: last?.pending || [] }]) {
      for (const image of t.images || []) used.add(image.id);
    }
  } catch {
    // nothing saved that parses: nothing held by it
  }
  await imageStore("readwrite", (store) => {
    const keys = store.getAllKeys();
    keys.onsuccess = () => keys.result.filter((k) => !used.has(k)).forEach((k) => store.delete(k));
    return keys;
  }).catch(() => undefined);
}

// A local image lives in IndexedDB: only its id and name are kept with the conversation.
const stored = (image) => (image.kind === "url" ? image : { id: image.id, kind: "data", name: image.name });

function save() {
  clearTimeout(saveTimer);
  saveTimer = null;
  const kept = {
    ...state,
    pending: state.pending.map(stored),
    turns: state.turns.map((t) => ({
      ...t,
      images: t.images.map(stored),
      status: t.status === "streaming" ? "stopped" : t.status,
    })),
  };
  hold(allImages());
  try {
    const text = JSON.stringify(kept);
    sessionStorage.setItem(STATE_SLOT, text); // this tab's own, over a reload
    localStorage.setItem(STATE_SLOT, text); // where a new tab starts
  } catch {
    setStatus("This browser's storage is full: the conversation will not survive a reload.", true);
  }
}

function saveSoon() {
  clearTimeout(saveTimer);
  saveTimer = setTimeout(save, 400);
}

async function restore() {
  let kept = null;
  try {
    kept = JSON.parse(sessionStorage.getItem(STATE_SLOT) || localStorage.getItem(STATE_SLOT) || "null");
  } catch {
    kept = null;
  }
  if (!kept) return;
  const { image, ...rest } = kept;
  state = { ...emptyState(), ...rest };
  state.turns = state.turns.map((t) => ({ ...t, images: t.images || [] }));
  if (image) {
    // Kept by an earlier playground, one image per conversation (stored in IndexedDB as "current"): it
    // belongs to the first answered turn, the one that carried it, else to the next message.
    const old = image.kind === "url" ? { ...image, id: newId() } : { ...image, id: "current" };
    const first = state.turns.find((t) => t.withImage && t.answer && ["done", "stopped"].includes(t.status));
    if (first) first.images = [old];
    else state.pending = [old];
  }
  hold(allImages()); // before any await: another tab's pruning sees them held
  let lost = false;
  for (const held of allImages()) {
    if (held.kind !== "data") continue;
    held.src = await readImage(held.id).catch(() => undefined);
    lost ||= !held.src;
  }
  state.pending = state.pending.filter((i) => i.kind !== "data" || i.src);
  if (lost) setStatus("An image could not be kept in this browser; add it again to go on.", true);
}

function newId() {
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
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
  showImageRules(model);
}

const imageCount = (n) => (n === 1 ? "1 image" : `${n} images`);

// The image hint says the model's own rules (its requires_image and max_images settings, as /models lists
// them); a tray already past a new model's limit is said at once.
function showImageRules(model) {
  const limit = model?.max_images;
  const first = model?.requires_image === false ? "a message may also go without one" : "the first message needs one";
  const most = limit ? ` ${model.model} takes at most ${imageCount(limit)} a conversation.` : "";
  const compare = !limit || limit > 1 ? " To compare images, send them together." : "";
  $("image-rules").textContent = `Images go with your next message, in order, at any turn; ${first}.${most}${compare}`;
  checkImageLimit();
}

// What the model's max_images says of the conversation's images and the tray's, with the way on; "" when
// within it (or the model is not listed: then the server's answer is the check).
function overLimit(model, imagesGiven = history().imagesGiven) {
  const limit = model?.max_images;
  const total = imagesGiven + state.pending.length;
  if (!limit || total <= limit) return "";
  const way = imagesGiven > limit ? "start a New chat" : "remove some from the tray (×) or start a New chat";
  return `${model.model} takes at most ${imageCount(limit)} a conversation and this message would make it `
    + `${total}: ${way}.`;
}

// Said as the tray changes (renderTray), not only at Send: a person adding one image too many learns it then.
function checkImageLimit() {
  const over = overLimit(models.find((m) => m.model === state.model));
  if (over) setStatus(over, true, "images");
  else clearStatus("images");
}

// The parameters set, as numbers (and stop as a list). A number field holding what is no number in range
// (1e999: the browser reads it as empty, or Number() as Infinity, which JSON sends as null) throws a
// RangeError naming the field (`field`), unless `lenient`: then it is left out.
function parameters(lenient = false) {
  const out = {};
  for (const name of PARAMETERS) {
    const raw = (state.parameters[name] ?? "").toString().trim();
    const field = $(`p-${name}`);
    if (name !== "stop" && (field.validity?.badInput || (raw && !Number.isFinite(Number(raw))))) {
      if (lenient) continue;
      const label = document.querySelector(`label[for="p-${name}"]`)?.textContent || name;
      const said = raw ? `${label}: ${raw} is not a number in range.` : `${label}: not a number in range.`;
      throw Object.assign(new RangeError(said), { field });
    }
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

function userMessage(text, images) {
  return { role: "user", content: [...images.map((image) => ({ image })), { text }] };
}

// The messages the API is sent: the system prompt, then every answered turn, each user message with the
// images its turn carried, as `reference(image)` gives them. `imagesGiven`: how many images are among them.
function history(reference = (image) => image.src) {
  const messages = [];
  if (state.system.trim()) messages.push({ role: "system", content: [{ text: state.system }] });
  let imagesGiven = 0;
  for (const turn of answered()) {
    const images = turn.images.filter((i) => i.src); // one this browser could not keep is left out
    messages.push(userMessage(turn.user, images.map(reference)));
    messages.push({ role: "assistant", content: [{ text: turn.answer }] });
    imagesGiven += images.length;
  }
  return { messages, imagesGiven };
}

// The turns the conversation goes on from: a failed one, or one stopped before its answer, is left out.
function answered() {
  return state.turns.filter((t) => ["done", "stopped"].includes(t.status) && t.answer);
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
  const images = state.pending;
  const { messages, imagesGiven } = history();
  const model = models.find((m) => m.model === state.model);
  if (!imagesGiven && !images.length && model?.requires_image !== false) {
    return refuse("Add an image first: the first message needs one (more may join at any turn).");
  }
  // The model's limit, said before megabytes of images go out, with the way on (the server would refuse too).
  const over = overLimit(model, imagesGiven);
  if (over) return setStatus(over, true, "images"); // cleared once the tray is within it again
  let params;
  try {
    params = requestParameters();
  } catch (error) {
    if (error instanceof RangeError) {
      $("parameters").open = true;
      return refuse(error.message, error.field);
    }
    $("answer-shape").open = true;
    return refuse(`The JSON Schema is not JSON: ${error.message}`, $("schema"));
  }
  messages.push(userMessage(text, images.map((i) => i.src)));
  const turn = {
    user: text,
    images,
    answer: "",
    status: "streaming",
    model: state.model,
    json: Boolean(params.response_format),
  };
  state.turns.push(turn);
  state.pending = [];
  renderTray();
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
      if (turn.error.code === "BadRequest.TooLarge") turn.error.hint = TOO_LARGE;
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
    if (error.name === "AbortError" || leaving) {
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
    giveBackImages(turn);
    save();
  }
}

// A turn that is not part of the conversation (failed, or stopped before its answer): its images wait in the
// tray for the next message (× removes one).
function giveBackImages(turn) {
  if (!state.turns.includes(turn) || answered().includes(turn)) return;
  const back = turn.images.filter((image) => !state.pending.includes(image));
  if (!back.length) return;
  state.pending = [...back, ...state.pending];
  renderTray();
}

// Leaving the page cuts the stream: the answer so far stays in the conversation, stopped, as Stop leaves it
// (not as a broken stream, which would drop it), and the server stops generating.
function leave() {
  if (running) {
    leaving = true;
    running.turn.status = "stopped";
    giveBackImages(running.turn);
    running.controller.abort();
    save();
  } else if (saveTimer) {
    save();
  }
  hold(null); // a reload holds them again as it restores
}

function refuse(message, focus) {
  setStatus(message, true);
  focus?.focus();
}

function stop() {
  running?.controller.abort();
}

// -- the images ----------------------------------------------------------------------------------

async function addImage(image) {
  state.pending.push(image);
  renderTray();
  save();
  if (image.kind !== "data") return;
  try {
    await keepImage(image.id, image.src);
  } catch {
    setStatus("This image is too large to keep in this browser: a reload will lose it.", true);
  }
}

function removeImage(image) {
  state.pending = state.pending.filter((i) => i !== image);
  renderTray();
  save();
  pruneImages();
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function takeFiles(files) {
  for (const file of files) {
    const src = await readFile(file);
    await addImage({ id: newId(), kind: "data", src, name: file.name || "pasted-image.png" });
  }
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
  addImage({ id: newId(), kind: "url", src: value, name: parsed.pathname.split("/").pop() || parsed.host });
}

// The tray: a thumbnail of each image for the next message, with its name and a button that removes it.
function renderTray() {
  const list = $("attachments");
  list.replaceChildren(
    ...state.pending.map((image) => {
      const figure = el("figure", "image-preview");
      // A URL image is fetched by the server only: loading it here would be a third-party request.
      if (image.kind === "data") {
        const img = el("img");
        img.src = image.src;
        img.alt = image.name;
        figure.append(img);
      } else {
        const card = el("div", "url-card");
        card.append(el("span", "url-host", new URL(image.src).host), el("small", "", "fetched by the server"));
        figure.append(card);
      }
      const caption = el("figcaption");
      const name = el("span", "image-name", image.name);
      name.title = image.kind === "url" ? image.src : image.name;
      const remove = el("button", "icon", "×");
      remove.type = "button";
      remove.title = `Remove ${image.name}`;
      remove.setAttribute("aria-label", remove.title);
      remove.addEventListener("click", () => removeImage(image));
      caption.append(name, remove);
      figure.append(caption);
      const item = el("li", "attachment");
      item.append(figure);
      return item;
    }),
  );
  list.hidden = state.pending.length === 0;
  $("dropzone").classList.toggle("holding", state.pending.length > 0);
  const sent = state.turns.some((t) => t.images.length);
  $("image-prompt").textContent =
    state.pending.length || sent ? "Add another image for the next message:" : "Drop images here, paste them, or";
  checkImageLimit();
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
  const attached = el("div", "attached-images");
  for (const image of turn.images) {
    if (image.kind === "data" && image.src) {
      const img = el("img", "attached");
      img.src = image.src;
      img.alt = image.name;
      attached.append(img);
    } else {
      attached.append(el("div", "attached-url", `image: ${image.kind === "url" ? image.src : image.name}`));
    }
  }
  if (turn.images.length) user.append(attached);
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
    if (turn.error.hint) view.error.append(el("span", "error-hint", turn.error.hint));
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

// A new conversation about the same images: the old one's go back to the tray, for its first message.
function newChat() {
  stop();
  const again = [...answered().flatMap((t) => t.images), ...(running?.turn.images || []), ...state.pending];
  state.pending = again.filter((image, n) => again.findIndex((i) => i.id === image.id) === n);
  state.turns = [];
  renderConversation();
  renderTray();
  save();
  pruneImages();
  setStatus("");
  $("message").focus();
}

// -- get code ------------------------------------------------------------------------------------

let codeLanguage = "curl";

// The conversation as the code sends it, and the images in it: each stands in the messages as a token,
// replaced by what each language writes for it (a file read beside the code, or a URL). `file` is a
// local image's file name, unique among them; an image of null is the example URL.
function codeConversation() {
  const images = [];
  const names = new Set();
  const token = (image) => {
    const entry = { image, token: `\u2063IMAGE${images.length}\u2063` };
    if (image?.kind === "data") entry.file = uniqueName(image.name, names);
    images.push(entry);
    return entry.token;
  };
  const { messages } = history(token);
  const pending = $("message").value.trim();
  if (pending) messages.push(userMessage(pending, state.pending.map(token)));
  else if (messages.at(-1)?.role === "assistant") messages.pop(); // asks the last question again
  if (!messages.some((m) => m.role === "user")) {
    messages.push(userMessage("What is in this image?", state.pending.map(token)));
  }
  if (!images.length) messages.find((m) => m.role === "user").content.unshift({ image: token(null) });
  return { messages, images };
}

function uniqueName(name, taken) {
  const base = (name || "image.png").split(/[\\/]/).pop().replace(/[^\w.+-]/g, "_") || "image.png";
  let file = base;
  for (let n = 2; taken.has(file); n += 1) file = base.replace(/(\.[^.]*)?$/, `-${n}$1`);
  taken.add(file);
  return file;
}

function mimeOf(image) {
  return image.src?.match(/^data:([^;,]+)/)?.[1] || "image/png";
}

const urlOf = (image) => image?.src || "https://example.com/your-image.jpg";

// Python variables for the local images: `image` when there is one, else image1, image2, ...
function imageVariables(images) {
  const local = images.filter((i) => i.file);
  local.forEach((entry, n) => (entry.variable = local.length === 1 ? "image" : `image${n + 1}`));
  return local;
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

function curlCode({ messages, images }, params) {
  const body = [
    `{"model": ${compact(state.model || "MODEL")},`,
    ` "input": {"messages": ${listing(messages, "    ").replace(/,\n(\s*\])$/, "\n$1")}},`,
    ` "parameters": ${compact({ ...params, incremental_output: true })}}`,
  ].join("\n");
  const local = images.some((i) => i.file);
  // An unquoted here-document expands $(...): escape what the shell would read in the JSON itself.
  const escape = (text) => (local ? text.replace(/[\\$`]/g, (c) => `\\${c}`) : text);
  let heredoc = escape(body);
  for (const { image, token, file } of images) {
    const value = file
      ? `data:${mimeOf(image)};base64,$(base64 < ${sq(file)} | tr -d '\\n')`
      : escape(JSON.stringify(urlOf(image)).slice(1, -1)); // a URL's " or \ inside a JSON string
    heredoc = heredoc.replace(token, () => value); // a function: "$&" or "$'" in a URL is no pattern
  }
  return [
    `curl -N ${location.origin}${GENERATION} \\`,
    '  -H "Authorization: Bearer $DASHSCOPE_API_KEY" \\',
    "  -H 'Content-Type: application/json' \\",
    "  -H 'X-DashScope-SSE: enable' \\",
    `  --data-binary @- <<${local ? "EOF" : "'EOF'"}`,
    heredoc,
    "EOF",
    "",
  ].join("\n");
}

// The literal of `messages` with each image token replaced by its Python expression.
function pythonMessages(messages, images) {
  let literal = listing(messages, "    ");
  for (const entry of images) {
    literal = literal.replace(py(entry.token), () => entry.variable || py(urlOf(entry.image)));
  }
  return literal;
}

function dashscopeCode({ messages, images }, params) {
  const local = imageVariables(images);
  const reads = local.map(
    (e, n) => `${e.variable} = Path(${py(e.file)}).resolve().as_uri()${n ? "" : "  # the SDK uploads the file to the server"}`,
  );
  return [
    "import os",
    ...(local.length ? ["from pathlib import Path"] : []),
    "",
    "import dashscope",
    "",
    `dashscope.base_http_api_url = ${py(location.origin + API)}`,
    ...reads,
    `messages = ${pythonMessages(messages, images)}`,
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

function openaiCode({ messages, images }, params) {
  const local = imageVariables(images);
  const converted = messages.map((m) => {
    const text = m.content.filter((c) => "text" in c).map((c) => c.text).join("");
    if (m.role !== "user" || !m.content.some((c) => "image" in c)) return { role: m.role, content: text };
    const parts = m.content.filter((c) => "image" in c).map((c) => ({ type: "image_url", image_url: { url: c.image } }));
    return { role: "user", content: [...parts, { type: "text", text }] };
  });
  const { top_k: topK, ...standard } = params;
  const extra = topK === undefined ? "" : `    extra_body={"top_k": ${topK}},\n`;
  const reads = local.map(
    (e) => `${e.variable} = "data:${mimeOf(e.image)};base64," + base64.b64encode(Path(${py(e.file)}).read_bytes()).decode()`,
  );
  return [
    ...(local.length ? ["import base64"] : []),
    "import os",
    ...(local.length ? ["from pathlib import Path"] : []),
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(api_key=os.getenv("DASHSCOPE_API_KEY"), base_url=${py(`${location.origin}/compatible-mode/v1`)})`,
    ...reads,
    `messages = ${pythonMessages(converted, images)}`,
    "stream = client.chat.completions.create(",
    `    model=${py(state.model || "MODEL")},`,
    "    messages=messages,",
    "    stream=True,",
    pyKwargs(Object.entries(standard)) + extra + ")",
    "for chunk in stream:",
    '    if chunk.choices and chunk.choices[0].delta.content:',
    '        print(chunk.choices[0].delta.content, end="", flush=True)',
    "print()",
    "",
  ].join("\n");
}

function showCode() {
  const conversation = codeConversation();
  const params = parameters(true); // a number out of range: left out (Send says so)
  try {
    const format = responseFormat();
    if (format) params.response_format = format;
  } catch {
    // the schema field is not JSON yet: the code leaves it out
  }
  const code = { curl: curlCode, dashscope: dashscopeCode, openai: openaiCode }[codeLanguage](conversation, params);
  $("code-text").textContent = code;
  for (const tab of document.querySelectorAll(".tabs [role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.lang === codeLanguage));
  }
  const notes = ["The key is read from $DASHSCOPE_API_KEY."];
  const files = conversation.images.filter((i) => i.file).map((i) => i.file);
  if (files.length === 1) notes.push(`Save the image as ${files[0]} beside it.`);
  if (files.length > 1) notes.push(`Save the images as ${files.join(", ")} beside it.`);
  if (conversation.images.some((i) => !i.image)) notes.push("Add an image, or put its URL in place of the example.");
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

  $("image-file").addEventListener("change", async (event) => {
    await takeFiles([...event.target.files]);
    event.target.value = "";
  });
  $("url-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if ($("image-url").value.trim()) takeUrl($("image-url").value);
    $("image-url").value = "";
  });
  $("dropzone").addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      $("image-file").click();
    }
  });
  document.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files || [])].filter((f) => f.type.startsWith("image/"));
    if (files.length) {
      event.preventDefault();
      takeFiles(files);
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
    const files = [...(event.dataTransfer?.files || [])].filter((f) => f.type.startsWith("image/"));
    if (files.length) return takeFiles(files);
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
  window.addEventListener("pagehide", leave);
  window.addEventListener("pageshow", (event) => {
    if (!event.persisted) return; // back from the browser's page cache: this page again, its images held again
    leaving = false;
    hold(allImages());
  });
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
  renderTray();
  renderConversation();
  await loadModelsNow();
  document.body.dataset.ready = "true";
  $(apiKey() ? "message" : "api-key").focus();
}

start();
