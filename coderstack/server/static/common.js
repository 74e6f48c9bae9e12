// Shared by the dashboard's pages: JSON from the API (the session cookie goes along), small DOM
// builders that only ever set text (never HTML), and relative times.

export class HTTPError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export async function api(path) {
  const resp = await fetch(path, {credentials: "same-origin", headers: {Accept: "application/json"}});
  if (resp.status === 401) {
    // The session ended (logged out elsewhere, expired): back to the login form.
    window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname));
    throw new HTTPError(401, "logged out");
  }
  if (!resp.ok) {
    throw new HTTPError(resp.status, `${path}: HTTP ${resp.status}`);
  }
  const type = resp.headers.get("Content-Type") || "";
  if (type.startsWith("application/x-ndjson")) {
    const text = await resp.text();
    return text.split("\n").filter((line) => line).map((line) => JSON.parse(line));
  }
  return resp.json();
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined) {
      node.setAttribute(key, value);
    }
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function ago(iso) {
  if (!iso) {
    return "never";
  }
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (seconds < 60) return `${seconds}s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h ago`;
  return `${Math.floor(seconds / 86400)}d ago`;
}

export function describePath(path) {
  // How the server reaches the agent (GET /api/v2/workspaceagents/{id} "server_path").
  if (!path) {
    return "no tunnel yet";
  }
  const latency = path.latency_ms === null || path.latency_ms === undefined
    ? "" : `, ${path.latency_ms.toFixed(1)} ms`;
  if (path.path === "p2p") {
    return `direct${path.endpoint ? " via " + path.endpoint : ""}${latency}`;
  }
  return `relayed (DERP${path.derp_region ? " region " + path.derp_region : ""})${latency}`;
}

// Run fn now and every `ms` milliseconds, showing the last refresh (or the error) in `status`.
export function every(ms, fn, status) {
  let timer = null;
  const tick = async () => {
    try {
      await fn();
      if (status) status.textContent = `Updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      if (status) status.textContent = `Update failed: ${err.message}; retrying`;
    }
    timer = setTimeout(tick, ms);
  };
  tick();
  return () => clearTimeout(timer);
}

// A state change through the API (the browser adds this page's Origin, which the API checks):
// the reply's JSON, or an HTTPError carrying the API's own message and detail.
export async function send(method, path, body) {
  const resp = await fetch(path, {
    method, credentials: "same-origin",
    headers: {Accept: "application/json", "Content-Type": "application/json"},
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const reply = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const why = [reply.message || `HTTP ${resp.status}`, reply.detail].filter((x) => x).join(": ");
    throw new HTTPError(resp.status, why);
  }
  return reply;
}

// Read a newline-delimited JSON response as it arrives, calling onLine for each object.
export async function streamLines(path, onLine) {
  const resp = await fetch(path, {credentials: "same-origin", headers: {Accept: "application/x-ndjson"}});
  if (!resp.ok) {
    throw new HTTPError(resp.status, `${path}: HTTP ${resp.status}`);
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let pending = "";
  for (;;) {
    const {value, done} = await reader.read();
    pending += decoder.decode(value || new Uint8Array(), {stream: !done});
    const lines = pending.split("\n");
    pending = lines.pop();
    for (const line of lines.filter((x) => x)) {
      onLine(JSON.parse(line));
    }
    if (done) {
      return;
    }
  }
}

// What a workspace's latest build says about it, in the words Coder's dashboard uses.
export function workspaceState(build) {
  if (!build) return "no build";
  const busy = {start: "starting", stop: "stopping", destroy: "deleting"}[build.transition];
  if (build.status === "pending" || build.status === "running") return busy;
  if (build.status === "failed") return "failed";
  return {start: "running", stop: "stopped", destroy: "deleted"}[build.transition];
}
