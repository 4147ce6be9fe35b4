// llamascope playground: the key's batch jobs, with their status and progress.
//
// A module of its own beside playground.js: it reads the key from the same field and calls the Batch API
// (GET /compatible-mode/v1/batches) only while its panel is open, again every few seconds while a batch
// there is still running.

const BATCHES = "/compatible-mode/v1/batches?limit=20";
const ENDED = new Set(["completed", "failed", "expired", "cancelled"]);
const POLL_MS = 3000;
const TYPING_PAUSE_MS = 400;

const $ = (id) => document.getElementById(id);
let pollTimer = null;
let typingTimer = null;
let loading = null; // {key, promise}: the list being read, for the key it was read with

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setNote(text, bad = false) {
  const note = $("batch-note");
  note.textContent = text;
  note.classList.toggle("bad", bad);
}

async function errorText(response) {
  try {
    const body = await response.json();
    const error = body.error || body;
    return `${error.code || "Error"} (HTTP ${response.status}): ${error.message || response.statusText}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

// One batch as a list item: its id, its status, a bar of the lines ended and the counts.
function batchItem(batch) {
  const counts = batch.request_counts || { total: 0, completed: 0, failed: 0 };
  const ended = counts.completed + counts.failed;
  const item = el("li", "batch");
  item.dataset.batchId = batch.id;
  item.dataset.status = batch.status;
  const head = el("div", "batch-head");
  head.append(el("code", "batch-id", batch.id), el("span", `batch-status ${batch.status}`, batch.status.replace("_", " ")));
  const bar = el("progress", "batch-bar");
  bar.max = Math.max(counts.total, 1);
  bar.value = counts.total ? ended : 0;
  bar.setAttribute("aria-label", `${batch.id}: ${ended} of ${counts.total} lines ended`);
  const failed = counts.failed ? ` · ${counts.failed} failed` : "";
  const tokens = batch.usage ? ` · ${batch.usage.total_tokens} tokens` : "";
  const detail = el("p", "batch-counts", `${counts.completed}/${counts.total} done${failed}${tokens}`);
  item.append(head, bar, detail);
  if (batch.model) item.title = `${batch.model}, made ${new Date(batch.created_at * 1000).toLocaleString()}`;
  return item;
}

function render(batches) {
  const list = $("batch-list");
  list.replaceChildren(...batches.map(batchItem));
  setNote(batches.length ? "This key's batches, newest first." : "No batches for this key yet.");
}

async function load() {
  clearTimeout(pollTimer);
  const key = $("api-key").value.trim();
  if (!key) {
    loading = null; // a list on its way for the key that was there is not shown
    $("batch-list").replaceChildren();
    setNote("Enter a key to list its batches.");
    return;
  }
  if (loading?.key === key) return loading.promise;
  // A load begun for another key may end after this one: only the latest load shows what it read.
  const mine = { key, promise: null };
  const latest = () => loading === mine;
  mine.promise = (async () => {
    try {
      const response = await fetch(BATCHES, { headers: { Authorization: `Bearer ${key}` } });
      if (!response.ok) {
        const text = await errorText(response);
        if (!latest()) return;
        $("batch-list").replaceChildren();
        setNote(text, true);
        return;
      }
      const batches = (await response.json()).data || [];
      if (!latest()) return;
      render(batches);
      if ($("batches").open && batches.some((b) => !ENDED.has(b.status))) pollTimer = setTimeout(load, POLL_MS);
    } catch (error) {
      if (latest()) setNote(`The batches could not be read: ${error.message}`, true);
    } finally {
      if (latest()) loading = null;
    }
  })();
  loading = mine;
  return mine.promise;
}

function wireBatches() {
  const panel = $("batches");
  if (!panel) return;
  panel.addEventListener("toggle", () => (panel.open ? load() : clearTimeout(pollTimer)));
  $("refresh-batches").addEventListener("click", load);
  $("api-key").addEventListener("input", () => {
    if (!panel.open) return;
    clearTimeout(typingTimer);
    typingTimer = setTimeout(load, TYPING_PAUSE_MS);
  });
}

wireBatches();
