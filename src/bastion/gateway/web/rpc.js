// Talking to the gateway: JSON-RPC 2.0 over POST /rpc (before the profile is open) and over
// the WebSocket /ws (after), where live events arrive as `event` notifications. The session
// cookie signs every request in; the page never sees the token again after signing in.

export class RpcError extends Error {
  constructor(error, status = 0) {
    super(error?.message || "the gateway did not answer");
    this.code = error?.data?.code || String(error?.code || "error");
    this.data = error?.data || {};
    this.status = status;
  }
}

export async function signIn(token) {
  const answer = await fetch("/session", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token }),
  });
  if (!answer.ok) throw new RpcError((await answer.json()).error, answer.status);
}

let nextId = 1;

export async function post(method, params = {}) {
  const answer = await fetch("/rpc", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ jsonrpc: "2.0", id: nextId++, method, params }),
  });
  const body = await answer.json();
  if (body.error) throw new RpcError(body.error, answer.status);
  return body.result;
}

export class Gateway {
  constructor({ onEvent, onState }) {
    this.onEvent = onEvent;
    this.onState = onState;
    this.pending = new Map();
    this.ws = null;
    this.delay = 500;
    this.open = null;
  }

  connect() {
    this.open = new Promise((resolve) => {
      const scheme = location.protocol === "https:" ? "wss" : "ws";
      const ws = new WebSocket(`${scheme}://${location.host}/ws`, ["bastion"]);
      this.ws = ws;
      ws.addEventListener("open", async () => {
        this.delay = 500;
        resolve();
        await this.call("subscribe");
        this.onState("open");
      });
      ws.addEventListener("message", (msg) => this.received(msg.data));
      ws.addEventListener("close", () => {
        for (const { reject } of this.pending.values()) {
          reject(new RpcError({ message: "the gateway closed the connection", data: { code: "closed" } }));
        }
        this.pending.clear();
        this.onState("closed");
        setTimeout(() => this.connect(), this.delay);
        this.delay = Math.min(this.delay * 2, 10000);
      });
    });
    return this.open;
  }

  received(text) {
    let message;
    try { message = JSON.parse(text); } catch { return; }
    if (message.method === "event") { this.onEvent(message.params); return; }
    const waiting = this.pending.get(message.id);
    if (!waiting) return;
    this.pending.delete(message.id);
    if (message.error) waiting.reject(new RpcError(message.error));
    else waiting.resolve(message.result);
  }

  async call(method, params = {}) {
    await this.open;
    const id = nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.ws.send(JSON.stringify({ jsonrpc: "2.0", id, method, params }));
    });
  }
}

// A file to the gateway, which encrypts and uploads it; `progress(done, total)` follows the
// bytes reaching the gateway (the encrypted upload reports through file_progress events).
export function upload(file, target, transfer, progress) {
  const query = new URLSearchParams({ name: file.name, transfer, ...target });
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/upload?${query}`);
    xhr.upload.addEventListener("progress", (e) => progress(e.loaded, e.total));
    xhr.addEventListener("load", () => {
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch { /* answered below */ }
      if (xhr.status === 200) resolve(body);
      else reject(new RpcError(body.error, xhr.status));
    });
    xhr.addEventListener("error", () => reject(new RpcError({ message: "the upload failed" })));
    xhr.send(file);
  });
}
