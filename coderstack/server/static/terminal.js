// The web terminal: xterm.js on the agent's reconnecting PTY
// (GET /api/v2/workspaceagents/{id}/pty?reconnect=UUID&width=&height=, a websocket).
//
// Output arrives as binary frames; keystrokes go out as {"data"} and sizes as {"height",
// "width"} text frames. The session's UUID is kept in sessionStorage, so a reload or a dropped
// connection re-attaches to the same shell, whose scrollback the agent replays (the screen is
// reset first, so it is not shown twice). A drop reconnects by itself with exponential backoff.
import {api, describePath} from "./common.js";

const {Terminal} = await import(document.body.dataset.xterm);
const {FitAddon} = await import(document.body.dataset.fit);

const agentId = document.body.dataset.agentId;
const stateEl = document.getElementById("terminal-state");
const pathEl = document.getElementById("terminal-path");
const storageKey = `coderstack.pty.${agentId}`;
const MIN_BACKOFF_MS = 250;
const MAX_BACKOFF_MS = 10000;
const PATH_POLL_MS = 5000;

function sessionId() {
  let id = sessionStorage.getItem(storageKey);
  if (!id) {
    id = crypto.randomUUID();
    sessionStorage.setItem(storageKey, id);
  }
  return id;
}

// A steady cursor: with blinking on, every keystroke restarts the blink, and Chromium then holds
// the echo's websocket message until the next frame is drawn — 8 ms more per key on average,
// one frame later on screen (measured in bench/bench_terminal.py).
const term = new Terminal({cursorBlink: false, scrollback: 10000, fontFamily: "monospace"});
const fit = new FitAddon();
term.loadAddon(fit);
term.open(document.getElementById("terminal"));
fit.fit();

let socket = null;
let attempts = 0;
let leaving = false;

function setState(text, cls) {
  stateEl.textContent = text;
  stateEl.className = `state ${cls}`;
}

function send(obj) {
  if (socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify(obj));
  }
}

function connect() {
  const scheme = window.location.protocol === "https:" ? "wss" : "ws";
  const query = new URLSearchParams({reconnect: sessionId(), width: term.cols, height: term.rows});
  // The page's ?command= runs that instead of the login shell (as Coder's terminal page does).
  const command = new URLSearchParams(window.location.search).get("command");
  if (command) query.set("command", command);
  const ws = new WebSocket(`${scheme}://${window.location.host}/api/v2/workspaceagents/${agentId}/pty?${query}`);
  ws.binaryType = "arraybuffer";
  socket = ws;
  ws.onopen = () => {
    attempts = 0;
    term.reset();  // the agent replays the session's scrollback next
    setState("connected", "ok");
    send({height: term.rows, width: term.cols});
    term.focus();
  };
  ws.onmessage = (ev) => {
    term.write(typeof ev.data === "string" ? ev.data : new Uint8Array(ev.data));
  };
  ws.onclose = () => {
    if (socket !== ws || leaving) {
      return;
    }
    socket = null;
    const delay = Math.min(MAX_BACKOFF_MS, MIN_BACKOFF_MS * 2 ** attempts) * (0.75 + Math.random() / 2);
    attempts += 1;
    setState(`reconnecting… (attempt ${attempts})`, "warn");
    setTimeout(connect, delay);
  };
}

term.onData((data) => send({data}));
term.onResize(({cols, rows}) => send({height: rows, width: cols}));
new ResizeObserver(() => fit.fit()).observe(document.getElementById("terminal"));
window.addEventListener("resize", () => fit.fit());
window.addEventListener("pagehide", () => { leaving = true; });
window.addEventListener("pageshow", (ev) => {
  if (ev.persisted) {  // back from the back-forward cache: its socket was closed on the way out
    leaving = false;
    connect();
  }
});

async function showPath() {
  try {
    const agent = await api(`/api/v2/workspaceagents/${agentId}`);
    pathEl.textContent = `server → agent: ${describePath(agent.server_path)}`;
  } catch (err) {
    pathEl.textContent = `server → agent: unknown (${err.message})`;
  }
  setTimeout(showPath, PATH_POLL_MS);
}

// For tests and debugging in the console: the terminal, its socket, its text.
window.coderstackTerminal = {
  term,
  get socket() { return socket; },
  get session() { return sessionId(); },
  text() {
    const buffer = term.buffer.active;
    const lines = [];
    for (let i = 0; i < buffer.length; i++) {
      lines.push(buffer.getLine(i).translateToString(true));
    }
    return lines.join("\n");
  },
};

setState("connecting…", "warn");
connect();
showPath();
