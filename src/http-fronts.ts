import { constants as h2Constants, createServer as createHttp2Server, type Http2Server, type ServerHttp2Session, type ServerHttp2Stream, type IncomingHttpHeaders, type Http2ServerRequest, type Http2ServerResponse } from 'node:http2';
import { STATUS_CODES, createServer as createHttpServer, type Server as HttpServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import { headerFieldsWithin, type Limits } from './config.js';
import { parentOf, type ConnectionContext } from './listeners.js';
import { tcpBytesMoved, tcpBytesRead } from './send-stall.js';
import { clientRef, type ProxyObserver } from './observer.js';
import { IdleSweeper, StreamCount, SWEEPS_PER_IDLE_TIMEOUT, type IdleConnection } from './idle-sweep.js';
import { H2_WITHOUT_ALPN, commaList, onlyChunked, requestHeadTooLargeMessage, unsupportedCodingMessage } from './http1-framing.js';
import { RAPID_RESET, RESET_BURST, RESETS_PER_SECOND, ResetAllowance, resetByClient } from './reset-allowance.js';
import { ClientAcks, type AckWatcher, type CountedSocket } from './client-acks.js';
import { forwardedHeaderBlockLimit } from './header-sizes.js';

/** `rawHeaders`: the fields as received, a flat name, value list (Node passes it; @types/node does not declare it). */
export type StreamHandler = (stream: ServerHttp2Stream, headers: IncomingHttpHeaders, context: ConnectionContext, rawHeaders?: string[]) => void;
export type RequestHandler = (req: IncomingMessage | Http2ServerRequest, res: ServerResponse | Http2ServerResponse, context: ConnectionContext) => void;

/** What the shutdown needs from each protocol front. */
export interface Drainable {
  /**
   * Finish in-flight work, refuse new work: GOAWAY on HTTP/2, `Connection: close` on HTTP/1.1.
   * `keepAliveGraceMs`: how long an HTTP/1.1 connection whose last answer said keep-alive stays open
   * for the request its client may be sending on it already (see H1Front.drain()).
   */
  drain(keepAliveGraceMs: number): void;
}

/** The client's socket went away: connections end so every day, and the connection's own lines say it. */
const CLIENT_WENT_AWAY: ReadonlySet<string> = new Set(['ECONNRESET', 'EPIPE', 'ETIMEDOUT', 'ECONNABORTED']);

interface UnansweredPing {
  /** Sweeps since it went out, or since bytes last moved on the connection (-1 just after). */
  sweeps: number;
  /** Node's count of the bytes moved on the connection when it went out, or when it last grew. */
  bytesMoved: number;
  /** What the kernel says the client sent and took (client-acks.ts), at its first sample or when it last grew. */
  taken?: number;
  /** It went out for a stream id Node took and no handler saw (an undecodable header field). */
  readonly missing: boolean;
}

/** The fewest bytes a stream costs the client that opens it: its HEADERS frame's 9-byte header. */
const MIN_STREAM_BYTES = 9;

/**
 * nghttp2 counts every RST_STREAM a client sends (reset-allowance.ts) and, at the first past its budget,
 * sends GOAWAY(INTERNAL_ERROR) and reads no more of the connection once its streams are over, telling
 * no JavaScript code. The resets counted here are those of the streams we saw, against the same budget
 * (`headroom` -1: spent at the same reset). nghttp2 takes no new stream after its GOAWAY, so a margin
 * past it was never reached on the REST port. Its refill comes at other second boundaries: a client
 * that resets at about the refill rate may find one count a few resets ahead of the other, and the
 * connection is then closed by the one ahead. When nghttp2's is, no stream comes after its GOAWAY to
 * bring ours to the end, and the connection sat silent until the idle close: with our count within a
 * second's refill of the end, the idle sweep sends a PING, which goes unanswered once nghttp2 reads no
 * more (#gaveUp).
 */
function rapidResetMessage(atSweep: boolean): string {
  const said = `the client reset more streams than nghttp2 allows (${RESET_BURST} at once, ${RESETS_PER_SECOND} more each second): rapid reset (CVE-2023-44487)`;
  if (atSweep) return `${said}, within a second's refill of it by the proxy's count. nghttp2 sent it GOAWAY INTERNAL_ERROR and read no more of it: it answered no PING since; closed`;
  return `${said}. nghttp2 sent it GOAWAY INTERNAL_ERROR (or the proxy a GOAWAY, had nghttp2's count, refilled at other seconds, a few resets to go); the connection closes once the streams still open on it end`;
}

/** A client's protocol error and a client that left have lines of their own (PROTOCOL_ERROR, client_closed): not named here. */
function unansweredMessage(open: number): string {
  return `the client answered no PING, and no byte moved either way, for an idle timeout with ${open} request(s) open (stopped or wedged, or gone without a FIN or reset reaching the proxy): closed`;
}

/** The h2_session_error code of a connection nghttp2 ended for the client's protocol error, on every Node version. */
const PROTOCOL_ERROR = 'PROTOCOL_ERROR';

const PROTOCOL_ERROR_MESSAGE = 'the client broke the HTTP/2 protocol (DATA past END_STREAM or past its content-length, a frame over SETTINGS_MAX_FRAME_SIZE, ...), and nghttp2 sent GOAWAY and stopped reading it';

/**
 * The same after our GOAWAY from a C-core client (grpcio; its User-Agent names grpc-c/): what it does now and then in a
 * drain, captured (README, graceful drain). The operator's way out is named, as the cut is not the client's alone to fix.
 */
const C_CORE_DRAIN_PROTOCOL_ERROR_MESSAGE = 'the client broke the HTTP/2 protocol after the proxy\'s GOAWAY, as C-core clients (grpcio) do now and then when told to go away (a drain) while starting calls: they reset a stream id they never opened (grpc/grpc#38758), and nghttp2 sent GOAWAY and stopped reading it; --mtls_grpc_mode relay is spared this';

/** C-core's User-Agent (grpcio, gRPC C++, Ruby, PHP) ends with its own part: `grpc-c/<version> (<os>; chttp2)`. */
const C_CORE_USER_AGENT = /\bgrpc-c\/\S+ \([^)]*; chttp2\)/;

/** nghttp2's NGHTTP2_ERR_PROTO: what Node 22+ destroys a session with once nghttp2 has ended it (GOAWAY sent, nothing more read). */
const NGHTTP2_ERR_PROTO = -505;

function nghttp2GaveUp(error: Error | undefined): boolean {
  const err = error as NodeJS.ErrnoException | undefined;
  return err?.code === 'ERR_HTTP2_ERROR' && err.errno === NGHTTP2_ERR_PROTO;
}

/**
 * Node 22+ ends a session nghttp2 gave up on at once (Node 20 never says, and the idle sweep finds it), by calling its
 * destroy() with an NghttpError. By its 'error' event the streams are closed, their access lines written, and the
 * session's state gone: `onGiveUp` runs before, while they can still be told why. It returns the GOAWAY code Node
 * should send where nghttp2 sent none (a content-length overrun): Node's default, INTERNAL_ERROR, blamed the proxy.
 */
function beforeNghttp2End(session: ServerHttp2Session, onGiveUp: () => number): void {
  const destroy = session.destroy.bind(session);
  session.destroy = (error?: Error, code?: number) => destroy(error, nghttp2GaveUp(error) && !session.destroyed ? (code ?? onGiveUp()) : code);
}

