// Bastion's browser app: a front end of this machine's gateway. It holds no keys; the
// gateway encrypts, signs, verifies and stores. See docs/gateway.md ("The browser app").

import { announce, append, byId, el, fill, size, time } from "./dom.js";
import { Gateway, RpcError, post, signIn, upload } from "./rpc.js";
import { Scanner } from "./scan.js";

const STATES = {
  queued: "Waiting for the connection (kept encrypted on this computer)",
  pending: "Sending…",
  sent: "Stored on the server",
  delivered: "Delivered",
  failed: "Not sent",
};
const PRESENCE = ["online", "away", "busy", "invisible"];

const S = {
  me: "",
  device: "",
  connection: "connecting",
  contacts: [],
  groups: [],
  invites: [],
  files: [],
  messages: new Map(), // conversation → messages, oldest first
  unread: new Map(), // conversation → count
  trust: new Map(), // user → unverified | verified | changed
  notices: new Map(), // conversation → system lines (devices, warnings)
  current: null, // { kind: "user" | "group", id, conversation, name }
  transfers: new Map(), // transfer id → { name, done, total, state }
  sas: null, // { id, user, codes }
  sasRequests: new Set(),
  panel: null, // "verify" | "devices" | "search" | "group" | null
  search: null,
};
let gw = null;

// The 1:1 conversation's id, the same on both sides (as the gateway names it).
function dmOf(user) {
  return `dm:${[S.me, user].sort().join(",")}`;
}

function peerOf(conversation) {
  const [a, b] = conversation.slice(3).split(",");
  return a === S.me ? b : a;
}

// --- starting: sign in with the link's token, then create, unlock or open ------------------

async function start() {
  const match = location.hash.match(/^#token=([A-Za-z0-9_-]+)$/);
  if (match) {
    history.replaceState(null, "", "/");
    try {
      await signIn(match[1]);
    } catch (e) {
      return showExpired(e.message);
    }
  }
  let state;
  try {
    state = await post("profile.state");
  } catch (e) {
    return showExpired(e.status === 401 ? "" : e.message);
  }
  if (state.state === "unlocked") return openApp();
  return showWelcome(state.state);
}

function showExpired(reason) {
  fill(byId("app"), el("main", { class: "welcome", id: "conversation" },
    el("h1", {}, "Bastion"),
    el("p", {}, "This page is not signed in to your gateway."),
    el("p", {}, "Open the link that ", el("code", {}, "bastion gateway --web"),
      " printed when it started. A link works until the gateway stops."),
    reason ? el("p", { class: "error" }, reason) : null));
}

function field(label, attrs) {
  const id = `f-${attrs.name}`;
  return el("div", { class: "field" },
    el("label", { for: id }, label),
    el("input", { id, ...attrs }),
    attrs["aria-describedby"] ? null : null);
}

function showWelcome(state) {
  const error = el("p", { class: "error", role: "alert" });
  const busy = el("p", { role: "status" });
  let form;
  if (state === "locked") {
    form = el("form", { "aria-labelledby": "welcome-title" },
      el("h1", { id: "welcome-title" }, "Unlock Bastion"),
      el("p", {}, "Your messages and keys on this computer are encrypted with your passphrase."),
      field("Passphrase", { name: "passphrase", type: "password", autocomplete: "current-password", required: true }),
      el("button", { type: "submit", class: "primary" }, "Unlock"), busy, error);
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      fill(error); fill(busy, "Unlocking…");
      try {
        await post("profile.unlock", { passphrase: form.elements.passphrase.value });
        form.elements.passphrase.value = "";
        await openApp();
      } catch (err) {
        fill(busy); fill(error, err.message);
        form.elements.passphrase.focus();
      }
    });
  } else {
    form = el("form", { "aria-labelledby": "welcome-title" },
      el("h1", { id: "welcome-title" }, "Create your Bastion account"),
      el("p", {}, "Your server's address comes from whoever runs it. Your keys are made on this computer and never leave it."),
      field("Server address", { name: "server", type: "url", placeholder: "wss://chat.example.org:8443", required: true }),
      field("Server fingerprint (optional, from the server's operator)", { name: "fingerprint", autocomplete: "off" }),
      field("Username", { name: "username", autocomplete: "username", required: true, pattern: "[a-z0-9_.\\-]{1,32}" }),
      field("Passphrase (long and hard to guess: it protects everything on this computer)", { name: "passphrase", type: "password", autocomplete: "new-password", required: true, minlength: 8 }),
      field("Passphrase again", { name: "repeat", type: "password", autocomplete: "new-password", required: true }),
      field("Invite code (if the server asks for one)", { name: "invite", autocomplete: "off" }),
      el("button", { type: "submit", class: "primary" }, "Create account"), busy, error);
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const f = form.elements;
      fill(error);
      if (f.passphrase.value !== f.repeat.value) {
        fill(error, "The two passphrases are not the same.");
        f.repeat.focus();
        return;
      }
      fill(busy, "Creating your keys and account…");
      const params = { server: f.server.value.trim(), username: f.username.value.trim(), passphrase: f.passphrase.value };
      if (f.fingerprint.value.trim()) params.fingerprint = f.fingerprint.value.trim();
      if (f.invite.value.trim()) params.invite = f.invite.value.trim();
      try {
        const made = await post("profile.create", params);
        f.passphrase.value = ""; f.repeat.value = "";
        fill(busy, `Account ${made.user} created. Server certificate pinned: ${made.fingerprint}`);
        await openApp();
      } catch (err) {
        fill(busy); fill(error, err.message);
      }
    });
  }
  fill(byId("app"), el("main", { class: "welcome", id: "conversation" }, form));
  form.querySelector("input").focus();
}

