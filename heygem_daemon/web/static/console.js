// heygem console: live regions (server-sent events swap in the fragment the server rendered) and copy buttons.
"use strict";

function csrfToken() {
  return document.querySelector('meta[name="csrf-token"]').content;
}

// The page's one stream. A page kept in the back/forward cache must not hold it: the browser allows six
// connections per host over HTTP/1.1, and a few cached job pages with open streams would block the next
// page. So the stream closes when the page is hidden and opens again when it is shown (the first event
// brings the fragment up to date).
let source = null;

function openLive() {
  const region = document.getElementById("live");
  if (!region || !window.EventSource || source) return;
  source = new EventSource(region.dataset.live);
  source.onmessage = (event) => {
    if (region.dataset.reload && event.data) { window.location.reload(); return; }
    if (!event.data) return;
    // A playing video is not interrupted: the fragment only changes while the job is moving.
    if ([...region.querySelectorAll("video")].some((v) => !v.paused)) return;
    region.innerHTML = event.data;
  };
}

function closeLive() {
  if (!source) return;
  source.close();
  source = null;
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

document.addEventListener("DOMContentLoaded", openLive);
window.addEventListener("pageshow", openLive);
window.addEventListener("pagehide", closeLive);
