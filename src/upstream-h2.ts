import { connect, type ClientHttp2Session } from 'node:http2';
import { connect as netConnect, type Socket } from 'node:net';
import { failIfNotConnectedWithin } from './upstream-connect.js';
import { headerFieldsWithin, type HostPort, type Limits } from './config.js';
import { hostAndPort } from './addresses.js';
import { forwardedHeaderBlockLimit } from './header-sizes.js';

/** Errors `session.request()` throws because of the session, not of the request. */
const SESSION_REFUSALS = new Set(['ERR_HTTP2_GOAWAY_SESSION', 'ERR_HTTP2_INVALID_SESSION', 'ERR_HTTP2_OUT_OF_STREAMS']);

/**
 * Whether `session.request()` threw because this session can take no more
 * streams (closing, destroyed, out of stream ids): only then is it replaced.
 */
export function isSessionRefusal(session: ClientHttp2Session, err: unknown): boolean {
  if (session.closed || session.destroyed) return true;
  return err instanceof Error && 'code' in err && SESSION_REFUSALS.has(String(err.code));
}

/**
 * How long the model server gets to answer a PING that checks a connection we suspect
 * (UpstreamH2Session.suspect); a live one answers within milliseconds, even when busy.
 */
export const PING_ANSWER_MS = 10_000;

/**
 * Our PINGs on one connection come at least this far apart. C-core (OVMS) counts a PING that
 * comes within 5 minutes of the previous one, with no response data sent between them, as a
 * strike, and at the third ends the connection with GOAWAY ENHANCE_YOUR_CALM "too_many_pings":
 * every client's calls on it with it.
 */
export const MIN_PING_SPACING_MS = 301_000;

/**
 * The largest frame we let the model server send (SETTINGS_MAX_FRAME_SIZE; 16 KiB unless said).
 * nghttp2 ends a whole connection, every client's calls on it, on a header block of more than 8
 * CONTINUATION frames (its CONTINUATION-flood guard), whatever our header list limit: at 16 KiB
 * frames, any answer with more than 144 KiB of metadata did that, where a list merely over our
 * limit resets its own call. C-core (OVMS) frames its header blocks by this setting.
 */
export const UPSTREAM_MAX_FRAME_SIZE = 1024 * 1024;

/** How long a closed connection waits for the model server's FIN once ours went out: a live one answers at once. */
const PEER_FIN_WAIT_MS = 1000;

/**
 * The HTTP/2 memory budget of an upstream connection, in Node's unit (10^6 bytes): 4.3 GB, well
 * within the 32 bits Node keeps the option in. Node counts in it the request bytes queued for the
 * model server, and once they pass it resets every response that arrives on the connection
 * (RST_STREAM ENHANCE_YOUR_CALM). This one connection carries every client's calls, each of which
 * may queue a stream window (stream-forward.ts): with --mtls_max_session_memory here (64 MB),
 * about 60 ModelStreamInfer clients sending faster than the model server read made every call of
 * every client fail RESOURCE_EXHAUSTED. What the proxy holds is bounded per call and per client
 * connection (http-fronts.ts), not here.
 */
export const UPSTREAM_SESSION_MEMORY_MB = 4294;

/** Upstream sessions on which the model server's SETTINGS arrived: it speaks HTTP/2, whatever fails later. */
const HEARD_SETTINGS = new WeakSet<ClientHttp2Session>();

/**
 * From now on, notes when the model server's SETTINGS arrive on `session`, for spokeHttp2(). Not
 * Node's 'connect': it comes once TCP connects, for a peer that answers in HTTP/1.1 too.
 * (UpstreamH2Session notes them in its own 'remoteSettings' listener.)
 */
export function noteSettings(session: ClientHttp2Session): void {
  session.once('remoteSettings', () => HEARD_SETTINGS.add(session));
}

/**
 * Whether the model server sent its SETTINGS on `session` (noteSettings()): then an ERR_HTTP2_ERROR
 * is nghttp2 refusing something it sent later, not a port that does not speak HTTP/2 (upstream-errors.ts).
 */
export function spokeHttp2(session: ClientHttp2Session | undefined): boolean {
  return session !== undefined && HEARD_SETTINGS.has(session);
}

/** The code calls get when a connection that stopped answering is closed (see upstream-errors.ts). */
export const UPSTREAM_UNRESPONSIVE = 'UPSTREAM_UNRESPONSIVE';

/**
 * One reusable h2c session to the upstream. Calls share it; when it dies
 * (upstream restart, GOAWAY, connection refused) the next call opens a new
 * one, so the proxy recovers without a restart.
 */
