import { validateHeaderName, validateHeaderValue, type IncomingMessage, type ServerResponse, type OutgoingHttpHeaders, type IncomingHttpHeaders } from 'node:http';
import { constants as http2Constants, Http2ServerResponse, type Http2ServerRequest, type ServerHttp2Stream } from 'node:http2';
import { Readable } from 'node:stream';
import type { Socket } from 'node:net';
import { Pool, buildConnector, type Dispatcher } from 'undici';
import type { HostPort } from './config.js';
import { requestStart, type ConnectionContext } from './listeners.js';
import { elapsedMs, type ProxyObserver } from './observer.js';
import { UPSTREAM_CLOSED_IDLE, describeUpstreamError, isBadResponse } from './upstream-errors.js';
import { FORWARDING_FIELDS, disguisesOurs, pushForwardingFields, setForwardingHeaders } from './forwarding-headers.js';
import { CancelTally } from './cancel-tally.js';
import { resetClientStream } from './reset-allowance.js';
import { ABSOLUTE_FORM, hostAndPort } from './addresses.js';
import { responseHeadTooLargeMessage } from './http1-framing.js';
import { forwardedHeaderBlockLimit, headerBlockBound } from './header-sizes.js';
import { onMalformedBody } from './http-fronts.js';

type ClientRequestLike = IncomingMessage | Http2ServerRequest;
type ClientResponseLike = ServerResponse | Http2ServerResponse;

/**
 * Never passed on, either way: the hop-by-hop fields (RFC 9110 7.6.1), HTTP/2's
 * HTTP2-Settings, and Expect, which is no hop-by-hop field but has been met by
 * the time we forward (Node's fronts send the 100 themselves), and which undici
 * refuses to send (NotSupportedError).
 */
const HOP_BY_HOP = new Set([
  'connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'http2-settings', 'expect',
]);

/**
 * The headers Node's HTTP/2 layer sends once at most (its kSingleValueHeaders,
 * Node 20: writeHead throws ERR_HTTP2_HEADER_SINGLE_VALUE on a second value).
 * An HTTP/1.1 upstream may repeat one (two `date` lines); an HTTP/2 client
 * gets the first, as Node itself keeps the first of a repeated one it receives.
 */
const HTTP2_SINGLE_VALUE: ReadonlySet<string> = new Set([
  'access-control-allow-credentials', 'access-control-max-age', 'access-control-request-method', 'age', 'authorization',
  'content-encoding', 'content-language', 'content-length', 'content-location', 'content-md5', 'content-range', 'content-type',
  'date', 'dnt', 'etag', 'expires', 'from', 'host', 'if-match', 'if-modified-since', 'if-none-match', 'if-range',
  'if-unmodified-since', 'last-modified', 'location', 'max-forwards', 'proxy-authorization', 'range', 'referer', 'retry-after',
  'tk', 'upgrade-insecure-requests', 'user-agent', 'x-content-type-options',
]);

/**
 * Body bytes a request or response may have waiting for the other side before
 * we stop reading it; as large as the default HTTP/2 stream window, so an
 * HTTP/2 client's window is not held back on every 16 KiB.
 */
const BODY_BUFFER = 1024 * 1024;

/** A request body up to this size is read whole first: its head and body then leave in one write. Larger ones stream. */
const WHOLE_BODY_BYTES = 64 * 1024;

export interface RestForwarderOptions {
  readonly upstream: HostPort;
  /** A new connection to the upstream not established by then fails the request with 502. */
  readonly connectTimeoutMs: number;
  /** A request body with no byte for this long is given up (408); --mtls_idle_timeout. */
  readonly bodyTimeoutMs: number;
  /** A response head larger than this is refused (502), as the relay refuses it; --mtls_max_header_size. */
  readonly maxHeaderSize: number;
  readonly observer: ProxyObserver;
  /** Returns why the upstream cannot take requests yet, or undefined when ready. */
  readonly notReady?: () => string | undefined;
  /** Requests of one HTTP/1.1 connection with the model server at once (pipelined); --mtls_max_concurrent_streams. */
  readonly maxRequestsInFlight: number;
}

/**
 * How many of each HTTP/1.1 connection's requests are with the model server at once. Node's
 * HTTP/1.1 server hands every pipelined request over as soon as it is parsed, and each took an
 * upstream connection of its own: one client writing 5,000 GETs in one go had the proxy open
 * 5,000 connections to the model server and run them all at once (13,600 in 9 s from a client
 * that kept writing to a model server that took 3 s per answer), past the limit an HTTP/2
 * client has (--mtls_max_concurrent_streams), though the answers go out one after another
 * anyway. Past the limit a request is forwarded when one before it is done. (H1Front reads such
 * a connection no further meanwhile, so the requests waiting here stay few.)
 */
class PipelineTurns {
  readonly #limit: number;
  readonly #lines = new WeakMap<Socket, { inFlight: number; waiting: Set<() => void> }>();

  constructor(limit: number) {
    this.#limit = limit;
  }

  /** Runs `start` now or in turn, and `never` instead if `res` closes first (its connection went). */
  take(socket: Socket, res: ClientResponseLike, start: () => void, never: () => void): void {
    let line = this.#lines.get(socket);
    if (line === undefined) this.#lines.set(socket, (line = { inFlight: 0, waiting: new Set() }));
    const { waiting } = line;
    const begin = () => {
      line.inFlight++;
      res.once('close', () => {
        line.inFlight--;
        // A connection gone closes the waiting responses too: none of them is forwarded.
        if (socket.destroyed) return;
        const next = waiting.values().next();
        if (!next.done) next.value();
      });
      start();
    };
    if (line.inFlight < this.#limit) {
      begin();
      return;
    }
    const turn = () => {
      waiting.delete(turn);
      res.off('close', gone);
      begin();
    };
    const gone = () => {
      waiting.delete(turn);
      never();
    };
    waiting.add(turn);
    res.once('close', gone);
  }
}

interface ExchangeStats {
  status: number;
  bytesIn: number;
  bytesOut: number;
  error?: string | undefined;
  /** A request we refused: why, as our answer told the client. */
  detail?: string | undefined;
}

/**
 * HTTP/1.1 and HTTP/2 clients -> the HTTP/1.1 upstream over kept-alive
 * connections (undici's Pool: a fifth less CPU per small request than Node's
 * own HTTP client, measured side by side). A request body up to 64 KiB is
 * read whole first, so head and body leave in one write and a stalled one
 * never reaches the model server; larger bodies, and every response, stream
 * with backpressure, so Server-Sent Events pass event by event. No timeout on
 * a live response: LLM streams can be quiet for minutes. A request body that
 * stops arriving is another matter (nginx's client_body_timeout): it would
 * hold a model server connection for as long as the client likes.
 */
