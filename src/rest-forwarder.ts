import { Agent, request, type AgentOptions, type IncomingMessage, type ServerResponse, type OutgoingHttpHeaders, type IncomingHttpHeaders, type ClientRequest } from 'node:http';
import { constants as http2Constants, type Http2ServerRequest, type Http2ServerResponse } from 'node:http2';
import type { Readable, Writable } from 'node:stream';
import type { HostPort } from './config.js';
import type { ConnectionContext } from './listeners.js';
import { elapsedMs, type ProxyObserver } from './observer.js';
import { describeUpstreamError } from './upstream-errors.js';
import { XFCC } from './grpc-forwarder.js';
import { forward } from './stream-forward.js';
import { failIfNotConnectedWithin } from './upstream-connect.js';
import { Socket } from 'node:net';

type ClientRequestLike = IncomingMessage | Http2ServerRequest;
type ClientResponseLike = ServerResponse | Http2ServerResponse;

/** Hop-by-hop headers (RFC 9110 7.6.1) plus the HTTP/2-only ones. */
const HOP_BY_HOP = new Set([
  'connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'http2-settings', 'expect',
]);

/**
 * Body bytes a request or response may have waiting for the other side before
 * we stop reading it; as large as the default HTTP/2 stream window, so an
 * HTTP/2 client's window is not held back on every 16 KiB (see stream-forward.ts).
 */
const BODY_BUFFER = 1024 * 1024;

export interface RestForwarderOptions {
  readonly upstream: HostPort;
  /** A new connection to the upstream not established by then fails the request with 502. */
  readonly connectTimeoutMs: number;
  /** A request body with no byte for this long is given up (408); --mtls_idle_timeout. */
  readonly bodyTimeoutMs: number;
  readonly observer: ProxyObserver;
  /** Returns why the upstream cannot take requests yet, or undefined when ready. */
  readonly notReady?: () => string | undefined;
}

/**
 * HTTP/1.1 and HTTP/2 clients -> the HTTP/1.1 upstream over kept-alive
 * connections. Bodies stream both ways with backpressure; nothing is
 * buffered, so Server-Sent Events pass event by event. No timeout on a live
 * response: LLM streams can be quiet for minutes. A request body that stops
 * arriving is another matter (nginx's client_body_timeout): it would hold a
 * model server connection for as long as the client likes.
 */
export class RestForwarder {
  readonly #options: RestForwarderOptions;
  readonly #agent: Agent;

  constructor(options: RestForwarderOptions) {
    this.#options = options;
    this.#agent = connectionTimingAgent(options.connectTimeoutMs);
  }

  handle(req: ClientRequestLike, res: ClientResponseLike, context: ConnectionContext): void {
    const started = performance.now();
    const notReady = this.#options.notReady?.();
    if (notReady !== undefined) {
      res.writeHead(503, { 'content-type': 'application/json', 'retry-after': '1' });
      res.end(JSON.stringify({ error: notReady }));
      req.resume();
      this.#log(req, context, started, { status: 503, bytesIn: 0, bytesOut: 0, error: 'not_ready' });
      return;
    }
    this.#forward(req, res, context, started);
  }

  close(): void {
    this.#agent.destroy();
  }

