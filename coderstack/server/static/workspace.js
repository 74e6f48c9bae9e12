// /workspaces/{user}/{name}: each agent's status, lifecycle, metadata, apps, the server's path to
// it and its startup logs, polled from the JSON API.
import * as builds from "./builds.js";
import {api, ago, describePath, el, every} from "./common.js";

const POLL_MS = 2000;
const workspaceId = document.body.dataset.workspaceId;
// The last log id shown per agent: each poll asks only for newer lines.
const lastLog = new Map();

function field(card, name, text, cls) {
  const node = card.querySelector(`[data-field="${name}"]`);
  node.textContent = text;
  if (cls !== undefined) node.className = cls;
}

function appItem(app) {
  const name = app.display_name || app.slug;
  const label = app.browser_url ? el("a", {href: app.browser_url, target: "_blank", rel: "noopener"}, name) : name;
  return el("li", {"data-app": app.slug}, label, " ",
            el("span", {class: `health health-${app.health}`}, app.health || "unknown"));
}

async function refreshAgent(card, summary) {
  const id = card.dataset.agentId;
  const [agent, metadata, logs] = await Promise.all([
    api(`/api/v2/workspaceagents/${id}`),
    api(`/api/v2/workspaceagents/${id}/metadata`),
    api(`/api/v2/workspaceagents/${id}/logs?after=${lastLog.get(id) || 0}`),
  ]);
  field(card, "status", agent.status, `status status-${agent.status}`);
  field(card, "lifecycle", agent.lifecycle_state || "—");
  field(card, "last-seen", ago(summary ? summary.last_seen_at : agent.last_seen_at));
  field(card, "system", [agent.operating_system, agent.architecture].filter((x) => x).join("/") || "—");
  field(card, "path", describePath(agent.server_path));
  card.querySelector(".metadata tbody").replaceChildren(...metadata.map((m) => el("tr", {"data-key": m.description.key},
    el("th", {}, m.description.display_name || m.description.key),
    el("td", {class: m.result.error ? "error" : ""}, m.result.error || m.result.value || "—"))));
  const apps = agent.apps || [];
  card.querySelector(".apps").replaceChildren(...(apps.length ? apps.map(appItem) : [el("li", {class: "muted"}, "none")]));
  if (logs.length) {
    const pre = card.querySelector(".logs");
    pre.append(logs.map((line) => line.output).join("\n") + "\n");
    lastLog.set(id, logs[logs.length - 1].id);
  }
}

every(POLL_MS, async () => {
  const ws = await api(`/api/v2/workspaces/${workspaceId}`);
  builds.refresh(ws);
  const byId = new Map(ws.agents.map((a) => [a.id, a]));
  const cards = [...document.querySelectorAll(".agent")].map((card) => card.dataset.agentId);
  if (cards.length !== byId.size || cards.some((id) => !byId.has(id))) {
    // A build brought other agents (or took them): the server renders their cards, once the
    // build's log has finished streaming.
    if (!builds.busy()) window.location.reload();
    return;
  }
  await Promise.all([...document.querySelectorAll(".agent")].map((card) =>
    refreshAgent(card, byId.get(card.dataset.agentId))));
}, document.getElementById("refreshed"));