// --- the app ----------------------------------------------------------------------------------

async function openApp() {
  // The gateway swaps in its full methods once the profile is open: wait for that.
  for (let i = 0; i < 100; i += 1) {
    const state = await post("profile.state");
    if (state.state === "unlocked" && state.user) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  renderShell();
  gw = new Gateway({ onEvent, onState: (state) => { if (state === "open") loadAll(); else setConnection("gateway"); } });
  await gw.connect();
}

function renderShell() {
  const search = el("form", { role: "search", class: "search", onsubmit: (e) => { e.preventDefault(); runSearch(e.target.elements.q.value); } },
    el("label", { for: "q", class: "sr-only" }, "Search all conversations"),
    el("input", { id: "q", name: "q", type: "search", placeholder: "Search messages", minlength: 1, maxlength: 200, required: true }),
    el("button", { type: "submit" }, "Search"));
  const presence = el("form", { class: "presence", onsubmit: setPresence },
    el("label", { for: "presence-state" }, "I am"),
    el("select", { id: "presence-state", name: "state" }, PRESENCE.map((p) => el("option", { value: p }, p))),
    el("label", { for: "presence-status", class: "sr-only" }, "Status message"),
    el("input", { id: "presence-status", name: "status", placeholder: "Status (optional)", maxlength: 140 }),
    el("button", { type: "submit" }, "Set"));
  fill(byId("app"),
    el("header", { class: "top" },
      el("h1", {}, "Bastion"),
      el("span", { id: "me", class: "me" }),
      el("span", { id: "connection", role: "status", class: "connection" }, "Connecting…"),
      presence, search,
      el("nav", { class: "tools", "aria-label": "Tools" },
        el("button", { type: "button", onclick: openDevices }, "Devices"),
        "Notification" in window ? el("button", { type: "button", id: "notify", onclick: askNotifications }, "Notifications") : null)),
    el("div", { class: "body" },
      el("nav", { id: "side", class: "side", "aria-label": "Contacts and groups" }),
      el("main", { id: "conversation", class: "conversation", tabindex: "-1" },
        el("p", { class: "hint" }, "Choose a contact or a group, or add a contact."))));
}

async function loadAll() {
  try {
    const [who, status, contacts, groups, invites, files, presence] = await Promise.all([
      gw.call("whoami"), gw.call("status"), gw.call("contacts.list"), gw.call("groups.list"),
      gw.call("groups.invites"), gw.call("files.list"), gw.call("presence.show")]);
    S.me = who.user; S.device = who.device; S.fingerprint = who.fingerprint;
    S.contacts = contacts; S.groups = groups; S.invites = invites; S.files = files;
    fill(byId("me"), `${who.user} · device ${who.device}`);
    const own = presence.find?.((p) => p.type === "presence_self") || presence.self || null;
    if (own) byId("presence-state").value = own.state;
    setConnection(status.connection, status.reason);
    renderSide();
    if (S.current) await openConversation(S.current, { keepFocus: true });
  } catch (e) {
    toast(e.message);
  }
}

function setConnection(state, reason = "") {
  S.connection = state;
  const text = {
    connected: "Connected",
    connecting: "Connecting…",
    reconnecting: `Offline: reconnecting${reason ? ` (${reason})` : ""}. Messages you send wait, encrypted, on this computer.`,
    stopped: `Stopped${reason ? `: ${reason}` : ""}`,
    gateway: "The gateway is not answering; trying again…",
  }[state] || state;
  const node = byId("connection");
  if (node) { fill(node, text); node.dataset.state = state; }
}

function toast(text) {
  const box = byId("toast") || document.body.appendChild(el("div", { id: "toast", class: "toast", role: "status" }));
  fill(box, text);
  clearTimeout(box.timer);
  box.timer = setTimeout(() => fill(box), 8000);
}

// --- the side: requests, contacts, groups, invites -----------------------------------------

function badge(conversation) {
  const n = S.unread.get(conversation) || 0;
  return n ? el("span", { class: "badge" }, el("span", { class: "sr-only" }, ", unread: "), String(n)) : null;
}

function renderSide() {
  const side = byId("side");
  if (!side) return;
  const requests = S.contacts.filter((c) => c.state === "pending-in");
  const people = S.contacts.filter((c) => c.state !== "pending-in");
  const add = el("form", { class: "add", onsubmit: addContact },
    el("h2", { id: "add-title" }, "Add a contact"),
    el("label", { for: "add-user" }, "Username"),
    el("input", { id: "add-user", name: "user", required: true, autocomplete: "off" }),
    el("label", { for: "add-note" }, "Note to them (optional)"),
    el("input", { id: "add-note", name: "note", maxlength: 280, autocomplete: "off" }),
    el("button", { type: "submit" }, "Send request"));
  const newGroup = el("form", { class: "add", onsubmit: createGroup },
    el("h2", {}, "New group"),
    el("label", { for: "group-name" }, "Group name"),
    el("input", { id: "group-name", name: "name", required: true, maxlength: 64 }),
    el("label", { for: "group-members" }, "Members (usernames, separated by commas)"),
    el("input", { id: "group-members", name: "members", autocomplete: "off" }),
    el("button", { type: "submit" }, "Create group"));
  fill(side,
    requests.length ? el("section", { "aria-labelledby": "req-title" },
      el("h2", { id: "req-title" }, "Contact requests"),
      el("ul", { class: "list" }, requests.map((c) => el("li", { class: "request" },
        el("strong", {}, c.user),
        c.note ? el("p", { class: "note" }, el("span", { class: "sr-only" }, "Their note: "), "“", c.note, "”") : el("p", { class: "note" }, "(no note)"),
        el("div", { class: "actions" },
          el("button", { type: "button", onclick: () => contactAction("contacts.accept", c.user) }, `Accept ${c.user}`),
          el("button", { type: "button", onclick: () => contactAction("contacts.decline", c.user) }, "Decline"),
          el("button", { type: "button", class: "danger", onclick: () => contactAction("contacts.block", c.user) }, "Block")))))) : null,
    el("section", { "aria-labelledby": "contacts-title" },
      el("h2", { id: "contacts-title" }, "Contacts"),
      people.length ? el("ul", { class: "list" }, people.map(contactItem)) : el("p", { class: "hint" }, "No contacts yet.")),
    el("section", { "aria-labelledby": "groups-title" },
      el("h2", { id: "groups-title" }, "Groups"),
      S.invites.length ? el("ul", { class: "list" }, S.invites.map((inv) => el("li", { class: "request" },
        el("strong", {}, inv.name), ` — invited by ${inv.by} (${inv.members} members)`,
        el("div", { class: "actions" },
          el("button", { type: "button", onclick: () => groupInvite("groups.accept", inv.group) }, `Join ${inv.name}`),
          el("button", { type: "button", onclick: () => groupInvite("groups.decline", inv.group) }, "Decline"))))) : null,
      S.groups.length ? el("ul", { class: "list" }, S.groups.map((g) => el("li", {},
        el("button", {
          type: "button", class: "conv", "aria-current": S.current?.conversation === g.conversation ? "true" : null,
          onclick: () => openConversation({ kind: "group", id: g.group, conversation: g.conversation, name: g.name }),
        }, el("span", { class: "name" }, g.name), el("span", { class: "sub" }, `${g.members.length} members`), badge(g.conversation))))) : el("p", { class: "hint" }, "No groups yet.")),
    el("details", {}, el("summary", {}, "Add a contact or start a group"), add, newGroup));
  updateTitle();
}

function contactItem(c) {
  const label = { "pending-out": "waiting for them to accept", blocked: "blocked" }[c.state];
  if (c.state === "blocked") {
    return el("li", { class: "blocked" }, el("span", {}, c.user), " — blocked ",
      el("button", { type: "button", onclick: () => contactAction("contacts.unblock", c.user) }, `Unblock ${c.user}`));
  }
  const trust = S.trust.get(c.user);
  return el("li", {},
    el("button", {
      type: "button", class: "conv", "aria-current": S.current?.conversation === dmOf(c.user) ? "true" : null,
      onclick: () => openConversation({ kind: "user", id: c.user, conversation: dmOf(c.user), name: c.user }),
    },
    el("span", { class: `dot ${c.presence}`, "aria-hidden": "true" }),
    el("span", { class: "name" }, c.user),
    el("span", { class: "sub" }, label || [c.presence, c.status ? ` — ${c.status}` : ""].join("")),
    trust === "verified" ? el("span", { class: "verified" }, "✓", el("span", { class: "sr-only" }, " verified")) : null,
    trust === "changed" ? el("span", { class: "changed" }, "! key changed") : null,
    badge(dmOf(c.user))));
}

async function contactAction(method, user) {
  try {
    await gw.call(method, { user });
    S.contacts = await gw.call("contacts.list");
    renderSide();
    announce(`${method.split(".")[1]}: ${user}`);
  } catch (e) { toast(e.message); }
}

async function addContact(e) {
  e.preventDefault();
  const f = e.target.elements;
  const params = { user: f.user.value.trim() };
  if (f.note.value.trim()) params.note = f.note.value.trim();
  try {
    await gw.call("contacts.add", params);
    S.contacts = await gw.call("contacts.list");
    renderSide();
    toast(`Request sent to ${params.user}.`);
  } catch (err) { toast(err.message); }
}

async function createGroup(e) {
  e.preventDefault();
  const f = e.target.elements;
  const members = f.members.value.split(",").map((m) => m.trim()).filter(Boolean);
  try {
    const g = await gw.call("groups.create", { name: f.name.value.trim(), members });
    S.groups = await gw.call("groups.list");
    renderSide();
    openConversation({ kind: "group", id: g.group, conversation: g.conversation, name: g.name });
  } catch (err) { toast(err.message); }
}

async function groupInvite(method, group) {
  try {
    await gw.call(method, { group });
    [S.invites, S.groups] = await Promise.all([gw.call("groups.invites"), gw.call("groups.list")]);
    renderSide();
  } catch (e) { toast(e.message); }
}

async function setPresence(e) {
  e.preventDefault();
  const f = e.target.elements;
  try {
    await gw.call("presence.set", { state: f.state.value, status: f.status.value.trim() || null });
    toast(`You show as ${f.state.value}.`);
  } catch (err) { toast(err.message); }
}

// --- a conversation ---------------------------------------------------------------------------

async function openConversation(conv, { keepFocus = false } = {}) {
  S.current = conv;
  S.panel = null;
  S.unread.delete(conv.conversation);
  try {
    if (conv.kind === "user") {
      const [history, number] = await Promise.all([
        gw.call("history", { user: conv.id, limit: 500 }),
        gw.call("verify.number", { user: conv.id }).catch(() => null)]);
      S.messages.set(conv.conversation, history);
      if (number) S.trust.set(conv.id, number.trust);
    } else {
      S.messages.set(conv.conversation, await gw.call("groups.history", { group: conv.id, limit: 500 }));
    }
  } catch (e) { toast(e.message); }
  renderSide();
  renderConversation();
  if (!keepFocus) byId("composer-text")?.focus();
}

function conversationHeader(conv) {
  const trust = S.trust.get(conv.id);
  const parts = [el("h2", { id: "conv-title" }, conv.kind === "group" ? `Group: ${conv.name}` : conv.name)];
  if (conv.kind === "user") {
    parts.push(trust === "verified"
      ? el("span", { class: "verified" }, "✓ Verified")
      : el("span", { class: "unverified" }, trust === "changed" ? "Key changed" : "Not verified"));
    if (trust !== "changed") {
      parts.push(el("button", { type: "button", onclick: () => openVerify(conv.id) }, trust === "verified" ? "Safety number" : `Verify ${conv.name}`));
    }
  } else {
    parts.push(el("button", { type: "button", onclick: () => openGroupInfo(conv) }, "Members and history"));
  }
  return el("div", { class: "conv-head" }, parts);
}

function keyChangedBanner(user) {
  return el("section", { class: "banner", role: "alert", "aria-labelledby": "banner-title" },
    el("h3", { id: "banner-title" }, `${user}'s security key changed. Sending to ${user} is stopped.`),
    el("p", {}, `This happens when ${user} reinstalls Bastion or loses their device — or when someone is trying to read your messages by pretending to be ${user}. Ask ${user}, in person or on a call you trust, before you continue.`),
    el("p", {}, "Choose one:"),
    el("ol", {},
      el("li", {}, el("strong", {}, "Compare, then continue (safest): "),
        `see the new safety number with ${user}, accept it, then verify by scanning their code or comparing emoji. `,
        el("button", { type: "button", class: "primary", onclick: () => acceptNewKey(user, true) }, "Accept the new key and verify now")),
      el("li", {}, el("strong", {}, "Continue without comparing: "),
        `messages go to the new key, and ${user} shows as not verified until you compare. `,
        el("button", { type: "button", onclick: () => acceptNewKey(user, false) }, "Accept the new key without verifying"))));
}

async function acceptNewKey(user, thenVerify) {
  try {
    const shown = await gw.call("verify.number", { user });
    if (shown.trust !== "changed") { S.trust.set(user, shown.trust); renderConversation(); return; }
    await gw.call("trust.accept_new_key", { user, key: shown.fingerprint });
    S.trust.set(user, "unverified");
    renderSide();
    if (thenVerify) await openVerify(user); else renderConversation();
  } catch (e) { toast(e.message); }
}

function messageItem(m) {
  const mine = m.from === S.me;
  const state = m.state && m.state !== "received" ? (m.state === "failed" ? `${STATES.failed}${m.reason ? `: ${m.reason}` : ""}` : STATES[m.state]) : null;
  return el("li", { class: mine ? "msg mine" : "msg", "data-id": m.id, "data-state": m.state || "" },
    el("div", { class: "meta" },
      el("span", { class: "from" }, mine ? "You" : m.from),
      m.verified ? el("span", { class: "verified", title: "verified sender" }, " ✓", el("span", { class: "sr-only" }, " verified")) : null,
      el("time", { datetime: m.sent_at }, time(m.sent_at))),
    el("p", { class: "text" }, m.text),
    state ? el("p", { class: `state ${m.state}` }, state) : null);
}

function fileItem(f) {
  const verdict = {
    offered: "Not checked yet",
    saved: "Checked: clean. Saved.",
    saved_anyway: "Blocked by the scan, saved anyway after a person confirmed",
    blocked: `Blocked — not saved${f.reasons.length ? `: ${f.reasons.join("; ")}` : ""}`,
    error: `Could not be checked — not saved${f.reasons.length ? `: ${f.reasons.join("; ")}` : ""}`,
    failed: "The download did not check out — not saved",
  }[f.state] || f.state;
  return el("li", { class: `file ${f.state}`, "data-file": f.id },
    el("span", { class: "name" }, f.name), ` (${size(f.size)}) `,
    el("span", { class: "verdict", role: "status" }, verdict),
    f.state === "offered" ? el("button", { type: "button", onclick: () => fetchFile(f) }, `Check and save ${f.name}`) : null,
    f.state === "saved" || f.state === "saved_anyway" ? el("a", { href: `/download/${encodeURIComponent(f.id)}`, download: f.name }, `Download ${f.name}`) : null);
}

async function fetchFile(f) {
  const node = document.querySelector(`[data-file="${CSS.escape(f.id)}"] .verdict`);
  if (node) fill(node, "Downloading and scanning…");
  try {
    await gw.call("files.get", { id: f.id });
  } catch (e) { toast(e.message); }
  S.files = await gw.call("files.list");
  renderConversation();
}

function renderConversation() {
  const main = byId("conversation");
  const conv = S.current;
  if (!main || !conv) return;
  if (S.panel === "verify" || S.panel === "devices" || S.panel === "search" || S.panel === "group") return;
  const changed = conv.kind === "user" && S.trust.get(conv.id) === "changed";
  const messages = S.messages.get(conv.conversation) || [];
  const notices = S.notices.get(conv.conversation) || [];
  const files = conv.kind === "user" ? S.files.filter((f) => f.from === conv.id) : [];
  const transfers = [...S.transfers.values()].filter((t) => t.conversation === conv.conversation);
  const composer = el("form", { class: "composer", onsubmit: sendMessage },
    el("label", { for: "composer-text", class: "sr-only" }, `Message to ${conv.name}`),
    el("textarea", { id: "composer-text", name: "text", rows: 2, required: true, maxlength: 60000, disabled: changed, placeholder: changed ? "Sending is stopped until you choose above" : `Message ${conv.name}` ,
      onkeydown: (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); e.target.form.requestSubmit(); } } }),
    el("button", { type: "submit", class: "primary", disabled: changed }, "Send"),
    el("label", { class: "file-pick", for: "file-input" }, "Send a file"),
    el("input", { id: "file-input", type: "file", class: "file-input", disabled: changed, onchange: sendFile }));
  fill(main,
    conversationHeader(conv),
    changed ? keyChangedBanner(conv.id) : null,
    S.sasRequests.has(conv.id) && S.sas?.user !== conv.id ? el("p", { class: "notice", role: "status" }, `${conv.id} asks to compare emoji with you. `,
      el("button", { type: "button", onclick: () => openVerify(conv.id, true) }, "Compare emoji")) : null,
    notices.length ? el("ul", { class: "notices", "aria-label": "Changes" }, notices.map((n) => el("li", {}, n))) : null,
    el("ol", { class: "messages", "aria-labelledby": "conv-title", "aria-live": "polite" }, messages.map(messageItem)),
    transfers.length ? el("ul", { class: "transfers", "aria-label": "Files being sent" }, transfers.map((t) => el("li", {},
      el("label", { for: `t-${t.id}` }, `${t.name}: ${t.state}`),
      el("progress", { id: `t-${t.id}`, max: t.total || 1, value: t.done || 0 })))) : null,
    files.length ? el("section", { "aria-labelledby": "files-title" }, el("h3", { id: "files-title" }, `Files from ${conv.name}`),
      el("ul", { class: "files" }, files.map(fileItem))) : null,
    composer);
  main.scrollTop = main.scrollHeight; // the newest message in view
}