  #forward(req: ClientRequestLike, res: ClientResponseLike, context: ConnectionContext, started: number): void {
    const { upstream } = this.#options;
    const stats = { status: 0, bytesIn: 0, bytesOut: 0, error: undefined as string | undefined };
    /** Set once we answered the client ourselves (a stalled body): nothing from the upstream may follow. */
    let givenUp = false;
    const upstreamReq: ClientRequest = request({
      agent: this.#agent,
      host: upstream.host,
      port: upstream.port,
      method: req.method,
      path: req.url,
      headers: upstreamHeaders(req, context),
      setHost: false,
    });
    upstreamReq.on('response', (upstreamRes) => {
      if (givenUp) return;
      stats.status = upstreamRes.statusCode ?? 502;
      res.writeHead(stats.status, responseHeaders(upstreamRes.headers));
      // Send the headers now: an SSE client should see the stream open before the first event.
      if (!upstreamRes.headers['content-length']) (res as ServerResponse).flushHeaders();
      forward(upstreamRes, res as unknown as Writable, BODY_BUFFER, (n) => (stats.bytesOut += n));
      upstreamRes.on('aborted', () => res.destroy());
    });
    upstreamReq.on('error', (err) => {
      if (givenUp) return;
      const { code, message } = describeUpstreamError(upstream, err);
      stats.error ??= code;
      if (res.headersSent || res.destroyed) {
        res.destroy();
        return;
      }
      this.#options.observer.upstreamError(context.listener, code);
      stats.status = 502;
      res.writeHead(502, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: message }));
    });
    const stall = this.#watchBody(req, () => {
      givenUp = true;
      stats.error = 'client_body_timeout';
      upstreamReq.destroy();
      if (res.headersSent) {
        res.destroy();
        return;
      }
      stats.status = 408;
      // The rest of this body will not come; on HTTP/1.1 the connection cannot carry another request.
      if (req.httpVersionMajor === 1) (res as ServerResponse).shouldKeepAlive = false;
      res.writeHead(408, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: bodyStalledMessage(this.#options.bodyTimeoutMs) }));
      // HTTP/2: RST_STREAM(NO_ERROR) once the answer is out tells the client to stop sending (RFC 9113 8.1); Node waits for the stream's 'finish'.
      if (req.httpVersionMajor === 2) (req as Http2ServerRequest).stream.close(http2Constants.NGHTTP2_NO_ERROR);
    });
    res.once('close', () => {
      clearTimeout(stall);
      if (!res.writableFinished) {
        // The client went away: abort the upstream request so the model stops working for nobody.
        stats.error ??= 'client_closed';
        upstreamReq.destroy();
      }
      this.#log(req, context, started, stats);
    });
    forward(req as Readable, upstreamReq, BODY_BUFFER, (n) => {
      stats.bytesIn += n;
      stall?.refresh();
    });
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

  #log(req: ClientRequestLike, context: ConnectionContext, started: number, stats: { status: number; bytesIn: number; bytesOut: number; error?: string | undefined }): void {
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
    });
  }
}

/**
 * An upstream connection idle this long is closed by us. A server closes its
 * idle connections too (Node after 5 s, OVMS's Drogon after 60 s, nginx after
 * 75 s); when it does so just as we send a request, that request fails with
 * 502. Closing first removes that race. Node's agent would also honour a
 * shorter `Keep-Alive: timeout=` from the server, but only once it has a
 * timeout of its own. A request in flight is never cut by it: the agent
 * destroys only sockets in its free list.
 */
export const UPSTREAM_IDLE_MS = 4000;

/**
 * Kept-alive upstream connections. noDelay at connect (a net.connect option)
 * and the connect timeout where each connection is made: once per
 * connection, not per request.
 */
function connectionTimingAgent(connectTimeoutMs: number): Agent {
  const agent = new Agent({ keepAlive: true, maxSockets: Infinity, maxFreeSockets: 256, scheduling: 'lifo', noDelay: true, timeout: UPSTREAM_IDLE_MS } as AgentOptions);
  const connect = agent.createConnection.bind(agent);
  agent.createConnection = (options, callback) => {
    const socket = connect(options, callback);
    if (socket instanceof Socket) failIfNotConnectedWithin(socket, connectTimeoutMs);
    return socket;
  };
  return agent;
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

/** X-Forwarded-For as the upstream gets it: what the client sent, then the client's own address. */
export function forwardedFor(previous: readonly string[], context: ConnectionContext): string {
  return [...previous, context.remoteAddress ?? 'unknown'].join(', ');
}

export function upstreamHeaders(req: ClientRequestLike, context: ConnectionContext): OutgoingHttpHeaders {
  const incoming = req.headers;
  const listed = connectionListed(incoming);
  const out: OutgoingHttpHeaders = {};
  for (const name in incoming) {
    if (name.startsWith(':') || HOP_BY_HOP.has(name) || listed.has(name) || name === XFCC) continue;
    out[name] = incoming[name];
  }
  const authority = incoming[':authority'] ?? incoming['host'];
  if (authority !== undefined) out['host'] = String(authority);
  const previous = incoming['x-forwarded-for'];
  out['x-forwarded-for'] = forwardedFor(previous ? [previous].flat() : [], context);
  out['x-forwarded-proto'] = 'https';
  out[XFCC] = context.identity.xfcc;
  return out;
}

function responseHeaders(headers: IncomingHttpHeaders): OutgoingHttpHeaders {
  const listed = connectionListed(headers);
  const out: OutgoingHttpHeaders = {};
  for (const name in headers) {
    if (HOP_BY_HOP.has(name) || listed.has(name)) continue;
    out[name] = headers[name];
  }
  return out;
}