/** What the front keeps per HTTP/2 connection. */
class SessionState implements IdleConnection, AckWatcher {
  readonly streams = new StreamCount();
  readonly session: ServerHttp2Session;
  readonly context: ConnectionContext;
  readonly #observer: ProxyObserver;
  readonly #acks: ClientAcks;
  /** The highest stream id our handlers saw (client ids are odd: -1 before stream 1). */
  #lastSeen = -1;
  /** Streams counted so far, seen or not: see #streamsPossible. */
  #streamsCounted = 0;
  /** The PING of watch() while it goes unanswered. */
  #unanswered: UnansweredPing | undefined;
  /** Node 22+ is ending the connection nghttp2 gave up on (beforeNghttp2End), already named: its 'error' event adds no line. */
  #nghttp2Ended = false;
  /**
   * For curl on the REST port only: what nghttp2's reset limit leaves it, so that a graceful GOAWAY
   * goes out before that limit cuts the connection (see reset-allowance.ts). Only curl resets every
   * stream it completes; for any other client a GOAWAY every ~850 requests cost a reconnect several
   * times a second when busy, and the requests it had in flight past the GOAWAY were refused
   * (REFUSED_STREAM: 300 errors in 5 s of the REST HTTP/2 benchmark), which not every client retries.
   */
  #resets: ResetAllowance | undefined;
  /** The client's resets against nghttp2's budget for them, from its first reset; see streamClosed(). */
  #clientResets: ResetAllowance | undefined;
  /** nghttp2 has cut the connection for rapid reset, and the line said so. */
  #rapidReset = false;
  /** The first User-Agent a request on it named: one client library speaks on a connection. */
  #userAgent: string | undefined;

  constructor(session: ServerHttp2Session, context: ConnectionContext, observer: ProxyObserver, acks: ClientAcks) {
    this.session = session;
    this.context = context;
    this.#observer = observer;
    this.#acks = acks;
  }

