// Live updates: a page whose <main> names a stream re-reads itself when the outbox says
// something happened, and swaps in its new <main>. No inline script, so the CSP stays 'self'.
"use strict";
(function () {
  const main = document.querySelector("main[data-live]");
  if (!main || !window.EventSource) return;
  const types = ["task.updated", "task.failed", "task.flagged", "task.archived",
                 "asset.stored", "asset.failed", "asset.expiring"];
  let timer = null;
  let busy = false;

  async function refresh() {
    timer = null;
    // A form being filled in, or a preview playing, is not thrown away under its user.
    const playing = Array.from(main.querySelectorAll("video, audio")).some(function (m) {
      return !m.paused;
    });
    if (busy || playing || main.contains(document.activeElement) && document.activeElement.form) {
      schedule();
      return;
    }
    busy = true;
    try {
      const answer = await fetch(location.href, {credentials: "same-origin", cache: "no-store"});
      if (!answer.ok) return;
      const page = new DOMParser().parseFromString(await answer.text(), "text/html");
      const fresh = page.querySelector("main");
      if (fresh) {
        main.replaceChildren(...fresh.childNodes);
        document.body.dataset.refreshed = String(Date.now());
      }
    } finally {
      busy = false;
    }
  }

  function schedule() {
    if (timer === null) timer = setTimeout(refresh, 250);
  }

  const stream = new EventSource(main.dataset.live);
  types.forEach(function (type) { stream.addEventListener(type, schedule); });
  stream.addEventListener("open", function () { document.body.dataset.live = "open"; });
})();
