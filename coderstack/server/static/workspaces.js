// /workspaces: the user's workspaces and their agents, polled from GET /api/v2/workspaces.
import {api, ago, el, every, workspaceState} from "./common.js";

const POLL_MS = 2000;
const body = document.querySelector("#workspaces tbody");

function rows(ws) {
  const link = el("a", {href: `/workspaces/${encodeURIComponent(ws.owner_name)}/${encodeURIComponent(ws.name)}`,
                        class: "workspace-link"}, ws.name);
  const agents = ws.agents.length ? ws.agents : [null];
  return agents.map((agent, i) => el("tr", {"data-workspace": ws.name},
    el("td", {}, i === 0 ? link : ""),
    el("td", {}, i === 0 ? (ws.template_name || "—") : ""),
    el("td", {class: "build-state"}, i === 0 && ws.template_id ? workspaceState(ws.latest_build) : ""),
    el("td", {}, agent ? agent.name : "—"),
    el("td", {class: `status status-${agent ? agent.status : "none"}`}, agent ? agent.status : "no agent"),
    el("td", {}, agent ? (agent.lifecycle_state || "—") : ""),
    el("td", {}, agent ? ago(agent.last_seen_at) : ""),
  ));
}

every(POLL_MS, async () => {
  const found = await api("/api/v2/workspaces");
  const all = found.workspaces.flatMap(rows);
  if (!all.length) {
    all.push(el("tr", {}, el("td", {colspan: "7", class: "muted"},
      "No workspaces yet: coderstack create NAME")));
  }
  body.replaceChildren(...all);
}, document.getElementById("refreshed"));
