/**
 * The admin listener: plain HTTP, loopback by default, for Prometheus and
 * Kubernetes probes. /metrics (Prometheus text), /healthz (the process
 * answers), /readyz (the callback's report; 503 while not ready).
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { bindsIpv6Only, type BindSpec } from './config.js';
import { bindEach, type SkippedAddress } from './bind-addresses.js';
import { ListenError } from './errors.js';
import type { HealthReport } from './health.js';
import type { Logger } from './log.js';
import type { MetricsSource } from './metrics-aggregate.js';
import { hostAndPort } from './addresses.js';
import { oneAtATime } from './one-at-a-time.js';

export interface AdminOptions extends BindSpec {
  /** 0 asks the OS for a free port (tests). */
  readonly port: number;
  /** A ProxyMetrics, or several workers' merged (src/metrics-aggregate.ts). */
  readonly metrics: MetricsSource;
  /** Computes the /readyz body; `ready` false answers 503. */
  readonly health: () => Promise<HealthReport> | HealthReport;
  readonly logger?: Logger;
}

export interface AdminServer {
  readonly addresses: readonly AddressInfo[];
  readonly port: number;
  /** Addresses of a host name not bound: not on this machine (bindEach). */
  readonly skipped: readonly SkippedAddress[];
  close(): Promise<void>;
}

type Route = (res: ServerResponse) => Promise<void>;

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body) + '\n';
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

function routes(options: AdminOptions, started: number): Record<string, Route> {
  // With workers, each rendering asks every one of them for its metrics, on their event loops, which serve the clients:
  // 500 scrapes at once took ~4 s of each worker's CPU and made both look stuck (worker_unresponsive). Concurrent scrapes share one.
  const metricsText = oneAtATime(() => options.metrics.text());
  return {
    '/metrics': async (res) => {
      const text = await metricsText();
      res.writeHead(200, { 'content-type': options.metrics.contentType, 'cache-control': 'no-store' });
      res.end(text);
    },
    '/healthz': async (res) => sendJson(res, 200, { status: 'alive', uptimeSeconds: Math.round((Date.now() - started) / 1000), pid: process.pid }),
    '/readyz': async (res) => {
      const report = await options.health();
      sendJson(res, report.ready ? 200 : 503, report);
    },
  };
}

function handler(options: AdminOptions): (req: IncomingMessage, res: ServerResponse) => void {
  const table = routes(options, Date.now());
  return (req, res) => {
    const path = (req.url ?? '/').split('?', 1)[0]!;
    const route = Object.hasOwn(table, path) ? table[path] : undefined;
    if (!route) return sendJson(res, 404, { error: `no such admin path; try ${Object.keys(table).join(', ')}` });
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.setHeader('allow', 'GET, HEAD');
      return sendJson(res, 405, { error: 'use GET' });
    }
    route(res).catch((err: unknown) => {
      options.logger?.error({ event: 'admin_error', path, err }, 'admin request failed');
      if (!res.headersSent) sendJson(res, 500, { error: 'internal error' });
      else res.destroy();
    });
  };
}

/** Why the admin port could not be bound, said so that the user knows what to change. */
export function adminBindProblem(err: NodeJS.ErrnoException): string {
  switch (err.code) {
    case 'EADDRINUSE':
      return 'is in use (pick another --mtls_admin_port)';
    case 'EACCES':
      return 'needs privileges (use a port above 1023)';
    case 'EADDRNOTAVAIL':
      return 'cannot be bound: the address is not on this machine (check --mtls_admin_bind_address)';
    case 'EAFNOSUPPORT':
      // A kernel booted with ipv6.disable=1 has no IPv6 sockets at all.
      return 'cannot be bound: IPv6 is turned off on this machine (give --mtls_admin_bind_address an IPv4 address)';
    default:
      return `cannot be bound (${err.code ?? err.message})`;
  }
}

function listen(server: Server, host: string, port: number, ipv6Only: boolean): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException) => {
      reject(new ListenError(`--mtls_admin_port: ${hostAndPort(host, port)} ${adminBindProblem(err)}`, { cause: err }));
    };
    server.once('error', onError);
    server.listen({ port, host, ipv6Only }, () => {
      server.off('error', onError);
      resolve();
    });
  });
}

/** Starts the admin listener on every host; rejects with a ListenError and nothing left bound. */
export async function startAdminServer(options: AdminOptions): Promise<AdminServer> {
  const servers: Server[] = [];
  const close = () => Promise.all(servers.map((s) => new Promise<void>((resolve) => {
    s.closeAllConnections();
    s.close(() => resolve());
  }))).then(() => undefined);
  let port = options.port;
  let skipped: SkippedAddress[];
  // One handler for every address: scrapes on any of them share a rendering.
  const serve = handler(options);
  try {
    skipped = await bindEach(options, async (host) => {
      const server = createServer(serve);
      await listen(server, host, port, bindsIpv6Only(host, options.hosts));
      servers.push(server);
      port = (server.address() as AddressInfo).port;
    });
  } catch (err) {
    await Promise.all(servers.filter((s) => s.listening).map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
    throw err;
  }
  const addresses = servers.map((s) => s.address() as AddressInfo);
  return { addresses, port: addresses[0]?.port ?? 0, skipped, close };
}
