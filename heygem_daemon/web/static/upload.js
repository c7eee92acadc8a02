// heygem console, Upload page: each file goes up through tus (tus.min.js), resumable after a dropped
// connection or a reloaded page (tus-js-client keeps a fingerprint per file in localStorage); once all
// are up, the job is sent and the server checks it as intake does.
"use strict";

const AUDIO = /\.(wav|mp3|m4a|aac|flac|ogg|opus)$/i;
const PORTRAIT = /\.(jpe?g|png|webp|mp4|mov|webm)$/i;
const items = [];
let paused = false;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function refreshButtons() {
  const send = document.getElementById("send");
  const pause = document.getElementById("pause");
  const running = items.some((i) => !i.id && !i.error);
  send.disabled = items.length < 2 || running || items.some((i) => i.error);
  pause.disabled = !running;
  pause.textContent = paused ? "Resume" : "Pause";
}

function addFile(file) {
  const form = document.getElementById("job");
  const item = { file, id: null, error: null };
  const row = el("li");
  const name = el("span", "name", file.name);
  const bar = el("progress");
  bar.max = 1; bar.value = 0;
  const note = el("span", "note", "");
  row.append(name, bar, note);
  document.getElementById("files").append(row);
  items.push(item);
  if (!AUDIO.test(file.name) && !PORTRAIT.test(file.name)) {
    item.error = note.textContent = "not an audio or portrait file";
    row.classList.add("refused");
    refreshButtons();
    return;
  }
  if (file.size > Number(form.dataset.maxMb) * 1048576) {
    item.error = note.textContent = `over the ${form.dataset.maxMb} MB limit`;
    row.classList.add("refused");
    refreshButtons();
    return;
  }
  item.upload = new tus.Upload(file, {
    endpoint: "/tus/",
    headers: { "X-CSRF-Token": csrfToken() },
    metadata: { filename: file.name, filetype: file.type },
    retryDelays: [0, 1000, 3000, 5000, 10000, 20000],
    removeFingerprintOnSuccess: true,
    onProgress: (sent, total) => { bar.value = sent / total; note.textContent = `${Math.round(100 * sent / total)} %`; },
    onSuccess: () => {
      item.id = item.upload.url.split("/").pop();
      bar.value = 1; note.textContent = "uploaded";
      refreshButtons();
    },
    onError: (error) => {
      const body = error.originalResponse ? error.originalResponse.getBody() : "";
      let reason = String(error.message || error);
      try { const parsed = JSON.parse(body); reason = `${parsed.reason} (${parsed.hint})`; } catch (_) { /* not ours */ }
      item.error = note.textContent = reason;
      row.classList.add("refused");
      refreshButtons();
    },
  });
  item.upload.findPreviousUploads().then((previous) => {
    if (previous.length) {
      note.textContent = "resuming";
      item.upload.resumeFromPreviousUpload(previous[0]);
    }
    if (!paused) item.upload.start();
  });
  refreshButtons();
}

function togglePause() {
  paused = !paused;
  for (const item of items) {
    if (!item.upload || item.id || item.error) continue;
    if (paused) item.upload.abort(); else item.upload.start();
  }
  refreshButtons();
}

async function send(event) {
  event.preventDefault();
  const form = event.target;
  const outcome = document.getElementById("outcome");
  outcome.className = "";
  outcome.textContent = "Checking the files…";
  const body = {
    ids: items.map((i) => i.id), name: form.elements.name.value, engine: form.elements.engine.value,
    preset: form.elements.preset.value, priority: form.elements.priority.value, upload: form.elements.upload.checked,
  };
  const answer = await fetch("/upload/submit", {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrfToken() }, body: JSON.stringify(body),
  });
  const result = await answer.json();
  outcome.textContent = "";
  if (answer.ok) {
    outcome.append("Handed to the daemon as ", Object.assign(el("a", "", result.job), { href: result.url }), ".");
    window.location.assign(result.url);
    return;
  }
  outcome.className = "refused";
  outcome.append(el("p", "", `Refused: ${result.reason}`), el("p", "", `What to do: ${result.hint}`));
}

document.addEventListener("DOMContentLoaded", () => {
  const drop = document.getElementById("drop");
  const pick = document.getElementById("pick");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    [...e.dataTransfer.files].forEach(addFile);
  });
  pick.addEventListener("change", () => { [...pick.files].forEach(addFile); pick.value = ""; });
  document.getElementById("pause").addEventListener("click", togglePause);
  document.getElementById("job").addEventListener("submit", send);
});