async function sendMessage(e) {
  e.preventDefault();
  const conv = S.current;
  const box = e.target.elements.text;
  const text = box.value;
  if (!text.trim()) return;
  try {
    if (conv.kind === "user") {
      const sent = await gw.call("send", { to: conv.id, text });
      const state = sent.state === "stored" ? "sent" : sent.state;
      addMessage({ type: "message", id: sent.id, from: S.me, device: S.device, conversation: conv.conversation, text, sent_at: new Date().toISOString(), verified: false, state });
    } else {
      await gw.call("groups.send", { group: conv.id, text });
      S.messages.set(conv.conversation, await gw.call("groups.history", { group: conv.id, limit: 500 }));
    }
    box.value = "";
    renderConversation();
    byId("composer-text")?.focus();
  } catch (err) {
    if (err.code === "key_changed") { S.trust.set(conv.id, "changed"); renderSide(); renderConversation(); }
    else if (err.code === "refused" && err.data?.id) { addMessage({ ...err.data, type: "message", from: S.me, conversation: conv.conversation, text, sent_at: new Date().toISOString(), verified: false, state: "failed" }); renderConversation(); }
    toast(err.message);
  }
}

async function sendFile(e) {
  const file = e.target.files[0];
  e.target.value = "";
  if (!file) return;
  const conv = S.current;
  const id = Math.random().toString(36).slice(2, 12);
  const t = { id, name: file.name, done: 0, total: file.size, state: "preparing", conversation: conv.conversation };
  S.transfers.set(id, t);
  renderConversation();
  const target = conv.kind === "user" ? { to: conv.id } : { group: conv.id };
  try {
    await upload(file, target, id, (done, total) => { t.done = done; t.total = total; t.state = "reaching the gateway"; updateTransfer(t); });
    t.state = "sent"; t.done = t.total;
    toast(`${file.name} was encrypted and sent.`);
  } catch (err) {
    t.state = `failed: ${err.message}`;
    toast(err.message);
  }
  updateTransfer(t);
  setTimeout(() => { S.transfers.delete(id); renderConversation(); }, 4000);
}