export class UpstreamH2Session {
  readonly #upstream: HostPort;
  readonly #limits: Limits;
  readonly #url: string;
  #session: ClientHttp2Session | undefined;
  /** The TCP connection under the session being opened (see #connect()). */
  #socket: Socket | undefined;
  /**
   * Every session this one opened that has not closed, with its TCP connection: the current one and
   * those no longer current (told to go away by the model server, or retired by us) whose calls go on.
   * close() ends them all: one whose call is stuck (a model server that stopped reading) waits for good.
   */
  readonly #open = new Map<ClientHttp2Session, Socket>();
  #maxHeaderListSize = Infinity;
  /**
   * The largest request header list we send: twice --mtls_max_header_size, as for the
   * responses we accept. Node refuses a larger block itself (RST_STREAM(REFUSED_STREAM) on a
   * stream the model server never saw), by default one over 64 KiB, though our front takes
   * about 150 KB in a request sent before the client has acknowledged the 64 KiB it advertises.
   */
  readonly maxSendHeaderListSize: number;

  readonly #onSettings: () => void;
  /** When the current session was last sent a PING of suspect(); a PING of ours is unanswered while #checking. */
  #pingedAt: number | undefined;
  #checking = false;

  /** `onSettings`: the upstream advertised its SETTINGS (maxHeaderListSize may have changed). */
  constructor(upstream: HostPort, limits: Limits, onSettings: () => void = () => {}) {
    this.#upstream = upstream;
    this.#limits = limits;
    this.#onSettings = onSettings;
    this.maxSendHeaderListSize = forwardedHeaderBlockLimit(limits.maxHeaderSize);
    this.#url = `http://${hostAndPort(upstream.host, upstream.port)}`;
  }

  /** The live session, or a new one (which may still be connecting). */
  current(): ClientHttp2Session {
    const session = this.#session;
    if (session && !session.closed && !session.destroyed) return session;
    this.#session = this.#connect();
    return this.#session;
  }

  /**
   * The upstream's SETTINGS_MAX_HEADER_LIST_SIZE as it last advertised it (none yet: no limit).
   * C-core (OVMS) advertises 8 KiB and closes its whole connection, every client's calls on it,
   * when a request's headers go over; a conforming client (grpc-go) refuses to send such a request.
   */
  get maxHeaderListSize(): number {
    return this.#maxHeaderListSize;
  }

