/**
 * Starts the real proxy (library API) in front of the stand-in model server,
 * with per-run certificates, and gives tests real clients: grpc-js with the
 * KServe and Echo protos, HTTPS/1.1 and HTTP/2 clients presenting a chosen
 * client certificate. Everything listens on 127.0.0.1.
 */
import assert from 'node:assert/strict';
import { before, after } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { connect as connectH2, type ClientHttp2Session } from 'node:http2';
import { request as httpsRequest, type RequestOptions } from 'node:https';
import type { IncomingMessage } from 'node:http';
import { createServer as createTcpServer, Socket, type Server as TcpServer } from 'node:net';
import { once } from 'node:events';
import { connect as tlsConnect, type SecureVersion } from 'node:tls';
import { startModelServer, type ModelServer, type ModelServerOptions } from '../../src/demo/model-server.js';
import { echoClient, kserveClient, type EchoClient, type KserveClient } from '../../src/demo/grpc-client.js';
import { startProxy, type RunningProxy } from '../../src/proxy.js';
import { createLogger } from '../../src/log.js';
import { loadTlsMaterialSync } from '../../src/tls-material.js';
import { DEFAULTS, EMPTY_ALLOW_LIST, FORWARD_MODES, type Config, type ForwardMode, type Limits, type TlsFiles } from '../../src/config.js';
import type { ProxyObserver } from '../../src/observer.js';
import { createTestPki, type TestPki } from './pki.js';
import type { Issued } from '../../src/x509.js';

export interface LogLine {
  level: string;
  event?: string;
  msg: string;
  [key: string]: unknown;
}

/** A pino destination that keeps every line, parsed, for assertions. */
export class LogCapture {
  readonly lines: LogLine[] = [];
  readonly #waiters: { match: (l: LogLine) => boolean; resolve: (l: LogLine) => void }[] = [];

