import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import { requestStart, type ConnectionContext } from './listeners.js';
import { Relay, type RelayedConnection, type RelayOptions } from './relay.js';
import { clientRef, elapsedMs, type ProxyObserver } from './observer.js';
import { RAPID_RESET, RESET_BURST, RESETS_PER_SECOND, ResetAllowance } from './reset-allowance.js';
import { CLIENT_PREFACE_BYTES, DrainPingAck, EMPTY_SETTINGS, ENHANCE_YOUR_CALM, FLAG_ACK, FrameCursor, OpenStreams, PROTOCOL_ERROR, SERVER_PREFACE_HEADER_BYTES, TYPE_RST_STREAM, TYPE_SETTINGS, ToClient, frameLength, goAway, isServerPreface, type OnFrame, type OnGoAway, withStreamLimit } from './h2-frames.js';
import { h2ErrorName } from './grpc-status.js';
import { UPSTREAM_NOT_HTTP2, describeUpstreamError } from './upstream-errors.js';
import type { HostPort } from './config.js';
import { IdleSweeper, type IdleConnection } from './idle-sweep.js';

/**
 * The fallback is the terminating HTTP/2 front, which answers UNAVAILABLE per
 * call. A connection with no stream open for `idleTimeoutMs` is closed; a client
 * may have `maxConcurrentStreams` open at once (--mtls_max_concurrent_streams).
 */
export type GrpcRelayOptions = Omit<RelayOptions, 'listener' | 'join'> & { readonly idleTimeoutMs: number; readonly maxConcurrentStreams: number };

/**
 * `--mtls_grpc_mode relay`: the decrypted HTTP/2 bytes go to the upstream h2c
 * connection as they are. No per-call HTTP/2 work, so a call costs a fraction
 * of what terminating costs; the price is no x-forwarded-client-cert and one
 * access line per connection instead of per call (README, "gRPC modes").
 */
export function grpcRelay(options: GrpcRelayOptions): Relay {
  const idle = new IdleSweeper(options.idleTimeoutMs);
  const { observer, maxConcurrentStreams } = options;
  return new Relay({ ...options, listener: 'grpc', join: (client, upstream, context, handBack) => new RelayedH2Connection({ client, upstream, target: options.upstream, context, observer, idle, handBack, maxConcurrentStreams }) });
}

/** The relay_access error of a connection the model server closed under calls in flight. */
export const UPSTREAM_CLOSED_MID_CALL = 'upstream_closed_mid_call';
const MAX_STREAM_ID = 0x7fffffff;

/** How long a client that was cut off has to read our last GOAWAY before its connection is closed. */
const CUT_OFF_GRACE_MS = 1000;

/** The relay_access error of a connection closed for rapid reset. */
export const CLIENT_RAPID_RESET = 'client_rapid_reset';
const RAPID_RESET_MESSAGE = `the client reset more streams than nghttp2 allows a client of terminate mode (${RESET_BURST} at once, ${RESETS_PER_SECOND} more each second): rapid reset (CVE-2023-44487). It was sent GOAWAY ENHANCE_YOUR_CALM and its connection to the model server closed`;

/** The relay_access error of a connection closed for opening more streams than it was allowed, and the h2_session_error line's code. */
export const CLIENT_TOO_MANY_STREAMS = 'client_too_many_streams';
export const TOO_MANY_STREAMS = 'TOO_MANY_STREAMS';

/**
 * The streams HTTP/2 clients open before they have read the server's SETTINGS, whose limit they
 * may take for unlimited until then (RFC 9113 6.5.2): nghttp2's default (Node, grpc-js, curl),
 * grpc-go's and Go's own. A client that opens more before it has acknowledged ours is cut off all the same.
 */
export const STREAMS_BEFORE_SETTINGS = 100;

/**
 * How much of what the client sends is kept until the model server's preface is in. Until the
 * model server's SETTINGS, a client may send one 64 KiB flow-control window of DATA (RFC 9113
 * 6.9.2) and its header blocks: more means a model server that accepted and says nothing, and
 * the connection stays relayed as before.
 */
