/**
 * Prometheus metrics for one proxy: a registry of its own (never prom-client's
 * global default, so two proxies in one process - tests, library users - do
 * not mix their numbers) fed by the data path through the ProxyObserver
 * interface, plus setters for what the data path cannot see (certificates,
 * reloads, the OVMS child).
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics, type Aggregator } from 'prom-client';
import type { Refusal } from './client-identity.js';
import type { AccessRecord, H2SessionFailure, ListenerName, ProxyObserver, RelayRecord, UnresponsiveClient, UnseenResets } from './observer.js';
import { subjectCn, validTo, type TlsMaterial } from './tls-material.js';
import { grpcRoute, restRoute } from './metric-routes.js';
import { replaceEventLoopDelayGauges } from './event-loop-delay.js';

export const METRIC_PREFIX = 'ovms_mtls_';

export interface MetricsOptions {
  /** Node process metrics (CPU, memory, event loop lag) with the same prefix. Default true. */
  readonly processMetrics?: boolean;
}

/** Seconds; from sub-millisecond health calls to multi-minute LLM streams. */
const DURATION_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300];

function defineMetrics(registry: Registry) {
  const name = (n: string) => METRIC_PREFIX + n;
  const registers = [registry];
  return {
    handshakes: new Counter({ name: name('handshakes_total'), help: 'TLS handshakes by listener, result (accepted, refused, failed) and reason', labelNames: ['listener', 'result', 'reason'], registers }),
    requests: new Counter({ name: name('requests_total'), help: 'Finished requests and RPCs by listener, method, route, HTTP status and grpc-status', labelNames: ['listener', 'method', 'route', 'status', 'grpc_status'], registers }),
    duration: new Histogram({ name: name('request_duration_seconds'), help: 'Time from request start to the end of the response, by listener and route', labelNames: ['listener', 'route'], buckets: DURATION_BUCKETS, registers }),
    bytesIn: new Counter({ name: name('received_bytes_total'), help: 'Request body bytes received from clients', labelNames: ['listener'], registers }),
    bytesOut: new Counter({ name: name('sent_bytes_total'), help: 'Response body bytes sent to clients', labelNames: ['listener'], registers }),
    relayedCalls: new Counter({ name: name('relayed_calls_total'), help: 'Calls (HTTP/2 streams) clients started in --mtls_grpc_mode relay, counted when their connection closes', labelNames: ['listener'], registers }),
    relayedBytes: new Counter({ name: name('relayed_bytes_total'), help: 'HTTP/2 bytes relayed in --mtls_grpc_mode relay (frames included), by direction (in = from clients), counted when a connection closes', labelNames: ['listener', 'direction'], registers }),
    connections: new Gauge({ name: name('open_connections'), help: 'Open client connections (after a successful handshake)', labelNames: ['listener'], registers }),
    connectionsTotal: new Counter({ name: name('connections_total'), help: 'Client connections accepted since start', labelNames: ['listener'], registers }),
    streams: new Gauge({ name: name('open_streams'), help: 'Requests and RPCs in flight', labelNames: ['listener'], registers }),
    unseenResets: new Counter({ name: name('h2_streams_reset_unseen_total'), help: 'HTTP/2 requests Node reset before the proxy saw them (no access line; mostly a header list over --mtls_max_header_size), by listener', labelNames: ['listener'], registers }),
    unresponsiveClients: new Counter({ name: name('unresponsive_clients_total'), help: 'HTTP/1.1 and relayed gRPC client connections closed because the client took none of the bytes waiting for it, and sent none, for --mtls_idle_timeout, by listener', labelNames: ['listener'], registers }),
    h2SessionErrors: new Counter({ name: name('h2_session_errors_total'), help: 'HTTP/2 client connections Node (or the gRPC relay: TOO_MANY_STREAMS) ended with an error of its own (flood, rapid reset: RAPID_RESET, protocol error, the client\'s GOAWAY with an error code), by listener and error code', labelNames: ['listener', 'code'], registers }),
    upstreamErrors: new Counter({ name: name('upstream_errors_total'), help: 'Failures talking to the model server, by listener and error code', labelNames: ['listener', 'code'], registers }),
    certExpiry: new Gauge({ name: name('certificate_expiry_timestamp_seconds'), help: 'notAfter (unix time) of the server certificate, of each CA sent with it and of each trusted client CA', labelNames: ['role', 'subject', 'serial'], registers }),
    crlNextUpdate: new Gauge({ name: name('crl_next_update_timestamp_seconds'), help: 'nextUpdate (unix time) of each loaded CRL; after it passes every client is refused', labelNames: ['crl'], registers }),
    reloads: new Counter({ name: name('tls_reloads_total'), help: 'Certificate reloads by result (success, failure); a failure keeps the previous material', labelNames: ['result'], registers }),
    lastReload: new Gauge({ name: name('tls_last_reload_success_timestamp_seconds'), help: 'When TLS material was last loaded successfully (unix time)', registers }),
    reloadFailing: new Gauge({ name: name('tls_reload_failing'), help: '1 while the certificate files are a set the last reload refused (the previous set still serves), 0 once a reload succeeds or the files are the set in use again', registers }),
    ovmsUp: new Gauge({ name: name('ovms_up'), help: '1 when the model server is running and ready, else 0', registers }),
    ovmsRestarts: new Counter({ name: name('ovms_restarts_total'), help: 'Times the OVMS child was restarted after it failed', registers }),
  };
}

