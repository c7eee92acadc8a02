// heygem console, Upload page: each file goes up through tus (tus.min.js), resumable after a dropped
// connection or a reloaded page (tus-js-client keeps a fingerprint per file in localStorage); once all
// are up, the job is sent and the server checks it as intake does.
//
// One row per file: tus-js-client finds a file's upload by its fingerprint (name, type, size, date), so a
// second row for the same file would resume the first row's upload and both would send one upload id.
"use strict";

const AUDIO = /\.(wav|mp3|m4a|aac|flac|ogg|opus)$/i;
const PORTRAIT = /\.(jpe?g|png|webp|mp4|mov|webm)$/i;
const RETRY_DELAYS = [0, 1000, 3000, 5000, 10000, 20000];
const items = [];
let paused = false;
let sending = false;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function fileKey(file) {
  return [file.name, file.type, file.size, file.lastModified].join("\u0000");
}

function refreshButtons() {
  const send = document.getElementById("send");
  const pause = document.getElementById("pause");
  const running = items.some((i) => !i.id && !i.error);
  send.disabled = sending || items.length < 2 || running || items.some((i) => i.error);
  pause.disabled = !running;
  pause.textContent = paused ? "Resume" : "Pause";
}

function parsed(text) {
  try {
    return JSON.parse(text);
  } catch (_) {
    return null;  // not ours: a proxy's page, or no body
  }
}

// A refusal's words: our JSON {reason, hint}, else the HTTP status and whatever the body says.
function refusal(status, body, fallback) {
  const ours = parsed(body);
  if (ours && ours.reason) return { reason: ours.reason, hint: ours.hint || "" };
  const text = (body || "").replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim().slice(0, 200);
  const reason = status ? `the server answered HTTP ${status}${text ? `: ${text}` : ""}` : fallback;
  return { reason, hint: "try again; if it keeps happening, tell the operator" };
}

function refuse(item, words) {
  item.error = `${words.reason}${words.hint ? ` (${words.hint})` : ""}`;
  item.note.textContent = item.error;
  item.row.classList.add("refused");
  refreshButtons();
}

// Worth another try: no answer, a server or proxy hiccup, an offset race, the lock of a PATCH being taken
// over, an idle body ended. A refusal with a reason (full disk, too big, wrong type) is shown at once.
function shouldRetry(error) {
  const status = error.originalResponse ? error.originalResponse.getStatus() : 0;
  if (status === 0) return navigator.onLine !== false;
  return [408, 409, 423].includes(status) || (status >= 500 && status !== 507);
}

function removeItem(item) {
  items.splice(items.indexOf(item), 1);
  item.row.remove();
  refreshButtons();
  // Gone from the server too (and from tus-js-client's fingerprints), so it holds no disk space.
  if (item.upload && !item.id) {
    item.upload.abort(true).catch(() => { /* expired or never made: nothing held */ });
  } else if (item.id) {
    fetch(`/tus/${item.id}`, {
      method: "DELETE", credentials: "same-origin",
      headers: { "Tus-Resumable": "1.0.0", "X-CSRF-Token": csrfToken() },
    }).catch(() => { /* the sweep removes it after web.upload_expiry_hours */ });
  }
}

function addFile(file) {
  const key = fileKey(file);
  const twin = items.find((i) => i.key === key);
  if (twin) {
    twin.row.classList.remove("again");
    void twin.row.offsetWidth;  // restart the highlight
    twin.row.classList.add("again");
    twin.flash.textContent = "is in the list already";
    clearTimeout(twin.flashTimer);
    twin.flashTimer = setTimeout(() => { twin.flash.textContent = ""; }, 4000);
    return;
  }
  const form = document.getElementById("job");
  const row = el("li");
  const name = el("span", "name", file.name);
  const bar = el("progress");
  bar.max = 1; bar.value = 0;
  const note = el("span", "note", "");
  const flash = el("span", "flash", "");
  const remove = el("button", "remove", "×");
  remove.type = "button";
  remove.title = `Remove ${file.name}`;
  remove.setAttribute("aria-label", remove.title);
  row.append(name, flash, bar, note, remove);
  document.getElementById("files").append(row);
  const item = { file, key, row, note, flash, id: null, error: null };
  remove.addEventListener("click", () => removeItem(item));
  items.push(item);
  if (!AUDIO.test(file.name) && !PORTRAIT.test(file.name)) {
    refuse(item, { reason: "not an audio or portrait file", hint: "remove it" });
    return;
  }
  if (file.size > Number(form.dataset.maxMb) * 1048576) {
    refuse(item, { reason: `over the ${form.dataset.maxMb} MB limit`, hint: "remove it" });
    return;
  }
  item.upload = new tus.Upload(file, {
    endpoint: "/tus/",
    headers: { "X-CSRF-Token": csrfToken() },
    metadata: { filename: file.name, filetype: file.type },
    retryDelays: RETRY_DELAYS,
    onShouldRetry: shouldRetry,
    removeFingerprintOnSuccess: true,
    onProgress: (sent, total) => { bar.value = sent / total; note.textContent = `${Math.round(100 * sent / total)} %`; },
    onSuccess: () => {
      item.id = item.upload.url.split("/").pop();
      bar.value = 1; note.textContent = "uploaded";
      refreshButtons();
    },
    onError: (error) => {
      const answer = error.originalResponse;
      refuse(item, refusal(answer ? answer.getStatus() : 0, answer ? answer.getBody() : "", String(error.message || error)));
    },
  });
  item.upload.findPreviousUploads().then((previous) => {
    if (!items.includes(item)) return;  // removed meanwhile
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

function showRefusal(outcome, words) {
  outcome.className = "refused";
  outcome.textContent = "";
  outcome.append(el("p", "", `Refused: ${words.reason}`), el("p", "", `What to do: ${words.hint}`));
}

async function send(event) {
  event.preventDefault();
  if (sending) return;  // one submit per click, however fast the clicks come
  sending = true;
  refreshButtons();
  const form = event.target;
  const outcome = document.getElementById("outcome");
  outcome.className = "";
  outcome.textContent = "Checking the files…";
  const body = {
    ids: items.map((i) => i.id), name: form.elements.name.value, engine: form.elements.engine.value,
    preset: form.elements.preset.value, priority: form.elements.priority.value, upload: form.elements.upload.checked,
  };
  let answer;
  let text;
  try {
    answer = await fetch("/upload/submit", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrfToken() }, body: JSON.stringify(body),
    });
    text = await answer.text();
  } catch (error) {
    sending = false;
    refreshButtons();
    showRefusal(outcome, { reason: `no answer from the server (${error.message || error})`,
                           hint: "check the connection and press Send again" });
    return;
  }
  const result = answer.ok ? parsed(text) : null;
  if (result && result.url) {
    outcome.textContent = "";
    outcome.append("Handed to the daemon as ", Object.assign(el("a", "", result.job), { href: result.url }), ".");
    window.location.assign(result.url);
    return;  // Send stays off: the files are the job's now
  }
  sending = false;
  refreshButtons();
  showRefusal(outcome, refusal(answer.status, text, ""));  // a 200 that is not our answer too (a proxy's page)
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