function updateTransfer(t) {
  const bar = byId(`t-${t.id}`);
  if (!bar) { renderConversation(); return; }
  bar.max = t.total || 1;
  bar.value = t.done || 0;
  fill(bar.previousSibling, `${t.name}: ${t.state}`);
}

function addMessage(m) {
  const list = S.messages.get(m.conversation) || [];
  const at = list.findIndex((x) => x.id === m.id);
  if (at >= 0) list[at] = { ...list[at], ...m }; else list.push(m);
  S.messages.set(m.conversation, list);
}

// --- verification -----------------------------------------------------------------------------

let scanner = null;

async function openVerify(user, answerSas = false) {
  S.panel = "verify";
  const main = byId("conversation");
  let number;
  try {
    number = await gw.call("verify.number", { user, qr: true });
  } catch (e) { toast(e.message); S.panel = null; renderConversation(); return; }
  S.trust.set(user, number.trust);
  const result = el("p", { class: "result", role: "status", id: "verify-result" });
  const video = el("video", { id: "scan-video", muted: true, playsinline: true, hidden: true, "aria-label": `Camera view for scanning ${user}'s code` });
  const digits = number.safety_number.split(" ");
  const typed = el("form", { class: "typed", onsubmit: async (e) => {
    e.preventDefault();
    try {
      const done = await gw.call("verify.confirm", { user, number: e.target.elements.number.value });
      verified(user, done, result);
    } catch (err) { fill(result, err.message); result.className = "result error"; }
  } },
  el("label", { for: "typed-number" }, `Or type the 60 digits ${user} reads out to you`),
  el("input", { id: "typed-number", name: "number", inputmode: "numeric", autocomplete: "off", required: true }),
  el("button", { type: "submit" }, "Check the number"));
  fill(main,
    el("div", { class: "conv-head" },
      el("h2", { id: "verify-title" }, `Verify ${user}`),
      el("button", { type: "button", onclick: closePanel }, "Back to the conversation")),
    el("p", {}, `Verifying proves you are talking to ${user}'s own keys and nobody in between. Do it together, in person or on a video call you trust.`),
    el("p", { id: "verify-state", class: number.trust === "verified" ? "verified" : "unverified" }, number.trust === "verified" ? `✓ ${user} is verified.` : `${user} is not verified yet.`),
    el("div", { class: "verify" },
      el("section", { "aria-labelledby": "mine-title" },
        el("h3", { id: "mine-title" }, `1. Let ${user} scan your code`),
        el("img", { src: `data:image/png;base64,${number.qr_png}`, alt: `QR code of your safety number with ${user}`, class: "qr", width: 240, height: 240 }),
        el("p", {}, "Safety number:"),
        el("p", { class: "digits", "aria-label": `Safety number: ${number.safety_number}` }, digits.map((d) => el("span", {}, d)))),
      el("section", { "aria-labelledby": "scan-title" },
        el("h3", { id: "scan-title" }, `2. Scan ${user}'s code`),
        el("p", {}, `Hold ${user}'s screen up to your camera. Bastion marks ${user} verified only if the code matches.`),
        el("button", { type: "button", class: "primary", id: "scan-start", onclick: () => startScan(user, video, result) }, "Start the camera"),
        video),
      el("section", { "aria-labelledby": "sas-title" },
        el("h3", { id: "sas-title" }, "3. Or compare emoji"),
        el("p", {}, `Both of you see the same emoji only if nobody is in between. ${user} must be online.`),
        el("button", { type: "button", id: "sas-start", onclick: () => startSas(user) }, "Compare emoji"),
        el("div", { id: "sas-area", "aria-live": "polite" }))),
    typed,
    result);
  byId("verify-title").setAttribute("tabindex", "-1");
  byId("verify-title").focus();
  if (answerSas) startSas(user);
}

