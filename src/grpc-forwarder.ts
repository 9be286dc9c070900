import { constants, type ClientHttp2Session, type ClientHttp2Stream, type IncomingHttpHeaders, type OutgoingHttpHeaders, type ServerHttp2Stream } from 'node:http2';
import type { HostPort, Limits } from './config.js';
import { requestStart, type ConnectionContext } from './listeners.js';
import { elapsedMs, type ProxyObserver } from './observer.js';
import { GRPC_STATUS, encodeGrpcMessage, grpcErrorHeaders, grpcTimeoutMs, statusForReset } from './grpc-status.js';
import { describeUpstreamError } from './upstream-errors.js';
import { UpstreamH2Sessions, isSessionRefusal, spokeHttp2 } from './upstream-h2.js';
import { forward } from './stream-forward.js';
import { XFCC, disguisesOurs, setForwardingHeaders } from './forwarding-headers.js';
import { CancelTally } from './cancel-tally.js';
import { resetClientStream } from './reset-allowance.js';
import { hostAndPort } from './addresses.js';
import { forwardedHeaderBlockLimit, headerBlockBound, headerListSize } from './header-sizes.js';

const { NGHTTP2_CANCEL, NGHTTP2_ENHANCE_YOUR_CALM, NGHTTP2_NO_ERROR, NGHTTP2_REFUSED_STREAM, NGHTTP2_FLAG_END_STREAM } = constants;

/**
 * On a working connection our RST_STREAM for a call the client left goes out at once, and Node
 * then closes the upstream stream. Still open after this long, the connection is checked
 * (UpstreamH2Sessions.suspect).
 */
export const CANCEL_SENT_MS = 2000;

/** A reset after this share of the call's grpc-timeout is logged as its deadline passing. */
const DEADLINE_SLACK = 0.9;

/** Headers that must not cross an HTTP/2 hop; `session.request` throws on them. */
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'upgrade', 'http2-settings', 'host']);

/**
 * The one connection-specific field nghttp2 lets through in a response or trailers it receives
 * (it drops the stream on the others), and on which Node's respond() and sendTrailers() throw
 * ERR_HTTP2_INVALID_CONNECTION_HEADERS: thrown in an event handler, that ended the process.
 */
const CONNECTION_SPECIFIC_RECEIVED = 'http2-settings';

export interface GrpcForwarderOptions {
  readonly upstream: HostPort;
  readonly limits: Limits;
  /** h2c connections to the upstream that calls take in turn (--mtls_grpc_upstream_connections); 1 when not given. */
  readonly upstreamConnections?: number;
  readonly observer: ProxyObserver;
  /** Returns why the upstream cannot take calls yet (OVMS still starting), or undefined when ready. */
  readonly notReady?: () => string | undefined;
}

/**
 * Forwards any gRPC method, byte for byte, from a client HTTP/2 stream to an
 * upstream h2c stream: no method table, no protobuf decoding. Headers,
 * metadata, trailers, Trailers-Only responses, resets and flow control pass
 * through; x-forwarded-client-cert is replaced, X-Forwarded-For/-Proto are
 * set as the REST forwarder sets them, and `:scheme` is rewritten.
 */
export class GrpcForwarder {
  readonly #options: GrpcForwarderOptions;
  readonly #shared: CallShared;

  constructor(options: GrpcForwarderOptions) {
    this.#options = options;
    this.#shared = { pool: new UpstreamH2Sessions(options.upstream, options.limits, options.upstreamConnections ?? 1), cancels: new CancelTally(), calls: new Set() };
  }

