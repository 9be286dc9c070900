import type { Refusal } from './client-identity.js';
import type { ConnectionContext } from './listeners.js';

export type ListenerName = 'grpc' | 'rest';

/** Milliseconds since `started` (a performance.now() reading), to the microsecond. */
export function elapsedMs(started: number): number {
  return Math.round((performance.now() - started) * 1000) / 1000;
}

/** Whose connection a record is about: its listener and its client. */
export interface ClientRef {
  readonly listener: ListenerName;
  readonly remote: string | undefined;
  readonly subject: string;
  readonly serial: string;
}

export function clientRef(context: ConnectionContext): ClientRef {
  return { listener: context.listener, remote: context.remoteAddress, subject: context.identity.subject, serial: context.identity.serial };
}

/** One finished request or RPC: the access-log line and the request metrics. */
export interface AccessRecord extends ClientRef {
  readonly protocol: 'h2' | 'http/1.1';
  readonly method: string;
  readonly path: string;
  readonly status: number;
  /** gRPC status from trailers (or Trailers-Only headers); undefined for REST or when none came. */
  readonly grpcStatus?: string | undefined;
  readonly bytesIn: number;
  readonly bytesOut: number;
  readonly durationMs: number;
  /** Set when the call failed because of the upstream or the client going away. */
  readonly error?: string | undefined;
  /** Only with `error`, for a request the proxy refused itself: why, as its answer told the client. */
  readonly detail?: string | undefined;
}

/** One relayed connection (`--mtls_grpc_mode relay`), reported when it closes: the relay sees no calls. */
export interface RelayRecord extends ClientRef {
  /** Calls the client started (HTTP/2 streams), counted from frame headers. */
  readonly calls: number;
  readonly bytesIn: number;
  readonly bytesOut: number;
  readonly durationMs: number;
  /** We sent the client a GOAWAY (drain, revocation or idle). */
  readonly goAway: boolean;
  /** We closed it for having no stream open for --mtls_idle_timeout. */
  readonly idle: boolean;
  readonly error?: string | undefined;
  /** The last GOAWAY each side sent, when one did: its error code's name (NO_ERROR, ENHANCE_YOUR_CALM...) and debug data. */
  readonly clientGoAway?: string | undefined;
  readonly clientGoAwayDebug?: string | undefined;
  readonly upstreamGoAway?: string | undefined;
  readonly upstreamGoAwayDebug?: string | undefined;
}

/** HTTP/2 requests Node reset on a connection before any handler of ours saw them, so they have no access line. */
export interface UnseenResets extends ClientRef {
  /** How many: stream ids the client used that never reached our handlers. */
  readonly streams: number;
  /**
   * Stream ids passed over besides, more than the client's bytes could have opened streams on: a client
   * may skip ids (RFC 9113 5.1.1), so `streams` is then an upper bound.
   */
  readonly skippedIds?: number;
  /**
   * Node ended the whole connection over them: a header field it cannot decode at all (over 64 KiB as
   * sent), answered with GOAWAY(COMPRESSION_ERROR); the requests in flight on it were cut too.
   */
  readonly goAway?: 'COMPRESSION_ERROR';
}

/**
 * An HTTP/2 connection Node ended with an error of its own: a flood its nghttp2 detected (about a
 * thousand PINGs or SETTINGS in one read), a protocol error, the client's GOAWAY with an error code.
 * Not the client's socket going away (ECONNRESET, EPIPE), which ends connections every day.
 */
export interface H2SessionFailure extends ClientRef {
  readonly code: string;
  readonly message: string;
  /** The proxy ended it itself (the gRPC relay, which has no Node HTTP/2 session to do it). */
  readonly byProxy?: true;
}

/**
 * A client of an HTTP/1.1 connection or a relayed gRPC one that took none of the bytes waiting for it,
 * and sent none, for --mtls_idle_timeout (send-stall.ts): closed, what was in flight on it cut.
 */
export interface UnresponsiveClient extends ClientRef {
  /** What the proxy held for it beyond what the kernel took (the kernel's buffers hold more). */
  readonly waitingBytes: number;
  readonly idleTimeoutMs: number;
}

/**
 * What the data path reports. The logger and the metrics registry each
 * implement it; the data path knows neither.
 */
export interface ProxyObserver {
  handshakeAccepted(listener: ListenerName): void;
  /** `subject` and `serial` are the client certificate's, when it sent one. */
  handshakeRefused(listener: ListenerName, refusal: Refusal, remote: string | undefined, subject?: string, serial?: string): void;
  /** `why`: what this connection did, where the reason's own words (handshake-failures.ts) are not enough. */
  handshakeFailed(listener: ListenerName, code: string, remote: string | undefined, why?: string): void;
  /** Closed before its handshake to keep descriptors spare; the headroom logs these itself, a line per interval. */
  openFilesRefused(listener: ListenerName): void;
  connectionOpened(listener: ListenerName): void;
  connectionClosed(listener: ListenerName): void;
  streamOpened(listener: ListenerName): void;
  streamClosed(listener: ListenerName): void;
  request(record: AccessRecord): void;
  relayed(record: RelayRecord): void;
  /**
   * `code` is the metrics label and the log line's `reason`; `detail` says which upstream and what failed, as the
   * client's 502 / UNAVAILABLE does (describeUpstreamError): the log had only "upstream error" and the code.
   */
  upstreamError(listener: ListenerName, code: string, detail: string): void;
  unseenResets(record: UnseenResets): void;
  h2SessionFailed(record: H2SessionFailure): void;
  clientUnresponsive(record: UnresponsiveClient): void;
}

export const NOOP_OBSERVER: ProxyObserver = {
  handshakeAccepted() {},
  handshakeRefused() {},
  handshakeFailed() {},
  openFilesRefused() {},
  connectionOpened() {},
  connectionClosed() {},
  streamOpened() {},
  streamClosed() {},
  request() {},
  relayed() {},
  upstreamError() {},
  unseenResets() {},
  h2SessionFailed() {},
  clientUnresponsive() {},
};

/** Fans every event out to several observers. */
export function combineObservers(...observers: ProxyObserver[]): ProxyObserver {
  const list = observers.filter((o) => o !== NOOP_OBSERVER);
  if (list.length === 1) return list[0]!;
  const combined = {} as Record<keyof ProxyObserver, (...args: unknown[]) => void>;
  for (const key of Object.keys(NOOP_OBSERVER) as (keyof ProxyObserver)[]) {
    combined[key] = (...args: unknown[]) => {
      for (const o of list) (o[key] as (...a: unknown[]) => void)(...args);
    };
  }
  return combined as unknown as ProxyObserver;
}