function verified(user, answer, result) {
  S.trust.set(user, answer.trust);
  fill(result, answer.trust === "verified" ? `✓ ${user} is verified.` : `${user}: ${answer.trust}`);
  result.className = "result ok";
  const state = byId("verify-state");
  if (state && answer.trust === "verified") { fill(state, `✓ ${user} is verified.`); state.className = "verified"; }
  announce(`${user} is verified`);
  stopScan();
  renderSide();
}

async function startScan(user, video, result) {
  stopScan();
  try {
    scanner = new Scanner(video);
    video.hidden = false;
    fill(result, "Looking for a QR code…"); result.className = "result";
    const payload = await scanner.scan();
    stopScan();
    const answer = await gw.call("verify.confirm", { user, qr_payload: payload });
    verified(user, answer, result);
  } catch (e) {
    stopScan();
    fill(result, e.message); result.className = "result error";
  }
}

function stopScan() {
  if (scanner) { scanner.stop(); scanner.video.hidden = true; scanner = null; }
}

async function startSas(user) {
  const area = byId("sas-area");
  if (area) fill(area, `Waiting for ${user}…`);
  try {
    const flow = await gw.call("verify.sas_start", { user });
    S.sas = { id: flow.id, user, codes: null };
    S.sasRequests.delete(user);
  } catch (e) { if (area) fill(area, e.message); }
}