export class RestForwarder {
  readonly #options: RestForwarderOptions;
  readonly #pool: Pool;
  /** HTTP/2 requests each client connection reset before their answer was complete, less those it completed. */
  readonly #cancels = new CancelTally();
  /** Per request whose response to the client is still open: what ends it at shutdown (endAll). */
  readonly #live = new Set<(message: string) => void>();
  readonly #resets = new UpstreamResets();
  /** Per HTTP/1.1 connection, the error of its last answer that went out, if it failed: what closed it under the answers queued behind. */
  readonly #lastFailure = new WeakMap<Socket, string>();
  readonly #pipelines: PipelineTurns;
  /** Set by endAll(): a pipelined request whose turn comes after it gets 503 with this, not forwarded. */
  #endingWith: string | undefined;

  constructor(options: RestForwarderOptions) {
    this.#options = options;
    this.#pool = upstreamPool(options, this.#resets.connector(options.connectTimeoutMs));
    this.#pipelines = new PipelineTurns(options.maxRequestsInFlight);
  }

  handle(req: ClientRequestLike, res: ClientResponseLike, context: ConnectionContext): void {
    const started = requestStart(context);
    const notReady = this.#options.notReady?.();
    if (notReady !== undefined) {
      this.#refuse(req, res, context, started, { status: 503, message: notReady, error: 'not_ready', headers: { 'retry-after': '1' } });
      return;
    }
    // Read once: the check and the Host line the model server gets are the same authority.
    const authority = requestAuthority(req.url ?? '', req.headers);
    const refusal = req.httpVersionMajor === 1 && hostLines(req.rawHeaders) > 1 ? SECOND_HOST : routingRefusal(req.url ?? '', authority);
    if (refusal) {
      this.#refuse(req, res, context, started, { status: 400, ...refusal });
      return;
    }
    if (req.httpVersionMajor === 2 && this.#cancels.defers(context)) {
      setImmediate(() => this.#forwardUnlessReset(req as Http2ServerRequest, res, context, started, authority));
      return;
    }
    if (req.httpVersionMajor === 1) {
      this.#pipelines.take(req.socket, res, () => this.#forwardInTurn(req, res, context, started, authority), () => this.#logNeverSent(req, context, started));
      return;
    }
    this.#forward(req, res, context, started, authority);
  }

  /** A pipelined HTTP/1.1 request whose turn came after endAll() is answered 503, not forwarded. */
  #forwardInTurn(req: ClientRequestLike, res: ClientResponseLike, context: ConnectionContext, started: number, authority: string | undefined): void {
    if (this.#endingWith === undefined) this.#forward(req, res, context, started, authority);
    else this.#refuse(req, res, context, started, { status: 503, message: this.#endingWith, error: 'shutdown_timeout' });
  }

  /** A pipelined request still waiting for its turn when its connection closed: never forwarded, never answered. */
  #logNeverSent(req: ClientRequestLike, context: ConnectionContext, started: number): void {
    const stats: ExchangeStats = { status: 0, bytesIn: 0, bytesOut: 0 };
    this.#neverSent(req, stats, context);
    this.#log(req, context, started, stats);
  }

  #forwardUnlessReset(req: Http2ServerRequest, res: ClientResponseLike, context: ConnectionContext, started: number, authority: string | undefined): void {
    if (req.stream.closed || req.stream.destroyed) {
      this.#log(req, context, started, { status: 0, bytesIn: 0, bytesOut: 0, error: context.closedBy ?? 'client_closed' });
      return;
    }
    this.#forward(req, res, context, started, authority);
  }

  /** Answered by us before anything goes upstream; the body is read and dropped (HTTP/2: and the client told to stop sending it). */
  #refuse(req: ClientRequestLike, res: ClientResponseLike, context: ConnectionContext, started: number, refusal: { status: number; message: string; error: string; headers?: OutgoingHttpHeaders }): void {
    if (req.httpVersionMajor === 2 && bodyLength(req) !== 0) whenAnsweredMidBody(req, res);
    const bytesOut = answerJson(res, refusal.status, refusal.message, refusal.headers);
    req.resume();
    const stats: ExchangeStats = { status: refusal.status, bytesIn: 0, bytesOut, error: refusal.error, detail: refusal.message };
    if (hasTheConnection(res)) {
      this.#log(req, context, started, stats);
      return;
    }
    // Queued behind a pipelined request: logged once it is out, or as never sent when the connection ended first.
    onClose(res, (onWire) => {
      if (!onWire) this.#neverSent(req, stats, context);
      this.#log(req, context, started, stats);
    });
  }

  /**
   * The shutdown timeout is running out: a request still waiting for its answer gets 503
   * with `message`, one whose answer has begun is cut short (so it is never taken for
   * complete), and its upstream request is aborted, rather than the connection being cut under it.
   */
  endAll(message: string): void {
    this.#endingWith = message;
    for (const end of this.#live) end(message);
  }

  close(): void {
    this.#pool.destroy().catch(() => {});
  }

  #forward(req: ClientRequestLike, res: ClientResponseLike, context: ConnectionContext, started: number, authority: string | undefined): void {
    const stats: ExchangeStats = { status: 0, bytesIn: 0, bytesOut: 0 };
    const exchange = new UpstreamExchange(res, stats, this.#options, context, this.#resets);
    const length = bodyLength(req);
    // A request without a body cannot stall, and an HTTP/2 one is never read (req.complete stays false): no timer, or it would cut a slow answer or a live stream.
    const stall = length === 0 ? undefined : this.#watchBody(req, () => {
      answerInstead(req, res, exchange, stats, { status: 408, message: bodyStalledMessage(this.#options.bodyTimeoutMs), error: 'client_body_timeout' });
    });
    const endNow = (message: string) => {
      // Answered in full by the model server, still on its way to a slow client: that answer stands.
      if (!exchange.upstreamEnded) answerInstead(req, res, exchange, stats, { status: 503, message, error: 'shutdown_timeout' });
    };
    this.#live.add(endNow);
    /** The body as it streams upstream, once it does: dropped, with its hold on the request, when the answer ends first. */
    let body: Readable | undefined;
    if (length !== 0) whenAnsweredMidBody(req, res, () => stopReadingBody(req, body));
    if (length !== 0 && req.httpVersionMajor === 1) {
      onMalformedBody(req as IncomingMessage, (refusal) => {
        // Also when our answer cannot go out (the model server's has begun): the log still says why the request was cut.
        stats.detail = refusal.message;
        answerInstead(req, res, exchange, stats, { ...refusal, error: 'bad_request_body', plain: true });
      });
    }
    onClose(res, (onWire) => {
      clearTimeout(stall);
      this.#live.delete(endNow);
      if (!onWire) this.#neverSent(req, stats, context);
      // The client went away: the model should stop working for nobody.
      // A session the proxy destroyed itself (http-fronts.ts #gaveUp) leaves its streams reading as ended: an answer the model server had not finished was not delivered.
      const cut = stats.error === undefined && (!deliveredWhole(res, exchange.passedWhole) || (context.closedBy !== undefined && !exchange.upstreamEnded));
      if (cut) stats.error = context.closedBy ?? cutBy(req);
      if (onWire && req.httpVersionMajor === 1) this.#noteEnded(req.socket, stats.error);
      if (req.httpVersionMajor === 2) {
        if (cut) this.#cancels.count(context);
        else this.#cancels.settle(context);
      }
      // Only now, with our own answer (a 408) out: aborting before it stalled an HTTP/2 client session sharing our process (tests; cause not found).
      exchange.abort();
      this.#log(req, context, started, stats);
    });
    const dispatch = (sent: Buffer | Readable | null) => {
      if (sent instanceof Readable) body = sent;
      if (exchange.givenUp) body?.destroy();
      else this.#pool.dispatch({ method: req.method ?? 'GET', path: req.url ?? '/', headers: upstreamHeaders(req, context, authority), body: sent }, exchange);
    };
    const counted = (n: number) => {
      stats.bytesIn += n;
      stall?.refresh();
    };
    if (length === 0) {
      if (IDEMPOTENT_METHODS.has(req.method ?? 'GET')) exchange.retryOnce(() => dispatch(null));
      dispatch(null);
    } else if (length !== undefined && length > WHOLE_BODY_BYTES) dispatch(bodyStream(req, counted, [], req.httpVersionMajor === 2 ? length : undefined));
    else readWholeOrStream(req, counted, dispatch);
  }

  /**
   * An HTTP/1.1 request pipelined behind another whose answer ended the connection (cut short,
   * or an answer of ours that closes it): its own answer, queued behind, never went out, whatever
   * the model server or we had put in it. Its line said the status and bytes of that answer, and
   * `client_closed` when we had closed the connection. It gets what ended the connection.
   */
  #neverSent(req: ClientRequestLike, stats: ExchangeStats, context: ConnectionContext): void {
    stats.status = 0;
    stats.bytesOut = 0;
    stats.error ??= context.closedBy ?? this.#lastFailure.get(req.socket) ?? 'client_closed';
  }

  #noteEnded(socket: Socket, error: string | undefined): void {
    if (error === undefined) this.#lastFailure.delete(socket);
    else this.#lastFailure.set(socket, error);
  }

  /**
   * Calls `stalled` when the body has had no byte for bodyTimeoutMs; the
   * timer is refreshed per chunk and cleared when the response closes. A
   * body that has ended by then is fine (no per-request 'end' listener just
   * to clear it earlier). While we hold the body back (the upstream is not
   * reading it) the client is not the one stalling: the timer starts again.
   */
  #watchBody(req: ClientRequestLike, stalled: () => void): NodeJS.Timeout | undefined {
    if (req.complete) return undefined;
    const timer = setTimeout(() => {
      if (req.complete) return;
      if (req.isPaused()) timer.refresh();
      else stalled();
    }, this.#options.bodyTimeoutMs);
    return timer;
  }

  #log(req: ClientRequestLike, context: ConnectionContext, started: number, stats: ExchangeStats): void {
    this.#options.observer.request({
      listener: context.listener,
      protocol: req.httpVersionMajor === 2 ? 'h2' : 'http/1.1',
      remote: context.remoteAddress,
      subject: context.identity.subject,
      serial: context.identity.serial,
      method: req.method ?? '',
      path: req.url ?? '',
      status: stats.status,
      bytesIn: stats.bytesIn,
      bytesOut: stats.bytesOut,
      durationMs: elapsedMs(started),
      error: stats.error,
      detail: stats.detail,
    });
  }
}

