import { constants, type ClientHttp2Session, type ClientHttp2Stream, type IncomingHttpHeaders, type OutgoingHttpHeaders, type ServerHttp2Stream } from 'node:http2';
import type { HostPort, Limits } from './config.js';
import type { ConnectionContext } from './listeners.js';
import { elapsedMs, type ProxyObserver } from './observer.js';
import { GRPC_STATUS, encodeGrpcMessage, grpcErrorHeaders, statusForReset } from './grpc-status.js';
import { describeUpstreamError } from './upstream-errors.js';
import { UpstreamH2Session } from './upstream-h2.js';
import { forward } from './stream-forward.js';

const { NGHTTP2_CANCEL, NGHTTP2_NO_ERROR, NGHTTP2_FLAG_END_STREAM } = constants;

/** Headers that must not cross an HTTP/2 hop; `session.request` throws on them. */
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'upgrade', 'http2-settings', 'host']);
export const XFCC = 'x-forwarded-client-cert';

export interface GrpcForwarderOptions {
  readonly upstream: HostPort;
  readonly limits: Limits;
  readonly observer: ProxyObserver;
  /** Returns why the upstream cannot take calls yet (OVMS still starting), or undefined when ready. */
  readonly notReady?: () => string | undefined;
}

/**
 * Forwards any gRPC method, byte for byte, from a client HTTP/2 stream to an
 * upstream h2c stream: no method table, no protobuf decoding. Headers,
 * metadata, trailers, Trailers-Only responses, resets and flow control pass
 * through; only x-forwarded-client-cert is replaced and `:scheme` rewritten.
 */
export class GrpcForwarder {
  readonly #options: GrpcForwarderOptions;
  readonly #upstream: UpstreamH2Session;

  constructor(options: GrpcForwarderOptions) {
    this.#options = options;
    this.#upstream = new UpstreamH2Session(options.upstream, options.limits);
  }