function showSasCodes(event) {
  if (!S.sas || S.sas.id !== event.id) return;
  S.sas.codes = event;
  const area = byId("sas-area");
  if (!area) return;
  fill(area,
    el("p", {}, `Do you and ${event.user} see these emoji, in this order?`),
    el("ol", { class: "emoji" }, event.emoji.map((e) => el("li", {}, el("span", { class: "symbol", "aria-hidden": "true" }, e.symbol), el("span", { class: "emoji-name" }, e.name)))),
    el("div", { class: "actions" },
      el("button", { type: "button", class: "primary", onclick: () => answerSas(true) }, "They match"),
      el("button", { type: "button", class: "danger", onclick: () => answerSas(false) }, "They don't match")));
  area.querySelector("button").focus();
}

async function answerSas(match) {
  const flow = S.sas;
  if (!flow) return;
  const area = byId("sas-area");
  try {
    if (match) {
      fill(area, `Waiting for ${flow.user} to confirm too…`);
      await gw.call("verify.sas_confirm", { id: flow.id });
    } else {
      await gw.call("verify.sas_cancel", { id: flow.id });
      fill(area, "Cancelled: nothing was marked verified. If the emoji differ, someone may be in between.");
    }
  } catch (e) { fill(area, e.message); }
}

function closePanel() {
  stopScan();
  S.panel = null;
  renderConversation();
  byId("composer-text")?.focus();
}

// --- group info, devices, search ----------------------------------------------------------------

