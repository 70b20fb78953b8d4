// The demo page: one room's chat as bullet comments, gifts, the online
// count, a chat box and gift buttons, on the fanout JavaScript SDK over
// WebSocket. Pushes to this user (its channel, client.channel: the gift
// service's receipts, system notices) show as toasts.
//
// Query parameters (all optional): room, user, ws (the node's WebSocket
// URL), token (use exactly this token, with no refresh).
//
// window.fanoutDemo is the page's state, for people poking at it and for
// tests/test_browser.py: status, error, online, messages (room, epoch, seq,
// kind, sender, text), pushes (the same, from the user's channel), gaps,
// user, room, channel.

import * as fanout from "/sdk/fanout.browser.js";

const KINDS = { 1: "chat", 2: "gift", 3: "system" };
const GIFTS = {
  rose: ["🌹", "Rose"], heart: ["💖", "Heart"], star: ["⭐", "Star"],
  rocket: ["🚀", "Rocket"], crown: ["👑", "Crown"], fireworks: ["🎆", "Fireworks"],
};
const BIG_GIFTS = new Set(["rocket", "crown", "fireworks"]);
const GIFT_BUTTONS = ["rose", "heart", "rocket", "crown"];
const MAX_KEPT = 5000;      // messages kept in fanoutDemo.messages
const MAX_LOG = 200;        // lines kept in the chat list
const MAX_BULLETS = 60;     // comments flying at once
const MAX_TOASTS = 4;       // pushes shown at once

const $ = (id) => document.getElementById(id);
const decoder = new TextDecoder();

const state = (window.fanoutDemo = {
  status: "connecting", error: null, online: null, user: "", room: "", channel: "",
  messages: [], pushes: [], gaps: [], received: 0, sampled: 0, reconnects: 0,
  client: null,
  send: (text) => sendChat(text),
  gift: (name, count) => sendGift(name, count),
});
// The page's current token: the gift service learns from it who sends.
let token = "";

// ---------------------------------------------------------------- status

function setStatus(status, detail = "") {
  state.status = status;
  document.body.dataset.status = status;
  const el = $("status");
  el.dataset.status = status;
  el.textContent = detail ? `${status}: ${detail}` : status;
  const live = status === "connected";
  $("text").disabled = !live;
  $("send").disabled = !live;
  for (const b of document.querySelectorAll("#giftbar button")) b.disabled = !live;
}

function showError(name, message) {
  state.error = { name, message };
  setStatus("error", message ? `${name} — ${message}` : name);
  notice(`error ${name}${message ? ": " + message : ""}`);
}

// ---------------------------------------------------------------- messages

function hue(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.codePointAt(0)) % 360;
  return h;
}

function who(name) {
  const span = document.createElement("span");
  span.className = "who";
  span.textContent = name;
  span.style.color = `hsl(${hue(name)} 85% 70%)`;
  return span;
}

function logLine(className, parts) {
  const log = $("log");
  const li = document.createElement("li");
  li.className = className;
  li.append(...parts);
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  log.append(li);
  while (log.childElementCount > MAX_LOG) log.firstElementChild.remove();
  if (atBottom) log.scrollTop = log.scrollHeight;
  return li;
}

function notice(text) {
  logLine("notice", [text]);
}

// Lanes of bullet comments: a new comment takes the lane whose last comment
// has moved furthest, so comments rarely overlap.
const lanes = [];
function bullet(sender, text, mine) {
  const layer = $("danmaku");
  if (layer.childElementCount >= MAX_BULLETS) layer.firstElementChild.remove();
  const laneHeight = 38;
  const count = Math.max(1, Math.floor((layer.clientHeight - 120) / laneHeight));
  const now = performance.now();
  let lane = 0;
  for (let i = 0; i < count; i++) {
    if ((lanes[i] || 0) <= now) { lane = i; break; }
    if ((lanes[i] || 0) < (lanes[lane] || 0)) lane = i;
  }
  const el = document.createElement("div");
  el.className = mine ? "bullet mine" : "bullet";
  el.append(who(sender), text);
  el.style.top = `${lane * laneHeight}px`;
  layer.append(el);
  const width = el.offsetWidth;
  // One speed for all (the animation's distance is the stage's width plus
  // the comment's own), so a comment never catches up with the one ahead.
  const speed = 180;                                        // px per second
  const distance = layer.clientWidth + width;
  el.style.setProperty("--distance", `${distance}px`);
  el.style.animationDuration = `${distance / speed}s`;
  lanes[lane] = now + ((width + 60) / speed) * 1000;       // its tail is 60 px in
  el.addEventListener("animationend", () => el.remove());
}

