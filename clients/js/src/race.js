// Racing node URLs: staggered WebSocket opens, the first to open wins.
//
// The Python SDK's fanout/client/dial.py for WebSockets (Mars dials up to
// three addresses 2.5 s apart): on a weak network one dead or distant node
// then costs the stagger, not a whole connect timeout. Only the transport
// handshake (TCP, TLS, HTTP upgrade) is raced, never the Hello: two Hellos of
// one user and device class would log in twice, and the later login kicks
// the earlier with DUPLICATE_LOGIN.

const WS_OPEN = 1;

/** Drop a WebSocket that lost (or was abandoned) without waiting for a close handshake. */
export function dropWebSocket(ws, handlers = null) {
  if (handlers) for (const [name, fn] of Object.entries(handlers)) ws.removeEventListener(name, fn);
  ws.addEventListener("error", () => {}); // a late error must not become an uncaught one
  // One that opens after all (its open was already on its way) is closed at once.
  ws.addEventListener("open", () => { try { ws.close(1000); } catch { /* closing */ } });
  try {
    if (typeof ws.terminate === "function" && ws.readyState !== WS_OPEN) ws.terminate();
    else ws.close(1000);
  } catch { /* already closing */ }
}

/**
 * Open up to `fan` of `urls` in order, the next one `staggerMs` after the
 * previous (at once if the previous failed).
 *
 * @param open `(url) => WebSocket`: starts one attempt (it may throw, e.g.
 *   on a malformed URL: that attempt fails).
 * @param onError `(url, message) => error`: the rejection for a failed attempt.
 * @returns `{promise, cancel}`: `promise` resolves with `{ws, url}` of the
 *   first WebSocket whose `open` fires (the others are closed), or rejects
 *   with the last attempt's error once every attempt failed; `cancel(error)`
 *   closes every attempt and rejects with `error`.
 */
export function raceWebSockets(urls, { fan = 3, staggerMs = 2500, open, onError }) {
  const todo = urls.slice(0, Math.max(1, fan));
  const pending = new Map(); // ws -> its listeners
  let timer = null;
  let done = false;
  let lastError = null;
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => { resolve = res; reject = rej; });

  const finish = () => {
    done = true;
    clearTimeout(timer);
    for (const [ws, handlers] of pending) dropWebSocket(ws, handlers);
    pending.clear();
  };
  const failed = (ws, url, message) => {
    if (done || !pending.has(ws)) return;
    dropWebSocket(ws, pending.get(ws));
    pending.delete(ws);
    lastError = onError(url, message);
    next(); // a failure starts the next attempt at once
  };
  const start = () => {
    const url = todo.shift();
    let ws;
    try {
      ws = open(url);
    } catch (e) {
      lastError = onError(url, e?.message ?? String(e));
      return false;
    }
    const handlers = {
      open: () => {
        if (done) return;
        for (const [name, fn] of Object.entries(handlers)) ws.removeEventListener(name, fn);
        pending.delete(ws);
        finish();
        resolve({ ws, url });
      },
      error: () => failed(ws, url, `WebSocket error on ${url}`),
      close: (ev) => failed(ws, url, `WebSocket to ${url} closed before opening (${ev?.code ?? ""})`),
    };
    for (const [name, fn] of Object.entries(handlers)) ws.addEventListener(name, fn);
    pending.set(ws, handlers);
    return true;
  };
  const next = () => {
    clearTimeout(timer);
    timer = null;
    // One attempt now (one that cannot even start counts as failed: the next).
    while (todo.length && !start()) { /* next */ }
    if (done) return;
    if (todo.length) {
      timer = setTimeout(next, staggerMs);
    } else if (!pending.size) {
      finish();
      reject(lastError);
    }
  };
  next();
  return {
    promise,
    cancel(error) {
      if (done) return;
      finish();
      reject(error);
    },
  };
}