  /** Called with a request's User-Agent; the connection's first curl request starts its reset allowance. */
  userAgent(value: string | undefined): void {
    if (this.#resets === undefined && this.context.listener === 'rest' && value?.startsWith('curl/')) this.#resets = new ResetAllowance();
    this.#userAgent ??= value;
  }

  /**
   * A stream reached our handlers. Client stream ids rise by two, so ids skipped since the
   * last one are streams Node reset itself without a JavaScript event (a header list over
   * maxHeaderListSize, say): no access line, no metric, unless counted here. The streams opened
   * since are also what the client may reset: for curl they are taken from its reset allowance.
   */
  seen(id: number): void {
    const opened = 1 + this.#reportUnseenUpTo(id - 2, undefined, 1);
    this.#lastSeen = id;
    this.#streamsCounted += 1;
    if (this.#resets?.take(opened) === false && !this.session.closed) this.close();
  }

  /**
   * A stream we saw closed. One the client reset is taken from nghttp2's budget, unless a GOAWAY went out
   * (nghttp2 counts no more then); once it is spent, the connection's one rapid-reset line.
   */
  streamClosed(stream: ServerHttp2Stream): void {
    if (this.#rapidReset || this.session.closed || this.session.destroyed || !resetByClient(stream)) return;
    this.#clientResets ??= new ResetAllowance(-1);
    if (this.#clientResets.take(1)) return;
    this.#reportRapidReset(false);
    // Its streams still open may finish (a GOAWAY spares them); then the connection closes, not at an idle sweep.
    this.close();
  }

  #reportRapidReset(atSweep: boolean): void {
    this.#rapidReset = true;
    this.#observer.h2SessionFailed({ ...clientRef(this.context), code: RAPID_RESET, message: rapidResetMessage(atSweep) });
  }

  /** The connection is ending: streams Node took in after the last one we saw never reached us either. */
  ending(): void {
    const last = this.session.state.lastProcStreamID;
    if (last !== undefined) this.#reportUnseenUpTo(last);
  }

  /**
   * The client's GOAWAY, or its connection closing (a client that gives up after a reset, as
   * curl does, sends no GOAWAY). Node emits the streams of the same read on the next tick, so
   * the stream ids are compared after them, and Node destroys the session soon after: its last id is read now.
   */
  clientLeaving(): void {
    // After our own GOAWAY Node refuses new streams itself, as it should: those are no limit's doing (ending() counted the rest).
    if (this.session.closed) return;
    const last = this.session.state.lastProcStreamID;
    if (last !== undefined) setImmediate(() => this.#reportUnseenUpTo(last));
  }

  /**
   * At every idle sweep. A header field over 64 KiB as sent is one nghttp2 cannot decode: it answers
   * GOAWAY(COMPRESSION_ERROR) and stops reading the connection, and Node emits nothing, not even when
   * the client then closes (unread). The connection, its streams and their upstream calls were held
   * for good. What is left to see is a stream id Node took and no handler of ours saw: a PING then
   * tells a live connection (its answer comes; a plain reset, reported now) from one nghttp2 gave up
   * (no answer by the next sweep, or with calls in flight an idle timeout: reported and destroyed).
   *
   * Node 20 misses two more ends with streams open: a client that dies while the answers to it are
   * backed up (a slow reader killed: its socket's close is never reported), and a protocol error of the
   * client's (DATA after END_STREAM, a frame over the maximum size), where nghttp2 sends GOAWAY and stops
   * reading. Both were held until the process ended. So while streams are open a PING goes out at every
   * sweep, and a connection that answers none for an idle timeout, with no byte moving either way meanwhile, is
   * closed. A live slow reader is not: the PING waits behind what it has not read, but each byte its kernel
   * takes from ours as it reads starts the wait again. Node cannot tell that: its count grows as our kernel
   * takes bytes, into a send buffer of MBs that fills whether the client reads or not, and stands still while
   * the client reads what is already there. So the kernel's own count is read (client-acks.ts) where there is one.
   */
  watch(): void {
    if (this.session.destroyed) return;
    const wait = this.#unanswered;
    if (wait !== undefined) {
      // Its last call has ended: no call to lose, and the idle close ends the connection gracefully (what our kernel still holds for a slow reader goes out first).
      if (!wait.missing && this.streams.open === 0) {
        wait.sweeps = 0;
        return;
      }
      if (!wait.missing && this.#acks.covers(this)) this.#acks.want(this);
      else this.#keepWaitingIfHeard(wait);
      if (++wait.sweeps >= this.#sweepsToAnswer()) this.#gaveUp();
      return;
    }
    const last = this.session.state.lastProcStreamID ?? 0;
    // 0 until the client's first stream: nothing can be missing yet (each idle connection got a PING at every sweep).
    // A client whose resets came within a second's refill of nghttp2's budget may have been cut by it (see rapidResetMessage()): a PING tells.
    const missing = (last >= 1 && last > this.#lastSeen) || this.#mayBeCutForResets();
    if (!missing && this.streams.open === 0) return;
    this.#unanswered = { sweeps: 0, bytesMoved: tcpBytesMoved(this.context.socket), missing };
    this.session.ping((err) => {
      this.#unanswered = undefined;
      // A header block still arriving at the sweep has its 'stream' event by now, maybe a tick after the answer: the ids are compared after it.
      if (!err && missing) setImmediate(() => this.#reportUnseenUpTo(last));
    });
  }

  /** The client's TCP counts, for the kernel's view of what it took (client-acks.ts). */
  tcp(): CountedSocket | undefined {
    const handle = (parentOf(this.context.socket) as { _handle?: CountedSocket | null } | null | undefined)?._handle;
    return handle ? { bytesRead: handle.bytesRead, bytesWritten: handle.bytesWritten, writeQueueSize: handle.writeQueueSize, fd: handle.fd } : undefined;
  }

  /** The kernel's count, after a sweep that asked for it: the first one starts the wait, each that grew starts it again. */
  sampled(taken: number | 'gone' | 'closed' | 'sent'): void {
    const wait = this.#unanswered;
    if (wait === undefined) return;
    if (taken === 'gone' || taken === 'closed') {
      this.#clientLeft(taken);
      return;
    }
    if (typeof taken === 'number' && wait.taken !== undefined && taken <= wait.taken) return;
    if (typeof taken === 'number') wait.taken = taken;
    wait.sweeps = 0;
  }

  /** A connection that is only waiting for a stream id, as before, is not given more time for bytes. */
  #keepWaitingIfHeard(wait: UnansweredPing): void {
    if (wait.missing) return;
    const now = tcpBytesMoved(this.context.socket);
    if (now === wait.bytesMoved) return;
    wait.bytesMoved = now;
    wait.sweeps = -1;
  }

  /**
   * A live client that reads slowly answers late: the PING waits behind the answers it has not read yet (and
   * Node's memory limit resets streams, unseen, precisely then). Given one sweep, its calls were all cut with
   * the connection. One waiting only for a stream id gets one sweep when no call is open.
   */
  #sweepsToAnswer(): number {
    return this.streams.open > 0 ? SWEEPS_PER_IDLE_TIMEOUT : 1;
  }

  #gaveUp(): void {
    const last = this.session.state.lastProcStreamID;
    if (this.#mayBeCutForResets()) this.#closeAfterRapidReset();
    else if (last !== undefined && last > this.#lastSeen) this.#closeUndecodable(last);
    else if (this.#nghttp2Stopped()) this.#closeProtocolError();
    else this.#closeUnresponsive();
  }

  /** Our count of the client's resets came within a second's refill of nghttp2's budget, and no line said so yet. */
  #mayBeCutForResets(): boolean {
    return !this.#rapidReset && (this.#clientResets?.left ?? RESET_BURST) <= RESETS_PER_SECOND;
  }

  /** nghttp2 cut the client a few resets before our count did (see rapidResetMessage()): said now, in place of the rest. */
  #closeAfterRapidReset(): void {
    this.#reportRapidReset(true);
    this.context.closedBy ??= 'proxy_closed_unresponsive';
    this.session.destroy();
    this.context.socket.destroy();
  }

  /**
   * Node 20: nghttp2 ended the connection itself (GOAWAY for a protocol error of the client's) and sends nothing
   * more: our PING is still in its queue, though the socket, which the kernel still has, has nothing queued that
   * it could be waiting behind. A client that reads nothing leaves our writes queued on the socket instead.
   */
  #nghttp2Stopped(): boolean {
    return (this.session.state.outboundQueueSize ?? 0) > 0 && this.tcp()?.writeQueueSize === 0;
  }

  #closeUndecodable(last: number): void {
    this.#noteUndecodable(last);
    // The session, not the socket as listeners.ts cutConnection() does: a destroyed socket reached the client as a reset (ECONNRESET).
    this.session.destroy();
  }

  #noteUndecodable(last: number): void {
    this.#reportUnseenUpTo(last, 'COMPRESSION_ERROR');
    this.context.closedBy ??= 'proxy_closed_undecodable_header';
  }

  #closeProtocolError(): void {
    this.#noteProtocolError();
    this.session.destroy();
  }

  #noteProtocolError(): void {
    this.context.closedBy ??= 'client_protocol_error';
    // closed: our GOAWAY went out (close()). The User-Agent is judged here, where a line is written, not per connection.
    const cCoreAfterGoAway = this.session.closed && C_CORE_USER_AGENT.test(this.#userAgent ?? '');
    const message = cCoreAfterGoAway ? C_CORE_DRAIN_PROTOCOL_ERROR_MESSAGE : PROTOCOL_ERROR_MESSAGE;
    this.#observer.h2SessionFailed({ ...clientRef(this.context), code: PROTOCOL_ERROR, message });
  }

  /**
   * Node 22+ is ending the connection nghttp2 gave up on (beforeNghttp2End): named as Node 20's sweep names it, an
   * undecodable header field by the stream id no handler saw, else the client's protocol error. Returns the GOAWAY code.
   */
  nghttp2GaveUp(): number {
    this.#nghttp2Ended = true;
    // A rapid reset already said (streamClosed()): the GOAWAY nghttp2 sent for it stands, and no second line.
    if (this.#rapidReset) return h2Constants.NGHTTP2_INTERNAL_ERROR;
    const last = this.session.state.lastProcStreamID;
    if (last !== undefined && last > this.#lastSeen) {
      this.#noteUndecodable(last);
      return h2Constants.NGHTTP2_COMPRESSION_ERROR;
    }
    this.#noteProtocolError();
    return h2Constants.NGHTTP2_PROTOCOL_ERROR;
  }

  /**
   * Node 20, its PING unanswered: the client reset the connection or closed its side (killed while the answers to
   * it were backed up), which Node 20 never reports, and the kernel's tables tell. Named as Node 22+ names it when
   * it reports it: the client closed, unless nghttp2 had ended the connection for its protocol error first (a client
   * that then closed its side). Not after a reset: Node 20 stops writing once a write fails, and nghttp2 then holds
   * frames too.
   */
  #clientLeft(how: 'gone' | 'closed'): void {
    if (how === 'closed' && this.#nghttp2Stopped()) this.#closeProtocolError();
    else this.#clientGone();
  }

  #clientGone(): void {
    // With the error Node 22+ gives: the streams end as reset (an answer cut short, not one delivered), and failed() logs no line.
    this.session.destroy(Object.assign(new Error('the client reset the connection: the kernel no longer has it'), { code: 'ECONNRESET' }));
    this.context.socket.destroy();
  }

  #closeUnresponsive(): void {
    this.context.closedBy ??= 'proxy_closed_unresponsive';
    this.#observer.h2SessionFailed({ ...clientRef(this.context), code: 'PING_UNANSWERED', message: unansweredMessage(this.streams.open) });
    this.session.destroy();
    // Node ends the socket after the session, once its writes are done: to a client that is gone, never.
    this.context.socket.destroy();
  }

  /**
   * Node ended the connection with an error: a PING or SETTINGS flood (nghttp2 counts unanswered ones;
   * about a thousand in one read), a protocol error, the client's GOAWAY with an error code. It had
   * been swallowed, and such a connection closed with no line at all.
   */
  failed(err: NodeJS.ErrnoException): void {
    const code = err.code ?? 'unknown';
    // Named, and logged as Node 20's sweep logs it, when Node began to end it (nghttp2GaveUp()).
    if (CLIENT_WENT_AWAY.has(code) || (this.#nghttp2Ended && nghttp2GaveUp(err))) return;
    this.#observer.h2SessionFailed({ ...clientRef(this.context), code, message: err.message });
  }

  /**
   * `id`: a client stream id, or 0 (lastProcStreamID before any stream). `alsoOpened`: streams the
   * client's bytes paid for besides these (the one just seen). Returns how many were reported.
   */
  #reportUnseenUpTo(id: number, goAway?: 'COMPRESSION_ERROR', alsoOpened = 0): number {
    if (id < 1 || id <= this.#lastSeen) return 0;
    // After nghttp2's GOAWAY for rapid reset the streams it took in later are refused, and a PING goes unanswered: already said.
    if (this.#rapidReset) {
      this.#lastSeen = id;
      return 0;
    }
    const ids = (id - this.#lastSeen) / 2;
    const streams = Math.min(ids, this.#streamsPossible(alsoOpened));
    this.#lastSeen = id;
    this.#streamsCounted += streams;
    if (streams > 0) this.#observer.unseenResets({ ...clientRef(this.context), streams, ...(streams < ids ? { skippedIds: ids - streams } : {}), ...(goAway ? { goAway } : {}) });
    return streams;
  }

  /**
   * How many more streams the client can have opened, by what it has sent: each cost it one HEADERS
   * frame at least. Stream ids only have to rise (RFC 9113 5.1.1), and a client that opened stream
   * 2^31-3 first was reported as a billion requests Node had reset, in the line and in
   * ovms_mtls_h2_streams_reset_unseen_total. The bound counts the TCP bytes (TLS records and handshake:
   * a request that came with the handshake's last bytes is counted all the same), so it errs high.
   */
  #streamsPossible(alsoOpened: number): number {
    const paidFor = Math.floor(tcpBytesRead(this.context.socket) / MIN_STREAM_BYTES);
    return Math.max(0, paidFor - this.#streamsCounted - alsoOpened);
  }

  /** GOAWAY (last stream id: the last one taken); Node ends the connection once no stream is open. */
  close(): void {
    this.ending();
    this.session.close();
  }

  closeIdle(): boolean {
    this.close();
    return false;
  }
}

/**
 * Node refuses every new stream (RST_STREAM ENHANCE_YOUR_CALM, RESOURCE_EXHAUSTED
 * to a gRPC client) once a session's memory passes maxSessionMemory, and counts in
 * it the response bytes it holds for a client that reads slowly. The gRPC forwarder
 * holds up to a stream window per stream for such a client (stream-forward.ts; the
 * REST one 1 MiB, the default window), so that much comes on top of the configured
 * budget: without it, ~60 slow streams on one connection (defaults) made every
 * further call on it fail. Node's unit is 10^6 bytes.
 */
function frontSessionMemory(limits: Limits): number {
  return limits.maxSessionMemoryMiB + (limits.maxConcurrentStreams * limits.streamWindow) / 1_000_000;
}

/**
 * The HTTP/2 side of a listener. Sockets arrive already authenticated; the
 * server never listens itself. `'session'` is emitted synchronously inside
 * `emit('connection')`, which is how each session learns its context.
 */
export class H2Front implements Drainable {
  readonly #server: Http2Server;
  readonly #states = new WeakMap<ServerHttp2Session, SessionState>();
  readonly #idle: IdleSweeper;
  readonly #acks = new ClientAcks();
  readonly #sessions = new Set<SessionState>();
  readonly #bySocket = new WeakMap<TLSSocket, SessionState>();
  #arriving: ConnectionContext | undefined;
  /** Set by drain(), its keep-alive grace: how long a connection whose handshake ends in the drain waits for its client's first request. */
  #drainGraceMs: number | undefined;
  /** See the constructor's `goAwayOnceIdleOnDrain`. */
  readonly #goAwayOnceIdle: boolean;

  /**
   * `goAwayOnceIdleOnDrain`: a drain tells a connection with streams open to go away only once they are over, or once
   * its client starts another (the REST port), not at once. httpx (httpcore 0.16 to 1.0, the openai SDK's transport)
   * fails every stream it still reads when any GOAWAY arrives, last stream id or not: an event stream in flight was cut
   * at the drain's start (RemoteProtocolError ConnectionTerminated), which the drain is there to let finish. A client
   * that starts another request meanwhile gets the GOAWAY with it (that request served): it would otherwise keep a
   * busy connection here to the end of the drain, its last requests ended by the shutdown timeout.
   */
  constructor(options: { limits: Limits; observer: ProxyObserver; onStream?: StreamHandler; onRequest?: RequestHandler; goAwayOnceIdleOnDrain?: boolean }) {
    const { limits, observer } = options;
    this.#goAwayOnceIdle = options.goAwayOnceIdleOnDrain ?? false;
    this.#idle = new IdleSweeper(limits.idleTimeoutMs);
    this.#server = createHttp2Server({
      settings: {
        maxConcurrentStreams: limits.maxConcurrentStreams,
        initialWindowSize: limits.streamWindow,
        maxHeaderListSize: limits.maxHeaderSize,
      },
      maxHeaderListPairs: headerFieldsWithin(limits.maxHeaderSize),
      // As large as the model server's answers we take (upstream-h2.ts: twice the limit). Node's
      // default, 64 KiB, failed a larger one (RST_STREAM(FRAME_SIZE_ERROR)), and a frame that
      // cannot be sent makes Node close the whole session: the client's next calls were refused.
      maxSendHeaderBlockLength: forwardedHeaderBlockLimit(limits.maxHeaderSize),
      maxSessionMemory: frontSessionMemory(limits),
    });
    this.#server.on('session', (session) => this.#onSession(session, limits, observer));
    this.#server.on('sessionError', () => {});
    const { onStream, onRequest } = options;
    if (onStream) {
      this.#server.on('stream', (stream, headers, _flags, rawHeaders?: string[]) => {
        const context = this.#enter(stream, observer, headers['user-agent']);
        if (context) onStream(stream, headers, context, rawHeaders);
      });
    }
    if (onRequest) {
      this.#server.on('request', (req, res) => {
        const context = this.#enter(req.stream, observer, req.headers['user-agent']);
        if (context) onRequest(req, res, context);
      });
      // Node's own answer (417, any value but the exact `100-continue`) would reach the client with no access line.
      this.#server.on('checkExpectation', (req, res) => {
        const context = this.#enter(req.stream, observer);
        if (context) meetExpectation(req, res, context, observer, onRequest);
      });
      // Likewise its 405 to a CONNECT (the proxy opens no tunnels); its target is the authority.
      this.#server.on('connect', (req: Http2ServerRequest, res: Http2ServerResponse) => {
        const context = this.#enter(req.stream, observer);
        if (context) answerH2Ourselves(req, res, context, observer, { ...CONNECT_REFUSED, path: req.authority });
      });
    }
  }

  /** The stream's connection context, counted as an open stream until it closes. */
  #enter(stream: ServerHttp2Stream, observer: ProxyObserver, userAgent?: string): ConnectionContext | undefined {
    const state = this.#states.get(stream.session as ServerHttp2Session);
    if (!state) {
      // Its session is gone already: bytes that waited for this front (a relayed client handed back, an OCSP answer
      // awaited) reach nghttp2 in one piece, and a flood in them ends the session in the tick that made the stream.
      // The stream is destroyed with that error, and an 'error' nobody listens to ended the process.
      stream.on('error', () => {});
      stream.close();
      return undefined;
    }
    const { context, streams } = state;
    state.userAgent(userAgent);
    if (stream.id !== undefined) state.seen(stream.id);
    observer.streamOpened(context.listener);
    streams.opened();
    // A client starting a request in the drain is using the connection on: told to go away now, this request still
    // served, it moves its next ones elsewhere instead of keeping the connection busy until the timeout cuts it.
    if (this.#drainGraceMs !== undefined && !state.session.closed) state.close();
    stream.once('close', () => {
      observer.streamClosed(context.listener);
      streams.closed();
      state.streamClosed(stream);
      if (this.#drainGraceMs !== undefined && streams.open === 0 && !state.session.closed) state.close();
    });
    return context;
  }

  accept(socket: TLSSocket, context: ConnectionContext): void {
    this.#arriving = context;
    try {
      this.#server.emit('connection', socket);
    } finally {
      this.#arriving = undefined;
    }
  }

  drain(keepAliveGraceMs: number): void {
    this.#drainGraceMs = keepAliveGraceMs;
    for (const state of this.#sessions) if (!this.#goAwayOnceIdle || state.streams.open === 0) state.close();
  }

  /**
   * A connection whose handshake ended in the drain, on the REST port: its client sends its first request at once, and
   * a GOAWAY before it fails it in httpx (any GOAWAY fails its streams), so that request gets the GOAWAY with it and is
   * served (#enter); one that sends none in the grace is told to go away then. gRPC clients retry a stream a GOAWAY refused.
   */
  #goAwayUnlessUsedSoon(state: SessionState, graceMs: number): void {
    if (!this.#goAwayOnceIdle) {
      state.close();
      return;
    }
    const timer = setTimeout(() => {
      if (!state.session.closed && state.streams.open === 0) state.close();
    }, graceMs);
    state.session.once('close', () => clearTimeout(timer));
  }

  /** GOAWAY on one connection: streams in flight finish, no new ones start. */
  closeConnection(socket: TLSSocket): void {
    const state = this.#bySocket.get(socket);
    if (state) state.close();
    else socket.end();
  }

  #onSession(session: ServerHttp2Session, limits: Limits, observer: ProxyObserver): void {
    if (!this.#arriving) {
      session.destroy();
      return;
    }
    const state = new SessionState(session, this.#arriving, observer, this.#acks);
    this.#states.set(session, state);
    this.#bySocket.set(this.#arriving.socket, state);
    this.#sessions.add(state);
    this.#idle.add(state);
    // on(), not once(), for what comes once: once() keeps a wrapper per listener for the connection's life.
    session.on('close', () => {
      this.#sessions.delete(state);
      this.#idle.delete(state);
    });
    session.on('error', (err: NodeJS.ErrnoException) => state.failed(err));
    beforeNghttp2End(session, () => state.nghttp2GaveUp());
    session.once('goaway', () => state.clientLeaving());
    // Prepended: Node's own listener destroys the session, and with it the stream ids it kept.
    state.context.socket.prependListener('close', () => state.clientLeaving());
    // FINDINGS: a 16 MiB connection window is what lets MB-sized tensors run at full speed.
    session.setLocalWindowSize(limits.connectionWindow);
    if (this.#drainGraceMs !== undefined) this.#goAwayUnlessUsedSoon(state, this.#drainGraceMs);
  }
}

/**
 * The names in an Expect field, lower-cased, parameters and empty members left out:
 * `100-Continue` and `100-continue;x=1` are a 100-continue (RFC 9110 10.1.1, names are
 * case-insensitive), as Node's HTTP/1.1 server and the relay read them.
 */
export function expectationNames(value: string): string[] {
  return value.split(',').map((member) => member.split(/[;=]/, 1)[0]!.trim().toLowerCase()).filter((name) => name !== '');
}

/** Why a request is refused 417, in both REST modes: Node's own 417 said nothing. `expect`: the field's values, joined. */
export function unmetExpectationMessage(expect: string): string {
  return `Expect: ${JSON.stringify(expect)} cannot be met; the only expectation supported is 100-continue`;
}

/** Why an HTTP/1.1 request without Host is refused 400, in both REST modes (RFC 9112 3.2). */
export const MISSING_HOST_MESSAGE = 'an HTTP/1.1 request needs a Host field';

const UNMET_EXPECTATION = { status: 417, error: 'bad_request' } as const;

/** The answer to an expectation that cannot be met, in terminate mode; the connection stays, as Node keeps it. */
function expectationFailed(expect: string): OwnAnswer {
  return { ...UNMET_EXPECTATION, close: false, message: unmetExpectationMessage(expect) };
}

/**
 * An HTTP/2 request whose Expect is not exactly `100-continue`: Node's compatibility
 * layer compares the value as sent, so `100-Continue` got 417 where HTTP/1.1 gets its
 * 100. A 100-continue in any spelling gets the 100 and goes on; anything else gets 417.
 */
function meetExpectation(req: Http2ServerRequest, res: Http2ServerResponse, context: ConnectionContext, observer: ProxyObserver, onRequest: RequestHandler): void {
  if (expectationNames(String(req.headers['expect'])).includes('100-continue')) {
    res.writeContinue();
    onRequest(req, res, context);
    return;
  }
  answerH2Ourselves(req, res, context, observer, { ...UNMET_EXPECTATION, path: req.url, message: unmetExpectationMessage(String(req.headers['expect'])) });
}

/** What Node's compatibility layer would answer on its own (a bare status), with the reason as a line and the access line it would not give. */
function answerH2Ourselves(req: Http2ServerRequest, res: Http2ServerResponse, context: ConnectionContext, observer: ProxyObserver, answer: { status: number; error: string; path: string; message: string }): void {
  const body = `${answer.message}\n`;
  res.writeHead(answer.status, { 'content-type': 'text/plain; charset=utf-8', 'content-length': Buffer.byteLength(body) });
  res.end(body);
  req.resume();
  logOwnAnswer(observer, context, 'h2', { method: req.method, path: answer.path, status: answer.status, error: answer.error, detail: answer.message, bytesOut: Buffer.byteLength(body) });
}

/** The access line of an answer of ours that no request handler saw; `detail`: what the answer told the client. */
function logOwnAnswer(observer: ProxyObserver, context: ConnectionContext, protocol: 'h2' | 'http/1.1', answer: { method: string; path: string; status: number; error: string; detail: string; bytesOut: number }): void {
  observer.request({ ...clientRef(context), protocol, method: answer.method, path: answer.path, status: answer.status, bytesIn: 0, bytesOut: answer.bytesOut, durationMs: 0, error: answer.error, detail: answer.detail });
}

/** What a client whose request head did not arrive in time is told, in both REST modes. */
export function headStalledMessage(timeoutMs: number): string {
  return `the request head did not arrive within ${timeoutMs / 1000} s (--mtls_idle_timeout)`;
}

interface Refusal {
  readonly status: number;
  readonly message: string;
  readonly error: string;
  /** The request's, when Node parsed its head; else the access line has empty ones. */
  readonly method?: string;
  readonly path?: string;
}

/** As the relay answers a CONNECT: the proxy opens no tunnels. */
const CONNECT_REFUSED: Refusal = { status: 405, message: 'CONNECT is not supported', error: 'bad_request' };

/** What a client whose request Node's parser refused is told, as the relay's own parser words it. */
function refusalOf(err: NodeJS.ErrnoException & { reason?: string }, limits: Limits): Refusal {
  if (err.code === 'ERR_HTTP_REQUEST_TIMEOUT') return { status: 408, message: headStalledMessage(limits.idleTimeoutMs), error: 'client_header_timeout' };
  if (err.code === 'HPE_HEADER_OVERFLOW') return { status: 431, message: requestHeadTooLargeMessage(limits.maxHeaderSize), error: 'bad_request' };
  if (err.code === 'HPE_PAUSED_H2_UPGRADE') return { status: 400, message: H2_WITHOUT_ALPN, error: 'bad_request' };
  return { status: 400, message: `malformed request: ${err.reason ?? err.code ?? err.message}`, error: 'bad_request' };
}

/** An answer of our own to a request Node parsed, given instead of the request handler's. */
interface OwnAnswer {
  readonly status: number;
  readonly error: string;
  /** The connection closes after it. */
  readonly close: boolean;
  /** Why, the answer's one line of text. */
  readonly message: string;
  /** The access line leaves out the request's method and path, as for a head nobody parsed. */
  readonly unparsed?: boolean;
}

/**
 * A request head's size as sent: its request line, and each field as `name: value`, with
 * their CRLFs (exact for the one space after the colon nearly every client puts there).
 * Node's maxHeaderSize counts the target, names and values only, so a head of many short
 * fields passed it at several times the size the relay, which counts the bytes, refuses.
 */
function headSizeAsSent(req: IncomingMessage): number {
  const raw = req.rawHeaders;
  let size = (req.method ?? '').length + (req.url ?? '').length + 'HTTP/1.1'.length + 4 + 2;
  for (let i = 0; i < raw.length; i += 2) size += raw[i]!.length + raw[i + 1]!.length + 4;
  return size;
}

function headTooLarge(req: IncomingMessage, maxHeaderSize: number): OwnAnswer | undefined {
  if (headSizeAsSent(req) <= maxHeaderSize) return undefined;
  return { status: 431, error: 'bad_request', close: true, message: requestHeadTooLargeMessage(maxHeaderSize), unparsed: true };
}

/**
 * llhttp takes `HTTP/2.0` (and 0.9) in a request line, and Node then reports
 * httpVersionMajor 2, which the REST forwarder reads as a request from the
 * HTTP/2 front: it threw on the missing stream and took the whole proxy down.
 * Every other version llhttp already refuses (400, clientError); so does the relay this one.
 */
function versionRefusal(req: IncomingMessage): OwnAnswer | undefined {
  if (req.httpVersionMajor === 1) return undefined;
  return { status: 400, error: 'bad_request', close: true, message: `malformed request: HTTP/${req.httpVersion} is not served on an HTTP/1.1 connection; send HTTP/1.1, or negotiate h2 by ALPN` };
}

/**
 * RFC 9112 3.2: an HTTP/1.1 request without Host gets 400. Node's server answers it
 * (requireHostHeader) before any event our code sees, so the request had no access line;
 * it is answered here instead, as Node did (the connection closed), and says why, as the relay does.
 */
function missingHostRefusal(req: IncomingMessage): OwnAnswer | undefined {
  if (req.httpVersionMinor === 0 || req.headers.host !== undefined) return undefined;
  return { status: 400, error: 'bad_request', close: true, message: MISSING_HOST_MESSAGE };
}

/**
 * RFC 9112 6.1: a request with a transfer coding besides its last `chunked` (`gzip, chunked`) gets 501, as
 * from the relay. llhttp takes such a body by its chunked framing and hands it over still gzip-coded; the
 * forwarder drops Transfer-Encoding (hop-by-hop), so the model server got those compressed bytes as the
 * body itself, with nothing saying so. (llhttp refuses a request whose last coding is not chunked itself.)
 */
function transferCodingRefusal(req: IncomingMessage): OwnAnswer | undefined {
  const field = req.headers['transfer-encoding'];
  if (field === undefined) return undefined;
  const codings = commaList(field);
  if (onlyChunked(codings)) return undefined;
  return { status: 501, error: 'bad_request', close: true, message: unsupportedCodingMessage(codings) };
}

/**
 * A request llhttp took as asking to switch protocols (an Upgrade field and a Connection option
 * `upgrade`; a few spellings it does not take are counted too, which costs those a reconnect).
 * With no 'upgrade' listener Node serves it as a plain request (as the relay does), but its
 * parser drops whatever came after it in the same read: a request pipelined behind it was never
 * answered, and a body cut by that read lost its head, its rest then read as a request of its
 * own and forwarded. Its answer closes the connection instead; nothing after it is forwarded
 * (answeredNever), and the client may send those requests again.
 */
function takenForUpgrade(req: IncomingMessage): boolean {
  const connection = req.headers.connection;
  return req.headers.upgrade !== undefined && connection !== undefined && connection.split(',').some((option) => option.trim().toLowerCase() === 'upgrade');
}

/** What Node's HTTP/1.1 server and net.Socket keep on a connection, read and set here (see holdBack()). */
interface NodeSocketState {
  /** Set by Node's server when it decided to stop reading (its flood check); it then pauses its parser. */
  _paused?: boolean;
  /** `reading` is what net.Socket looks at before it starts the handle again. */
  _handle?: { reading?: boolean; readStart?(): number; readStop?(): number } | null;
}

/**
 * Stops reading `socket`. Node's HTTP/1.1 parser reads a connection straight from its handle
 * (it consumes it), so socket.pause() does not stop it: the handle is stopped; what one read
 * brought is still parsed. Node's own flood check, which pauses the parser instead, is taken
 * over (its flag cleared): the TLS records already read still reached the paused parser,
 * which refused the next pipelined request as malformed ("Paused"): 30 POSTs of 300 KB
 * pipelined, answered with their bodies, got a 400 after the 23rd answer and no more.
 */
function holdBack(socket: Socket): void {
  const state = socket as unknown as NodeSocketState;
  state._paused = false;
  const handle = state._handle;
  if (handle?.reading === true && typeof handle.readStop === 'function') {
    handle.reading = false;
    handle.readStop();
  }
}

function readOn(socket: Socket): void {
  const handle = (socket as unknown as NodeSocketState)._handle;
  if (handle?.reading !== false || typeof handle.readStart !== 'function') return;
  handle.reading = true;
  handle.readStart();
}

/** Node's server has just decided to stop reading the connection (a flood of pipelined requests, or a client not reading its answers). */
function nodeHoldsBack(socket: Socket): boolean {
  return (socket as unknown as NodeSocketState)._paused === true;
}

/**
 * A request Node parsed behind a response that closes the connection (ours with `connection: close`,
 * a drain's, one to an HTTP/1.0 client), or once our end is closing: Node never sends its answer,
 * and the model server, had it been forwarded, would have worked for nobody.
 */
function answeredNever(socket: Socket, open: ReadonlySet<ServerResponse>): boolean {
  if (socket.writableEnded || socket.destroyed) return true;
  for (const res of open) if (!res.shouldKeepAlive) return true;
  return false;
}

/** A whole HTTP/1.1 response of our own, and its body's length, which counts as sent bytes as the model server's bodies do. */
export interface ClosingAnswer {
  readonly wire: Buffer;
  readonly bodyBytes: number;
}

/** A whole HTTP/1.1 response of our own, after which the connection closes. */
export function closingAnswer(status: number, contentType: string, body: string): ClosingAnswer {
  const payload = Buffer.from(body);
  const head = `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? 'Unknown'}\r\ncontent-type: ${contentType}\r\ncontent-length: ${payload.length}\r\nconnection: close\r\n\r\n`;
  return { wire: Buffer.concat([Buffer.from(head, 'latin1'), payload]), bodyBytes: payload.length };
}

/** What Node's parser refused in a request body, as its handler answers it: the status and the words naming the problem. */
export interface BodyRefusal {
  readonly status: number;
  readonly message: string;
}

/**
 * Per HTTP/1.1 request whose body is on its way: who answers it if the rest of that body is malformed.
 * A property of the request, not a WeakMap keyed by it: a WeakMap entry per request took the proxy's
 * CPU per request in the REST bench from ~100-150 to ~180-280 µs (bench/README.md, "A regression").
 */
const BODY_REFUSER = Symbol('bodyRefuser');
type RefusableRequest = IncomingMessage & { [BODY_REFUSER]?: (refusal: BodyRefusal) => void };

/**
 * `answer` takes the place of the model server's answer to `req` if Node's parser finds the rest
 * of its body malformed (a bad chunk line or trailer), as the relay answers such a request.
 */
export function onMalformedBody(req: IncomingMessage, answer: (refusal: BodyRefusal) => void): void {
  (req as RefusableRequest)[BODY_REFUSER] = answer;
}

/** What Node 20's ConnectionsList (internal: node_http_parser.cc) gives of each parser. */
interface ParserEntry {
  readonly socket?: Socket;
}

/**
 * Node's own list of an HTTP server's parsers, set up on 'listening' (the list its headersTimeout
 * check reads): `active()` holds those inside a message, a head begun and not complete among them
 * (and those of connections that have sent nothing yet). Internal, reached by its symbol's
 * description as pino's are; without it (another Node), no message is taken for begun.
 */
class NodeParsers {
  readonly #list: { active(): ParserEntry[] } | undefined;

  constructor(server: HttpServer) {
    const key = Object.getOwnPropertySymbols(server).find((symbol) => symbol.description === 'http.server.connections');
    const list = key === undefined ? undefined : (server as unknown as Record<symbol, unknown>)[key];
    this.#list = typeof (list as { active?: unknown } | undefined)?.active === 'function' ? (list as { active(): ParserEntry[] }) : undefined;
  }

  /** Node's parser of `socket` has begun a message after bytes came (a connection that sent nothing is in the list too). */
  midMessage(socket: Socket): boolean {
    if (this.#list === undefined || socket.bytesRead === 0) return false;
    return this.#list.active().some((parser) => parser.socket === socket);
  }
}

/**
 * The HTTP/1.1 side of a listener. Tracks requests per socket so a drain can
 * close idle keep-alive connections at once and busy ones after their response.
 * A connection with more requests owed answers than --mtls_max_concurrent_streams,
 * or whose client does not read its answers, is read no further until half of them
 * are answered and what was written has drained: Node's server parses every pipelined
 * request it can read and hands it over at once, and its own check stops only once
 * answers pile up unread, so a client that kept writing GETs to a model server slow
 * to answer had 100,000 requests parsed and held, the event loop busy with them,
 * while other clients waited (13 s for a GET) and memory grew.
 */
export class H1Front implements Drainable {
  readonly #server: HttpServer;
  readonly #contexts = new WeakMap<Socket, ConnectionContext>();
  /** Per connection, its responses not closed yet: the one being written and those of pipelined requests queued behind it. */
  readonly #active = new Map<Socket, Set<ServerResponse>>();
  /** Connections to close once their current response is done (revoked clients). */
  readonly #closing = new WeakSet<Socket>();
  /** The last request Node parsed on each connection. */
  readonly #latest = new WeakMap<Socket, IncomingMessage>();
  /** What Node's parser refused behind requests still in flight: answered, and the connection closed, once they are. */
  readonly #refuseAfterAnswers = new WeakMap<Socket, Refusal>();
  /** socket.bytesRead when its last request in flight was answered. */
  readonly #readAtRest = new WeakMap<Socket, number>();
  /** Connections whose request in flight had a malformed body, answered by its handler: what follows it is dropped. */
  readonly #badBodies = new WeakSet<Socket>();
  /** Connections not read while too many of their requests wait for answers, or their client does not read them (holdBack()). */
  readonly #heldBack = new WeakSet<Socket>();
  /** --mtls_max_concurrent_streams: requests of one connection owed answers before we read it no further. */
  readonly #maxOwed: number;
  /** Set by drain(), its keep-alive grace. */
  #drainGraceMs: number | undefined;
  /** When each connection last had nothing in flight: accepted, or its last answer done. */
  readonly #quietSince = new WeakMap<Socket, number>();

  readonly #observer: ProxyObserver;
  readonly #idleTimeoutMs: number;
  readonly #maxHeaderSize: number;
  readonly #parsers: NodeParsers;

  constructor(options: { limits: Limits; observer: ProxyObserver; onRequest: RequestHandler }) {
    this.#observer = options.observer;
    this.#maxHeaderSize = options.limits.maxHeaderSize;
    this.#maxOwed = options.limits.maxConcurrentStreams;
    const idleMs = (this.#idleTimeoutMs = options.limits.idleTimeoutMs);
    this.#server = createHttpServer(
      {
        maxHeaderSize: options.limits.maxHeaderSize,
        // A live upload or SSE response may take as long as it takes.
        requestTimeout: 0,
        // A head trickled in byte by byte would otherwise hold the connection for ever (nginx: client_header_timeout).
        headersTimeout: idleMs,
        connectionsCheckingInterval: Math.max(50, Math.min(30_000, Math.floor(idleMs / 4))),
        keepAliveTimeout: idleMs,
        // Checked by missingHostRefusal() instead, which logs the request.
        requireHostHeader: false,
      },
      (req, res) => this.#onRequest(req, res, options.onRequest),
    );
    // Node's default keeps the first 1000 fields of a head (2000 names and values) and drops the rest without a word, where
    // the relay forwards all of them: maxHeaderSize is the one limit, in both modes.
    this.#server.maxHeadersCount = 0;
    // Node answers any Expect but 100-continue with 417 on its own, which would leave the request without its access line.
    this.#server.on('checkExpectation', (req: IncomingMessage, res: ServerResponse) => this.#onRequest(req, res, options.onRequest, expectationFailed(String(req.headers.expect))));
    // Node checks headersTimeout from a timer it starts on 'listening'; this server never listens itself (sockets are handed in).
    this.#server.emit('listening');
    this.#parsers = new NodeParsers(this.#server);
    // Any socket timeout (ours above, Node's keep-alive one) lands here; without a listener Node would cut a busy connection too.
    this.#server.on('timeout', (socket: Socket) => {
      if (this.#busy(socket)) return;
      // Node's headersTimeout check would answer a head that stopped arriving up to a quarter of the timeout later: closing it as idle first left no answer and no access line.
      if (this.#headArriving(socket)) this.#refuse(socket, { status: 408, message: headStalledMessage(idleMs), error: 'client_header_timeout' });
      else socket.destroy();
    });
    // Without a listener Node closes a CONNECT's connection with no answer and no access line; the relay answers 405.
    this.#server.on('connect', (req: IncomingMessage, socket: Socket) => {
      if (this.#owesAnswers(socket)) this.#keepWriting(socket);
      this.#refuseOrDefer(socket, { ...CONNECT_REFUSED, method: 'CONNECT', path: req.url ?? '' });
    });
    this.#server.on('clientError', (err: NodeJS.ErrnoException, socket: Socket) => {
      // Our answer to what it refused is on its way (end() called): Node's parser reports the reads after it too, and a destroy() here cut the answer off (a 431 whose head came in two reads reached the client as nothing).
      if (socket.writableEnded) return;
      // A client that leaves in the middle of a body (an upload it gave up, once answered early) has a request with its own access line: no answer, no second line.
      if (!socket.writable || this.#leftMidBody(socket, err)) {
        socket.destroy();
        return;
      }
      // Node's head timeout also counts a connection that has sent nothing yet; when its check runs before our idle
      // timer (a late event loop), that connection is idle, as our timer would have found it: closed, no 408.
      if (err.code === 'ERR_HTTP_REQUEST_TIMEOUT' && !this.#headArriving(socket, true)) {
        socket.destroy();
        return;
      }
      const refusal = refusalOf(err, options.limits);
      if (this.#refuseBody(socket, refusal)) return;
      // What llhttp refused comes behind an answer that closes the connection, as no request behind one is, it goes unanswered:
      // llhttp refuses a request with one coding other than chunked (`foo`) after the head our 501 answers, and its 400 went out too.
      if (answeredNever(socket, this.#active.get(socket) ?? new Set())) return;
      this.#refuseOrDefer(socket, refusal);
    });
  }

  /**
   * Bad bytes in the body of the request in flight: its handler answers it (onMalformedBody), so it has one access
   * line with its method, path and status. Answered here instead, it had two: our refusal, with no method or path, and the
   * request's own, status 0 `client_closed` as if the client had left, two requests in the metrics for one.
   * Node's parser reports every later read of the connection too: those are dropped.
   */
  #refuseBody(socket: Socket, refusal: Refusal): boolean {
    if (this.#badBodies.has(socket)) return true;
    const req = this.#latest.get(socket);
    // Its answer still open: one that went out whole before (an early 413) leaves the bytes to #refuseOrDefer, as before.
    const answer = req?.complete === false && this.#busy(socket) ? (req as RefusableRequest)[BODY_REFUSER] : undefined;
    if (answer === undefined) return false;
    this.#badBodies.add(socket);
    answer(refusal);
    return true;
  }

  #refuseOrDefer(socket: Socket, refusal: Refusal): void {
    // The refused bytes follow whole requests still being answered: an answer now would reach the client as the answer to the first of them.
    if (this.#owesAnswers(socket)) this.#refuseAfterAnswers.set(socket, refusal);
    else this.#refuse(socket, refusal);
  }

  /**
   * Node hands a CONNECT's socket over with its own listeners taken off, 'drain' and 'timeout'
   * among them, though responses to requests pipelined before it are still being written there.
   * A response that had to wait for the client to read stalled for good (3 MB of /stream-bytes
   * stopped at 1.2 MB: no 405 after it, no access line, its upstream request held), and the idle
   * timeout never came. Both are passed on again, as Node did.
   */
  #keepWriting(socket: Socket): void {
    const open = this.#active.get(socket);
    socket.on('drain', () => {
      for (const res of open ?? []) if (res.writableNeedDrain) res.emit('drain');
    });
    socket.on('timeout', () => this.#server.emit('timeout', socket));
  }

  /**
   * Part of a head came and made no request yet (not the rest of a body answered early, read and
   * dropped): bytes after the last answer, or, when they came in the same read as the request
   * before it (pipelined), a message Node's parser has begun. That one had been closed as idle,
   * with no 408 and no access line, where the relay answers it. `nodeExpired`: Node's headersTimeout
   * check gave up on the connection, which it does only to a parser inside a message (taking it off
   * its list first), or to a connection that has sent nothing yet.
   */
  #headArriving(socket: Socket, nodeExpired = false): boolean {
    if (this.#latest.get(socket)?.complete === false) return false;
    if (socket.bytesRead > (this.#readAtRest.get(socket) ?? 0)) return true;
    return nodeExpired ? socket.bytesRead > 0 : this.#parsers.midMessage(socket);
  }

  /** The connection ended while the body of a request we took was still arriving. */
  #leftMidBody(socket: Socket, err: NodeJS.ErrnoException): boolean {
    return err.code === 'HPE_INVALID_EOF_STATE' && this.#latest.get(socket)?.complete === false;
  }

  #holdBack(socket: Socket): void {
    holdBack(socket);
    this.#heldBack.add(socket);
  }

  /** Reads a held connection again once half its requests owed answers are answered and the client reads what was written. */
  #readOnIfHeld(socket: Socket, open: ReadonlySet<ServerResponse> | undefined): void {
    // At least one: a request whose body is still to come is the last one read, and waits for it alone.
    if (open === undefined || socket.destroyed || open.size > Math.max(1, this.#maxOwed / 2) || socket.writableNeedDrain) return;
    if (this.#heldBack.delete(socket)) readOn(socket);
  }

  /** A response of the connection is still open. */
  #busy(socket: Socket): boolean {
    return (this.#active.get(socket)?.size ?? 0) > 0;
  }

  /** Requests that arrived whole before the bad bytes are still waiting for their answers. */
  #owesAnswers(socket: Socket): boolean {
    return this.#busy(socket) && this.#latest.get(socket)?.complete === true;
  }

  /** Our own answer to what Node's parser refused; the connection then closes. */
  #refuse(socket: Socket, refusal: Refusal): void {
    if (!socket.writable) {
      socket.destroy();
      return;
    }
    const answer = closingAnswer(refusal.status, 'text/plain; charset=utf-8', `${refusal.message}\n`);
    socket.end(answer.wire);
    const context = this.#contexts.get(socket);
    if (context) logOwnAnswer(this.#observer, context, 'http/1.1', { method: refusal.method ?? '', path: refusal.path ?? '', status: refusal.status, error: refusal.error, detail: refusal.message, bytesOut: answer.bodyBytes });
  }

  accept(socket: TLSSocket, context: ConnectionContext): void {
    this.#contexts.set(socket, context);
    this.#active.set(socket, new Set());
    socket.on('close', () => this.#closeQueuedResponses(socket));
    socket.on('drain', () => this.#readOnIfHeld(socket, this.#active.get(socket)));
    this.#quietSince.set(socket, performance.now());
    // Node's keepAliveTimeout starts after a first response; a connection that never sends a request needs this one.
    socket.setTimeout(this.#idleTimeoutMs);
    this.#server.emit('connection', socket);
    // Its handshake ended in the drain: its client writes its first request now, and a connection closed under it
    // is an error it does not retry (Go: a fresh connection's EOF), so that request is answered, with connection: close.
    if (this.#drainGraceMs !== undefined) this.#endOnceQuiet(socket);
  }

  /**
   * A keep-alive client may be sending its next request as we close an idle connection: Go's
   * net/http does not resend a POST written before it read our close ("Post ...: EOF"), and a
   * client in a steady loop sends one within a millisecond of its last answer. So a connection
   * whose last answer said keep-alive stays open until it has been quiet for `keepAliveGraceMs`
   * since that answer; a request that comes meanwhile is answered with `connection: close`.
   */
  drain(keepAliveGraceMs: number): void {
    this.#drainGraceMs = keepAliveGraceMs;
    for (const socket of this.#active.keys()) this.#closeAfterAnswers(socket);
  }

  /** Once every connection is gone: stops Node's headersTimeout check timer. */
  close(): void {
    this.#server.close();
  }

  /** Closes one connection now if idle, else right after the response in progress. */
  closeConnection(socket: TLSSocket): void {
    this.#closing.add(socket);
    this.#closeAfterAnswers(socket);
  }

  /**
   * An idle connection ends now. On a busy one the last answer owed, if its head has not gone
   * out yet, says `connection: close`: it had said keep-alive and the connection then closed
   * under a keep-alive client, which sent its next request on it and got a reset (Node's
   * https: ECONNRESET "socket hang up", never retried) instead of opening a new connection.
   * Only the last: Node ends the connection after an answer that says close, and the answers
   * pipelined behind it would never go out.
   */
  #closeAfterAnswers(socket: Socket): void {
    const open = this.#active.get(socket);
    const last = open === undefined ? undefined : [...open].at(-1);
    if (last === undefined) this.#endOnceQuiet(socket);
    else if (!last.headersSent) last.shouldKeepAlive = false;
  }

  /** Ends a connection with nothing in flight: in a drain, once it has been quiet for the grace (drain()); a revoked client's at once. */
  #endOnceQuiet(socket: Socket): void {
    const graceLeft = this.#closing.has(socket) ? 0 : (this.#drainGraceMs ?? 0) - (performance.now() - (this.#quietSince.get(socket) ?? 0));
    if (graceLeft <= 0) {
      socket.end();
      return;
    }
    // A request that came meanwhile says connection: close in its answer, after which its 'close' ends the connection.
    // Part of a head is not waited for past the grace: a client stalled mid-head held the drain to its timeout.
    const timer = setTimeout(() => {
      if (!this.#busy(socket)) socket.end();
    }, graceLeft);
    socket.once('close', () => clearTimeout(timer));
  }

  /** `unmet`: what Node found the request cannot have (its Expect), answered instead of the handler. */
  #onRequest(req: IncomingMessage, res: ServerResponse, handler: RequestHandler, unmet?: OwnAnswer): void {
    const socket = req.socket;
    const context = this.#contexts.get(socket);
    const open = this.#active.get(socket);
    if (!context || !open) {
      socket.destroy();
      return;
    }
    if (answeredNever(socket, open)) {
      // Not read, as the relay reads nothing after such an answer: its body is dropped, it has no access line.
      req.resume();
      return;
    }
    open.add(res);
    this.#latest.set(socket, req);
    if (nodeHoldsBack(socket) || open.size > this.#maxOwed || socket.writableNeedDrain) this.#holdBack(socket);
    // An HTTP/1.1 request in flight counts as an open stream, as an HTTP/2 stream does.
    this.#observer.streamOpened(context.listener);
    const closing = () => this.#drainGraceMs !== undefined || this.#closing.has(socket);
    if (closing() || takenForUpgrade(req)) res.shouldKeepAlive = false;
    res.once('close', () => {
      this.#observer.streamClosed(context.listener);
      open.delete(res);
      this.#readOnIfHeld(socket, open);
      // The connection is gone (it closes before its responses do): nothing more to answer or close on it.
      if (!this.#active.has(socket) || open.size > 0) return;
      this.#readAtRest.set(socket, socket.bytesRead);
      this.#quietSince.set(socket, performance.now());
      const refusal = this.#refuseAfterAnswers.get(socket);
      // After this 'close' event's other listeners, the forwarder's among them, which logs the answer before: access lines in the order of the requests.
      if (refusal) process.nextTick(() => this.#refuse(socket, refusal));
      // An answer that went out saying keep-alive before the drain began: its client may be sending its next request.
      else if (closing() && res.shouldKeepAlive) this.#endOnceQuiet(socket);
      else if (closing()) socket.end();
    });
    const own = headTooLarge(req, this.#maxHeaderSize) ?? versionRefusal(req) ?? missingHostRefusal(req) ?? transferCodingRefusal(req) ?? unmet;
    if (own) this.#answerOurselves(req, res, context, own);
    else handler(req, res, context);
  }

  /**
   * The connection closed. Node closes the response it was writing, not those of pipelined
   * requests queued behind it (its socketOnClose leaves them, "Abort socket._httpMessage ?"):
   * they never emitted 'close', so their requests stayed in flight for good (open_streams,
   * the forwarder's upstream request, still running, and their access lines). They are
   * closed here, after the socket's other 'close' listeners, Node's among them.
   */
  #closeQueuedResponses(socket: Socket): void {
    const open = this.#active.get(socket);
    this.#active.delete(socket);
    if (open === undefined || open.size === 0) return;
    process.nextTick(() => {
      for (const res of open) {
        res.destroy();
        res.emit('close');
      }
    });
  }

  /** Answered here, after Node parsed the request, in its turn among the requests pipelined with it. */
  #answerOurselves(req: IncomingMessage, res: ServerResponse, context: ConnectionContext, answer: OwnAnswer): void {
    if (answer.close) res.shouldKeepAlive = false;
    const body = `${answer.message}\n`;
    const bytesOut = Buffer.byteLength(body);
    res.writeHead(answer.status, { 'content-type': 'text/plain; charset=utf-8', 'content-length': bytesOut });
    res.end(body);
    // Whatever body it has is read and dropped (Node does so once the answer is out).
    req.resume();
    const [method, path] = answer.unparsed ? ['', ''] : [req.method ?? '', req.url ?? ''];
    // Logged once out, after the answers before it, as the forwarder logs those: access lines in the order of the requests.
    // A connection that closed first never carried it: status 0, the refusal's error kept (README, Logs).
    let onWire = res.socket !== null;
    if (!onWire) res.once('socket', () => (onWire = true));
    res.once('close', () => logOwnAnswer(this.#observer, context, 'http/1.1', { method, path, status: onWire ? answer.status : 0, error: answer.error, detail: answer.message, bytesOut: onWire ? bytesOut : 0 }));
  }
}
