// Types of @fanout/client (fanout.js and dist/fanout.browser.js). README.md documents them.

export declare const VERSION: string;

/** Reason codes by name, and names by code (fanout.proto `Reason`). */
export declare const Reason: {
  readonly REASON_UNSPECIFIED: 0;
  readonly BAD_FRAME: 1;
  readonly FRAME_TOO_LARGE: 2;
  readonly BAD_PROTOBUF: 3;
  readonly UNKNOWN_FRAME_TYPE: 4;
  readonly UNSUPPORTED_VERSION: 5;
  readonly BAD_COMPRESSION: 6;
  readonly AUTH_REQUIRED: 10;
  readonly AUTH_MISSING: 11;
  readonly AUTH_INVALID: 12;
  readonly AUTH_EXPIRED: 13;
  readonly AUTH_TIMEOUT: 14;
  readonly ALREADY_AUTHENTICATED: 15;
  readonly ROOM_FORBIDDEN: 20;
  readonly NOT_A_MEMBER: 21;
  readonly RATE_LIMITED: 22;
  readonly MESSAGE_TOO_LARGE: 23;
  readonly TOO_MANY_ROOMS: 24;
  readonly BAD_REQUEST: 25;
  readonly ROOM_OVERLOADED: 26;
  readonly DRAINING: 27;
  readonly ALREADY_JOINED: 28;
  readonly HEARTBEAT_TIMEOUT: 30;
  readonly SLOW_CONSUMER: 31;
  readonly DUPLICATE_LOGIN: 32;
  readonly SERVER_SHUTDOWN: 33;
  readonly CONNECTION_LIMIT: 34;
  readonly CONNECTION_RATE_LIMITED: 35;
  readonly ADMIN_DISCONNECT: 36;
  readonly TOO_MANY_REQUESTS: 37;
  readonly TOKEN_EXPIRED: 38;
  readonly TOKEN_REVOKED: 39;
  readonly INTERNAL_ERROR: 40;
  readonly ADDRESS_LIMIT: 41;
  readonly UNAVAILABLE: 42;
  /** The name of a code. */
  readonly [code: number]: string;
};
export declare function reasonName(code: number): string;
/** "chat" | "gift" | "system", or the number of a kind this client does not know. */
export declare function kindName(code: number): MessageKind;

export declare const FrameType: Readonly<{
  HELLO: 0x01; JOIN: 0x02; LEAVE: 0x03; CHAT: 0x04; PING: 0x05; REFRESH: 0x06;
  AUTH_OK: 0x41; ERROR: 0x42; BATCH: 0x43; KICK: 0x44; PONG: 0x45; GAP: 0x46;
  ACK: 0x47; PRESENCE: 0x48;
}>;

/** Pre-shared LZ4 dictionaries held, by id. */
export declare const DICTIONARIES: ReadonlyMap<number, Uint8Array>;

export interface WebSocketLike {
  binaryType: string;
  readonly readyState: number;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: string, listener: (ev: any) => void): void;
  removeEventListener(type: string, listener: (ev: any) => void): void;
}
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface ClientOptions {
  /** ws:// or wss:// URL(s); reconnects rotate through a list, and each
   * connect races up to `race` of them from the current one. */
  url?: string | string[];
  urls?: string[];
  /** How many URLs one connect opens at most (default 3). */
  race?: number;
  /** Ms between starting two WebSockets of a race (default 2500); a failed one starts the next at once. */
  raceStaggerMs?: number;
  /** The key of the network the device is on ("wifi:home", "cell:46001"); the heartbeat search remembers one interval per key (default ""). */
  network?: string;
  /** Search for the longest ping interval the network tolerates (default true); false: ping at the node's default. */
  adaptiveHeartbeat?: boolean;
  /** Where the search's results are kept (default: one in-memory store per page/process); see localStorageHeartbeatStore(). */
  heartbeatStore?: HeartbeatStoreLike;
  /** The safe interval an unknown network starts at, ms (default 20000), within the node's bounds. */
  heartbeatStartMs?: number;
  /** Factor of a step up, > 1 (default 1.5). */
  heartbeatStep?: number;
  /** Answered probes in a row before a step up (default 3). */
  heartbeatStepAfter?: number;
  /** Ms a Ping may go unanswered, nothing else received, before the link counts as dead (default 5000; at most the idle timeout minus the grant). */
  pongTimeoutMs?: number;
  token?: string;
  getToken?: () => string | Promise<string>;
  deviceClass?: string;
  deviceId?: string;
  clientName?: string;
  WebSocket?: WebSocketConstructor | (new (url: string, protocols?: any) => any);
  protocols?: string[];
  /** Third argument of the WebSocket constructor (Node's `ws`: e.g. `{ ca }` for wss:// with a development CA). */
  wsOptions?: object;
  reconnect?: boolean;
  backoffMinMs?: number;
  backoffMaxMs?: number;
  connectTimeoutMs?: number;
  requestTimeoutMs?: number;
  /** Queue events for async iteration (default true); false when only on() is used. */
  iterate?: boolean;
}