/**
 * An upstream connection idle this long is closed by us. A server closes its
 * idle connections too (Node after 5 s, OVMS's Drogon after 60 s, nginx after
 * 75 s); when it does so just as we send a request, that request fails with
 * 502 (unless UpstreamExchange.retryOnce() sends it again). Closing first removes that race. A server's shorter `Keep-Alive:
 * timeout=` hint wins (undici closes 2 s before it). A request in flight is
 * never cut by it: only idle connections time out.
 */
export const UPSTREAM_IDLE_MS = 4000;

/**
 * Kept-alive upstream connections, as many as requests in flight. No
 * headers or body timeout: a model may think, and a stream may be quiet, for
 * minutes. undici's head limit is Node's (16 KiB by default) unless given:
 * a response head between that and --mtls_max_header_size, which the relay
 * passes on, was a 502.
 */
function upstreamPool(options: Pick<RestForwarderOptions, 'upstream' | 'maxHeaderSize'>, connect: buildConnector.connector): Pool {
  const { upstream } = options;
  return new Pool(`http://${hostAndPort(upstream.host, upstream.port)}`, {
    pipelining: 1,
    keepAliveTimeout: UPSTREAM_IDLE_MS,
    keepAliveMaxTimeout: UPSTREAM_IDLE_MS,
    headersTimeout: 0,
    bodyTimeout: 0,
    maxHeaderSize: options.maxHeaderSize,
    connect,
  });
}

/**
 * Whether an upstream connection is reporting a TCP reset at this moment. undici takes a reset
 * of a connection whose response body runs until close (no Content-Length, not chunked: an
 * HTTP/1.0 answer, or `connection: close` without a length) for the body's end, a workaround
 * for macOS, which reports ECONNRESET after whole bodies too, and ends the response from inside
 * that socket's 'error' event. RFC 9112 (section 8) counts such a body complete only when the
 * connection indicated no error; the relay reads it so (a reset cuts it short), and the client
 * must not get it as whole (a last chunk, an END_STREAM).
 */
class UpstreamResets {
  #resetting = false;

  get resetting(): boolean {
    return this.#resetting;
  }

