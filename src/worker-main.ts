/**
 * One proxy worker (`--mtls_workers` > 1): runs startProxy with the
 * primary's Config on the listeners cluster shares, with its own upstream
 * sessions and metrics, and does what the primary asks over IPC (reload,
 * metrics, drain). It never reads or watches the certificate files (the
 * primary sends the set it validated) and never talks to OVMS.
 */
import cluster from 'node:cluster';
import { createLogger, type Logger } from './log.js';
import { keepInspectorOff } from './inspector-signal.js';
import { takeHeldStopSignal } from './startup-signals.js';
import { isUserError } from './errors.js';
import { ProxyMetrics } from './metrics.js';
import { startProxy, type RunningProxy } from './proxy.js';
import { tlsMaterialFromTexts, type TlsTexts } from './tls-material.js';
import { TlsReloader } from './tls-reload.js';
import { dropPrivileges, isRoot } from './privileges.js';
import type { Config } from './config.js';
import { isMessage, type FromWorker, type ToWorker, type UpstreamPorts } from './worker-protocol.js';

type StartMessage = Extract<ToWorker, { type: 'start' }>;

/** The forwarders read the upstream port at each connection: moving it here redirects new upstream sessions. */
class LiveUpstreams {
  readonly config: Config;
  readonly #grpc: { host: string; port: number } | undefined;
  readonly #rest: { host: string; port: number } | undefined;

  constructor(config: Config) {
    this.#grpc = config.grpc ? { ...config.grpc.upstream } : undefined;
    this.#rest = config.rest ? { ...config.rest.upstream } : undefined;
    this.config = {
      ...config,
      grpc: config.grpc && this.#grpc ? { ...config.grpc, upstream: this.#grpc } : undefined,
      rest: config.rest && this.#rest ? { ...config.rest, upstream: this.#rest } : undefined,
    };
  }