export interface AuthInfo {
  user: string;
  session: string;
  pingIntervalMs: number;
  idleTimeoutMs: number;
  serverTimeMs: number;
  tokenExpiresMs: number;
  compressDict: number;
  /** Bounds of a requested ping interval (Hello.ping_interval_ms; protocol 5.6). */
  pingIntervalMinMs: number;
  pingIntervalMaxMs: number;
  /** The user's channel ("@" + user; protocol 5.10), "" when the node has none. */
  channel: string;
}

export interface Ack {
  room: string;
  seq: number;
  epoch: string;
}

export interface Cursor {
  epoch: string;
  seq: number;
}

export type MessageKind = "chat" | "gift" | "system" | number;

export declare class RoomMessage {
  readonly type: "message";
  room: string;
  seq: number;
  epoch: string;
  kind: MessageKind;
  priority: number;
  sender: string;
  payload: Uint8Array;
  serverTsMs: number;
  /** Overload control thinned the chat around this message's batch. */
  sampled: boolean;
  /** The payload decoded as UTF-8. */
  readonly text: string;
}

export interface GapEvent {
  type: "gap";
  room: string;
  fromSeq: number;
  toSeq: number;
  epoch: string;
}

export interface PresenceEvent {
  type: "presence";
  room: string;
  online: number;
}

/** The room is no longer joined (resume refused, or a refreshed token no longer allows it). */
export interface RoomErrorEvent {
  type: "error";
  room: string;
  reason: number;
  reasonName: string;
  message: string;
}

export interface ConnectedEvent extends AuthInfo {
  type: "connected";
  reconnect: boolean;
  url: string;
}

export interface ReconnectingEvent {
  type: "reconnecting";
  attempt: number;
  delayMs: number;
  reason: number;
  reasonName: string;
  message: string;
  url: string;
}

export interface KickedEvent {
  type: "kicked";
  reason: number;
  reasonName: string;
  message: string;
  error: FanoutError;
}

export interface ClosedEvent {
  type: "closed";
  error: FanoutError | Error | null;
}

/** What iteration and nextEvent() yield. */
export type Event = RoomMessage | GapEvent | PresenceEvent | RoomErrorEvent | ConnectedEvent | ReconnectingEvent;
export type AnyEvent = Event | KickedEvent | ClosedEvent;

export interface EventMap {
  message: RoomMessage;
  gap: GapEvent;
  presence: PresenceEvent;
  error: RoomErrorEvent;
  connected: ConnectedEvent;
  reconnecting: ReconnectingEvent;
  kicked: KickedEvent;
  closed: ClosedEvent;
  "*": AnyEvent;
}

export interface ClientStats {
  frames: number;
  messages: number;
  duplicates: number;
  gaps: number;
  reconnects: number;
  sampledBatches: number;
  refreshes: number;
  /** Connections ended by the client's heartbeat (a Ping unanswered, or the idle timeout). */
  deadLinks: number;
  /** Answered probes of the heartbeat search (Pings after a full interval of silence). */
  probes: number;
}

/** What the heartbeat search learnt about one network. */
export interface HeartbeatState {
  intervalMs: number;
  /** The longest interval with an answered probe (0: none yet). */
  goodMs: number;
  /** Stepping up stopped after a dead link. */
  locked: boolean;
}

/** Where heartbeat searches keep their state, per network key (synchronous). */
export interface HeartbeatStoreLike {
  get(network: string): HeartbeatState | null | undefined;
  set(network: string, state: HeartbeatState): void;
}

/** The default store: in memory. */
export declare class HeartbeatStore implements HeartbeatStoreLike {
  constructor();
  get(network: string): HeartbeatState | null;
  set(network: string, state: HeartbeatState): void;
}

/** The part of a Web Storage object (localStorage) the store uses. */
export interface WebStorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
}

/** A store kept as JSON under `key` (default "fanout.heartbeat") in `storage`
 * (default: globalThis.localStorage). Without one it keeps memory only; a
 * storage that throws or holds bad JSON costs a new search, never an exception. */