const KEPT_BEFORE_PREFACE_MAX = 256 * 1024;

/**
 * What the client sent upstream before the model server's first frame header was in, and the
 * model server's bytes so far. Until that header is in, nothing goes to the client.
 */
interface BeforePreface {
  /** undefined: more than KEPT_BEFORE_PREFACE_MAX, the client can no longer be handed back. */
  sent: Buffer[] | undefined;
  sentBytes: number;
  received: Buffer;
}

interface RelayedH2Parts {
  readonly client: TLSSocket;
  readonly upstream: Socket;
  /** Where `upstream` goes, for the upstream_error line. */
  readonly target: HostPort;
  readonly context: ConnectionContext;
  readonly observer: ProxyObserver;
  readonly idle: IdleSweeper;
  readonly handBack: () => void;
  readonly maxConcurrentStreams: number;
}

/** One client connection and its own upstream connection, with backpressure both ways. */
class RelayedH2Connection implements RelayedConnection, IdleConnection {
  readonly #client: TLSSocket;
  readonly #upstream: Socket;
  readonly #target: HostPort;
  readonly #context: ConnectionContext;
  readonly #observer: ProxyObserver;
  /** From when the relay took the connection, if the client was already waiting. */
  readonly #started: number;
  /** Followed from both directions' frame headers: each call, and whether any is open. */
  readonly streams = new OpenStreams();
  /** Upstream-to-client frames, so a GOAWAY of ours never lands inside one of the upstream's, and its SETTINGS carry our stream limit. */
  readonly #toClient: ToClient;
  /** Client-to-upstream frames. */
  readonly #fromClient: FrameCursor;
  #idleClosed = false;
  /** Once our GOAWAY has gone out and the client's frames are followed from a boundary: looks for the ACK of the PING after it. */
  #drainPingAck: DrainPingAck | undefined;
  /** The client acknowledged the PING after our GOAWAY: it has read the GOAWAY. */
  #clientReadGoAway = false;
  /** Set by the frame that opened a stream after the client read our GOAWAY: the last stream id opened before it. */
  #ignoredGoAwayAfter: number | undefined;
  /** The client's RST_STREAM frames, held to the budget nghttp2 holds terminate mode's clients to. */
  readonly #resets = new ResetAllowance(0);
  /** Set by the RST_STREAM that ran that budget dry: nothing from its read on goes upstream. */
  #resetFlood = false;
  /** --mtls_max_concurrent_streams: the client is told at most this many in the upstream's SETTINGS, and held to it. */
  readonly #maxStreams: number;
  /** The client acknowledged the upstream's first SETTINGS, which carries our limit: from then on it has it. */
  #limitKnown = false;
  /** Set by the HEADERS that opened a stream past the limit. */
  #tooManyStreams: TooManyStreams | undefined;
  #bytesIn = 0;
  #bytesOut = 0;
  #error: string | undefined;
  /** The last GOAWAY from each side: why a connection ended is often only there (C-core's ENHANCE_YOUR_CALM "too_many_pings"). */
  #clientGoAway: SeenGoAway | undefined;
  #upstreamGoAway: SeenGoAway | undefined;
  /** The last stream id of the upstream's last GOAWAY: the streams past it it never processed. */
  #upstreamLastStreamId: number | undefined;
  #beforePreface: BeforePreface | undefined = { sent: [], sentBytes: 0, received: Buffer.alloc(0) };
  readonly #idle: IdleSweeper;
  readonly #handBack: () => void;
  /** Removes each listener this connection added to the client socket, which lives on if handed back. */
  readonly #clientListeners: (() => void)[] = [];
  /** Toward the client, pausing the upstream while the client is slow. */
  readonly #write = (chunk: Buffer): void => {
    if (!this.#client.write(chunk)) this.#upstream.pause();
  };

