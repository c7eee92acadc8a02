// heygem console: live regions (server-sent events swap in the fragment the server rendered) and copy buttons.
"use strict";

function csrfToken() {
  return document.querySelector('meta[name="csrf-token"]').content;
}

function startLive() {
  const region = document.getElementById("live");
  if (!region || !window.EventSource) return;
  const source = new EventSource(region.dataset.live);
  source.onmessage = (event) => {
    if (region.dataset.reload && event.data) { window.location.reload(); return; }
    if (!event.data) return;
    // A playing video is not interrupted: the fragment only changes while the job is moving.
    if ([...region.querySelectorAll("video")].some((v) => !v.paused)) return;
    region.innerHTML = event.data;
  };
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return;
    } catch (_) { /* no clipboard permission (an unfocused page): the selection way below */ }
  }
  const area = document.createElement("textarea");
  area.value = text;
  document.body.appendChild(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  await copyText(button.dataset.copy);
  const label = button.textContent;
  button.textContent = "Copied";
  button.dataset.copied = "1";
  setTimeout(() => { button.textContent = label; }, 1500);
});

document.addEventListener("DOMContentLoaded", startLive);