  /** Forget a session that refused a new stream so the next call reconnects. */
  discard(session: ClientHttp2Session): void {
    if (this.#session === session) this.#session = undefined;
  }

  /**
   * A call on `session` looks stuck (a cancel of ours has not gone out): a PING tells a live
   * connection from one that no longer reads or writes, which is destroyed, so that its calls
   * end UNAVAILABLE and the next call opens a new one. The case in point: a response header
   * field over 64 KiB as sent. nghttp2 cannot decode it, answers GOAWAY(COMPRESSION_ERROR) and
   * stops reading and writing, and Node tells no JavaScript code: every call on the connection,
   * every client's, and every call opened on it later waited for good (or for its deadline).
   */
  suspect(session: ClientHttp2Session): void {
    if (session !== this.#session || session.closed || session.destroyed || this.#checking) return;
    const now = performance.now();
    if (this.#pingedAt !== undefined && now - this.#pingedAt < MIN_PING_SPACING_MS) return;
    this.#pingedAt = now;
    this.#checking = true;
    const unresponsive = Object.assign(new Error(`no answer to a PING in ${PING_ANSWER_MS / 1000} s`), { code: UPSTREAM_UNRESPONSIVE });
    const timer = setTimeout(() => session.destroy(unresponsive), PING_ANSWER_MS).unref();
    session.once('close', () => clearTimeout(timer));
    session.ping(() => {
      clearTimeout(timer);
      this.#checking = false;
    });
  }

  /**
   * Every session opened and not yet closed, the current one and those no longer current: graceful
   * (GOAWAY, in-flight streams finish) for up to `graceMs`, then destroyed. A model
   * server that has stopped reading (SIGSTOP, stuck) with our socket's buffers full never lets
   * the GOAWAY, or the RST_STREAMs of the calls we cancelled, out, and a session waits for its
   * write in progress even when destroyed: the session never closed and the proxy never
   * exited. Destroying its socket ends it.
   */
  async close(graceMs: number): Promise<void> {
    this.#session = undefined;
    await Promise.all([...this.#open].map(([session, socket]) => closeWithin(session, socket, graceMs)));
  }

  #connect(): ClientHttp2Session {
    const limits = this.#limits;
    // A PING policy (C-core's) counts per connection: a new one starts afresh.
    this.#pingedAt = undefined;
    this.#checking = false;
    const session = connect(this.#url, {
      settings: { enablePush: false, initialWindowSize: limits.streamWindow, maxHeaderListSize: forwardedHeaderBlockLimit(limits.maxHeaderSize), maxFrameSize: UPSTREAM_MAX_FRAME_SIZE },
      maxHeaderListPairs: headerFieldsWithin(forwardedHeaderBlockLimit(limits.maxHeaderSize)),
      maxSessionMemory: UPSTREAM_SESSION_MEMORY_MB,
      // nghttp2 compares its bound of the encoded block (11 bytes a field over name and value),
      // which is below our list size (32 bytes a field), so a list within ours always goes out.
      maxSendHeaderBlockLength: this.maxSendHeaderListSize,
      // Until the upstream's SETTINGS arrive, open one stream at a time: a burst sent before
      // them would be refused by an upstream with a low stream limit. nghttp2 queues the rest
      // and keeps queueing whenever the upstream's own limit is reached.
      peerMaxConcurrentStreams: 1,
      // Small gRPC frames must not wait for Nagle.
      createConnection: () => {
        const socket = netConnect({ host: this.#upstream.host, port: this.#upstream.port, noDelay: true });
        failIfNotConnectedWithin(socket, limits.upstreamConnectTimeoutMs);
        this.#socket = socket;
        return socket;
      },
    });
    // connect() called createConnection() before it returned.
    this.#open.set(session, this.#socket!);
    // Without an 'error' listener a GOAWAY or refused connect crashes the process (FINDINGS).
    // Each call sees the failure on its own stream; nothing more to do here.
    session.on('error', () => {});
    const forget = () => {
      if (this.#session === session) this.#session = undefined;
    };
    session.once('goaway', forget);
    session.once('close', () => {
      forget();
      this.#open.delete(session);
    });
    session.on('remoteSettings', (settings) => {
      HEARD_SETTINGS.add(session);
      this.#maxHeaderListSize = settings.maxHeaderListSize ?? Infinity;
      this.#onSettings();
    });
    session.once('connect', () => {
      session.setLocalWindowSize(limits.connectionWindow);
    });
    return session;
  }
}

/**
 * Closes `session` gracefully (GOAWAY, its streams finish) for up to `graceMs`, then destroys its
 * socket: see UpstreamH2Session.close().
 */
async function closeWithin(session: ClientHttp2Session, socket: Socket, graceMs: number): Promise<void> {
  if (session.destroyed) return;
  let timer = setTimeout(() => socket.destroy(), graceMs);
  // Every stream over, GOAWAY and our FIN written: Node still waits for the model server's FIN, which
  // one that is frozen never sends. Each stop took the whole --mtls_shutdown_timeout (30 s), silently.
  socket.once('finish', () => {
    clearTimeout(timer);
    timer = setTimeout(() => socket.destroy(), Math.min(graceMs, PEER_FIN_WAIT_MS));
  });
  // Not close(callback): on a session already closing (after the model server's GOAWAY) Node drops the callback.
  const closed = new Promise<void>((resolve) => session.once('close', () => resolve()));
  session.close();
  await closed;
  clearTimeout(timer);
}

/**
 * Calls spread, in turn, over `count` upstream sessions. OVMS runs --grpc_workers gRPC
 * servers on one port (SO_REUSEPORT: the kernel hands each connection to one of them, by a
 * hash of its addresses), so over a single shared connection one server took every call and
 * the others stayed idle; several connections reach them as direct clients would, and no
 * one connection's flow-control window or reader is shared by every call.
 */
export class UpstreamH2Sessions {
  readonly #sessions: readonly UpstreamH2Session[];
  #next = 0;
  #maxHeaderListSize = Infinity;
  readonly maxSendHeaderListSize: number;

  constructor(upstream: HostPort, limits: Limits, count: number) {
    const onSettings = () => this.#settingsChanged();
    this.#sessions = Array.from({ length: Math.max(1, count) }, () => new UpstreamH2Session(upstream, limits, onSettings));
    this.maxSendHeaderListSize = this.#sessions[0]!.maxSendHeaderListSize;
  }

  /** The next session in turn (opened, or reopened, when it is not live). */
  current(): ClientHttp2Session {
    const sessions = this.#sessions;
    const one = sessions[this.#next]!;
    this.#next = (this.#next + 1) % sessions.length;
    return one.current();
  }

  /**
   * The lowest limit any session's upstream advertised (they are one server, or its servers on
   * one port): read by every call, so worked out when SETTINGS arrive, not per call.
   */
  get maxHeaderListSize(): number {
    return this.#maxHeaderListSize;
  }

  #settingsChanged(): void {
    let lowest = Infinity;
    for (const one of this.#sessions) lowest = Math.min(lowest, one.maxHeaderListSize);
    this.#maxHeaderListSize = lowest;
  }

  /** See UpstreamH2Session.suspect. */
  suspect(session: ClientHttp2Session): void {
    for (const one of this.#sessions) one.suspect(session);
  }

  /** Closes a session that refused a new stream; the next call its slot gets reconnects. */
  discard(session: ClientHttp2Session): void {
    for (const one of this.#sessions) one.discard(session);
    if (!session.destroyed) session.close();
  }

  close(graceMs: number): Promise<void> {
    return Promise.all(this.#sessions.map((one) => one.close(graceMs))).then(() => undefined);
  }
}