  constructor({ client, upstream, target, context, observer, idle, handBack, maxConcurrentStreams }: RelayedH2Parts) {
    this.#target = target;
    this.#client = client;
    this.#idle = idle;
    this.#handBack = handBack;
    this.#upstream = upstream;
    this.#context = context;
    this.#observer = observer;
    this.#started = requestStart(context);
    this.#maxStreams = maxConcurrentStreams;
    this.#toClient = new ToClient({ onFrame: this.streams.fromServer, onGoAway: this.#upstreamWentAway, maxConcurrentStreams });
    this.#fromClient = new FrameCursor({ skip: CLIENT_PREFACE_BYTES, onFrame: this.#clientFrame, onGoAway: this.#clientWentAway });
    idle.add(this);
    this.#onClient('data', (chunk: Buffer) => {
      // The upstream has gone: what the client still sends is read (so its FIN is seen) and dropped.
      if (upstream.writableEnded || upstream.destroyed) return;
      this.#bytesIn += chunk.length;
      this.#keepUntilPreface(chunk);
      if (this.#drainPingAck) this.#drainPingAck.pass(chunk, this.#toUpstream, this.#goAwayRead);
      else if (this.#toClient.sent) this.#lookForDrainPingAck(chunk);
      else this.#toUpstream(chunk);
    });
    upstream.on('drain', () => client.resume());
    upstream.on('data', (chunk: Buffer) => {
      const passed = this.#beforePreface ? this.#judgePreface(this.#beforePreface, chunk) : chunk;
      if (passed === undefined) return;
      this.#bytesOut += passed.length;
      this.#toClient.pass(passed, this.#write);
    });
    this.#onClient('drain', () => upstream.resume());
    // 'end' and 'close' come once; on() spares the wrapper once() keeps per listener for the connection's life.
    this.#onClient('end', () => upstream.end());
    upstream.on('end', () => {
      if (this.#handedBackFor('UPSTREAM_CLOSED')) return;
      this.#noteCallsCut();
      client.end();
    });
    this.#onClient('error', (err: NodeJS.ErrnoException) => this.#failed('client_' + (err.code ?? 'error')));
    upstream.on('error', (err: NodeJS.ErrnoException) => {
      if (this.#handedBackFor(err.code ?? 'error')) return;
      this.#failed('upstream_' + (err.code ?? 'error'));
      this.#upstreamError(err.code ?? 'error', err);
    });
    // Whichever side goes first, the other follows; written bytes are flushed before the FIN.
    this.#onClient('close', () => {
      if (context.closedBy !== undefined) this.#failed(context.closedBy);
      upstream.destroy();
      idle.delete(this);
      this.#report();
    });
    upstream.on('close', () => {
      if (this.#error) {
        if (!client.writableEnded) client.destroy();
        return;
      }
      client.end();
      // Paused while the upstream was full, the client would never be read again, nor its FIN.
      client.resume();
    });
  }