  write(text: string): void {
    for (const raw of text.split('\n')) {
      if (!raw) continue;
      const line = JSON.parse(raw) as LogLine;
      this.lines.push(line);
      for (const w of [...this.#waiters]) {
        if (w.match(line)) {
          this.#waiters.splice(this.#waiters.indexOf(w), 1);
          w.resolve(line);
        }
      }
    }
  }

  /** Resolves with the first line (already logged from index `from` on, or future) that matches. */
  waitFor(match: (l: LogLine) => boolean, from = 0): Promise<LogLine> {
    const found = this.lines.slice(from).find(match);
    if (found) return Promise.resolve(found);
    return new Promise((resolve) => this.#waiters.push({ match, resolve }));
  }
}

export interface ProxySetup {
  pki: TestPki;
  /** `host`: where both upstreams listen (127.0.0.1 unless given). */
  upstream?: { grpcPort?: number; restPort?: number; host?: string };
  /** The proxy's own ports; the system picks them unless given. */
  listen?: { grpcPort?: number; restPort?: number };
  tls?: Partial<TlsFiles>;
  limits?: Partial<Limits>;
  allow?: Partial<Config['allow']>;
  observer?: ProxyObserver;
  notReady?: Parameters<typeof startProxy>[0]['notReady'];
  handshakeLineLimit?: Parameters<typeof startProxy>[0]['handshakeLineLimit'];
  grpcMode?: Config['grpcMode'];
  restMode?: Config['restMode'];
  grpcUpstreamConnections?: number;
  ocsp?: Config['ocsp'];
  proxyProtocol?: Config['proxyProtocol'];
}

export interface StartedProxy {
  proxy: RunningProxy;
  logs: LogCapture;
  grpcPort: number;
  restPort: number;
  grpcAddress: string;
}

/** A drain of the one connection `local` holds (its GOAWAY, as for a revoked client), the rest of the proxy left serving. */
export function drainOnlyConnection(local: StartedProxy): void {
  const [listener] = local.proxy.listeners();
  listener!.closeConnection([...listener!.connections.keys()][0]!, 30_000);
}

export function baseConfig(setup: ProxySetup): Config {
  const { pki } = setup;
  const host = setup.upstream?.host ?? '127.0.0.1';
  return {
    grpc: setup.upstream?.grpcPort ? { hosts: ['127.0.0.1'], port: setup.listen?.grpcPort ?? 0, upstream: { host, port: setup.upstream.grpcPort } } : undefined,
    rest: setup.upstream?.restPort ? { hosts: ['127.0.0.1'], port: setup.listen?.restPort ?? 0, upstream: { host, port: setup.upstream.restPort } } : undefined,
    tls: { cert: pki.paths['server.pem']!, key: pki.paths['server.key']!, clientCa: pki.paths['client_cert_ca.pem']!, crl: pki.paths['client_cert_ca.crl'], ...setup.tls },
    allow: { ...EMPTY_ALLOW_LIST, ...setup.allow },
    limits: { ...DEFAULTS.limits, ...setup.limits },
    shutdownTimeoutMs: 5000,
    logLevel: 'debug',
    accessLog: true,
    workers: 1,
    grpcMode: setup.grpcMode ?? 'terminate',
    grpcUpstreamConnections: setup.grpcUpstreamConnections ?? 1,
    restMode: setup.restMode ?? 'terminate',
    ...(setup.ocsp ? { ocsp: setup.ocsp } : {}),
    ...(setup.proxyProtocol ? { proxyProtocol: setup.proxyProtocol } : {}),
  };
}

export async function startTestProxy(setup: ProxySetup): Promise<StartedProxy> {
  const config = baseConfig(setup);
  const logs = new LogCapture();
  const proxy = await startProxy({
    config,
    material: loadTlsMaterialSync(config.tls),
    logger: createLogger({ level: 'debug', destination: logs }),
    ...(setup.observer ? { observer: setup.observer } : {}),
    ...(setup.notReady ? { notReady: setup.notReady } : {}),
    handshakeLineLimit: setup.handshakeLineLimit,
  });
  const grpcPort = proxy.port('grpc') ?? 0;
  return { proxy, logs, grpcPort, restPort: proxy.port('rest') ?? 0, grpcAddress: `localhost:${grpcPort}` };
}

export async function startUpstream(options: ModelServerOptions = {}): Promise<ModelServer> {
  return startModelServer({ grpcPort: 0, restPort: 0, testService: true, ...options });
}

/** What most test files start in `before` and close in `after`: this run's certificates and a model server. */
export interface UpstreamFixture {
  pki: TestPki;
  upstream: ModelServer;
  close(): Promise<void>;
}

export async function startUpstreamFixture(options: ModelServerOptions = {}): Promise<UpstreamFixture> {
  const [pki, upstream] = await Promise.all([createTestPki(), startUpstream(options)]);
  return {
    pki,
    upstream,
    close: async () => {
      await upstream.close();
      await pki.cleanup();
    },
  };
}

/** The same with a proxy in front of the model server; `setup` adds to the proxy's. */
export async function startProxyFixture(setup: Omit<ProxySetup, 'pki' | 'upstream'> = {}): Promise<UpstreamFixture & { front: StartedProxy }> {
  const fixture = await startUpstreamFixture();
  const front = await startTestProxy({ pki: fixture.pki, upstream: fixture.upstream, ...setup });
  return {
    ...fixture,
    front,
    close: async () => {
      await front.proxy.shutdown(1000);
      await fixture.close();
    },
  };
}

/** A model server and a proxy in front of it in each REST mode, for tests that hold the two modes to the same answers. */
export interface RestModeFrontsOf<U> {
  readonly pki: TestPki;
  readonly upstream: U;
  front(restMode: ForwardMode): StartedProxy;
}

/** A REST-only stand-in model server and a proxy in front of it in each REST mode. */
export type RestModeFronts = RestModeFrontsOf<ModelServer>;

/** Starts them before the file's tests and stops them after. */
export function restModeFronts(): RestModeFronts {
  return restModeFrontsOf(() => startUpstream({ grpcPort: null }), (upstream) => upstream.restPort!);
}

/**
 * As restModeFronts(), in front of the model server `start` makes (a scripted one, say), whose REST port `restPort` names;
 * `more`: further proxy options per mode (an observer, say).
 */
export function restModeFrontsOf<U extends { close(): unknown }>(
  start: () => Promise<U>,
  restPort: (upstream: U) => number,
  more: (restMode: ForwardMode) => Partial<ProxySetup> = () => ({}),
): RestModeFrontsOf<U> {
  let pki: TestPki | undefined;
  let upstream: U | undefined;
  const fronts = new Map<ForwardMode, StartedProxy>();
  before(async () => {
    pki = await createTestPki();
    upstream = await start();
    for (const restMode of FORWARD_MODES) fronts.set(restMode, await startTestProxy({ pki, upstream: { restPort: restPort(upstream) }, restMode, ...more(restMode) }));
  });
  after(async () => {
    for (const front of fronts.values()) await front.proxy.shutdown(1000);
    await upstream?.close();
    await pki?.cleanup();
  });
  return {
    get pki() {
      return pki!;
    },
    get upstream() {
      return upstream!;
    },
    front: (restMode) => fronts.get(restMode)!,
  };
}

/** `null` = present no client certificate at all. */
export function clientCredentials(pki: TestPki, client: Issued | null = pki.client): grpc.ChannelCredentials {
  return grpc.credentials.createSsl(
    Buffer.from(pki.serverCa.certPem),
    client ? Buffer.from(client.keyPem) : null,
    client ? Buffer.from(client.certPem) : null,
  );
}

export function grpcClients(address: string, pki: TestPki, client: Issued | null = pki.client): { kserve: KserveClient; echo: EchoClient; close(): void } {
  const credentials = clientCredentials(pki, client);
  const kserve = kserveClient(address, credentials);
  const echo = echoClient(address, credentials);
  return { kserve, echo, close: () => { kserve.close(); echo.close(); } };
}

export function tlsClientOptions(pki: TestPki, client: Issued | null = pki.client) {
  return {
    ca: pki.serverCa.certPem,
    ...(client ? { cert: client.certPem, key: client.keyPem } : {}),
    servername: 'localhost',
  };
}

/** The TLS version a client speaking at most `maxVersion` got on `port`, or the code its handshake failed with. */
export async function negotiatedVersion(port: number, pki: TestPki, maxVersion: SecureVersion, alpn = 'http/1.1'): Promise<string> {
  const socket = tlsConnect({ host: '127.0.0.1', port, ...tlsClientOptions(pki), maxVersion, ALPNProtocols: [alpn] });
  try {
    return await new Promise<string>((resolve) => {
      socket.once('secureConnect', () => resolve(socket.getProtocol() ?? 'none'));
      socket.once('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? err.message));
    });
  } finally {
    socket.destroy();
  }
}

export interface Http1Response {
  status: number;
  headers: IncomingMessage['headers'];
  body: string;
}

/** One HTTPS/1.1 request with a client certificate; a fresh connection each time. */
export function https1(port: number, pki: TestPki, options: RequestOptions & { body?: string | Buffer; client?: Issued | null } = {}): Promise<Http1Response> {
  const { body, client, ...rest } = options;
  return new Promise((resolve, reject) => {
    const req = httpsRequest({ host: '127.0.0.1', port, agent: false, ...tlsClientOptions(pki, client === undefined ? pki.client : client), ...rest }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

export function h2Session(port: number, pki: TestPki, client: Issued | null = pki.client): ClientHttp2Session {
  const session = connectH2(`https://localhost:${port}`, tlsClientOptions(pki, client));
  session.on('error', () => {});
  return session;
}

export interface H2Response {
  headers: Record<string, unknown>;
  body: Buffer;
  trailers: Record<string, unknown> | undefined;
  endedWithHeaders: boolean;
}

/** The :status a REST GET /v2/health/ready gets on `session`. */
export async function readyStatus(session: ClientHttp2Session): Promise<unknown> {
  return (await h2Request(session, { ':method': 'GET', ':path': '/v2/health/ready' })).headers[':status'];
}

/** One request on an HTTP/2 session; collects headers, body and trailers. */
export function h2Request(session: ClientHttp2Session, headers: Record<string, string | string[]>, body?: Buffer | string): Promise<H2Response> {
  return new Promise((resolve, reject) => {
    const stream = session.request(headers, { endStream: body === undefined });
    let response: Record<string, unknown> = {};
    let trailers: Record<string, unknown> | undefined;
    let endedWithHeaders = false;
    const chunks: Buffer[] = [];
    stream.on('response', (h, flags) => {
      response = h;
      endedWithHeaders = (flags & 1) === 1;
    });
    stream.on('trailers', (t) => (trailers = t));
    stream.on('data', (c: Buffer) => chunks.push(c));
    stream.on('end', () => resolve({ headers: response, body: Buffer.concat(chunks), trailers, endedWithHeaders }));
    stream.on('error', reject);
    if (body !== undefined) stream.end(body);
  });
}

/** A gRPC length-prefixed message frame (uncompressed). */
export function grpcFrame(payload: Buffer): Buffer {
  const header = Buffer.alloc(5);
  header.writeUInt32BE(payload.length, 1);
  return Buffer.concat([header, payload]);
}

/** A TCP relay in front of an upstream that counts connections; proves connection reuse. */
export async function countingRelay(targetPort: number): Promise<{ server: TcpServer; port: number; connections: () => number }> {
  let count = 0;
  const sockets = new Set<Socket>();
  const server = createTcpServer((client) => {
    count += 1;
    const upstream = new Socket();
    upstream.connect(targetPort, '127.0.0.1');
    for (const [s, other] of [[client, upstream], [upstream, client]] as const) {
      s.setNoDelay(true);
      sockets.add(s);
      s.on('error', () => {});
      // After a clean end, pipe() ends the other side once what it still holds is written;
      // destroying it here could drop the last bytes of a response on their way.
      s.on('close', () => {
        sockets.delete(s);
        if (!s.readableEnded) other.destroy();
      });
    }
    client.pipe(upstream).pipe(client);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const close = server.close.bind(server);
  server.close = (cb?: (err?: Error) => void) => { for (const s of sockets) s.destroy(); return close(cb); };
  return { server, port: (server.address() as { port: number }).port, connections: () => count };
}

/** The words a refused client reads, starting with the reason the proxy's `client_refused` line logs. */
export function refusedWording(reason: string): RegExp {
  return new RegExp(`^client certificate refused \\(${reason}\\): `);
}

/** A refused REST client's answer: 403, JSON naming the reason. */
export function assertRefusedAnswer(answer: { status: number; body: string }, reason: string): void {
  assert.equal(answer.status, 403, answer.body);
  assert.match((JSON.parse(answer.body) as { error: string }).error, refusedWording(reason));
}

/** A refused gRPC client's call: UNAUTHENTICATED (PERMISSION_DENIED for the allow-list), naming the reason. */
export function assertRefusedCall(err: grpc.ServiceError, reason: string): void {
  assert.equal(err.code, reason === 'not_allowed' ? grpc.status.PERMISSION_DENIED : grpc.status.UNAUTHENTICATED, err.details);
  assert.match(err.details, refusedWording(reason));
}

/** The discard port, which nothing here serves: connections to it are refused. */
export const DISCARD_PORT = 9;

/**
 * A proxy in front of a model server that is down, then one whose model server is starting (not ready): `use` runs
 * with each, and the status and words its REST clients must read (502 naming the refused connection; 503 with the
 * not-ready reason and Retry-After). Both proxies are stopped after.
 */
export async function withDownAndStartingFronts(pki: TestPki, restMode: ForwardMode, use: (front: StartedProxy, status: 502 | 503, words: RegExp) => Promise<void>): Promise<void> {
  const down = await startTestProxy({ pki, upstream: { restPort: DISCARD_PORT }, restMode });
  const starting = await startTestProxy({ pki, upstream: { restPort: DISCARD_PORT }, restMode, notReady: { rest: () => 'OVMS is starting' } });
  try {
    await use(down, 502, /refused the connection \(is the model server running\?\)/);
    await use(starting, 503, /^OVMS is starting$/);
  } finally {
    await down.proxy.shutdown(1000);
    await starting.proxy.shutdown(1000);
  }
}