async function openGroupInfo(conv) {
  S.panel = "group";
  const main = byId("conversation");
  let info; let changes;
  try {
    [info, changes] = await Promise.all([gw.call("groups.show", { group: conv.id }), gw.call("groups.changes", { group: conv.id })]);
  } catch (e) { toast(e.message); S.panel = null; renderConversation(); return; }
  const admin = info.admins.includes(S.me);
  const say = { create: "created the group", add_member: "added", remove_member: "removed", promote: "made an admin:", demote: "took admin from", rename: "renamed the group to", leave: "left" };
  const refresh = async () => { S.groups = await gw.call("groups.list"); renderSide(); openGroupInfo({ ...conv, name: info.name }); };
  const act = (method, params) => async (e) => {
    e?.preventDefault?.();
    try { await gw.call(method, { group: conv.id, ...params(e) }); await refresh(); } catch (err) { toast(err.message); }
  };
  fill(main,
    el("div", { class: "conv-head" },
      el("h2", { id: "group-title", tabindex: "-1" }, `${info.name}: members and history`),
      el("button", { type: "button", onclick: closePanel }, "Back to the conversation")),
    el("section", { "aria-labelledby": "members-title" },
      el("h3", { id: "members-title" }, `Members (${info.members.length})`),
      el("ul", { class: "list" }, info.members.map((m) => el("li", {}, m,
        info.admins.includes(m) ? " (admin)" : "",
        ` — ${(info.devices[m] || []).length} device(s)`,
        admin && m !== S.me ? el("button", { type: "button", class: "danger", onclick: act("groups.remove", () => ({ user: m })) }, `Remove ${m}`) : null)))),
    admin ? el("form", { onsubmit: act("groups.add", (e) => ({ user: e.target.elements.user.value.trim() })) },
      el("label", { for: "member-add" }, "Add a member (username)"),
      el("input", { id: "member-add", name: "user", required: true, autocomplete: "off" }),
      el("button", { type: "submit" }, "Add")) : null,
    admin ? el("form", { onsubmit: act("groups.rename", (e) => ({ name: e.target.elements.name.value.trim() })) },
      el("label", { for: "group-rename" }, "Rename the group"),
      el("input", { id: "group-rename", name: "name", required: true, maxlength: 64 }),
      el("button", { type: "submit" }, "Rename")) : null,
    el("button", { type: "button", class: "danger", onclick: act("groups.leave", () => ({})) }, "Leave the group"),
    el("section", { "aria-labelledby": "changes-title" },
      el("h3", { id: "changes-title" }, "Signed change history"),
      el("p", { class: "hint" }, "Each change was signed by the member who made it and checked on this device."),
      el("ol", { class: "changes" }, changes.map((c) => el("li", {},
        el("time", { datetime: c.at }, time(c.at)), " ", c.by, " ", say[c.change] || c.change, c.change === "rename" ? ` “${c.name}”` : "", c.user ? ` ${c.user}` : "")))));
  byId("group-title").focus();
}

async function openDevices() {
  S.panel = "devices";
  const main = byId("conversation");
  let list;
  try { list = await gw.call("devices.list"); } catch (e) { toast(e.message); return; }
  const linkArea = el("div", { id: "link-area", "aria-live": "polite" });
  fill(main,
    el("div", { class: "conv-head" },
      el("h2", { id: "devices-title", tabindex: "-1" }, "Your devices"),
      S.current ? el("button", { type: "button", onclick: closePanel }, "Back to the conversation") : null),
    el("ul", { class: "list" }, list.map((d) => el("li", {}, `Device ${d.device}`, d.this_device ? " (this one)" : "",
      ` — added ${time(new Date(d.created_at).toISOString())}`,
      d.this_device ? null : el("button", { type: "button", class: "danger", onclick: async () => {
        if (!confirm(`Remove device ${d.device}? It will no longer get your messages.`)) return;
        try { await gw.call("devices.revoke", { device: d.device }); openDevices(); } catch (e) { toast(e.message); }
      } }, `Remove device ${d.device}`)))),
    el("h3", {}, "Link a new device"),
    el("p", {}, "A linked device gets your new messages and shows your contacts' trust."),
    el("button", { type: "button", onclick: async () => {
      try {
        const code = await gw.call("devices.link");
        fill(linkArea, el("p", {}, "On the new device, run:"),
          el("pre", { class: "code", id: "link-command" }, `bastion link ${code.code} --server ${code.server} --fingerprint ${S.fingerprint}`),
          el("p", {}, `The code works once, for ${Math.round(code.expires_in_s / 60)} minutes. Keep it secret: whoever types it joins your account.`));
      } catch (e) { fill(linkArea, e.message); }
    } }, "Show a link code"),
    linkArea);
  byId("devices-title").focus();
}

async function runSearch(text) {
  S.panel = "search";
  const main = byId("conversation");
  let hits;
  try { hits = await gw.call("search", { text, limit: 100 }); } catch (e) { toast(e.message); return; }
  const nameOf = (c) => S.groups.find((g) => g.conversation === c)?.name || (c.startsWith("dm:") ? peerOf(c) : c);
  fill(main,
    el("div", { class: "conv-head" },
      el("h2", { id: "search-title", tabindex: "-1" }, `Search: “${text}”`),
      S.current ? el("button", { type: "button", onclick: closePanel }, "Back to the conversation") : null),
    hits.length ? el("ol", { class: "hits" }, hits.map((m) => el("li", {},
      el("button", { type: "button", class: "conv", onclick: () => {
        const group = S.groups.find((g) => g.conversation === m.conversation);
        openConversation(group ? { kind: "group", id: group.group, conversation: group.conversation, name: group.name } : { kind: "user", id: peerOf(m.conversation), conversation: m.conversation, name: peerOf(m.conversation) });
      } }, el("span", { class: "name" }, nameOf(m.conversation)), el("span", { class: "sub" }, `${m.from === S.me ? "You" : m.from}, ${time(m.sent_at)}`), el("span", { class: "text" }, m.text))))) : el("p", {}, "Nothing found."));
  byId("search-title").focus();
}

