// The web view's script (plexus agent --metrics-address): it swaps in the page's live part
// every few seconds and puts the flows the agent streams (Server-Sent Events) on top of the
// flow table. The server renders every piece of HTML (src/plexus/observe/web_html.py); this
// only fetches and inserts, and never writes anything to the agent.
"use strict";

(function () {
  const STATE_EVERY_MS = 2000;
  const MAX_ROWS = 500; // older flows drop off the bottom of the table

  const status = document.getElementById("status");
  const state = document.getElementById("state");
  const table = document.getElementById("flows");
  const rows = table.tBodies[0];
  const flowStatus = document.getElementById("flow-status");

  async function refreshState() {
    try {
      const response = await fetch("/fragments/state", { cache: "no-store" });
      if (!response.ok) {
        throw new Error(`${response.status} ${response.statusText}`);
      }
      state.innerHTML = await response.text();
      status.textContent = `live, as of ${new Date().toISOString().slice(11, 19)} UTC`;
      status.className = "";
    } catch (error) {
      status.textContent = `the agent does not answer (${error.message}); retrying`;
      status.className = "stale";
    }
  }

  function followFlows() {
    const query = new URLSearchParams(table.dataset.query);
    query.set("follow", "1");
    if (Number(table.dataset.last) > 0) {
      query.set("after", table.dataset.last); // the page opened with these rows
    }
    const label = table.dataset.query ? `filtered: ${table.dataset.query}` : "live";
    const source = new EventSource(`/fragments/flows?${query}`);
    source.onopen = () => {
      flowStatus.textContent = label;
      flowStatus.className = "";
    };
    source.onmessage = (event) => {
      rows.insertAdjacentHTML("afterbegin", event.data);
      while (rows.rows.length > MAX_ROWS) {
        rows.deleteRow(-1);
      }
    };
    // EventSource reconnects by itself and sends the last record's id: none is shown twice.
    source.onerror = () => {
      flowStatus.textContent = "stream interrupted; reconnecting";
      flowStatus.className = "stale";
    };
  }

  setInterval(refreshState, STATE_EVERY_MS);
  followFlows();
})();
