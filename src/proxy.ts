import type { AddressInfo } from 'node:net';
import type { TLSSocket } from 'node:tls';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Http2ServerRequest, Http2ServerResponse } from 'node:http2';
import type { Config, ListenerConfig } from './config.js';
import type { Logger } from './log.js';
import { OcspChecker } from './ocsp.js';
import { BIND_FLAG, SecureListener, requestStart, type ConnectionContext } from './listeners.js';
import { logSkipped, type SkippedAddress } from './bind-addresses.js';
import { H1Front, H2Front, type Drainable, type RequestHandler } from './http-fronts.js';
import { GrpcForwarder, separateRepeated } from './grpc-forwarder.js';
import { RestForwarder } from './rest-forwarder.js';
import { grpcRelay } from './grpc-relay.js';
import { restRelay } from './rest-relay.js';
import type { Relay } from './relay.js';
import { secureContextOptions, type TlsMaterial } from './tls-material.js';
import { liveJudge } from './tls-reload.js';
import { combineObservers, elapsedMs, NOOP_OBSERVER, type ListenerName, type ProxyObserver } from './observer.js';
import { loggingObserver } from './log-observer.js';
import { hostAndPort } from './addresses.js';
import { DescriptorHeadroom } from './fd-headroom.js';
import type { RepeatLimit } from './repeat-budget.js';

export interface ProxyOptions {
  readonly config: Config;
  readonly material: TlsMaterial;
  readonly logger: Logger;
  /** Extra observer (metrics); the logging observer is always on. */
  readonly observer?: ProxyObserver;
  /** Per listener: returns why the upstream is not ready yet (OVMS starting), or undefined. */
  readonly notReady?: Partial<Record<ListenerName, () => string | undefined>>;
  /** Refuses connections short of the open-files limit; default: this process's limit, if known. */
  readonly descriptors?: DescriptorHeadroom | undefined;
  /** Shared by both listeners (one cache of answers per process); default: one made from config.ocsp, if set. */
  readonly ocsp?: OcspChecker | undefined;
  /** How many failed or refused handshake lines of one kind are logged in full; default: repeat-budget.ts. */
  readonly handshakeLineLimit?: RepeatLimit | undefined;
}

export interface RunningProxy {
  /** Bound addresses per listener (several when a bind address list was given). */
  readonly addresses: Readonly<Partial<Record<ListenerName, readonly AddressInfo[]>>>;
  /** The first bound port of a listener; handy with port 0. */
  port(listener: ListenerName): number | undefined;
  /** New handshakes use the new material; live connections keep going, a revoked client's too (TlsReloader closes those). */
  reloadTls(material: TlsMaterial, allow?: Config['allow']): void;
  /** Live connections by listener, for revocation checks. */
  listeners(): readonly SecureListener[];
  /**
   * Stop accepting, let in-flight calls finish (GOAWAY on HTTP/2) for up to
   * `timeoutMs`, then cut whatever is left. A second call waits for the first, whose timeout stands.
   */
  shutdown(timeoutMs: number): Promise<void>;
  /** Rejects when the proxy can serve no more and the run must end (workers: see WorkerPool.failed). */
  readonly failed?: Promise<never>;
  /** False while a connection accepted now would be closed at once to keep open files spare (fd-headroom.ts). */
  takesNewConnections?(): boolean;
  /** True once shutdown() has begun: the listeners are closed or closing, and calls in flight finish. */
  draining?(): boolean;
}

const GRPC_PORT_HINT =
  'This port speaks gRPC over HTTP/2 (TLS with ALPN h2). Point a gRPC client at it; ' +
  'REST and plain HTTP/1.1 requests belong on the REST port (--rest_port).\n';

/** The 426 an HTTP/1.1 request on the gRPC port gets, with its access line: an operator sees who is pointed at the wrong port. */
function answerHttp1OnGrpcPort(observer: ProxyObserver): RequestHandler {
  return (req: IncomingMessage | Http2ServerRequest, res: ServerResponse | Http2ServerResponse, context: ConnectionContext) => {
    const started = requestStart(context);
    res.writeHead(426, { 'content-type': 'text/plain; charset=utf-8', upgrade: 'h2', connection: 'close' });
    res.end(GRPC_PORT_HINT);
    const { identity } = context;
    observer.request({
      listener: context.listener, protocol: 'http/1.1', remote: context.remoteAddress, subject: identity.subject, serial: identity.serial,
      method: req.method ?? '', path: req.url ?? '', status: 426, bytesIn: 0, bytesOut: Buffer.byteLength(GRPC_PORT_HINT), durationMs: elapsedMs(started),
    });
  };
}

interface Assembled {
  listener: SecureListener;
  fronts: Drainable[];
  /** The shutdown timeout is running out: each call or request in flight is ended, told `message`. */
  endInFlight(message: string): void;
  /** Once no client connection is left: closes the upstream side, taking `graceMs` at most. */
  close(graceMs: number): Promise<void>;
}