  handle(stream: ServerHttp2Stream, headers: IncomingHttpHeaders, context: ConnectionContext): void {
    const notReady = this.#options.notReady?.();
    if (notReady !== undefined) {
      answerLocally(stream, headers, context, this.#options.observer, { grpcStatus: GRPC_STATUS.UNAVAILABLE, message: notReady, error: 'not_ready' });
      return;
    }
    if (headers[':method'] === 'CONNECT') {
      answerLocally(stream, headers, context, this.#options.observer, CONNECT_REFUSED);
      return;
    }
    if (this.#shared.cancels.defers(context)) {
      // A reset with an error code meanwhile makes the stream emit 'error': unheard, it would end the process.
      stream.on('error', ignore);
      setImmediate(() => this.#startUnlessReset(stream, headers, context));
      return;
    }
    new GrpcCall(stream, headers, context, this.#options, this.#shared).start();
  }

  #startUnlessReset(stream: ServerHttp2Stream, headers: IncomingHttpHeaders, context: ConnectionContext): void {
    if (stream.closed || stream.destroyed) {
      this.#options.observer.request(accessRecord(context, headers, { status: 0, grpcStatus: undefined, bytesIn: 0, bytesOut: 0, started: performance.now(), error: context.closedBy ?? 'client_cancelled' }));
      return;
    }
    new GrpcCall(stream, headers, context, this.#options, this.#shared).start();
  }

  /**
   * The shutdown timeout is running out: every call still in flight gets `message` as an
   * UNAVAILABLE status (Trailers-Only, or trailers after its response), and its upstream
   * call is cancelled, rather than the connection being cut under it.
   */
  endAll(message: string): void {
    for (const call of this.#shared.calls) call.end(message);
  }

  /** Closes the upstream connections: gracefully, destroyed after `graceMs`. */
  close(graceMs: number): Promise<void> {
    return this.#shared.pool.close(graceMs);
  }
}

/** What every call of a forwarder shares. */
interface CallShared {
  readonly pool: UpstreamH2Sessions;
  readonly cancels: CancelTally;
  /** Calls whose client stream is still open. */
  readonly calls: Set<GrpcCall>;
}

/**
 * Node joins the values of a repeated field into one ("a, b") and would send them
 * on as one field: a gRPC server then reads one metadata value "a, b" where the
 * client sent two, and a repeated `-bin` value as base64 that does not decode.
 * Each value Node joined goes on as a field of its own, as the relay passes them.
 * `raw` is the flat name, value list Node passes with the headers; only a field
 * Node joined is touched (it keeps the first of a single-value field), so most calls
 * get their headers object back as it is. Cookies, which Node joins with "; ", are
 * separated too: `cookie` metadata sent twice had reached the model server as one
 * value "a=1; b=2" (RFC 9113 8.2.3 asks that join only of a hop to HTTP/1.1).
 * Linear in the fields: one name sent 2,000 times (a 2 KiB header block, each
 * repeat one HPACK byte) had each of them gather all the others, 40 ms of the
 * event loop per call.
 */
export function separateRepeated(headers: IncomingHttpHeaders, raw: readonly string[] | undefined): IncomingHttpHeaders {
  if (!raw || !anyJoined(headers, raw)) return headers;
  let out: IncomingHttpHeaders | undefined;
  for (const [name, values] of valuesByName(raw)) {
    if (values.length > 1 && values.join(name === 'cookie' ? '; ' : ', ') === headers[name]) (out ??= { ...headers })[name] = values;
  }
  return out ?? headers;
}

/** Whether the headers object holds a value other than the field's own for some field: Node joined, or kept only the first. */
function anyJoined(headers: IncomingHttpHeaders, raw: readonly string[]): boolean {
  for (let i = 0; i < raw.length; i += 2) {
    const kept = headers[raw[i]!];
    if (typeof kept === 'string' && kept !== raw[i + 1]) return true;
  }
  return false;
}

/** Each name of a flat name, value list with its values in the order sent. */
function valuesByName(raw: readonly string[]): Map<string, string[]> {
  const byName = new Map<string, string[]>();
  for (let i = 0; i < raw.length; i += 2) {
    const values = byName.get(raw[i]!);
    if (values) values.push(raw[i + 1]!);
    else byName.set(raw[i]!, [raw[i + 1]!]);
  }
  return byName;
}

/** A final status Node's respond() sends (RFC 9110 15: 1xx are interim, none goes past 599). */
function sendableStatus(status: number): boolean {
  return status >= 200 && status <= 599;
}

/** The model server's response headers or trailers as the client's stream can send them. */
function forClient(headers: IncomingHttpHeaders): IncomingHttpHeaders {
  if (headers[CONNECTION_SPECIFIC_RECEIVED] === undefined) return headers;
  const out = { ...headers };
  delete out[CONNECTION_SPECIFIC_RECEIVED];
  return out;
}

export function upstreamRequestHeaders(headers: IncomingHttpHeaders, context: ConnectionContext): OutgoingHttpHeaders {
  // No prototype, as Node's own headers objects: assigned to a plain object, a `__proto__` key
  // (a legal metadata key) set its prototype instead, and the model server never got it.
  const out = Object.create(null) as OutgoingHttpHeaders;
  for (const name in headers) {
    if (HOP_BY_HOP.has(name) || name === XFCC || disguisesOurs(name)) continue;
    out[name] = headers[name];
  }
  out[':scheme'] = 'http';
  // A client may name the authority by a Host line alone (RFC 9113 8.3.1): it goes on as :authority, not
  // replaced by Node's default, our upstream's address, which for an IPv6 one even loses its brackets (`::1:9000`).
  if (out[':authority'] === undefined && headers.host !== undefined) out[':authority'] = headers.host;
  // C-core servers (OVMS is one) reject requests without `te: trailers`.
  if (headers['te'] !== 'trailers') delete out['te'];
  if (out['te'] === undefined && String(headers['content-type'] ?? '').startsWith('application/grpc')) out['te'] = 'trailers';
  setForwardingHeaders(out, headers['x-forwarded-for'], context);
  return out;
}

function ignore(): void {}

/** A status of ours as trailers. */
function statusTrailers(status: number, message: string): OutgoingHttpHeaders {
  return { 'grpc-status': String(status), 'grpc-message': encodeGrpcMessage(message) };
}

/** Why a request's metadata is not sent on: the model server's limit, or ours when it is the lower. */
function metadataTooLarge(size: number, pool: UpstreamH2Sessions): string {
  const included = 'x-forwarded-client-cert included';
  if (size > pool.maxHeaderListSize) {
    return `request metadata of ${size} bytes is over the ${pool.maxHeaderListSize} bytes the model server accepts (its HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE, ${included})`;
  }
  return `request metadata of ${size} bytes is over the ${pool.maxSendHeaderListSize} bytes this proxy forwards (twice --mtls_max_header_size, ${included})`;
}

/** What the proxy answers by itself, without the upstream. */
interface LocalAnswer {
  readonly grpcStatus: number;
  readonly message: string;
  readonly error: string;
  /** HTTP status; 200 (a gRPC error rides on a 200) unless said. */
  readonly status?: number;
  readonly headers?: OutgoingHttpHeaders;
}

/**
 * A CONNECT (a tunnel request, not a call) can never be forwarded: Node's client
 * will not send one with `:scheme`. Answered as gRPC servers answer any method
 * but POST: 405 with an INTERNAL gRPC status (grpc-go does the same).
 */
const CONNECT_REFUSED: LocalAnswer = {
  grpcStatus: GRPC_STATUS.INTERNAL,
  message: 'CONNECT is not forwarded: gRPC calls are POST requests',
  error: 'method_not_allowed',
  status: 405,
  headers: { allow: 'POST' },
};

/** A Trailers-Only answer of ours; a client still sending is stopped, and the call logged. */
function answerLocally(stream: ServerHttp2Stream, headers: IncomingHttpHeaders, context: ConnectionContext, observer: ProxyObserver, answer: LocalAnswer): void {
  const started = requestStart(context);
  const status = answer.status ?? 200;
  stream.on('error', ignore);
  stream.respond({ ...grpcErrorHeaders(answer.grpcStatus, answer.message), ...answer.headers, ':status': status }, { endStream: true });
  stopRequestBody(stream);
  observer.request(accessRecord(context, headers, { status, grpcStatus: String(answer.grpcStatus), bytesIn: 0, bytesOut: 0, started, error: answer.error }));
}

/**
 * The answer is complete: a client still sending is told to stop with
 * RST_STREAM(NO_ERROR) once the answer is out (RFC 9113 8.1; Node waits for the
 * stream's 'finish'), and what it still sends is dropped. Without this the
 * stream stays open for as long as the client keeps sending.
 */
function stopRequestBody(stream: ServerHttp2Stream): void {
  stream.resume();
  // Not in the tick of respond(): Node 22 then sent the RST_STREAM before the answer's HEADERS, and
  // a client still sending got no status at all (grpc-js: INTERNAL "Received RST_STREAM with code 0
  // (Call ended without gRPC status)" for the UNAVAILABLE of a model server still starting).
  setImmediate(() => {
    if (!stream.readableEnded && !stream.closed && !stream.destroyed) stream.close(NGHTTP2_NO_ERROR);
  });
}

interface CallOutcome {
  status: number;
  grpcStatus: string | undefined;
  bytesIn: number;
  bytesOut: number;
  started: number;
  error?: string | undefined;
}

/**
 * What the access line shows as the path: `:path`, or for a CONNECT, which has none (RFC 9113
 * 8.5), its `:authority`, as the REST port logs one (HTTP/1.1's authority-form target). The
 * line had said "undefined".
 */
function requestTarget(headers: IncomingHttpHeaders): string {
  return headers[':path'] ?? headers[':authority'] ?? '';
}

function accessRecord(context: ConnectionContext, headers: IncomingHttpHeaders, o: CallOutcome) {
  return {
    listener: context.listener,
    protocol: 'h2' as const,
    remote: context.remoteAddress,
    subject: context.identity.subject,
    serial: context.identity.serial,
    method: String(headers[':method']),
    path: requestTarget(headers),
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
  readonly #shared: CallShared;
  readonly #outcome: CallOutcome;
  #upstream: ClientHttp2Stream | undefined;
  #session: ClientHttp2Session | undefined;
  #trailers: OutgoingHttpHeaders | undefined;
  /** The upstream stream's first error, kept for the client's message: a refused connection names the addresses tried. */
  #upstreamError: unknown;
  /** The upstream's side of the call is over: trailers or Trailers-Only seen, or its response ended without them. */
  #upstreamDone = false;
  /** The client has been given a status of ours; the first one given is the one it gets. */
  #statusGiven = false;
  /** The client's stream has been given its end: trailers, or a Trailers-Only answer. */
  #statusSent = false;
  #unforwardRequest: (() => void) | undefined;
  #unforwardResponse: (() => void) | undefined;

  constructor(client: ServerHttp2Stream, headers: IncomingHttpHeaders, context: ConnectionContext, options: GrpcForwarderOptions, shared: CallShared) {
    this.#client = client;
    this.#headers = headers;
    this.#context = context;
    this.#options = options;
    this.#shared = shared;
    this.#outcome = { status: 0, grpcStatus: undefined, bytesIn: 0, bytesOut: 0, started: requestStart(context) };
  }

  start(): void {
    const client = this.#client;
    this.#shared.calls.add(this);
    // `on`, not `once`, for events a stream emits at most once: no wrapper per call (issue #6).
    client.on('error', ignore);
    client.on('close', () => this.#onClientClose());
    client.on('wantTrailers', () => {
      // No trailers of the model server's nor status of ours: it ended its response with END_STREAM on a DATA
      // frame. While the client still sends (a ModelStreamInfer stream) its call stays open, so no 'close' says so.
      if (this.#trailers === undefined) this.#endedWithoutStatus();
      client.sendTrailers(this.#trailers ?? {});
      this.#statusSent = true;
      // Most calls have sent their whole request by now: nothing to stop. Otherwise the reset
      // that stops the client waits a turn: Node frames the trailers after this handler
      // returns, and a reset submitted here goes out first and discards them (the client then
      // sees RST_STREAM(NO_ERROR) with no status at all).
      if (!client.readableEnded) setImmediate(() => this.#stopRequest());
    });
    const headers = upstreamRequestHeaders(this.#headers, this.#context);
    const size = headerListSize(headers);
    const pool = this.#shared.pool;
    if (size > pool.maxHeaderListSize || size > pool.maxSendHeaderListSize) {
      this.#finishWithStatus(GRPC_STATUS.RESOURCE_EXHAUSTED, metadataTooLarge(size, pool), 'request_headers_too_large');
      return;
    }
    let upstream: ClientHttp2Stream;
    try {
      upstream = this.#openUpstream(headers);
    } catch (err) {
      if (this.#session && isSessionRefusal(this.#session, err)) this.#fail(err);
      else this.#finishWithStatus(GRPC_STATUS.INTERNAL, 'this request cannot be forwarded over HTTP/2', 'request_not_forwardable');
      return;
    }
    this.#upstream = upstream;
    upstream.on('error', (err) => this.#onUpstreamError(err));
    upstream.on('response', (headers, flags, raw?: string[]) => this.#onResponse(forClient(separateRepeated(headers, raw)), flags));
    upstream.on('trailers', (received, _flags, raw?: string[]) => {
      const trailers = forClient(separateRepeated(received, raw));
      this.#upstreamDone = true;
      const tooLarge = this.#overOurLimit(trailers, 'trailing metadata');
      if (tooLarge !== undefined) {
        this.#refuseTrailers(tooLarge);
        return;
      }
      this.#trailers = trailers;
      this.#outcome.grpcStatus = trailers['grpc-status'] as string | undefined;
    });
    upstream.on('close', () => this.#onUpstreamClose());
    if (!client.endAfterHeaders) this.#unforwardRequest = forward(client, upstream, this.#options.limits.streamWindow, (n) => (this.#outcome.bytesIn += n));
  }

  #openUpstream(headers: OutgoingHttpHeaders): ClientHttp2Stream {
    const options = { endStream: this.#client.endAfterHeaders };
    const session = this.#shared.pool.current();
    try {
      this.#session = session;
      return session.request(headers, options);
    } catch (err) {
      // A request Node will not build says nothing about the session every client shares: that call alone fails.
      if (!isSessionRefusal(session, err)) throw err;
      // The session is closing (GOAWAY) but had not told us yet: one retry on a fresh one.
      this.#shared.pool.discard(session);
      this.#session = this.#shared.pool.current();
      return this.#session.request(headers, options);
    }
  }

  #onResponse(headers: IncomingHttpHeaders, flags: number): void {
    const client = this.#client;
    const upstream = this.#upstream!;
    this.#outcome.status = Number(headers[':status']);
    if (client.closed || client.destroyed) return;
    if (!sendableStatus(this.#outcome.status)) {
      this.#refuseStatus(upstream);
      return;
    }
    const tooLarge = this.#overOurLimit(headers, 'response metadata');
    if (tooLarge !== undefined) {
      this.#refuseHeaders(upstream, flags, tooLarge);
      return;
    }
    if (flags & NGHTTP2_FLAG_END_STREAM) {
      // Trailers-Only: one HEADERS frame carrying the status; keep it that way (FINDINGS).
      this.#upstreamDone = true;
      this.#outcome.grpcStatus = headers['grpc-status'] as string | undefined;
      client.respond(headers, { endStream: true });
      this.#statusSent = true;
      upstream.resume();
      this.#stopRequest();
      return;
    }
    client.respond(headers, { waitForTrailers: true });
    this.#unforwardResponse = forward(upstream, client, this.#options.limits.streamWindow, (n) => (this.#outcome.bytesOut += n));
  }

  /**
   * nghttp2 takes any three digits for a status; Node's respond() throws on one past 599, and
   * thrown in the 'response' handler that ended the process. The call fails alone.
   */
  #refuseStatus(upstream: ClientHttp2Stream): void {
    const status = this.#outcome.status;
    this.#finishWithStatus(GRPC_STATUS.INTERNAL, `${this.#where()} answered with HTTP status ${status}, which is no HTTP response status`, 'bad_response');
    upstream.close(NGHTTP2_CANCEL);
  }

  /**
   * Node holds the model server's answers to our SETTINGS_MAX_HEADER_LIST_SIZE (twice the limit) only once it
   * has acknowledged them: a call opened before that (the first on each upstream connection) takes any. The
   * client's stream then refused to send one over what the front sends (maxSendHeaderBlockLength, the same
   * twice), with RST_STREAM(FRAME_SIZE_ERROR), which was logged as the client's cancel. Counted as Node counts
   * what it receives (32 bytes a field), so the first call is held to the limit of the later ones; and by
   * nghttp2's bound of what it sends, over that only for two or three fields a few bytes within the limit.
   */
  #overOurLimit(fields: IncomingHttpHeaders, what: 'response metadata' | 'trailing metadata'): string | undefined {
    const size = Math.max(headerListSize(fields), headerBlockBound(fields, what === 'response metadata'));
    const limit = forwardedHeaderBlockLimit(this.#options.limits.maxHeaderSize);
    if (size <= limit) return undefined;
    return `${this.#where()} answered with ${what} of ${size} bytes, over the ${limit} bytes this proxy takes (twice --mtls_max_header_size)`;
  }

  /** The client gets our status in place of the answer, and the model server a cancel for a call it is still answering. */
  #refuseHeaders(upstream: ClientHttp2Stream, flags: number, message: string): void {
    this.#options.observer.upstreamError(this.#context.listener, 'bad_response', message);
    // A Trailers-Only answer is the model server's whole call: nothing to cancel, and no client cancel to count.
    if (flags & NGHTTP2_FLAG_END_STREAM) this.#upstreamDone = true;
    this.#finishWithStatus(GRPC_STATUS.RESOURCE_EXHAUSTED, message, 'bad_response');
    if (!this.#upstreamDone) upstream.close(NGHTTP2_CANCEL);
  }

  /** The answer, already going to the client, ends with our status in place of the model server's trailers. */
  #refuseTrailers(message: string): void {
    this.#options.observer.upstreamError(this.#context.listener, 'bad_response', message);
    if (this.#statusGiven) return;
    this.#statusGiven = true;
    this.#outcome.error = 'bad_response';
    this.#outcome.grpcStatus = String(GRPC_STATUS.RESOURCE_EXHAUSTED);
    this.#trailers = statusTrailers(GRPC_STATUS.RESOURCE_EXHAUSTED, message);
  }

  #onUpstreamError(err: unknown): void {
    if (this.#outcome.error !== undefined) return;
    this.#upstreamError = err;
    this.#outcome.error = describeUpstreamError(this.#options.upstream, err).code;
  }

  #onUpstreamClose(): void {
    const client = this.#client;
    const upstream = this.#upstream!;
    if (client.closed || client.destroyed) return;
    if (this.#upstreamDone) {
      if (!upstream.readableEnded && !client.writableEnded) this.#deliverHeldResponse(upstream);
      return;
    }
    if (upstream.rstCode === NGHTTP2_REFUSED_STREAM && !client.headersSent) {
      this.#refuse();
      return;
    }
    const sessionGone = !this.#session || this.#session.destroyed || this.#session.closed;
    if (sessionGone) {
      this.#fail(this.#outcome.error ? { code: this.#outcome.error, cause: this.#upstreamError } : { code: 'ECONNRESET' });
      return;
    }
    const rstCode = upstream.rstCode ?? NGHTTP2_NO_ERROR;
    if (rstCode === NGHTTP2_NO_ERROR) {
      this.#endedWithoutStatus();
      return;
    }
    if (rstCode === NGHTTP2_ENHANCE_YOUR_CALM) this.#shared.pool.discard(this.#session!);
    // The upstream reset this one stream. Node cannot send a bare RST_STREAM with a chosen
    // code on a stream whose response is open (close(code) writes END_STREAM first), so the
    // client gets the status the gRPC spec derives from that reset code, with a message.
    const reset = statusForReset(rstCode);
    this.#finishWithStatus(reset.status, this.#resetMessage(rstCode, reset.name), `upstream_reset_${rstCode}`);
  }

  /**
   * Once the model server has acknowledged our SETTINGS, Node resets a call itself, with ENHANCE_YOUR_CALM, when its
   * answer's metadata is over our SETTINGS_MAX_HEADER_LIST_SIZE (the limit #overOurLimit holds the first call to), and
   * tells no JavaScript code: the stream closes with that code as when the model server resets it (no event, state or
   * performance entry differs). The likelier cause, with the option to change, comes first. Node also resets so every
   * answer on a connection whose count of its own memory has gone wrong, for good (seen on Node 20, 22 and 24 after uploads
   * cancelled under small windows: every call of every client failed from then on), so the connection is replaced
   * (#onUpstreamClose); its calls under way finish on it.
   */
  #resetMessage(rstCode: number, name: string): string {
    if (rstCode !== NGHTTP2_ENHANCE_YOUR_CALM) return `${this.#where()} reset the call (${name})`;
    const limit = forwardedHeaderBlockLimit(this.#options.limits.maxHeaderSize);
    return `the call was reset (${name}), most likely by this proxy's HTTP/2 client because ${this.#where()} answered with metadata over the ${limit} bytes this proxy takes (twice --mtls_max_header_size): Node resets such an answer without saying why; else by ${this.#where()} itself, or by Node for its own miscount of the connection's memory (the next calls go over a new connection)`;
  }

  /**
   * END_STREAM or RST_STREAM(NO_ERROR) without a grpc-status: INTERNAL by the gRPC spec, and not
   * worth a retry. The connection is fine, so this is no upstream connection failure; nor did the
   * client cancel when it is then stopped from sending: the model server's side of the call is done.
   */
  #endedWithoutStatus(): void {
    this.#upstreamDone = true;
    this.#finishWithStatus(GRPC_STATUS.INTERNAL, `${this.#where()} ended the call without a gRPC status`, 'upstream_no_status');
  }

  #where(): string {
    return `upstream ${hostAndPort(this.#options.upstream.host, this.#options.upstream.port)}`;
  }

  /**
   * The whole response had come (its trailers), then an RST_STREAM with an error code: a server
   * that stops reading a request it answered early (h2 before 0.3.16 sends CANCEL). Node then
   * destroys the stream, and the rest of the response it still held for a client that reads
   * slowly was never emitted, nor its 'end': the client waited for good. It goes on from here.
   */
  #deliverHeldResponse(upstream: ClientHttp2Stream): void {
    const client = this.#client;
    this.#unforwardResponse?.();
    for (let chunk: Buffer | null = upstream.read(); chunk !== null; chunk = upstream.read()) {
      this.#outcome.bytesOut += chunk.length;
      client.write(chunk);
    }
    client.end();
  }

  /**
   * The model server did not process the call: a stream past the last one its GOAWAY took (a
   * restart), still queued for a free stream when the GOAWAY came, or refused by an RST_STREAM.
   * The client gets RST_STREAM(REFUSED_STREAM) too, on which gRPC clients retry the call
   * transparently (here, on the proxy's next upstream connection), as they would have on the
   * model server's own; a status of ours (UNAVAILABLE) would end the call.
   */
  #refuse(): void {
    this.#statusGiven = true;
    this.#outcome.error = 'upstream_refused_stream';
    this.#unforwardRequest?.();
    resetClientStream(this.#client, NGHTTP2_REFUSED_STREAM);
  }

  /** The proxy stops (endAll): the client gets UNAVAILABLE saying so, the model server a cancel. */
  end(message: string): void {
    // Answered in full by the model server, still on its way to a slow client: that answer stands.
    if (this.#upstreamDone) return;
    this.#finishWithStatus(GRPC_STATUS.UNAVAILABLE, message, 'shutdown_timeout');
    const upstream = this.#upstream;
    if (upstream && !upstream.closed && !upstream.destroyed) upstream.close(NGHTTP2_CANCEL);
  }

  /** The upstream cannot finish the call: the client gets UNAVAILABLE, never a hang. */
  #fail(err: unknown): void {
    const { code, message } = describeUpstreamError(this.#options.upstream, err, spokeHttp2(this.#session));
    this.#options.observer.upstreamError(this.#context.listener, code, message);
    this.#finishWithStatus(GRPC_STATUS.UNAVAILABLE, message, code);
  }

  /** Ends the client call with this status: Trailers-Only before the response started, trailers after. */
  #finishWithStatus(status: number, message: string, errorCode: string): void {
    const client = this.#client;
    if (this.#statusGiven) return;
    this.#statusGiven = true;
    this.#outcome.error = errorCode;
    this.#outcome.grpcStatus = String(status);
    if (client.closed || client.destroyed) return;
    if (!client.headersSent) {
      this.#outcome.status = 200;
      client.respond(grpcErrorHeaders(status, message), { endStream: true });
      this.#statusSent = true;
      this.#stopRequest();
      return;
    }
    this.#unforwardRequest?.();
    client.resume();
    this.#trailers = statusTrailers(status, message);
    this.#unforwardResponse?.();
    if (!client.writableEnded) client.end();
  }

  /** The response to the client is complete: none of its request body goes upstream any more. */
  #stopRequest(): void {
    this.#unforwardRequest?.();
    stopRequestBody(this.#client);
  }

  #onClientClose(): void {
    this.#shared.calls.delete(this);
    const upstream = this.#upstream;
    if (upstream && !upstream.closed && !upstream.destroyed) {
      if (this.#upstreamDone) {
        // The upstream answered before it had the whole request; we stopped sending it.
        upstream.close(NGHTTP2_NO_ERROR);
      } else {
        // Client cancelled (RST_STREAM) or went away, or we cut its connection: free the upstream call at once.
        const code = this.#client.rstCode;
        upstream.close(code === undefined || code === NGHTTP2_NO_ERROR ? NGHTTP2_CANCEL : code);
        this.#watchCancel(upstream);
        this.#clientLeft();
      }
    }
    if (this.#upstreamDone && !this.#statusSent) {
      // The model server's answer was whole, but the client reset its stream (or left) before the end of it
      // reached it, as a slow reader that gives up does: the status it never got is not logged as its outcome.
      this.#outcome.grpcStatus = undefined;
      this.#clientLeft();
    } else if (this.#upstreamDone) {
      this.#shared.cancels.settle(this.#context);
    }
    this.#options.observer.request(accessRecord(this.#context, this.#headers, this.#outcome));
  }

  /** A cancel that has not gone out after CANCEL_SENT_MS is a sign of a connection that no longer reads or writes. */
  #watchCancel(upstream: ClientHttp2Stream): void {
    const session = this.#session;
    if (!session || upstream.destroyed) return;
    const timer = setTimeout(() => this.#shared.pool.suspect(session), CANCEL_SENT_MS).unref();
    upstream.once('close', () => clearTimeout(timer));
  }

  /** The client cancelled (RST_STREAM) or went away, unless we cut its connection (closedBy). */
  #clientLeft(): void {
    this.#outcome.error ??= this.#context.closedBy ?? this.#whyClientReset();
    this.#shared.cancels.count(this.#context);
  }

  /**
   * A client resets its call with CANCEL both when told to and when its deadline passes; only
   * the time tells them apart. A tenth of slack: our clock starts when the headers were read,
   * a little after the client's.
   */
  #whyClientReset(): string {
    const timeoutMs = grpcTimeoutMs(this.#headers['grpc-timeout']);
    return timeoutMs !== undefined && elapsedMs(this.#outcome.started) >= timeoutMs * DEADLINE_SLACK ? 'client_deadline_exceeded' : 'client_cancelled';
  }
}