export declare function localStorageHeartbeatStore(options?: {
  key?: string;
  storage?: WebStorageLike | null;
}): HeartbeatStoreLike & { readonly storage: WebStorageLike | null };

/** The heartbeat search of one network (docs/protocol.md 5.6; the Python SDK's HeartbeatTuner). */
export declare class HeartbeatTuner {
  constructor(store: HeartbeatStoreLike, network?: string,
    options?: { stepAfter?: number; stepFactor?: number; startMs?: number });
  readonly store: HeartbeatStoreLike;
  readonly network: string;
  readonly stepAfter: number;
  readonly stepFactor: number;
  readonly startMs: number;
  /** The current interval (0 until the first AuthOk). */
  intervalMs: number;
  goodMs: number;
  locked: boolean;
  /** Answered probes in a row at intervalMs. */
  successes: number;
  /** What the next Hello asks for: the interval found once locked; while searching, the next step
   * (the current interval, or startMs on a new network, times stepFactor), within the node's maximum. */
  requestMs(): number;
  /** Take an AuthOk's grant and bounds; returns the ms to ping at. */
  granted(intervalMs: number, minMs: number, maxMs: number): number;
  /** A probe at intervalMs was answered; returns the ms to ping at from now on (a step never
   * goes past grantMs, the connection's grant: the next connection's Hello asks for it). */
  probeAnswered(intervalMs: number, grantMs: number): number;
  /** A dead link: back off and lock. */
  deadLink(): void;
}

export declare class Client implements AsyncIterable<Event> {
  constructor(options: ClientOptions);
  token: string | null;
  getToken: (() => string | Promise<string>) | null;
  readonly urls: string[];
  readonly stats: ClientStats;
  reconnect: boolean;
  requestTimeoutMs: number;
  race: number;
  raceStaggerMs: number;
  pongTimeoutMs: number;
  /** The heartbeat search of `network`; null with adaptiveHeartbeat: false. */
  readonly heartbeat: HeartbeatTuner | null;
  readonly connected: boolean;
  readonly auth: AuthInfo | null;
  readonly rooms: string[];
  /** The user's channel ("@" + user) once connected, else null: pushes to
   * this user arrive as messages of this room and resume like a room's. */
  readonly channel: string | null;
  readonly url: string;

  connect(): Promise<AuthInfo>;
  close(): Promise<void>;
  join(room: string, options?: { lastSeq?: number; epoch?: string }): Promise<Ack>;
  leave(room: string): Promise<Ack>;
  say(room: string, payload: string | Uint8Array): Promise<Ack>;
  refresh(token?: string): Promise<Ack>;
  online(room: string): number | undefined;
  cursor(room: string): Cursor | undefined;
  on<K extends keyof EventMap>(type: K, fn: (ev: EventMap[K]) => void): () => void;
  off<K extends keyof EventMap>(type: K, fn: (ev: EventMap[K]) => void): void;
  nextEvent(timeoutMs?: number): Promise<Event | undefined>;
  [Symbol.asyncIterator](): AsyncIterator<Event>;
}

export declare class FanoutError extends Error {
  constructor(reason: number, message?: string, extra?: object);
  /** A fanout Reason code; 0 when the error did not come from the node. */
  reason: number;
  /** E.g. "AUTH_INVALID"; "" for reason 0. */
  reasonName: string;
  room?: string;
}
export declare class AuthError extends FanoutError {}
export declare class RequestError extends FanoutError {
  room: string;
}
export declare class KickedError extends FanoutError {}
export declare class ConnectionLostError extends FanoutError {
  reconnectAfterMs: number;
}
export declare class FanoutTimeoutError extends FanoutError {}

export declare class WireError extends Error {
  reason: number;
  reasonName: string;
}

export interface Frame {
  type: number;
  flags: number;
  /** The body, inflated if it was LZ4-compressed. */
  body: Uint8Array;
}
/** Split one WebSocket message (whole frames) into frames; throws WireError. */
export declare function decodeFrames(buf: Uint8Array, maxBody?: number): Frame[];
/** Decode a body as its frame type's protobufjs message; null for an unknown type. */
export declare function decodeMessage(type: number, body: Uint8Array): any;
/** Encode one frame (uncompressed) from camelCase message fields. */
export declare function encodeFrame(type: number, fields: object): Uint8Array;
/** The protobufjs static classes of fanout.v1 (fanout.proto). */
export declare const proto: any;