// --- live events ------------------------------------------------------------------------------

function onEvent(event) {
  switch (event.type) {
    case "message": {
      const mine = event.from === S.me;
      addMessage(event);
      const c = event.conversation;
      const looking = S.current?.conversation === c && !document.hidden;
      if (!mine && !looking) {
        S.unread.set(c, (S.unread.get(c) || 0) + 1);
        notify(event);
      }
      if (!mine) announce(`New message from ${event.from}`);
      renderSide();
      if (S.current?.conversation === c) renderConversation();
      break;
    }
    case "delivered":
      for (const list of S.messages.values()) for (const m of list) if (event.ids.includes(m.id)) m.state = "delivered";
      renderConversation();
      break;
    case "presence":
      for (const c of S.contacts) if (c.user === event.user) { c.presence = event.state; c.status = event.status; }
      renderSide();
      break;
    case "contact":
    case "contact_request":
      gw.call("contacts.list").then((list) => { S.contacts = list; renderSide(); });
      if (event.type === "contact_request") notify({ from: event.user, type: "request" });
      break;
    case "group_invite":
    case "group_change":
    case "group_declined":
      Promise.all([gw.call("groups.invites"), gw.call("groups.list")]).then(([i, g]) => { S.invites = i; S.groups = g; renderSide(); });
      break;
    case "file":
      gw.call("files.list").then((f) => { S.files = f; renderConversation(); });
      break;
    case "key_changed":
      S.trust.set(event.user, "changed");
      renderSide();
      if (S.current?.id === event.user) { S.panel = null; renderConversation(); }
      break;
    case "devices_changed": {
      const who = event.own_account ? "You" : event.user;
      const lines = [];
      if (event.added.length) lines.push(`${who} added a new device (${event.added.join(", ")}).`);
      if (event.removed.length) lines.push(`${who} removed a device (${event.removed.join(", ")}).`);
      const conv = event.own_account ? S.current?.conversation : dmOf(event.user);
      if (conv) S.notices.set(conv, [...(S.notices.get(conv) || []), ...lines]);
      if (event.own_account) toast(lines.join(" "));
      renderConversation();
      break;
    }
    case "connection":
      setConnection(event.state, event.reason || "");
      if (event.state === "connected") loadAll();
      break;
    case "file_progress": {
      const t = S.transfers.get(event.transfer);
      if (t) { t.done = event.done; t.total = event.total; t.state = event.done >= event.total ? "sent" : "encrypting and uploading"; updateTransfer(t); }
      break;
    }
    case "verification_request":
      S.sasRequests.add(event.from);
      renderConversation();
      break;
    case "verification_codes":
      showSasCodes(event);
      break;
    case "verification_done":
      if (S.sas?.id === event.id) {
        S.sas = null;
        const result = byId("verify-result");
        if (result) verified(event.user, { trust: "verified" }, result);
        else { S.trust.set(event.user, "verified"); renderSide(); }
      }
      break;
    case "verification_failed":
    case "verification_cancelled":
      if (S.sas && (S.sas.id === event.id || S.sas.user === (event.user || event.from))) {
        S.sas = null;
        const area = byId("sas-area");
        if (area) fill(area, `Not verified: ${event.reason || "the other side cancelled"}.`);
      }
      break;
    case "warning":
      toast(`Warning about a message from ${event.from}: ${event.reason}`);
      break;
    case "linked":
      toast(`A new device joined your account: ${event.device}.`);
      if (S.panel === "devices") openDevices();
      break;
    case "link_failed": {
      const area = byId("link-area");
      if (area) fill(area, `Linking failed: ${event.reason}`);
      break;
    }
    case "overflow":
      toast("This page fell behind; reloading the conversations.");
      loadAll();
      break;
    default:
      break;
  }
}

function updateTitle() {
  const total = [...S.unread.values()].reduce((a, b) => a + b, 0);
  document.title = total ? `(${total}) Bastion` : "Bastion";
}

async function askNotifications() {
  const answer = await Notification.requestPermission();
  toast(answer === "granted" ? "Notifications are on. They never show message text." : "Notifications stay off.");
}

function notify(event) {
  if (!("Notification" in window) || Notification.permission !== "granted") return;
  // Never the text: a notification can be seen over a shoulder and is kept by the desktop.
  const title = event.type === "request" ? `Contact request from ${event.from}` : `New message from ${event.from}`;
  const n = new Notification(title, { tag: `bastion-${event.conversation || event.from}`, silent: false });
  n.addEventListener("click", () => { window.focus(); n.close(); });
}

// The link pasted again into a tab that is already open signs it in again.
window.addEventListener("hashchange", () => { if (location.hash.startsWith("#token=")) location.reload(); });

document.addEventListener("visibilitychange", () => {
  if (!document.hidden && S.current) { S.unread.delete(S.current.conversation); renderSide(); }
});

start().catch((e) => {
  fill(byId("app"), el("main", { id: "conversation" }, el("p", { class: "error", role: "alert" }, e instanceof RpcError ? e.message : "Bastion could not start in this page.")));
});