function parseGift(text) {
  try {
    const g = JSON.parse(text);
    if (g && typeof g.gift === "string") return { name: g.gift, count: Number(g.count) || 1 };
  } catch (_) { /* a plain gift name */ }
  return { name: text.trim() || "gift", count: 1 };
}

function giftCard(sender, gift) {
  const [icon, label] = GIFTS[gift.name] || ["🎁", gift.name];
  const list = $("gifts");
  const li = document.createElement("li");
  li.className = "gift";
  const i = document.createElement("span");
  i.className = "icon";
  i.textContent = icon;
  const t = document.createElement("span");
  t.append(who(sender), ` sent ${label}`);
  const c = document.createElement("span");
  c.className = "count";
  c.textContent = `×${gift.count}`;
  li.append(i, t, c);
  list.append(li);
  while (list.childElementCount > 4) list.firstElementChild.remove();
  li.addEventListener("animationend", (e) => { if (e.animationName === "fade") li.remove(); });
  if (BIG_GIFTS.has(gift.name)) {
    const boom = document.createElement("div");
    boom.className = "boom";
    boom.textContent = icon;
    $("burst").replaceChildren(boom);
    boom.addEventListener("animationend", () => boom.remove());
  }
  return `${icon} ${label} ×${gift.count}`;
}

function kindName(kind) {
  return typeof kind === "string" ? kind.toLowerCase() : KINDS[kind] || `kind-${kind}`;
}

function payloadText(payload) {
  if (typeof payload === "string") return payload;
  return decoder.decode(payload || new Uint8Array());
}

function onMessage(m) {
  const kind = kindName(m.kind);
  const text = payloadText(m.payload);
  const sender = m.sender || "?";
  state.received += 1;
  state.messages.push({ room: m.room, epoch: m.epoch || "", seq: Number(m.seq), kind, sender, text });
  if (state.messages.length > MAX_KEPT) state.messages.splice(0, state.messages.length - MAX_KEPT);
  const seq = document.createElement("span");
  seq.className = "seq";
  seq.textContent = `#${m.seq}`;
  let li;
  if (kind === "gift") {
    const shown = giftCard(sender, parseGift(text));
    li = logLine("gift-line", [seq, who(sender), ` sent ${shown}`]);
  } else {
    const mine = sender === state.user;
    bullet(sender, text, mine);
    li = logLine(kind === "system" ? "notice" : "chat-line", [seq, who(sender), " ", text]);
  }
  li.dataset.seq = m.seq;
  li.dataset.kind = kind;
}

// ---------------------------------------------------------------- pushes

function toast(className, parts) {
  const list = $("toasts");
  const li = document.createElement("li");
  li.className = `toast ${className}`;
  li.append(...parts);
  list.append(li);
  while (list.childElementCount > MAX_TOASTS) list.firstElementChild.remove();
  li.addEventListener("animationend", (e) => { if (e.animationName === "fade") li.remove(); });
  return li;
}

function parseReceipt(text) {
  try {
    const r = JSON.parse(text);
    if (r && r.receipt === "gift" && typeof r.gift === "string") return r;
  } catch (_) { /* a plain notice */ }
  return null;
}

// A message on this user's channel: no one else in the room sees it.
function onPush(m) {
  const kind = kindName(m.kind);
  const text = payloadText(m.payload);
  const sender = m.sender || "system";
  state.pushes.push({ room: m.room, epoch: m.epoch || "", seq: Number(m.seq), kind, sender, text });
  if (state.pushes.length > MAX_KEPT) state.pushes.splice(0, state.pushes.length - MAX_KEPT);
  const receipt = parseReceipt(text);
  let li;
  if (receipt) {
    const [icon, label] = GIFTS[receipt.gift] || ["🎁", receipt.gift];
    const count = Number(receipt.count) > 1 ? ` ×${receipt.count}` : "";
    li = toast("receipt", [`${icon} Your ${label}${count} reached the room (#${receipt.room_seq})`]);
  } else {
    li = toast("system", [who(sender), " ", text]);
  }
  li.dataset.seq = m.seq;
  li.dataset.kind = receipt ? "receipt" : kind;
}