  #onClient<A extends unknown[]>(event: string, listener: (...args: A) => void): void {
    const loose = listener as (...args: unknown[]) => void;
    this.#client.on(event, loose);
    this.#clientListeners.push(() => this.#client.off(event, loose));
  }

  #keepUntilPreface(chunk: Buffer): void {
    const before = this.#beforePreface;
    if (!before?.sent) return;
    before.sentBytes += chunk.length;
    if (before.sentBytes > KEPT_BEFORE_PREFACE_MAX) before.sent = undefined;
    else before.sent.push(chunk);
  }

  /**
   * The model server's bytes until its first frame is in: an HTTP/2 server's preface (a SETTINGS
   * frame) lets them all through (returned), with ours added when it names no stream limit
   * (ToClient lowers the limits of every SETTINGS, this one's too, to ours); anything else (the HTTP/1.1 answer of a REST port given as the
   * gRPC upstream) never reaches the client, whose HTTP/2 connection it would break with no
   * status: the client is handed back to the terminating front, which answers each of its calls
   * UNAVAILABLE saying why (upstream-errors.ts).
   */
  #judgePreface(before: BeforePreface, chunk: Buffer): Buffer | undefined {
    const received = before.received.length === 0 ? chunk : Buffer.concat([before.received, chunk]);
    if (received.length < SERVER_PREFACE_HEADER_BYTES) {
      before.received = received;
      return undefined;
    }
    if (isServerPreface(received)) {
      const length = frameLength(received);
      if (received.length < length) {
        before.received = received;
        return undefined;
      }
      this.#beforePreface = undefined;
      const settings = withStreamLimit(received.subarray(0, length), this.#maxStreams);
      return settings.length === length ? received : Buffer.concat([settings, received.subarray(length)]);
    }
    if (!this.#handedBackFor(UPSTREAM_NOT_HTTP2)) {
      this.#failed('upstream_not_http2');
      this.#upstreamError(UPSTREAM_NOT_HTTP2);
      this.#upstream.destroy();
    }
    return undefined;
  }

  /**
   * Before the model server's preface (an HTTP/2 server's first frame), the client has been sent
   * nothing: one whose upstream closed, failed or spoke something else goes to the terminating
   * front with what it sent, as a client whose upstream connection failed does (relay.ts). False
   * when it cannot be: past the preface, too much kept, or the client gone, ended, or sent our GOAWAY.
   */
  #handedBackFor(code: string): boolean {
    const kept = this.#beforePreface?.sent;
    this.#beforePreface = undefined;
    const client = this.#client;
    if (!kept || this.#toClient.sent || client.destroyed || client.readableEnded) return false;
    this.#upstreamError(code);
    for (const remove of this.#clientListeners) remove();
    this.#idle.delete(this);
    this.#upstream.removeAllListeners();
    this.#upstream.on('error', () => {});
    this.#upstream.destroy();
    client.pause();
    if (kept.length > 0) client.unshift(Buffer.concat(kept));
    this.#handBack();
    return true;
  }

  /** Counted, and logged saying which upstream and what failed, as the terminating path says it to its clients. */
  #upstreamError(code: string, err: unknown = { code }): void {
    this.#observer.upstreamError('grpc', code, describeUpstreamError(this.#target, err).message);
  }

  readonly #toUpstream = (piece: Buffer): void => {
    this.#fromClient.advance(piece);
    this.#writeUpstream(piece);
  };

  /** `piece`, already followed, to the upstream; unless it opened a stream the client was told not to open. */
  #writeUpstream(piece: Buffer): void {
    if (this.#upstream.destroyed) return;
    if (this.#resetFlood) this.#cutOffResetFlood();
    else if (this.#tooManyStreams) this.#cutOffTooManyStreams(this.#tooManyStreams);
    else if (this.#ignoredGoAwayAfter !== undefined) this.#cutOff(this.#ignoredGoAwayAfter, PROTOCOL_ERROR, 'client_ignored_goaway');
    else if (!this.#upstream.write(piece)) this.#client.pause();
  }

  /**
   * The first read since our GOAWAY and its PING went out: the rest of the frame in progress
   * goes as before (it began before the PING, so it is not its ACK), the frames after it
   * through a DrainPingAck.
   */
  #lookForDrainPingAck(chunk: Buffer): void {
    let at = 0;
    if (!this.#fromClient.betweenFrames) {
      at = this.#fromClient.advance(chunk, true);
      this.#writeUpstream(at === chunk.length ? chunk : chunk.subarray(0, at));
      if (!this.#fromClient.betweenFrames) return;
    }
    this.#drainPingAck = new DrainPingAck();
    if (at < chunk.length) this.#drainPingAck.pass(chunk.subarray(at), this.#toUpstream, this.#goAwayRead);
  }

  readonly #goAwayRead = (): void => {
    this.#clientReadGoAway = true;
  };

  readonly #clientFrame: OnFrame = (type, streamId, flags) => {
    if (this.streams.opens(type, streamId)) {
      // RFC 9113 section 6.8 forbids it; the relay cannot refuse one stream without decoding HPACK.
      if (this.#clientReadGoAway) this.#ignoredGoAwayAfter ??= this.streams.lastClientId;
      const limit = this.#streamLimit();
      if (this.streams.open >= limit) this.#tooManyStreams ??= { lastTaken: this.streams.lastClientId, limit, acknowledged: this.#limitKnown };
    } else if (type === TYPE_SETTINGS && (flags & FLAG_ACK) !== 0) {
      this.#limitKnown = true;
    }
    if (type === TYPE_RST_STREAM && !this.#resetFlood && !this.#resets.take(1)) this.#resetFlood = true;
    this.streams.fromClient(type, streamId, flags);
  };

  readonly #clientWentAway: OnGoAway = (code, debug) => {
    this.#clientGoAway = seenGoAway(code, debug);
  };

  readonly #upstreamWentAway: OnGoAway = (code, debug, lastStreamId) => {
    this.#upstreamGoAway = seenGoAway(code, debug);
    this.#upstreamLastStreamId = lastStreamId;
    this.streams.closeAbove(lastStreamId);
  };

  /**
   * The streams the client may have open when it opens another: ours once it has acknowledged the
   * SETTINGS that carry it (clients ACK in order, after applying them); before, the streams clients
   * open before they have it, unless ours is more.
   */
  #streamLimit(): number {
    return this.#limitKnown ? this.#maxStreams : Math.max(this.#maxStreams, STREAMS_BEFORE_SETTINGS);
  }

  /**
   * The model server closed its connection first (a crash, an OOM kill: a FIN, no GOAWAY) under
   * calls it had taken and not answered: their clients get UNAVAILABLE, so the line says why, as
   * terminate mode's per-call lines do. Streams past its GOAWAY's last stream id it never
   * processed (a restart), and the client retries them elsewhere: not counted.
   */
  #noteCallsCut(): void {
    if (this.#error !== undefined || this.#client.readableEnded) return;
    if (this.streams.unansweredUpTo(this.#upstreamLastStreamId ?? MAX_STREAM_ID) === 0) return;
    this.#failed(UPSTREAM_CLOSED_MID_CALL);
    this.#observer.upstreamError('grpc', 'UPSTREAM_CLOSED', `${describeUpstreamError(this.#target, { code: 'UPSTREAM_CLOSED' }).message} the calls it had taken (a crash or an OOM kill?): their clients get UNAVAILABLE`);
  }

  /**
   * Rapid reset through the relay: each stream a client opened and reset at once reached the model
   * server, whose own limits were the only ones. A C-core server (grpcio 1.51) given 5 s of it grew
   * by 800 MB and was still busy 20 s later, another client's call timing out meanwhile. The client
   * is held to the budget of resets terminate mode's get from nghttp2 (reset-allowance.ts).
   */
  #cutOffResetFlood(): void {
    this.#observer.h2SessionFailed({ ...clientRef(this.#context), code: RAPID_RESET, message: RAPID_RESET_MESSAGE, byProxy: true });
    this.#cutOff(this.streams.lastClientId, ENHANCE_YOUR_CALM, CLIENT_RAPID_RESET);
  }

  /**
   * A stream past the limit: RFC 9113 5.1.2 allows a stream error, which a relay can only give by
   * passing the HEADERS on (the HPACK table is the connection's) and resetting the stream both ways,
   * every refused stream reaching the model server as in a rapid reset. Clients keep to the limit
   * (grpc-js, grpc-go and C-core queue their calls), so one that does not is broken or hostile: it
   * is cut off, as terminate mode's nghttp2 cuts one off past a limit it has acknowledged, and the
   * stream never reaches the model server. Without it, a client opening streams without end grew a
   * C-core server (grpcio) started with grpc.max_concurrent_streams=2147483647, as the README tells
   * `proxy` users to, from 69 to 869 MB in 4 s, another client timing out.
   */
  #cutOffTooManyStreams({ lastTaken, limit, acknowledged }: TooManyStreams): void {
    const which = acknowledged ? `the limit it had acknowledged (--mtls_max_concurrent_streams=${limit})` : `the ${limit} the proxy allows before the client has acknowledged its SETTINGS (--mtls_max_concurrent_streams=${this.#maxStreams})`;
    const message = `the client opened more streams at once than ${which}: RFC 9113 5.1.2. It was sent GOAWAY PROTOCOL_ERROR and its connection to the model server closed`;
    this.#observer.h2SessionFailed({ ...clientRef(this.#context), code: TOO_MANY_STREAMS, message, byProxy: true });
    this.#cutOff(lastTaken, PROTOCOL_ERROR, CLIENT_TOO_MANY_STREAMS);
  }

  /**
   * The client broke a rule (opened a stream after it had read our GOAWAY, reset too many, opened too many): nothing
   * from the piece of this read that holds the frame on goes upstream, the client is told the last
   * stream that was taken and why, and both connections close.
   */
  #cutOff(lastTaken: number, errorCode: number, reason: string): void {
    this.#failed(reason);
    this.#upstream.destroy();
    const client = this.#client;
    // Nothing of the model server's has reached the client: a SETTINGS frame of ours is the server preface a GOAWAY must follow.
    const nothingSent = this.#bytesOut === 0;
    if (!nothingSent && !this.#toClient.atBoundary) {
      client.destroy();
      return;
    }
    client.end(nothingSent ? Buffer.concat([EMPTY_SETTINGS, goAway(lastTaken, errorCode)]) : goAway(lastTaken, errorCode));
    // Closed at once, with what the client sent since still unread, the connection was reset, and a
    // client that kept writing (a reset flood) lost the GOAWAY with it: what it sends now is read and
    // dropped (the 'data' listener: the upstream is gone) until it closes, or the grace is up.
    client.resume();
    setTimeout(() => client.destroy(), CUT_OFF_GRACE_MS).unref();
  }

  /** A graceful GOAWAY at the next frame boundary toward the client. */
  closeGracefully(): void {
    this.#toClient.request(this.#write);
  }

  /**
   * No stream open for the idle timeout: a graceful GOAWAY, after which a client
   * closes the connection itself; one still there after another idle spell is ended.
   */
  closeIdle(): boolean {
    if (this.#idleClosed) {
      this.#client.end();
      this.#upstream.end();
      return false;
    }
    this.#idleClosed = true;
    this.closeGracefully();
    return true;
  }

  #failed(reason: string): void {
    this.#error ??= reason;
  }

  #report(): void {
    const { identity, listener, remoteAddress } = this.#context;
    this.#observer.relayed({
      listener,
      remote: remoteAddress,
      subject: identity.subject,
      serial: identity.serial,
      calls: this.streams.started,
      bytesIn: this.#bytesIn,
      bytesOut: this.#bytesOut,
      durationMs: elapsedMs(this.#started),
      goAway: this.#toClient.sent,
      idle: this.#idleClosed,
      error: this.#error,
      clientGoAway: this.#clientGoAway?.code,
      clientGoAwayDebug: this.#clientGoAway?.debug,
      upstreamGoAway: this.#upstreamGoAway?.code,
      upstreamGoAwayDebug: this.#upstreamGoAway?.debug,
    });
  }
}

/** The stream that was one too many: the last stream id taken before it, and the limit it broke. */
interface TooManyStreams {
  readonly lastTaken: number;
  readonly limit: number;
  /** Whether the client had acknowledged the SETTINGS with our limit. */
  readonly acknowledged: boolean;
}

interface SeenGoAway {
  readonly code: string;
  readonly debug: string | undefined;
}

/** Debug data is opaque bytes (RFC 9113 section 6.8); what gRPC servers put there is ASCII. */
function seenGoAway(code: number, debug: Buffer): SeenGoAway {
  return { code: h2ErrorName(code), debug: debug.length === 0 ? undefined : debug.toString('latin1').replace(/[^\x20-\x7e]/g, '?') };
}