/** A relay (when its mode is on) takes a protocol's connections first; the terminating front is its fallback. */
interface Relays {
  readonly h2?: Relay | undefined;
  readonly http1?: Relay | undefined;
}

/** A public TLS port handing authorized sockets to its relays or its HTTP/2 and HTTP/1.1 fronts. */
function listenerWithFronts(name: ListenerName, cfg: ListenerConfig, options: ProxyOptions, observer: ProxyObserver, h2: H2Front, h1: H1Front, relays: Relays): SecureListener {
  const { config } = options;
  const closeH2 = (s: TLSSocket) => relays.h2?.closeConnection(s) || h2.closeConnection(s);
  const closeHttp1 = (s: TLSSocket) => relays.http1?.closeConnection(s) || h1.closeConnection(s);
  return new SecureListener({
    name,
    hosts: cfg.hosts,
    resolvedFrom: cfg.resolvedFrom,
    port: cfg.port,
    secureContext: secureContextOptions(options.material),
    certificates: options.material,
    limits: config.limits,
    allow: config.allow,
    observer,
    descriptors: options.descriptors,
    ocsp: options.ocsp,
    proxyProtocol: config.proxyProtocol,
    handover: {
      h2: (s, c) => (relays.h2 ?? h2).accept(s, c),
      http1: (s, c) => (relays.http1 ?? h1).accept(s, c),
      close: (s) => (s.alpnProtocol === 'h2' ? closeH2(s) : closeHttp1(s)),
    },
  });
}

function assembleGrpc(cfg: ListenerConfig, options: ProxyOptions, observer: ProxyObserver): Assembled {
  const { limits, grpcMode, grpcUpstreamConnections } = options.config;
  const notReady = options.notReady?.grpc;
  const forwarder = new GrpcForwarder({ upstream: cfg.upstream, limits, upstreamConnections: grpcUpstreamConnections, observer, notReady });
  const h2 = new H2Front({ limits, observer, onStream: (stream, headers, ctx, raw) => forwarder.handle(stream, separateRepeated(headers, raw), ctx) });
  const h1 = new H1Front({ limits, observer, onRequest: answerHttp1OnGrpcPort(observer) });
  // The terminating front stays: it answers while the upstream is not ready or unreachable.
  const relay =
    grpcMode === 'relay'
      ? grpcRelay({ upstream: cfg.upstream, connectTimeoutMs: limits.upstreamConnectTimeoutMs, idleTimeoutMs: limits.idleTimeoutMs, maxConcurrentStreams: limits.maxConcurrentStreams, observer, notReady, fallback: (s, c) => h2.accept(s, c) })
      : undefined;
  const fronts: Drainable[] = relay ? [relay, h2, h1] : [h2, h1];
  const close = (graceMs: number): Promise<void> => {
    h1.close();
    return forwarder.close(graceMs);
  };
  const endInFlight = (message: string) => forwarder.endAll(message);
  return { listener: listenerWithFronts('grpc', cfg, options, observer, h2, h1, { h2: relay }), fronts, endInFlight, close };
}

function assembleRest(cfg: ListenerConfig, options: ProxyOptions, observer: ProxyObserver): Assembled {
  const { limits, restMode } = options.config;
  const notReady = options.notReady?.rest;
  const forwarder = new RestForwarder({ upstream: cfg.upstream, connectTimeoutMs: limits.upstreamConnectTimeoutMs, bodyTimeoutMs: limits.idleTimeoutMs, maxHeaderSize: limits.maxHeaderSize, maxRequestsInFlight: limits.maxConcurrentStreams, observer, notReady });
  const onRequest = forwarder.handle.bind(forwarder);
  const h2 = new H2Front({ limits, observer, onRequest, goAwayOnceIdleOnDrain: true });
  const h1 = new H1Front({ limits, observer, onRequest });
  // HTTP/2 clients of the REST port keep the terminating front: the upstream speaks HTTP/1.1 only.
  const relay =
    restMode === 'relay'
      ? restRelay({ upstream: cfg.upstream, connectTimeoutMs: limits.upstreamConnectTimeoutMs, observer, notReady, limits, fallback: (s, c) => h1.accept(s, c) })
      : undefined;
  const fronts: Drainable[] = relay ? [relay, h2, h1] : [h2, h1];
  const close = async (): Promise<void> => {
    h1.close();
    forwarder.close();
  };
  const endInFlight = (message: string) => {
    relay?.endAll(message);
    forwarder.endAll(message);
  };
  return { listener: listenerWithFronts('rest', cfg, options, observer, h2, h1, { http1: relay }), fronts, endInFlight, close };
}

/**
 * Binds the public listeners (TLS material already validated) and starts
 * forwarding. Resolves once every port listens; rejects with a ListenError
 * (and nothing left listening) when one cannot bind.
 */