type Defined = ReturnType<typeof defineMetrics>;

/** The metrics registry of one proxy; pass it to startProxy as `observer`. */
export class ProxyMetrics implements ProxyObserver {
  readonly registry = new Registry();
  readonly #m: Defined;
  #processMetrics = false;

  constructor(options: MetricsOptions = {}) {
    this.#m = defineMetrics(this.registry);
    if (options.processMetrics !== false) this.collectProcessMetrics();
    // Counters that should read 0, not be absent, before the first event.
    for (const result of ['success', 'failure']) this.#m.reloads.inc({ result }, 0);
    this.#m.reloadFailing.set(0);
    this.#m.ovmsRestarts.inc(0);
    for (const listener of ['grpc', 'rest']) {
      this.#m.connections.set({ listener }, 0);
      this.#m.streams.set({ listener }, 0);
    }
  }

  /**
   * Adds the Node process metrics, once. Their event-loop delay gauges sample every 10 ms, which wakes
   * an idle process 100 times a second (~5 ms of CPU per second): a process that serves no /metrics
   * (no --mtls_admin_port) is better off without them.
   */
  collectProcessMetrics(): void {
    if (this.#processMetrics) return;
    this.#processMetrics = true;
    collectDefaultMetrics({ register: this.registry, prefix: METRIC_PREFIX });
    replaceEventLoopDelayGauges(this.registry, METRIC_PREFIX);
    mergeOpenFilesPerProcess(this.registry);
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  /** The Prometheus text exposition of every metric. */
  text(): Promise<string> {
    return this.registry.metrics();
  }

  handshakeAccepted(listener: ListenerName): void {
    this.#m.handshakes.inc({ listener, result: 'accepted', reason: '' });
  }

  handshakeRefused(listener: ListenerName, refusal: Refusal): void {
    this.#m.handshakes.inc({ listener, result: 'refused', reason: refusal.reason });
  }

  handshakeFailed(listener: ListenerName, code: string): void {
    this.#m.handshakes.inc({ listener, result: 'failed', reason: code });
  }

  openFilesRefused(listener: ListenerName): void {
    this.#m.handshakes.inc({ listener, result: 'refused', reason: 'open_files_limit' });
  }

  connectionOpened(listener: ListenerName): void {
    this.#m.connections.inc({ listener });
    this.#m.connectionsTotal.inc({ listener });
  }

  connectionClosed(listener: ListenerName): void {
    this.#m.connections.dec({ listener });
  }

  streamOpened(listener: ListenerName): void {
    this.#m.streams.inc({ listener });
  }

  streamClosed(listener: ListenerName): void {
    this.#m.streams.dec({ listener });
  }

  request(record: AccessRecord): void {
    const { listener } = record;
    const route = listener === 'grpc' ? grpcRoute(record.path) : restRoute(record.path);
    // Not 'POST' for every gRPC-port record: an HTTP/1.1 client's GET there (answered 426) is a GET.
    const method = normaliseMethod(record.method);
    this.#m.requests.inc({ listener, method, route, status: String(record.status), grpc_status: grpcStatusLabel(record.grpcStatus) });
    this.#m.duration.observe({ listener, route }, record.durationMs / 1000);
    this.#m.bytesIn.inc({ listener }, record.bytesIn);
    this.#m.bytesOut.inc({ listener }, record.bytesOut);
  }

  relayed(record: RelayRecord): void {
    this.#m.relayedCalls.inc({ listener: record.listener }, record.calls);
    this.#m.relayedBytes.inc({ listener: record.listener, direction: 'in' }, record.bytesIn);
    this.#m.relayedBytes.inc({ listener: record.listener, direction: 'out' }, record.bytesOut);
  }

  upstreamError(listener: ListenerName, code: string): void {
    this.#m.upstreamErrors.inc({ listener, code });
  }

  unseenResets(record: UnseenResets): void {
    this.#m.unseenResets.inc({ listener: record.listener }, record.streams);
  }

  h2SessionFailed(record: H2SessionFailure): void {
    this.#m.h2SessionErrors.inc({ listener: record.listener, code: record.code });
  }

  clientUnresponsive(record: UnresponsiveClient): void {
    this.#m.unresponsiveClients.inc({ listener: record.listener });
  }

  /** Expiry gauges for the material now in use; call at start and after every reload. */
  setCertificates(material: TlsMaterial): void {
    this.#m.certExpiry.reset();
    const serverCert = material.serverCert;
    this.#m.certExpiry.set({ role: 'server', subject: subjectCn(serverCert), serial: serverCert.serialNumber.toLowerCase() }, unixSeconds(validTo(serverCert)));
    // An intermediate CA sent with the server certificate that expires fails every client as well.
    for (const ca of material.serverChain.slice(1)) {
      this.#m.certExpiry.set({ role: 'server_chain', subject: subjectCn(ca), serial: ca.serialNumber.toLowerCase() }, unixSeconds(validTo(ca)));
    }
    for (const ca of material.clientCas) {
      this.#m.certExpiry.set({ role: 'client_ca', subject: subjectCn(ca), serial: ca.serialNumber.toLowerCase() }, unixSeconds(validTo(ca)));
    }
    this.#m.crlNextUpdate.reset();
    for (const crl of material.crls) {
      // A CRL without nextUpdate never goes stale; +Inf says so to alert rules.
      this.#m.crlNextUpdate.set({ crl: String(crl.index) }, crl.nextUpdate ? unixSeconds(crl.nextUpdate) : Infinity);
    }
  }

  /** The material in force was loaded: at start too, or the gauge reads 1970 and any alert on its age fires until a reload. */
  materialLoaded(): void {
    this.#m.lastReload.set(unixSeconds(new Date()));
  }

  /**
   * A certificate reload finished; `ok` false means the old material stays in use. `changed` false: the files were
   * the set in use, nothing was loaded or counted, but a set that failed before is no longer what they hold.
   */
  reloaded({ ok, changed = true }: { readonly ok: boolean; readonly changed?: boolean }): void {
    this.#m.reloadFailing.set(ok ? 0 : 1);
    if (!changed) return;
    this.#m.reloads.inc({ result: ok ? 'success' : 'failure' });
    if (ok) this.materialLoaded();
  }

  setOvmsUp(up: boolean): void {
    this.#m.ovmsUp.set(up ? 1 : 0);
  }

  ovmsRestarted(): void {
    this.#m.ovmsRestarts.inc();
  }
}

/**
 * The open-files limit is per process. Summed over the primary and its workers (prom-client's
 * default merge), process_max_fds read three times `ulimit -n` with two workers, and the usual
 * alert, process_open_fds / process_max_fds, stayed near a third while one worker was at its
 * limit and closed every new connection (/readyz 503). Merged so, the ratio is the fullest
 * process's: its descriptors, over the limit every process inherits from the primary.
 */
const OPEN_FILES_AGGREGATORS: Readonly<Record<string, Aggregator>> = { process_open_fds: 'max', process_max_fds: 'min' };

function mergeOpenFilesPerProcess(registry: Registry): void {
  for (const [name, aggregator] of Object.entries(OPEN_FILES_AGGREGATORS)) {
    const metric = registry.getSingleMetric(METRIC_PREFIX + name) as { aggregator: Aggregator } | undefined;
    if (metric) metric.aggregator = aggregator;
  }
}

function unixSeconds(date: Date): number {
  return Math.floor(date.getTime() / 1000);
}

const METHODS = new Set(['GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'PATCH', 'OPTIONS']);

/** Clients choose the method string: anything unusual shares one label. */
function normaliseMethod(method: string): string {
  return METHODS.has(method) ? method : 'OTHER';
}

/** gRPC's status codes, 0 (OK) to 16 (UNAUTHENTICATED). */
const GRPC_STATUSES = new Set(Array.from({ length: 17 }, (_, code) => String(code)));

/**
 * The model server chooses the grpc-status string: one that sent anything else (`bogus-1`, a
 * number past 16) added a series per value. Those share one label; '' stays for no status.
 */
function grpcStatusLabel(status: string | undefined): string {
  if (status === undefined) return '';
  return GRPC_STATUSES.has(status) ? status : 'other';
}