async function sendGift(name, count = 1) {
  if (!token || !state.room) return null;
  let r;
  try {
    r = await fetch("/gift", {
      method: "POST", cache: "no-store",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
      body: JSON.stringify({ gift: name, count, room: state.room }),
    });
  } catch (e) {
    notice(`gift not sent: ${e.message || e}`);
    throw e;
  }
  const reply = await r.json().catch(() => ({}));
  if (!r.ok) {
    const err = reply.error || { code: `HTTP ${r.status}`, message: "" };
    notice(`gift not sent: ${err.code}${err.message ? ": " + err.message : ""}`);
    throw Object.assign(new Error(err.message), { reasonName: err.code });
  }
  return reply;
}

function giftButtons() {
  const bar = $("giftbar");
  for (const name of GIFT_BUTTONS) {
    const [icon, label] = GIFTS[name];
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.gift = name;
    b.title = `send a ${label}`;
    b.textContent = icon;
    b.disabled = true;
    b.addEventListener("click", () => sendGift(name).catch(() => {}));
    bar.append(b);
  }
}
giftButtons();

function onGap(g) {
  state.gaps.push({ room: g.room, from: Number(g.fromSeq ?? g.from_seq), to: Number(g.toSeq ?? g.to_seq) });
  notice(`messages ${g.fromSeq ?? g.from_seq}–${g.toSeq ?? g.to_seq} are gone`);
}

function onPresence(online) {
  state.online = online;
  $("online").dataset.online = String(online);
  $("online").querySelector(".count").textContent = String(online);
}

// ---------------------------------------------------------------- wiring

async function json(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status} ${await r.text()}`);
  return r.json();
}

async function sendChat(text) {
  text = String(text).trim();
  if (!text || !state.client) return null;
  try {
    return await state.client.say(state.room, text);
  } catch (e) {
    notice(`not sent: ${e.reasonName || e.name}${e.message ? ": " + e.message : ""}`);
    throw e;
  }
}

$("chat").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = $("text");
  const text = input.value;
  input.value = "";
  sendChat(text).catch(() => {});
});

// The SDK: one Client, its events drive the page. The first connection is
// "connected" once the room is joined (messages published from then on are
// the page's); later ones as soon as they are authenticated, since they
// resume the room in their Hello.
async function run(url, token, getToken) {
  const client = new fanout.Client({
    url, token, getToken: getToken || undefined, deviceClass: "web",
    clientName: "fanout-demo", iterate: false,
  });
  state.client = client;
  let joined = false;
  client.on("message", (m) => {
    if (m.room === state.room) onMessage(m);
    else if (m.room === client.channel) onPush(m);
  });
  client.on("gap", (g) => { if (g.room === state.room) onGap(g); });
  client.on("presence", (p) => { if (p.room === state.room) onPresence(p.online); });
  client.on("error", (e) => {
    if (e.room === state.room) showError(e.reasonName, `left the room: ${e.message}`);
  });
  client.on("connected", (c) => {
    if (!joined || !c.reconnect) return;
    state.reconnects += 1;
    setStatus("connected", `as ${state.user}, resumed at #${client.cursor(state.room)?.seq ?? "?"}`);
  });
  client.on("reconnecting", (r) => {
    const why = r.reasonName ? `${r.reasonName}${r.message ? " — " + r.message : ""}`
                             : "connection lost";
    setStatus("reconnecting", `${why}; attempt ${r.attempt} in ${(r.delayMs / 1000).toFixed(1)} s`);
  });
  client.on("kicked", (k) => showError(k.reasonName || "KICKED", k.message));
  client.on("closed", (c) => {
    if (c.error && state.status !== "error") {
      showError(c.error.reasonName || c.error.name, c.error.message);
    }
  });
  const auth = await client.connect();
  state.user = auth.user || state.user;
  state.channel = client.channel || "";
  await client.join(state.room);
  joined = true;
  setStatus("connected", `as ${state.user}`);
  $("you").textContent = `you are ${state.user}`;
}

async function main() {
  const q = new URLSearchParams(location.search);
  const config = await json("/config.json");
  state.room = q.get("room") || config.room;
  const url = q.get("ws") || config.ws_url;
  $("room").textContent = `#${state.room}`;
  token = q.get("token") || "";
  let refresh = null;
  if (token) {
    state.user = q.get("user") || "";
  } else {
    const t = await json(`/token?user=${encodeURIComponent(q.get("user") || config.user)}`);
    token = t.token;
    state.user = t.user;
    refresh = async () => (token = (await json(`/token?user=${encodeURIComponent(state.user)}`)).token);
  }
  $("you").textContent = state.user ? `you are ${state.user}` : "";
  await run(url, token, refresh);
}

main().catch((e) => showError(e.reasonName || e.name || "Error", e.message || String(e)));
