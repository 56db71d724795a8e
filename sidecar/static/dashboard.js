// Swaps in the live part of the dashboard every few seconds; no reload, nothing external.
(() => {
  "use strict";
  const live = document.getElementById("live");
  const conn = document.getElementById("conn");
  const every = Math.max(1, Number(live.dataset.every) || 3) * 1000;
  let refreshes = 0;

  async function refresh() {
    if (document.hidden) {
      setTimeout(refresh, every);
      return;
    }
    try {
      const response = await fetch(live.dataset.src, { cache: "no-store" });
      if (response.status === 401) {
        location.reload(); // signed out (a new token, say): the page asks to sign in again
        return;
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      live.innerHTML = await response.text();
      refreshes += 1;
      live.dataset.refreshes = String(refreshes);
      conn.textContent = "live";
      conn.className = "conn ok";
    } catch (error) {
      conn.textContent = "sidecar unreachable";
      conn.className = "conn bad";
      conn.title = String(error);
    } finally {
      setTimeout(refresh, every);
    }
  }

  setTimeout(refresh, every);
})();