export async function startProxy(proxyOptions: ProxyOptions): Promise<RunningProxy> {
  const { config, logger } = proxyOptions;
  // One for both listeners: they share the process's descriptors.
  const options = {
    ...proxyOptions,
    descriptors: proxyOptions.descriptors ?? DescriptorHeadroom.forThisProcess(logger),
    ocsp: proxyOptions.ocsp ?? (config.ocsp && new OcspChecker(config.ocsp)),
  };
  const logging = loggingObserver(logger, { accessLog: config.accessLog, repeats: options.handshakeLineLimit, minTlsVersion: config.limits.minTlsVersion });
  const observer = combineObservers(logging, options.observer ?? NOOP_OBSERVER);
  const parts: Assembled[] = [];
  if (config.grpc) parts.push(assembleGrpc(config.grpc, options, observer));
  if (config.rest) parts.push(assembleRest(config.rest, options, observer));
  const skipped: Partial<Record<ListenerName, SkippedAddress[]>> = {};
  try {
    for (const part of parts) skipped[part.listener.name] = await part.listener.listen();
  } catch (err) {
    await Promise.all(parts.map((p) => p.listener.stopAccepting()));
    throw err;
  }
  const addresses: Partial<Record<ListenerName, AddressInfo[]>> = {};
  let stopping: Promise<void> | undefined;
  for (const part of parts) addresses[part.listener.name] = part.listener.addresses();
  for (const part of parts) {
    const { name } = part.listener;
    for (const s of skipped[name] ?? []) logSkipped(logger, name, BIND_FLAG[name], addresses[name]?.[0]?.port ?? 0, s);
    logger.info({ event: 'listening', listener: name, addresses: addresses[name]?.map((a) => hostAndPort(a.address, a.port)) }, `${name} listener ready`);
  }
  return {
    addresses,
    port: (name) => addresses[name]?.[0]?.port,
    listeners: () => parts.map((p) => p.listener),
    reloadTls(material, allow) {
      // Split the PEM bundles once for all listeners: a million-entry CRL is 50 MiB of text to search.
      const options = secureContextOptions(material);
      const judge = liveJudge(material);
      for (const part of parts) part.listener.setSecureContext(options, material, allow, judge);
    },
    // A second call (a signal during a library's own shutdown) waits for the first: it ran the timeout and its lines again.
    shutdown: (timeoutMs) => {
      stopping ??= (async () => {
        await shutdown(parts, timeoutMs, logger);
        // No handshake comes after the listeners closed: what the log held back is said now, not lost at exit.
        logging.flushHeldLines();
      })();
      return stopping;
    },
    takesNewConnections: () => options.descriptors?.hasRoom() ?? true,
    draining: () => stopping !== undefined,
  };
}

/** What a call or request still in flight when the shutdown timeout runs out is told (gRPC UNAVAILABLE, REST 503). */
const SHUTTING_DOWN_MESSAGE = 'the proxy is shutting down: --mtls_shutdown_timeout ran out before this call finished (retry it)';

/**
 * The last part of the shutdown timeout, at most 1 s, in which the calls still in flight are
 * ended with a status saying why and their connections close; only what is left after it is cut.
 */
function goodbyeMs(timeoutMs: number): number {
  return Math.min(1000, timeoutMs / 10);
}

/**
 * How long a drain keeps an HTTP/1.1 connection whose last answer said keep-alive open for the
 * request its client may be sending (H1Front.drain()): a client in a steady loop sends its next one
 * within milliseconds of an answer; a quarter of the drain at most, so that it never runs into the timeout.
 */
function keepAliveGraceMs(drainMs: number): number {
  return Math.min(1000, drainMs / 4);
}

/** Resolves true if `done` has not settled within `ms`. */
async function outlasts(done: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<boolean>((resolve) => {
    timer = setTimeout(() => resolve(true), ms);
  });
  const expired = await Promise.race([done.then(() => false), timedOut]);
  clearTimeout(timer);
  return expired;
}

async function shutdown(parts: Assembled[], timeoutMs: number, logger: Logger): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  const allClosed = Promise.all(parts.map((p) => p.listener.stopAccepting()));
  const goodbye = goodbyeMs(timeoutMs);
  const keepAliveGrace = keepAliveGraceMs(timeoutMs - goodbye);
  for (const part of parts) for (const front of part.fronts) front.drain(keepAliveGrace);
  if (await outlasts(allClosed, timeoutMs - goodbye)) {
    const left = parts.reduce((n, p) => n + p.listener.connections.size, 0);
    logger.warn({ event: 'shutdown_timeout', connections: left }, `shutdown timeout: ending what is still in flight on ${left} connection(s)`);
    // Cut under them, clients would read a dropped connection (UNAVAILABLE "Connection dropped", a reset) and not know why.
    for (const part of parts) part.endInFlight(SHUTTING_DOWN_MESSAGE);
    if (await outlasts(allClosed, goodbye)) {
      for (const part of parts) part.listener.destroyAll();
      await allClosed;
    }
  }
  const remaining = Math.max(0, deadline - performance.now());
  await Promise.all(parts.map((p) => p.close(remaining)));
}