  move(ports: UpstreamPorts | undefined): void {
    if (ports?.grpc && this.#grpc) this.#grpc.port = ports.grpc;
    if (ports?.rest && this.#rest) this.#rest.port = ports.rest;
  }
}

/** What the primary told this worker so far; the message handler fills it in. */
class Inbox {
  notReady: string | undefined;
  /** The certificate set the primary sent last. */
  tls: TlsTexts | undefined;
  upstreams: LiveUpstreams | undefined;
  reloader: TlsReloader | undefined;
  /** Once it serves: does it take new connections (see RunningProxy.takesNewConnections)? */
  takesNewConnections: () => boolean = () => true;
  readonly started: Promise<StartMessage>;
  readonly drain: Promise<number>;
  #start!: (m: StartMessage) => void;
  #drain!: (timeoutMs: number) => void;

  constructor(readonly metrics: ProxyMetrics) {
    this.started = new Promise((resolve) => (this.#start = resolve));
    this.drain = new Promise((resolve) => (this.#drain = resolve));
  }

  handle(message: ToWorker): void {
    switch (message.type) {
      case 'start':
        this.notReady = message.notReady;
        this.tls = message.tls;
        return this.#start(message);
      case 'upstream':
        this.notReady = message.notReady;
        this.upstreams?.move(message.ports);
        return;
      case 'reload':
        this.tls = message.tls;
        // Before the reloader exists, serve() loads this set once it does.
        void this.reloader?.reload('primary');
        return;
      case 'metrics':
        void this.metrics.registry.getMetricsAsJSON().then((metrics) => send({ type: 'metrics', id: message.id, metrics }));
        return;
      case 'ping':
        return send({ type: 'pong', room: this.takesNewConnections() });
      case 'drain':
        return this.#drain(message.timeoutMs);
    }
  }

  /** A terminal's Ctrl-C reaches the whole process group: drain as if the primary asked. */
  drainOnSignal(timeoutMs: number): void {
    this.#drain(timeoutMs);
  }
}

/**
 * With a callback: a primary that died (SIGKILL, the out-of-memory killer) while a message to it
 * was on its way (an answer to a scrape or ping it sent, the hello of a worker starting) fails the
 * write with EPIPE, and without one that failure was an uncaught 'error' whose stack trace went to
 * the container log. Nothing to do about it: the worker ends at the disconnect that follows.
 */
function send(message: FromWorker): void {
  if (process.connected) process.send!(message, undefined, undefined, ignoreSendFailure);
}

function ignoreSendFailure(): void {}

/**
 * Signals: SIGINT/SIGTERM drain (the primary sends `drain` too), one that came while the worker loaded
 * too (a Ctrl-C reaches the whole process group). SIGHUP is the primary's to handle: ignored here since launch().
 */
function handleSignals(inbox: Inbox, timeoutMs: () => number): void {
  const onStop = () => inbox.drainOnSignal(timeoutMs());
  process.on('SIGINT', onStop);
  process.on('SIGTERM', onStop);
  if (takeHeldStopSignal() !== undefined) onStop();
}

async function serve(start: StartMessage, inbox: Inbox, logger: Logger): Promise<RunningProxy | undefined> {
  inbox.upstreams = new LiveUpstreams(start.config);
  inbox.upstreams.move(start.ports);
  const { config } = inbox.upstreams;
  const notReady = () => inbox.notReady;
  try {
    // The primary's validated set, not the files: they may be broken now (a failed reload), and the old set must keep serving.
    const material = tlsMaterialFromTexts(config.tls, start.tls);
    const proxy = await startProxy({ config, material, logger, ...(config.admin ? { observer: inbox.metrics } : {}), ...(start.gated ? { notReady: { grpc: notReady, rest: notReady } } : {}) });
    if (start.dropTo && isRoot()) {
      dropPrivileges(start.dropTo);
      logger.info({ event: 'privileges_dropped', user: start.dropTo.name, uid: start.dropTo.uid, gid: start.dropTo.gid }, `worker now runs as ${start.dropTo.name}`);
    }
    const load = async () => tlsMaterialFromTexts(config.tls, inbox.tls ?? start.tls);
    inbox.reloader = new TlsReloader({ files: config.tls, current: material, proxy, logger, revokedGraceMs: config.shutdownTimeoutMs, load });
    // A reload that came while the listeners were starting found no reloader: apply it now.
    if (inbox.tls !== start.tls) void inbox.reloader.reload('primary');
    inbox.takesNewConnections = () => proxy.takesNewConnections?.() ?? true;
    send({ type: 'listening', addresses: proxy.addresses });
    return proxy;
  } catch (err) {
    // The primary prints user errors as its one startup line; anything else is logged here.
    if (!isUserError(err)) logger.error({ event: 'worker_failed', err }, `worker failed to start: ${(err as Error).message}`);
    send({ type: 'failed', message: (err as Error).message, code: isUserError(err) ? err.code : undefined });
    return undefined;
  }
}

/** The worker process's whole life; resolves with its exit code. */
export async function runWorker(): Promise<number> {
  // Process metrics start with the config, and only if the primary serves /metrics (see collectProcessMetrics).
  const inbox = new Inbox(new ProxyMetrics({ processMetrics: false }));
  process.on('message', (message: unknown) => {
    if (isMessage<ToWorker>(message)) inbox.handle(message);
  });
  send({ type: 'hello' });
  let signalDrainMs = 0;
  // Set once started: a SIGUSR1 before that is ignored without a line.
  const logging: { logger?: Logger } = {};
  handleSignals(inbox, () => signalDrainMs);
  keepInspectorOff(() => logging.logger);
  // Told to stop before being told to start (the primary is shutting down): nothing to drain.
  const start = await Promise.race([inbox.started, inbox.drain.then(() => undefined)]);
  if (!start) return 0;
  signalDrainMs = start.drainMs;
  if (start.config.admin) inbox.metrics.collectProcessMetrics();
  const logger = createLogger({ level: start.config.logLevel }).child({ worker: cluster.worker?.id, pid: process.pid });
  logging.logger = logger;
  const proxy = await serve(start, inbox, logger);
  if (!proxy) return 1;
  const timeoutMs = await inbox.drain;
  logger.info({ event: 'worker_draining', timeoutMs }, 'worker draining');
  await proxy.shutdown(timeoutMs);
  if (start.config.admin) await handOverCounts(inbox.metrics);
  return 0;
}

/** The primary serves /metrics after this worker has gone: it gets the final counts, sent before the exit. */
async function handOverCounts(metrics: ProxyMetrics): Promise<void> {
  const final = await metrics.registry.getMetricsAsJSON();
  if (!process.connected) return;
  await new Promise<void>((resolve) => process.send!({ type: 'final', metrics: final } satisfies FromWorker, () => resolve()));
}
