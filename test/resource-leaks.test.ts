/**
 * A proxy that runs for months must come back to where it started after
 * every kind of traffic. Each test churns one way a request can end, then
 * waits (eventually(), never a timer) until the proxy's counts are back at
 * their baseline: its client connections, the sockets the model server sees,
 * the in-flight gauge, and the proxy-side sockets themselves (garbage
 * collected: nothing of ours still refers to them).
 */
import { test, before, after, describe } from 'node:test';
import { once } from 'node:events';
import { createServer as createTcpServer, connect as netConnect, type Socket } from 'node:net';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { startTestProxy, startUpstream, tlsClientOptions, type StartedProxy } from './helpers/harness.js';
import { eventually, sample } from './helpers/ops.js';
import { openRaw, readUntil } from './helpers/raw-http1.js';
import { GateBoard } from './helpers/sse.js';
import { ProxyMetrics } from '../src/metrics.js';
import type { ModelServer } from '../src/demo/model-server.js';

setFlagsFromString('--expose-gc');
/** V8's gc(), without starting node with --expose-gc. */
const collectGarbage = runInNewContext('gc') as () => void;

/** Enough cut requests that a per-request leak is plain, few enough for a few seconds. */
const CUTS = 200;
const OPEN_AT_ONCE = 20;

let pki: TestPki;
let upstream: ModelServer;
const board = new GateBoard();

before(async () => {
  pki = await createTestPki();
  // The first event of each stream goes out, the rest wait: every stream is cut mid-way.
  upstream = await startUpstream({ sseGate: (i) => (i === 0 ? Promise.resolve() : board.wait(i)) });
});

after(async () => {
  board.openAll();
  await upstream.close();
  await pki.cleanup();
});