  /** undici's own connector (`timeoutMs`: --mtls_upstream_connect_timeout), each socket watched ahead of undici's listeners. */
  connector(timeoutMs: number): buildConnector.connector {
    const connect = buildConnector({ timeout: timeoutMs });
    return (options, callback) => connect(options, (...args) => {
      args[1]?.prependListener('error', this.#onError).prependListener('end', this.#onEnd);
      callback(...args);
    });
  }

  /** The answers we paused (onResponseData) and have not resumed. */
  readonly #paused = new Set<Dispatcher.DispatchController>();
  /** Within an upstream connection's 'end' that resumed paused answers (#onEnd). */
  #ending = false;

  /** Stops reading an answer whose client has a full buffer. */
  pause(controller: Dispatcher.DispatchController): void {
    controller.pause();
    this.#paused.add(controller);
  }

  /** Reads it on (its client drained, or its connection ended). */
  resume(controller: Dispatcher.DispatchController): void {
    this.#paused.delete(controller);
    controller.resume();
  }

  /** The exchange ended: nothing more to resume. */
  forget(controller: Dispatcher.DispatchController): void {
    this.#paused.delete(controller);
  }

  /**
   * undici ends an answer whose connection ends (a body that runs until close, or `connection: close`)
   * from the socket's 'end', asserting its parser is not paused. We pause it when the client's side is
   * full, and when that came with the last bytes, the model server's FIN already read, the assertion
   * (`assert(!this.paused)`) threw out of the process, which stops on an uncaught exception: an answer
   * without a Content-Length of about 1 MiB plus a window to an HTTP/2 client that reads slower than
   * the model server sends. A connection that ends has nothing more to hold back: every paused answer
   * is resumed first (undici does not say which is this connection's; the others pause again at their
   * next bytes).
   */
  readonly #onEnd = (): void => {
    if (this.#paused.size === 0) return;
    // Resumed, the answer's last bytes come again to onResponseData, whose client is still full: not paused again.
    this.#ending = true;
    for (const controller of [...this.#paused]) this.resume(controller);
    // After every listener of this 'end', undici's among them, has run.
    queueMicrotask(() => (this.#ending = false));
  };

  /** An upstream connection is ending under a paused answer (#onEnd): pausing now would stop it for good. */
  get ending(): boolean {
    return this.#ending;
  }

  readonly #onError = (err: NodeJS.ErrnoException): void => {
    if (err.code !== 'ECONNRESET') return;
    this.#resetting = true;
    // After every listener of this 'error', undici's among them, has run.
    queueMicrotask(() => (this.#resetting = false));
  };
}

/**
 * What the upstream client can send: a path, or an absolute http(s) URL. Not
 * the asterisk form (`OPTIONS *`), which nginx refuses too. Nor one with a
 * fragment: clients keep it to themselves, no request target carries one
 * (RFC 9112 3.2, RFC 9113 8.3.1), yet nghttp2 and llhttp let `/a#b` through,
 * and a model server that cuts it off would serve a path our access line
 * does not show.
 */
function isForwardableTarget(target: string): boolean {
  return (target.startsWith('/') || ABSOLUTE_FORM.test(target)) && !target.includes('#');
}


/**
 * An authority as the Host line of an HTTP/1.1 request may carry it (RFC 9112
 * 3.2): an IP literal or a reg-name (RFC 3986 3.2.2), then an optional port.
 * nghttp2 lets an HTTP/2 client's `:authority` through with userinfo
 * (`user@host`) or a second colon, which RFC 9113 8.3.1 makes malformed and
 * 8.1.1 forbids an intermediary to forward; as a Host line it would be one the
 * model server must refuse, or may read differently from us.
 */
const HOST_AND_PORT = /^(?:\[[0-9A-Za-z:.%_~-]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?$/;

/** Why a request is answered 400 instead of forwarded, in both REST modes: its target, or its authority, is not one the model server reads as we do. */
export interface RoutingRefusal {
  readonly message: string;
  /** The access line's `error`. */
  readonly error: 'bad_request_target' | 'bad_request_authority';
}

/**
 * Two Host lines (RFC 9112 3.2: a server answers 400). Node's parser keeps the
 * first; a model server may keep the last, and route by a host we never checked.
 */
export const SECOND_HOST: RoutingRefusal = { message: 'a request may have one Host field at most', error: 'bad_request_authority' };

/** How many Host lines an HTTP/1.x head has (Node's headers object keeps one). */
function hostLines(rawHeaders: readonly string[]): number {
  let count = 0;
  for (let i = 0; i < rawHeaders.length; i += 2) {
    const name = rawHeaders[i]!;
    if (name.length === 4 && name.toLowerCase() === 'host') count++;
  }
  return count;
}

/** The refusal for a request target and the authority it is for (requestAuthority()), undefined when both may be forwarded. */
export function routingRefusal(target: string, authority: string | undefined): RoutingRefusal | undefined {
  if (!isForwardableTarget(target)) {
    return { message: `request target ${JSON.stringify(target.slice(0, 64))} is not forwarded: a path (/v2/...) or an http(s) URL without a #fragment is`, error: 'bad_request_target' };
  }
  if (authority !== undefined && !HOST_AND_PORT.test(authority)) {
    return { message: `request authority ${JSON.stringify(authority.slice(0, 64))} is not forwarded: send host[:port] only, without a user@ part`, error: 'bad_request_authority' };
  }
  return undefined;
}

/**
 * Who the request is for, as the model server gets it in its Host line: the
 * authority of an absolute-form target, which wins over Host (RFC 9112 3.2.2:
 * a proxy forwarding such a request generates Host from it), else HTTP/2's
 * `:authority` (RFC 9113 8.3.1), else the Host line.
 */
export function requestAuthority(target: string, headers: IncomingHttpHeaders): string | undefined {
  const absolute = ABSOLUTE_FORM.exec(target);
  if (absolute) return absolute[1];
  const authority = headers[':authority'] ?? headers['host'];
  return authority === undefined ? undefined : String(authority);
}

/** The request body's declared length (0: none), undefined when not declared (chunked, or HTTP/2 without content-length). */
function bodyLength(req: ClientRequestLike): number | undefined {
  const declared = req.headers['content-length'];
  if (declared !== undefined) return Number(declared);
  if (req.httpVersionMajor === 2) return (req as Http2ServerRequest).stream.endAfterHeaders ? 0 : undefined;
  return req.headers['transfer-encoding'] === undefined ? 0 : undefined;
}

/**
 * The answer is out before the whole body came in (the model server answered
 * early, a 413 say, or failed, or we did). Left alone, the client would wait
 * for ever: its body is held back once the buffer towards the upstream, which
 * has stopped, is full. The rest is read and dropped, so the connection serves
 * the client's next request (curl --next); a client that stops sending instead
 * is let go by the idle timeout.
 */
function stopReadingBody(req: ClientRequestLike, body: Readable | undefined): void {
  // A body still being gathered (under 64 KiB so far) becomes a stream after this, which dispatch drops.
  body?.destroy();
  req.resume();
}

/**
 * Calls `then` when our whole answer is out (the model server's, or our 408)
 * while the request body is still arriving; HTTP/2 then also resets the
 * stream. There the stream's 'finish', not the compatibility response's: that
 * one waits for the stream's close, which a client still sending delays. Not
 * for a stream the client reset first.
 */
function whenAnsweredMidBody(req: ClientRequestLike, res: ClientResponseLike, then?: () => void): void {
  if (req.httpVersionMajor === 1) {
    res.once('finish', () => {
      if (!req.complete) then?.();
    });
    return;
  }
  const stream = (req as Http2ServerRequest).stream;
  stream.once('finish', () => {
    if (stream.aborted || req.readableEnded) return;
    then?.();
    resetOnceEnded(stream);
  });
}

/** Event-loop turns resetOnceEnded() looks again in before it looks every RESET_RECHECK_MS instead. */
const RESET_RECHECK_TURNS = 4;
const RESET_RECHECK_MS = 100;

/**
 * RST_STREAM(NO_ERROR) once our END_STREAM has left tells a client answered
 * early to stop sending (RFC 9113 8.1), as nginx does. Not at once: 'finish'
 * comes before nghttp2 frames the END_STREAM, and Node then sends the reset
 * ahead of it, which the client reads as an answer cut short (seen frame by
 * frame). The END_STREAM leaves within a turn or two of the event loop,
 * unless the client does not read its connection; then look now and then.
 */
function resetOnceEnded(stream: ServerHttp2Stream, turns = 0): void {
  if (stream.closed || stream.destroyed) return;
  if (stream.state.localClose === 1) stream.close(http2Constants.NGHTTP2_NO_ERROR);
  else if (turns < RESET_RECHECK_TURNS) setImmediate(resetOnceEnded, stream, turns + 1);
  else setTimeout(resetOnceEnded, RESET_RECHECK_MS, stream, turns).unref();
}

/**
 * Reads the body whole while it stays within WHOLE_BODY_BYTES (a small body
 * of undeclared length too: streaming it measured 160-170 µs per 1 KiB
 * request against 90-100 whole); past that it streams, from what came so far.
 */
function readWholeOrStream(req: ClientRequestLike, count: (n: number) => void, send: (body: Buffer | Readable) => void): void {
  const chunks: Buffer[] = [];
  let bytes = 0;
  const onData = (chunk: Buffer) => {
    count(chunk.length);
    chunks.push(chunk);
    bytes += chunk.length;
    if (bytes <= WHOLE_BODY_BYTES) return;
    req.off('data', onData);
    req.off('end', onEnd);
    // Of undeclared length: a declared one over WHOLE_BODY_BYTES streams from the start.
    send(bodyStream(req, count, chunks, undefined));
  };
  const onEnd = () => send(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, bytes));
  req.on('data', onData);
  req.once('end', onEnd);
}

/**
 * The client's body as the pool reads it. A stream of our own, not the
 * request itself: the pool destroys its body when done or failed, and the
 * client's request must outlive that (a 502 still goes out on it).
 */
function bodyStream(req: ClientRequestLike, count: (n: number) => void, received: readonly Buffer[], declared: number | undefined): Readable {
  const holdLast = lastByteHold(declared);
  const onData = (chunk: Buffer) => {
    count(chunk.length);
    if (!body.push(holdLast.pass(chunk))) req.pause();
  };
  const onEnd = () => {
    body.push(holdLast.release());
    body.push(null);
  };
  const body = new Readable({
    highWaterMark: BODY_BUFFER,
    read: () => req.resume(),
    destroy: (err, callback) => {
      req.off('data', onData);
      req.off('end', onEnd);
      callback(err);
    },
  });
  for (const chunk of received) body.push(holdLast.pass(chunk));
  req.on('data', onData);
  req.once('end', onEnd);
  return body;
}

/**
 * An HTTP/2 body of declared length keeps its last byte until the client's END_STREAM. nghttp2
 * resets a stream whose DATA runs past its content-length only at the frame that does: passed on
 * as it came, every declared byte had reached the model server, which took the request as complete
 * and ran it. Held back, the upstream request is aborted one byte short instead.
 */
function lastByteHold(declared: number | undefined): { pass(chunk: Buffer): Buffer; release(): Buffer } {
  let left = declared;
  let held: Buffer = EMPTY;
  return {
    pass(chunk) {
      if (left === undefined) return chunk;
      left -= chunk.length;
      if (left > 0) return chunk;
      held = chunk.subarray(chunk.length - 1);
      return chunk.subarray(0, chunk.length - 1);
    },
    release: () => held,
  };
}

const EMPTY = Buffer.alloc(0);

/** Why we abort an upstream request (the client left, or we answered it ourselves); one object, no stack per request. */
const GIVEN_UP = new Error('the proxy gave up this request');

/** A body that runs until close, ended by a reset (UpstreamResets): cut short, not complete. */
const RESET_MID_BODY: NodeJS.ErrnoException = Object.assign(new Error('the upstream reset the connection in the middle of a body that runs until close'), { code: 'ECONNRESET' });

/**
 * Resumes a paused upstream answer once the call stack is clear. A 'drain' can come from inside
 * another upstream answer's data callback: Node's HTTP/1.1 server, handed a pipelined answer
 * queued behind the one on the wire, tells the one on the wire 'drain' then and there
 * (updateOutgoingData), and undici refuses a resume while any of its parsers is running
 * (assert(currentParser === null)): the second answer failed as ERR_ASSERTION and the first,
 * never resumed, stalled for good.
 */
function resumeOutsideParser(controller: Dispatcher.DispatchController, resets: UpstreamResets): void {
  queueMicrotask(() => resets.resume(controller));
}

/** RFC 9110 9.2.2. */
const IDEMPOTENT_METHODS = new Set(['GET', 'HEAD', 'OPTIONS', 'TRACE', 'PUT', 'DELETE']);

/** undici's and the system's names for a connection the model server closed (FIN or reset). */
const CLOSED_CODES = new Set(['UND_ERR_SOCKET', 'ECONNRESET', 'EPIPE']);

/** One request's upstream side: undici calls these as the answer arrives. */
class UpstreamExchange implements Dispatcher.DispatchHandler {
  readonly #res: ClientResponseLike;
  readonly #stats: ExchangeStats;
  readonly #options: RestForwarderOptions;
  readonly #context: ConnectionContext;
  readonly #http2: boolean;
  readonly #resets: UpstreamResets;
  #controller: Dispatcher.DispatchController | undefined;
  /** The upstream request has ended, answered or failed. */
  #ended = false;
  /**
   * Set once we answered the client ourselves or it left: nothing from the upstream may follow. It covers a
   * destroyed response: Node's HTTP/1.1 server destroys one as it emits its 'close' (onClose() gives up), ours
   * are destroyed after giving up (cutShort), and an Http2ServerResponse has no `destroyed` at all.
   */
  givenUp = false;
  /** The answer is a 204 or a 304: it has no body, whatever its Content-Length says (RFC 9110 6.4.1, 8.6). */
  #bodiless = false;
  /** Sends the request again, once: see retryOnce(). */
  #retry: (() => void) | undefined;
  /** The model server's answer began (a head, interim or final): a failure now is no idle close. */
  #heardBack = false;
  /** The answer declares its body's length (Content-Length): its client knows it has it all at the last byte. */
  #declaredLength = false;
  /** See passedWhole. */
  #passedWhole = false;

  constructor(res: ClientResponseLike, stats: ExchangeStats, options: RestForwarderOptions, context: ConnectionContext, resets: UpstreamResets) {
    this.#resets = resets;
    this.#res = res;
    this.#stats = stats;
    this.#options = options;
    this.#context = context;
    this.#http2 = res instanceof Http2ServerResponse;
  }

  /** The upstream request has ended, answered or failed. */
  get upstreamEnded(): boolean {
    return this.#ended;
  }

  /**
   * The model server's whole answer, a body of declared length, was handed to the client's HTTP/2 stream
   * while it was open, and ended there by us: not by Node, which ends a stream the client resets (see deliveredWhole()).
   */
  get passedWhole(): boolean {
    return this.#passedWhole;
  }

  /**
   * An idempotent request without a body is sent once more (the pool picks the connection) when the model server closes
   * the kept-alive one under it before a byte of its answer: its idle close met the request (a server's idle
   * timeout shorter than ours, UPSTREAM_IDLE_MS, without a `Keep-Alive: timeout` hint), as nginx retries such a
   * request after a cached connection fails (RFC 9110 9.2.2). Bodies and other methods get the 502, as from nginx.
   * undici does not say whether the connection was a kept-alive one: on a new one the retry is only one more
   * attempt, whose failure is the 502.
   */
  retryOnce(retry: () => void): void {
    this.#retry = retry;
  }

  /** Nothing more from the upstream goes to the client; a request not sent yet never will be. */
  giveUp(): void {
    this.givenUp = true;
  }

  /** Ends the upstream request unless it has ended already (the usual case: then nothing to do). */
  abort(): void {
    this.givenUp = true;
    if (!this.#ended) this.#controller?.abort(GIVEN_UP);
  }

  onRequestStart(controller: Dispatcher.DispatchController): void {
    this.#controller = controller;
    if (this.givenUp) controller.abort(GIVEN_UP);
  }

  onResponseStart(controller: Dispatcher.DispatchController, statusCode: number, headers: IncomingHttpHeaders): void {
    this.#heardBack = true;
    // An interim answer (103) is not passed on; the final one follows.
    if (this.givenUp || statusCode < 200) return;
    const res = this.#res;
    this.#stats.status = statusCode;
    this.#bodiless = statusCode === 204 || statusCode === 304;
    this.#declaredLength = headers['content-length'] !== undefined;
    const head = responseHeaders(headers, this.#http2);
    if (this.#http2 && this.#overHttp2Limit(statusCode, head)) {
      controller.abort(Object.assign(new Error('response head too large for HTTP/2'), { code: HEAD_OVER_HTTP2_LIMIT }));
      return;
    }
    try {
      res.writeHead(statusCode, head);
    } catch (err) {
      // A head Node refuses to send (HTTP/2: a status past 599, say) fails the request: onResponseError answers 502, no stream is left open.
      controller.abort(err as Error);
      return;
    }
    // Send the headers now: an SSE client should see the stream open before the first event. And
    // into the queue of an answer pipelined behind others, after its `100 Continue` (flushHead()).
    if (headers['content-length'] === undefined || !hasTheConnection(res)) flushHead(res);
  }

  /**
   * undici counts a head's names and values only, so a head of many short fields within the limit
   * is several times it as HTTP/2 sends it: Node refused to send it to an HTTP/2 client (RST_STREAM
   * (FRAME_SIZE_ERROR), logged client_closed) and closed the client's connection, every other request on it with it.
   */
  #overHttp2Limit(statusCode: number, head: OutgoingHttpHeaders): boolean {
    return headerBlockBound({ ':status': statusCode, ...head }, true) > forwardedHeaderBlockLimit(this.#options.maxHeaderSize);
  }

  onResponseData(controller: Dispatcher.DispatchController, chunk: Buffer): void {
    this.#stats.bytesOut += chunk.length;
    const res = this.#res;
    if (this.givenUp) return;
    (res as ServerResponse).write(chunk);
    // A listener only when needed: most responses never fill the buffer.
    if (res.writableLength >= BODY_BUFFER && !controller.paused && !this.#resets.ending) {
      this.#resets.pause(controller);
      res.once('drain', () => resumeOutsideParser(controller, this.#resets));
    }
  }

  onResponseEnd(controller: Dispatcher.DispatchController, trailers?: IncomingHttpHeaders): void {
    this.#resets.forget(controller);
    // Only a body that runs until close ends while its connection reports a reset.
    if (this.#resets.resetting) {
      this.onResponseError(controller, RESET_MID_BODY);
      return;
    }
    this.#ended = true;
    if (this.givenUp) return;
    this.#passedWhole = this.#declaredLength && this.#http2 && !(this.#res as Http2ServerResponse).stream.closed;
    const passed = trailers === undefined ? undefined : responseTrailers(trailers, this.#http2);
    if (passed !== undefined) this.#res.addTrailers(passed);
    this.#res.end();
  }

  onResponseError(controller: Dispatcher.DispatchController, err: Error): void {
    this.#resets.forget(controller);
    if (this.#bodiless && (err as NodeJS.ErrnoException).code === 'UND_ERR_RES_CONTENT_LENGTH_MISMATCH') {
      // undici takes the Content-Length a 304 may carry (the length of the representation the client has, RFC 9110 8.6)
      // for a body that never came, and fails a whole answer: the client got an empty reply (HTTP/1.1) in its place.
      // Its connection is gone; the answer is not.
      this.onResponseEnd(controller);
      return;
    }
    if (this.#retriedAfter(err)) return;
    this.#ended = true;
    if (this.givenUp) return;
    const res = this.#res;
    const begun = res.headersSent;
    const { code, message } = this.#describe(err, begun);
    this.#stats.error ??= code;
    // Counted before and after the answer has begun alike, as the relay counts it: a model server
    // that crashes in the middle of a streamed answer is the failure an alert on this is for.
    this.#options.observer.upstreamError(this.#context.listener, code, message);
    if (begun) {
      cutShort(res);
      return;
    }
    this.#stats.status = 502;
    this.#stats.bytesOut += answerJson(res, 502, message);
  }

  /** The connection closed before any answer and the request may go again (retryOnce): it has, counted as the relay counts such a close. */
  #retriedAfter(err: Error): boolean {
    const retry = this.#retry;
    // undici's "bad response" (a 100 the model server sent unasked) comes as UND_ERR_SOCKET too, before any head reaches us: the request was answered, not dropped.
    if (!retry || this.givenUp || this.#heardBack || !CLOSED_CODES.has(String((err as NodeJS.ErrnoException).code)) || isBadResponse(err)) return false;
    this.#retry = undefined;
    this.#controller = undefined;
    this.#options.observer.upstreamError(this.#context.listener, UPSTREAM_CLOSED_IDLE, `${describeUpstreamError(this.#options.upstream, { code: UPSTREAM_CLOSED_IDLE }).message}: sent once more, on a new connection`);
    retry();
    return true;
  }

  /**
   * A head over the limit is named as the relay names it (undici's own words name neither the limit nor the option).
   * `begun`: the answer's head went out already.
   */
  #describe(err: Error, begun: boolean): { code: string; message: string } {
    const { code } = err as NodeJS.ErrnoException;
    if (code === 'UND_ERR_HEADERS_OVERFLOW') return { code: 'bad_response', message: responseHeadTooLargeMessage(this.#options.maxHeaderSize) };
    if (code === HEAD_OVER_HTTP2_LIMIT) return { code: 'bad_response', message: http2HeadTooLargeMessage(this.#options.maxHeaderSize) };
    // A body shorter than its Content-Length that the model server's close ended: undici names it so after a `connection: close` head, a closed socket otherwise.
    if (begun && code === 'UND_ERR_RES_CONTENT_LENGTH_MISMATCH') return describeUpstreamError(this.#options.upstream, { code: 'UND_ERR_SOCKET' });
    return describeUpstreamError(this.#options.upstream, err);
  }
}

/**
 * Sends a response's head before any of its body. Not ServerResponse.flushHeaders(): Node (20 to 24)
 * writes the head it flushes as UTF-8, where every other head goes out as latin1, one byte a character,
 * so a value with obs-text from the model server (`caf\xe9`, which undici reads as latin1) reached an
 * HTTP/1.1 client as `caf\xc3\xa9` on every answer without a Content-Length. An empty write sends it as latin1:
 * an empty string, not a Buffer, which Node 20 writes after the head by putting the head in front of
 * whatever the response holds queued (OutgoingMessage _send's unshift). For a request pipelined behind
 * answers still going out, that is the `100 Continue` Node wrote when it parsed the request: the client
 * read the answer's head, then `HTTP/1.1 100 Continue` as its body.
 */
function flushHead(res: ClientResponseLike): void {
  if (res instanceof Http2ServerResponse) (res as unknown as ServerResponse).flushHeaders();
  else (res as ServerResponse).write('', 'latin1');
}

/** The code of the error that ends an exchange whose response head HTTP/2 cannot send (#overHttp2Limit). */
const HEAD_OVER_HTTP2_LIMIT = 'OVMS_MTLS_HEAD_OVER_HTTP2_LIMIT';

function http2HeadTooLargeMessage(maxHeaderSize: number): string {
  return `the model server's response header section is larger than the ${forwardedHeaderBlockLimit(maxHeaderSize)} bytes this proxy sends to an HTTP/2 client (twice --mtls_max_header_size, 12 bytes more per field as HTTP/2 counts it)`;
}

/**
 * An answer of our own (REST errors are small JSON bodies: README, "REST
 * errors"), with our headers only: an upstream head whose writeHead threw
 * has left its headers set (a content-length of its own, say).
 */
function answerJson(res: ClientResponseLike, status: number, error: string, headers?: OutgoingHttpHeaders): number {
  return answerOwn(res, status, { 'content-type': 'application/json', ...headers }, JSON.stringify({ error }));
}

/** answerJson() with `headers` and `body` as given; returns the body's length. */
function answerOwn(res: ClientResponseLike, status: number, headers: OutgoingHttpHeaders, body: string): number {
  for (const name of res.getHeaderNames()) if (!name.startsWith(':')) res.removeHeader(name);
  // Http2ServerResponse's removeHeader('date') only turns its own date off, leaving the upstream's.
  if (res.hasHeader('date')) res.setHeader('date', new Date().toUTCString());
  res.writeHead(status, headers);
  res.end(body);
  // Its length, for sent bytes: these bodies reach the client as the model server's do.
  return Buffer.byteLength(body);
}

/**
 * We end the request ourselves (its body stalled, the proxy stops): nothing more from the
 * model server reaches the client, which gets our answer, or a cut if its response has begun.
 */
function answerInstead(req: ClientRequestLike, res: ClientResponseLike, exchange: UpstreamExchange, stats: ExchangeStats, answer: { status: number; message: string; error: string; plain?: boolean }): void {
  stats.error = answer.error;
  exchange.giveUp();
  if (res.headersSent) {
    cutShort(res);
    return;
  }
  stats.status = answer.status;
  // The rest of a body will not be read; on HTTP/1.1 the connection cannot carry another request.
  if (req.httpVersionMajor === 1) (res as ServerResponse).shouldKeepAlive = false;
  // `plain`: a line of text, as the relay and our other refusals of what Node's parser rejects word it.
  stats.bytesOut += answer.plain ? answerOwn(res, answer.status, { 'content-type': 'text/plain; charset=utf-8' }, `${answer.message}\n`) : answerJson(res, answer.status, answer.message);
}

/**
 * Node's HTTP/1.1 server gives a pipelined request's response the connection (its 'socket'
 * event) only once the responses before it are done; a connection that closes first never
 * carries it. An HTTP/2 response has its own stream at once.
 */
function hasTheConnection(res: ClientResponseLike): boolean {
  return res instanceof Http2ServerResponse || res.socket !== null;
}

/**
 * Runs `done` when `res` closes, saying whether it ever had the connection: Node's HTTP/1.1 server
 * queues the answer to a pipelined request until those before it are done, and a connection that
 * closes first never carries it.
 */
function onClose(res: ClientResponseLike, done: (onWire: boolean) => void): void {
  let onWire = hasTheConnection(res);
  if (!onWire) res.once('socket', () => (onWire = true));
  res.once('close', () => done(onWire));
}

/**
 * Ends a response that cannot be finished so the client sees it was cut:
 * HTTP/1.1 by closing the connection short of its length or last chunk,
 * HTTP/2 by RST_STREAM(INTERNAL_ERROR) as nginx and Envoy do (RFC 9113 8.1);
 * a plain destroy() sends NO_ERROR there, which reads as a clean end.
 */
function cutShort(res: ClientResponseLike): void {
  if (res instanceof Http2ServerResponse) resetClientStream(res.stream, http2Constants.NGHTTP2_INTERNAL_ERROR);
  else res.destroy();
}

/**
 * Who cut short a response that we did not: the client, or, on HTTP/2, nghttp2,
 * which resets a stream with PROTOCOL_ERROR (RFC 9113 8.1.1) whose DATA does not
 * add up to its content-length, before we see its end. That is the client's
 * malformed request, not a client that left: Go's client, for one, sends it
 * again at once, in a loop, which the access lines should show.
 */
function cutBy(req: ClientRequestLike): 'client_closed' | 'bad_request_body' {
  if (req.httpVersionMajor === 2 && (req as Http2ServerRequest).stream.rstCode === http2Constants.NGHTTP2_PROTOCOL_ERROR) return 'bad_request_body';
  return 'client_closed';
}

/**
 * The whole response went out. Not Http2ServerResponse's writableFinished:
 * it turns true when the client resets the stream. The stream's own end
 * counts, not the response's: Node ends a 304's or a HEAD's itself.
 *
 * HTTP/2, a body of declared length: delivered once its every byte was written to the client's
 * connection (the stream's 'finish', after the model server's whole answer was passed to it:
 * `passedWhole`), as nginx and Envoy count it, whether or not the END_STREAM got out too. Node
 * sends that END_STREAM in a DATA frame of its own after the last write, and curl, having read
 * content-length bytes, resets the stream (CANCEL) or closes the connection without waiting for it:
 * 28 of 590 complete downloads in a soak were logged as client_closed. A body without declared
 * length (SSE, chunked) ends for the client only with the END_STREAM. Not the stream's 'finish'
 * alone: Node ends the stream of a reset whose writes were all out, and it finishes then too.
 */
function deliveredWhole(res: ClientResponseLike, passedWhole: boolean): boolean {
  if (!(res instanceof Http2ServerResponse)) return res.writableFinished;
  const { stream } = res;
  if (stream.writableEnded && stream.rstCode === http2Constants.NGHTTP2_NO_ERROR) return true;
  return passedWhole && stream.writableFinished;
}

/** What a client whose request body stopped arriving is told, in both REST modes. */
export function bodyStalledMessage(timeoutMs: number): string {
  return `the request body stopped arriving: no byte of it for ${timeoutMs / 1000} s (--mtls_idle_timeout)`;
}

const NONE_LISTED: ReadonlySet<string> = new Set();

/** Connection names listed in `Connection:` are hop-by-hop too. */
function connectionListed(headers: IncomingHttpHeaders): ReadonlySet<string> {
  const value = headers['connection'];
  if (!value) return NONE_LISTED;
  return new Set(String(value).split(',').map((v) => v.trim().toLowerCase()).filter(Boolean));
}

/**
 * Request fields never passed on as the client sent them: hop-by-hop ones, Host (the
 * authority's, set once), and ours (set by us: a client's copy would stand for them).
 */
const NOT_PASSED_ON: ReadonlySet<string> = new Set([...HOP_BY_HOP, 'host', ...FORWARDING_FIELDS]);

/** `name` (lower-case) is a client field the model server gets; `listed`: connectionListed() of the request. */
function passedOn(name: string, listed: ReadonlySet<string>): boolean {
  return !(NOT_PASSED_ON.has(name) || name.startsWith(':') || listed.has(name) || disguisesOurs(name));
}

/**
 * The fields the model server gets: the client's, then ours. From Node's headers object
 * when it holds one name per line the client sent (nearly every request, and the cheapest),
 * else from the lines as sent (clientLines()). `authority`: requestAuthority() of the request.
 */
export function upstreamHeaders(req: ClientRequestLike, context: ConnectionContext, authority: string | undefined): Record<string, string | string[]> | string[] {
  const incoming = req.headers;
  const listed = connectionListed(incoming);
  const out: Record<string, string | string[]> = {};
  let names = 0;
  for (const name in incoming) {
    names++;
    if (passedOn(name, listed)) out[name] = incoming[name]!;
  }
  if (names * 2 !== req.rawHeaders.length) return clientLines(req, listed, context, authority);
  if (authority !== undefined) out['host'] = authority;
  setForwardingHeaders(out, incoming['x-forwarded-for'], context);
  return out;
}

/**
 * A request with a field name on more than one line, for which Node's headers object
 * kept only the first line (Authorization, User-Agent, Referer, From...) or joined them
 * into one, where the relay and nginx pass every line on: each line in the order sent, as
 * a flat name, value list. Names lower-cased, as HTTP/2 sends them and as the headers
 * object has them, so the model server sees the same names whichever path or front a
 * request took. An HTTP/2 client's cookies are one line, the crumbs not empty joined with "; " (RFC 9113 8.2.3:
 * HTTP/2 lets a client split them; an HTTP/1.1 server may not take them apart).
 */
function clientLines(req: ClientRequestLike, listed: ReadonlySet<string>, context: ConnectionContext, authority: string | undefined): string[] {
  const raw = req.rawHeaders;
  const joinCookies = req.httpVersionMajor === 2;
  const out: string[] = [];
  /** Where the first cookie's value is in `out`, once there. */
  let cookieAt = -1;
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]!.toLowerCase();
    if (!passedOn(name, listed)) continue;
    const value = raw[i + 1]!;
    if (joinCookies && name === 'cookie') {
      if (cookieAt >= 0) {
        // An empty crumb adds nothing: joined, it left the line ending in "; " (a value may not end in white space, RFC 9110 5.5).
        if (value !== '') out[cookieAt] = out[cookieAt] === '' ? value : `${out[cookieAt]}; ${value}`;
        continue;
      }
      cookieAt = out.length + 1;
    }
    out.push(name, value);
  }
  // undici sends Host first, wherever it is in the list.
  if (authority !== undefined) out.push('host', authority);
  pushForwardingFields(out, req.headers['x-forwarded-for'], context);
  return out;
}

/**
 * The trailer fields of a chunked answer as the client gets them, undefined when none: the end-to-end
 * ones, as responseHeaders() passes a head's, each Node can send (an HTTP/2 stream sends them from an
 * event handler, where a field Node refuses would throw out of the process). They had been dropped:
 * a client read them through the relay and not here. Node sends them to an HTTP/1.1 client only when
 * its answer is chunked, which a chunked answer's is (never to an HTTP/1.0 one, RFC 9112 7.1.2).
 */
function responseTrailers(trailers: IncomingHttpHeaders, forHttp2: boolean): OutgoingHttpHeaders | undefined {
  const out: OutgoingHttpHeaders = {};
  let count = 0;
  for (const [name, value] of Object.entries(responseHeaders(trailers, forHttp2))) {
    if (value === undefined || !sendable(name, value)) continue;
    out[name] = value;
    count++;
  }
  return count === 0 ? undefined : out;
}

/** Node's HTTP/1.1 and HTTP/2 writers take this field (a name without ':' and values without control characters). */
function sendable(name: string, value: number | string | readonly string[]): boolean {
  try {
    validateHeaderName(name);
    for (const one of [value].flat()) validateHeaderValue(name, String(one));
    return true;
  } catch {
    return false;
  }
}

function responseHeaders(headers: IncomingHttpHeaders, forHttp2: boolean): OutgoingHttpHeaders {
  const listed = connectionListed(headers);
  const out: OutgoingHttpHeaders = {};
  for (const name in headers) {
    if (HOP_BY_HOP.has(name) || listed.has(name)) continue;
    const value = headers[name];
    out[name] = forHttp2 && Array.isArray(value) && HTTP2_SINGLE_VALUE.has(name) ? value[0] : value;
  }
  return out;
}