  handle(stream: ServerHttp2Stream, headers: IncomingHttpHeaders, context: ConnectionContext): void {
    const notReady = this.#options.notReady?.();
    if (notReady !== undefined) {
      answerWithoutUpstream(stream, headers, context, this.#options.observer, notReady);
      return;
    }
    new GrpcCall(stream, headers, context, this.#options, this.#upstream).start();
  }

  close(): Promise<void> {
    return this.#upstream.close();
  }
}

export function upstreamRequestHeaders(headers: IncomingHttpHeaders, xfcc: string): OutgoingHttpHeaders {
  const out: OutgoingHttpHeaders = {};
  for (const name in headers) {
    if (HOP_BY_HOP.has(name) || name === XFCC) continue;
    out[name] = headers[name];
  }
  out[':scheme'] = 'http';
  // C-core servers (OVMS is one) reject requests without `te: trailers`.
  if (headers['te'] !== 'trailers') delete out['te'];
  if (out['te'] === undefined && String(headers['content-type'] ?? '').startsWith('application/grpc')) out['te'] = 'trailers';
  out[XFCC] = xfcc;
  return out;
}

function ignore(): void {}

function answerWithoutUpstream(stream: ServerHttp2Stream, headers: IncomingHttpHeaders, context: ConnectionContext, observer: ProxyObserver, message: string): void {
  const started = performance.now();
  stream.on('error', ignore);
  stream.respond(grpcErrorHeaders(GRPC_STATUS.UNAVAILABLE, message), { endStream: true });
  stream.resume();
  observer.request(accessRecord(context, headers, { status: 200, grpcStatus: String(GRPC_STATUS.UNAVAILABLE), bytesIn: 0, bytesOut: 0, started, error: 'not_ready' }));
}

interface CallOutcome {
  status: number;
  grpcStatus: string | undefined;
  bytesIn: number;
  bytesOut: number;
  started: number;
  error?: string | undefined;
}

function accessRecord(context: ConnectionContext, headers: IncomingHttpHeaders, o: CallOutcome) {
  return {
    listener: context.listener,
    protocol: 'h2' as const,
    remote: context.remoteAddress,
    subject: context.identity.subject,
    serial: context.identity.serial,
    method: String(headers[':method']),
    path: String(headers[':path']),
    status: o.status,
    grpcStatus: o.grpcStatus,
    bytesIn: o.bytesIn,
    bytesOut: o.bytesOut,
    durationMs: elapsedMs(o.started),
    error: o.error,
  };
}

/** One proxied call: client stream <-> upstream stream. */
class GrpcCall {
  readonly #client: ServerHttp2Stream;
  readonly #headers: IncomingHttpHeaders;
  readonly #context: ConnectionContext;
  readonly #options: GrpcForwarderOptions;
  readonly #pool: UpstreamH2Session;
  readonly #outcome: CallOutcome;
  #upstream: ClientHttp2Stream | undefined;
  #session: ClientHttp2Session | undefined;
  #trailers: OutgoingHttpHeaders | undefined;
  /** The upstream finished the call properly (trailers or Trailers-Only seen). */
  #upstreamDone = false;
  #unforwardRequest: (() => void) | undefined;
  #unforwardResponse: (() => void) | undefined;

  constructor(client: ServerHttp2Stream, headers: IncomingHttpHeaders, context: ConnectionContext, options: GrpcForwarderOptions, pool: UpstreamH2Session) {
    this.#client = client;
    this.#headers = headers;
    this.#context = context;
    this.#options = options;
    this.#pool = pool;
    this.#outcome = { status: 0, grpcStatus: undefined, bytesIn: 0, bytesOut: 0, started: performance.now() };
  }

  start(): void {
    const client = this.#client;
    // `on`, not `once`, for events a stream emits at most once: no wrapper per call (issue #6).
    client.on('error', ignore);
    client.on('close', () => this.#onClientClose());
    client.on('wantTrailers', () => client.sendTrailers(this.#trailers ?? {}));
    let upstream: ClientHttp2Stream;
    try {
      upstream = this.#openUpstream();
    } catch (err) {
      this.#fail(err);
      return;
    }
    this.#upstream = upstream;
    upstream.on('error', (err) => this.#onUpstreamError(err));
    upstream.on('response', (headers, flags) => this.#onResponse(headers, flags));
    upstream.on('trailers', (trailers) => {
      this.#trailers = trailers;
      this.#outcome.grpcStatus = trailers['grpc-status'] as string | undefined;
      this.#upstreamDone = true;
    });
    upstream.on('close', () => this.#onUpstreamClose());
    if (!client.endAfterHeaders) this.#unforwardRequest = forward(client, upstream, this.#options.limits.streamWindow, (n) => (this.#outcome.bytesIn += n));
  }

  #openUpstream(): ClientHttp2Stream {
    const headers = upstreamRequestHeaders(this.#headers, this.#context.identity.xfcc);
    const options = { endStream: this.#client.endAfterHeaders };
    const session = this.#pool.current();
    try {
      this.#session = session;
      return session.request(headers, options);
    } catch {
      // The session is closing (GOAWAY) but had not told us yet: one retry on a fresh one.
      this.#pool.discard(session);
      this.#session = this.#pool.current();
      return this.#session.request(headers, options);
    }
  }

  #onResponse(headers: IncomingHttpHeaders, flags: number): void {
    const client = this.#client;
    const upstream = this.#upstream!;
    this.#outcome.status = Number(headers[':status']);
    if (client.closed || client.destroyed) return;
    if (flags & NGHTTP2_FLAG_END_STREAM) {
      // Trailers-Only: one HEADERS frame carrying the status; keep it that way (FINDINGS).
      this.#upstreamDone = true;
      this.#outcome.grpcStatus = headers['grpc-status'] as string | undefined;
      client.respond(headers, { endStream: true });
      upstream.resume();
      return;
    }
    client.respond(headers, { waitForTrailers: true });
    this.#unforwardResponse = forward(upstream, client, this.#options.limits.streamWindow, (n) => (this.#outcome.bytesOut += n));
  }

  #onUpstreamError(err: unknown): void {
    if (this.#outcome.error === undefined) this.#outcome.error = describeUpstreamError(this.#options.upstream, err).code;
  }

  #onUpstreamClose(): void {
    const client = this.#client;
    const upstream = this.#upstream!;
    if (this.#upstreamDone || client.closed || client.destroyed) return;
    const sessionGone = !this.#session || this.#session.destroyed || this.#session.closed;
    if (!sessionGone && upstream.rstCode !== undefined && upstream.rstCode !== NGHTTP2_NO_ERROR) {
      // The upstream reset this one stream. Node cannot send a bare RST_STREAM with a chosen
      // code on a stream whose response is open (close(code) writes END_STREAM first), so the
      // client gets the status the gRPC spec derives from that reset code, with a message.
      const reset = statusForReset(upstream.rstCode);
      this.#finishWithStatus(reset.status, `upstream ${this.#options.upstream.host}:${this.#options.upstream.port} reset the call (${reset.name})`, `upstream_reset_${upstream.rstCode}`);
      return;
    }
    this.#fail(this.#outcome.error ? { code: this.#outcome.error } : { code: 'ECONNRESET' });
  }

  /** The upstream cannot finish the call: the client gets UNAVAILABLE, never a hang. */
  #fail(err: unknown): void {
    const { code, message } = describeUpstreamError(this.#options.upstream, err);
    this.#options.observer.upstreamError(this.#context.listener, code);
    this.#finishWithStatus(GRPC_STATUS.UNAVAILABLE, message, code);
  }

  /** Ends the client call with this status: Trailers-Only before the response started, trailers after. */
  #finishWithStatus(status: number, message: string, errorCode: string): void {
    const client = this.#client;
    this.#outcome.error = errorCode;
    this.#outcome.grpcStatus = String(status);
    if (client.closed || client.destroyed) return;
    this.#unforwardRequest?.();
    client.resume();
    if (!client.headersSent) {
      this.#outcome.status = 200;
      client.respond(grpcErrorHeaders(status, message), { endStream: true });
      return;
    }
    this.#trailers = { 'grpc-status': String(status), 'grpc-message': encodeGrpcMessage(message) };
    this.#unforwardResponse?.();
    if (!client.writableEnded) client.end();
  }

  #onClientClose(): void {
    const upstream = this.#upstream;
    if (upstream && !upstream.closed && !upstream.destroyed) {
      // Client cancelled (RST_STREAM) or went away: free the upstream call at once.
      const code = this.#client.rstCode;
      upstream.close(code === undefined || code === NGHTTP2_NO_ERROR ? NGHTTP2_CANCEL : code);
      this.#outcome.error ??= 'client_cancelled';
    }
    this.#options.observer.request(accessRecord(this.#context, this.#headers, this.#outcome));
  }
}