/** A TCP hop in front of the model server counting the connections it holds open, as the model server would. */
async function liveConnectionCounter(targetPort: number): Promise<{ port: number; live(): number; close(): void }> {
  const live = new Set<Socket>();
  const server = createTcpServer((client) => {
    const toServer = netConnect({ host: '127.0.0.1', port: targetPort });
    live.add(client);
    for (const socket of [client, toServer]) socket.on('error', () => {});
    client.on('close', () => {
      live.delete(client);
      toServer.destroy();
    });
    toServer.on('close', () => client.destroy());
    client.pipe(toServer).pipe(client);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as { port: number }).port;
  return { port, live: () => live.size, close: () => { for (const s of live) s.destroy(); server.close(); } };
}

/** Taken outside the async test body: a suspended async function may keep the last value of a loop variable alive. */
function weakRefs<T extends object>(objects: Iterable<T>): WeakRef<T>[] {
  return Array.from(objects, (one) => new WeakRef(one));
}

/** An HTTP/1.1 client that asks for an event stream and resolves once the first event has arrived. */
async function sseReadToFirstEvent(port: number): Promise<TLSSocket> {
  const socket = tlsConnect({ host: '127.0.0.1', port, ...tlsClientOptions(pki), ALPNProtocols: ['http/1.1'] });
  socket.on('error', () => {});
  await once(socket, 'secureConnect');
  const body = JSON.stringify({ model: 'dummy', stream: true });
  socket.write(`POST /v3/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n${body}`);
  let received = '';
  for await (const chunk of socket) {
    received += String(chunk);
    if (received.includes('data:')) break;
  }
  return socket;
}

for (const restMode of ['terminate', 'relay'] as const) {
  describe(`REST port, ${restMode} mode`, () => {
    let counter: Awaited<ReturnType<typeof liveConnectionCounter>>;
    let front: StartedProxy;
    const metrics = new ProxyMetrics({ processMetrics: false });

    before(async () => {
      counter = await liveConnectionCounter(upstream.restPort!);
      front = await startTestProxy({ pki, upstream: { restPort: counter.port }, restMode, observer: metrics });
    });

    after(async () => {
      await front.proxy.shutdown(1000);
      counter.close();
    });

    test(`after ${CUTS} SSE reads cut mid-stream by HTTP/1.1 clients, the proxy holds none of their connections, no model server connection, and no request in flight`, async () => {
      const listener = front.proxy.listeners().find((l) => l.name === 'rest')!;
      const proxySide: WeakRef<TLSSocket>[] = [];
      for (let done = 0; done < CUTS; done += OPEN_AT_ONCE) {
        const clients = await Promise.all(Array.from({ length: OPEN_AT_ONCE }, () => sseReadToFirstEvent(front.restPort)));
        // Every stream is mid-way now: the proxy holds the other end of each client.
        proxySide.push(...weakRefs(listener.connections.keys()));
        for (const client of clients) client.destroy();
      }
      const inFlight = async () => sample(await metrics.text(), 'ovms_mtls_open_streams', { listener: 'rest' });
      await eventually(async () => listener.connections.size === 0 && (await inFlight()) === 0, 'no client connection open and no request in flight');
      await eventually(() => counter.live() === 0, 'no connection to the model server');
      await eventually(() => {
        collectGarbage();
        return proxySide.every((ref) => ref.deref() === undefined);
      }, `every proxy-side socket of the ${CUTS} cut connections collected (nothing of the proxy still holds one)`);
    });

    test('a client that pipelines two SSE requests and leaves during the first: neither is left in flight, the model server works for nobody on neither, each has its access line', async () => {
      const body = JSON.stringify({ model: 'dummy', stream: true });
      const request = (path: string) => `POST ${path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n${body}`;
      const socket = await openRaw(front.restPort, pki);
      socket.write(request('/v3/chat/completions?first') + request('/v3/chat/completions?second'));
      await readUntil(socket, /data:/);
      socket.destroy();
      const inFlight = async () => sample(await metrics.text(), 'ovms_mtls_open_streams', { listener: 'rest' });
      await eventually(async () => (await inFlight()) === 0, 'no request in flight');
      await eventually(() => counter.live() === 0, 'no connection to the model server');
      for (const path of ['/v3/chat/completions?first', '/v3/chat/completions?second']) {
        await eventually(() => front.logs.lines.some((line) => line.event === 'access' && line.path === path && line.error === 'client_closed'), `the access line of ${path}`);
      }
    });
  });
}

/** An idle timeout short enough for a few spells per test. */
const SHORT_IDLE_MS = 300;
const HALF_OPEN_CLIENTS = 10;
const H2_PREFACE_AND_SETTINGS = Buffer.concat([Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'), Buffer.from([0, 0, 0, 4, 0, 0, 0, 0, 0])]);
const LAST_REQUEST = 'GET /v2/health/ready HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n';

/** A client that reads what comes and never closes its end, even after the proxy has closed its own. */
async function neverClosingClient(port: number, protocol: 'h2' | 'http/1.1'): Promise<TLSSocket> {
  // Node's TLSSocket takes allowHalfOpen as net.Socket does; @types/node leaves it out of ConnectionOptions.
  const options = { host: '127.0.0.1', port, ...tlsClientOptions(pki), allowHalfOpen: true, ALPNProtocols: [protocol] };
  const socket = tlsConnect(options);
  socket.on('error', () => {});
  socket.resume();
  await once(socket, 'secureConnect');
  socket.write(protocol === 'h2' ? H2_PREFACE_AND_SETTINGS : LAST_REQUEST);
  return socket;
}

const halfOpenCases = [
  { listener: 'grpc', mode: 'terminate', protocol: 'h2', why: 'an HTTP/2 connection closed for being idle' },
  { listener: 'grpc', mode: 'relay', protocol: 'h2', why: 'a relayed HTTP/2 connection closed for being idle' },
  { listener: 'rest', mode: 'relay', protocol: 'http/1.1', why: 'a relayed HTTP/1.1 connection closed after its `connection: close` response' },
] as const;

for (const { listener: name, mode, protocol, why } of halfOpenCases) {
  test(`${name} port, ${mode} mode: after ${why}, ${HALF_OPEN_CLIENTS} clients that never close their end no longer hold the proxy's connections (open_connections back to 0)`, async () => {
    const metrics = new ProxyMetrics({ processMetrics: false });
    const ports = name === 'grpc' ? { grpcPort: upstream.grpcPort! } : { restPort: upstream.restPort! };
    const front = await startTestProxy({ pki, upstream: ports, grpcMode: mode, restMode: mode, observer: metrics, limits: { idleTimeoutMs: SHORT_IDLE_MS } });
    const port = name === 'grpc' ? front.grpcPort : front.restPort;
    const clients: TLSSocket[] = [];
    try {
      for (let i = 0; i < HALF_OPEN_CLIENTS; i++) clients.push(await neverClosingClient(port, protocol));
      const listener = front.proxy.listeners().find((l) => l.name === name)!;
      const open = async () => sample(await metrics.text(), 'ovms_mtls_open_connections', { listener: name });
      await eventually(async () => listener.connections.size === 0 && (await open()) === 0, 'the proxy to let go of every connection whose client never closed');
    } finally {
      for (const client of clients) client.destroy();
      await front.proxy.shutdown(1000);
    }
  });
}
