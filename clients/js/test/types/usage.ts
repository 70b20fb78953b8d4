// Compiles under --strict: the typed API as an application uses it.
import {
  Client, FanoutError, AuthError, Reason, type Event, type RoomMessage, type GapEvent, type AuthInfo, type Ack,
  HeartbeatStore, localStorageHeartbeatStore, type HeartbeatState,
} from "@fanout/client";

export async function main(): Promise<void> {
  const c = new Client({
    url: ["ws://127.0.0.1:7002/ws", "ws://127.0.0.1:7012/ws"],
    getToken: async () => "token",
    deviceClass: "web",
    WebSocket: globalThis.WebSocket,
    backoffMinMs: 100,
    iterate: true,
  });
  const unsubscribe: () => void = c.on("message", (m: RoomMessage) => console.log(m.seq + 1, m.text, m.payload.length));
  c.on("reconnecting", (ev) => console.log(ev.attempt, ev.delayMs, ev.reasonName));
  c.on("kicked", (ev) => console.log(ev.error.reason));
  c.on("*", (ev) => console.log(ev.type));
  unsubscribe();
  try {
    const auth: AuthInfo = await c.connect();
    console.log(auth.pingIntervalMs, auth.tokenExpiresMs);
  } catch (e) {
    if (e instanceof AuthError && e.reason === Reason.AUTH_INVALID) console.log(e.reasonName);
    if (e instanceof FanoutError) console.log(e.message);
  }
  const ack: Ack = await c.join("live:1", { lastSeq: 5, epoch: "e1" });
  await c.say("live:1", "hi");
  await c.say("live:1", new Uint8Array([1, 2]));
  await c.refresh();
  const cur = c.cursor("live:1");
  if (cur) console.log(cur.epoch, cur.seq, ack.seq);
  const online: number | undefined = c.online("live:1");
  console.log(online, c.stats.duplicates, c.rooms.length, c.connected);
  for await (const ev of c) {
    const e: Event = ev;
    switch (e.type) {
      case "message": console.log(e.kind === "gift", e.sender); break;
      case "gap": { const g: GapEvent = e; console.log(g.fromSeq, g.toSeq); break; }
      case "presence": console.log(e.online); break;
      case "error": console.log(e.room, e.reasonName); break;
      case "connected": console.log(e.reconnect, e.user); break;
      case "reconnecting": console.log(e.attempt); break;
    }
  }
  await c.close();
}

export function weakNetwork(): number {
  const c = new Client({
    urls: ["wss://a.example/ws", "wss://b.example/ws"],
    token: "t",
    race: 2,
    raceStaggerMs: 1000,
    network: "wifi:home",
    heartbeatStore: localStorageHeartbeatStore({ key: "app.heartbeat" }),
    heartbeatStartMs: 20000,
    heartbeatStep: 1.5,
    heartbeatStepAfter: 3,
    pongTimeoutMs: 5000,
  });
  const state: HeartbeatState | null = new HeartbeatStore().get("wifi:home");
  const asked: number = c.heartbeat ? c.heartbeat.requestMs() : 0;
  return asked + c.stats.deadLinks + c.stats.probes + (state ? state.intervalMs : 0);
}

export const forbidden: 20 = Reason.ROOM_FORBIDDEN;
export const name: string = Reason[20];
