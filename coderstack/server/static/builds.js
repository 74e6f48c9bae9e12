// The workspace page's build card: the latest build's state and its log (streamed while the
// build runs), and the start / stop / delete buttons, which start a build through the API.
import {api, send, streamLines, workspaceState} from "./common.js";

// A workspace without a template has no card (nothing to build).
const card = document.getElementById("build");
const workspaceId = document.body.dataset.workspaceId;
const log = document.getElementById("build-log");
const state = document.getElementById("build-state");
const problem = document.getElementById("build-error");
const buttons = card ? [...card.querySelectorAll("button[data-transition]")] : [];
// The build whose log is on the page, and whether it is being streamed.
let shown = null;
let streaming = false;

function stateClass(text) {
  if (text === "running") return "state ok";
  if (text === "failed") return "state bad";
  if (text === "stopped" || text === "no build") return "state muted";
  return "state warn";
}

function showState(build) {
  const text = workspaceState(build);
  state.textContent = text;
  state.className = stateClass(text);
  card.dataset.state = text;
  document.getElementById("build-number").textContent = build ? `#${build.build_number}` : "";
  const busy = text === "starting" || text === "stopping" || text === "deleting";
  const allowed = {
    start: !busy && text !== "running",
    stop: !busy && (text === "running" || (text === "failed" && build.transition === "start")),
    destroy: !busy,
  };
  for (const button of buttons) {
    button.disabled = streaming || !allowed[button.dataset.transition];
  }
}

async function follow(build) {
  shown = build.id;
  streaming = !["succeeded", "failed"].includes(build.status);
  log.textContent = "";
  showState(build);
  let final = build;
  await streamLines(`/api/v2/workspacebuilds/${build.id}/logs${streaming ? "?follow=true" : ""}`, (line) => {
    if (line.output !== undefined) {
      log.append(line.output + "\n");
      log.scrollTop = log.scrollHeight;
    } else if (line.build) {
      final = line.build;
    }
  });
  streaming = false;
  showState(final);
  if (final.transition === "destroy" && final.status === "succeeded") {
    window.location.assign("/workspaces");
  }
}

for (const button of buttons) {
  button.addEventListener("click", async () => {
    const transition = button.dataset.transition;
    if (transition === "destroy" && !window.confirm("Delete this workspace and everything its template made?")) {
      return;
    }
    problem.hidden = true;
    for (const b of buttons) b.disabled = true;
    try {
      const build = await send("POST", `/api/v2/workspaces/${workspaceId}/builds`, {transition});
      await follow(build);
    } catch (err) {
      problem.textContent = err.message;
      problem.hidden = false;
      streaming = false;
      refresh();
    }
  });
}

// Is a build's log streaming (the page should not reload under it)?
export function busy() {
  return streaming;
}

// Called by the page's poll with the workspace's JSON: a build started elsewhere (the CLI)
// is followed too.
export function refresh(ws) {
  if (!card) return;
  const build = ws ? ws.latest_build : null;
  if (build && build.id !== shown && !streaming) {
    follow(build).catch((err) => {
      problem.textContent = err.message;
      problem.hidden = false;
      streaming = false;
    });
  } else if (!streaming && ws) {
    showState(build);
  } else if (!ws) {
    api(`/api/v2/workspaces/${workspaceId}`).then((w) => showState(w.latest_build)).catch(() => {});
  }
}
