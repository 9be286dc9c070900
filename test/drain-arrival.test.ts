import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { connect as netConnect, createServer as createTcpServer, type AddressInfo, type Socket } from 'node:net';
import { connect as tlsConnect } from 'node:tls';
import { connect as h2Connect } from 'node:http2';
import type { OutgoingHttpHeaders } from 'node:http';
import type { TestPki } from './helpers/pki.js';
import { https1, startTestProxy, startUpstream, startUpstreamFixture, tlsClientOptions, type StartedProxy } from './helpers/harness.js';
import { settlesWithin } from './helpers/ops.js';
import { heldChatStream } from './helpers/sse.js';
import type { ModelServer } from '../src/demo/model-server.js';
import type { Config } from '../src/config.js';

let pki: TestPki;
let upstream: ModelServer;
let closeAll: () => Promise<void>;

before(async () => ({ pki, upstream, close: closeAll } = await startUpstreamFixture()));
after(() => closeAll());

/**
 * A loopback hop in front of `targetPort` that passes the client's first
 * flight (ClientHello) and holds the rest until released: the proxy has
 * accepted the connection and answered, but the handshake ends only when the
 * test says so.
 */
async function heldHandshake(targetPort: number): Promise<{ port: number; serverAnswered: Promise<void>; release(): void; close(): void }> {
  let release = (): void => {};
  let answered = (): void => {};
  const serverAnswered = new Promise<void>((resolve) => (answered = resolve));
  const hop = createTcpServer((client: Socket) => {
    const target = netConnect({ host: '127.0.0.1', port: targetPort });
    const held: Buffer[] = [];
    let passing = false;
    let first = true;
    client.on('data', (chunk: Buffer) => {
      if (first || passing) target.write(chunk);
      else held.push(chunk);
      first = false;
    });
    release = () => {
      passing = true;
      for (const chunk of held.splice(0)) target.write(chunk);
    };
    target.once('data', () => answered());
    target.on('data', (chunk: Buffer) => client.write(chunk));
    target.on('close', () => client.destroy());
    client.on('close', () => target.destroy());
    for (const s of [client, target]) s.on('error', () => {});
  });
  hop.listen(0, '127.0.0.1');
  await once(hop, 'listening');
  return { port: (hop.address() as AddressInfo).port, serverAnswered, release: () => release(), close: () => hop.close() };
}

/** Starts a drain while a client's handshake is half done, then lets the handshake finish. */
async function arriveDuringDrain(local: StartedProxy, port: number, connect: (hopPort: number) => Promise<string>): Promise<string> {
  const hop = await heldHandshake(port);
  try {
    const outcome = connect(hop.port);
    await hop.serverAnswered;
    const drained = local.proxy.shutdown(20_000);
    hop.release();
    const seen = await outcome;
    await drained;
    assert.equal(local.logs.lines.find((l) => l.event === 'shutdown_timeout'), undefined, 'the drain had to force connections closed');
    return seen;
  } finally {
    hop.close();
  }
}

/** HTTP/1.1 over the hop: everything the proxy sends after a request, until it closes. */
function http1Exchange(hopPort: number): Promise<string> {
  return new Promise((resolve) => {
    const socket = tlsConnect({ host: '127.0.0.1', port: hopPort, ALPNProtocols: ['http/1.1'], ...tlsClientOptions(pki) });
    let text = '';
    socket.on('secureConnect', () => socket.write('GET /v2/health/ready HTTP/1.1\r\nhost: a\r\n\r\n'));
    socket.on('data', (c: Buffer) => (text += c.toString('latin1')));
    socket.on('error', () => {});
    socket.on('close', () => resolve(text));
  });
}

/** HTTP/2 over the hop, no request sent: the GOAWAY that came, once the connection is gone. */
function http2Silence(hopPort: number): Promise<string> {
  return new Promise((resolve) => {
    const session = h2Connect(`https://127.0.0.1:${hopPort}`, { ...tlsClientOptions(pki) });
    let goaway = 'no GOAWAY';
    session.on('error', () => {});
    session.on('goaway', (code: number, lastStreamId: number) => (goaway = `GOAWAY ${code} last stream ${lastStreamId}`));
    session.on('close', () => resolve(goaway));
  });
}

const GRPC_CALL = { headers: { ':method': 'POST', ':path': '/inference.GRPCInferenceService/ServerLive', 'content-type': 'application/grpc', te: 'trailers' }, body: Buffer.alloc(5) };
const REST_GET = { headers: { ':method': 'GET', ':path': '/v2/health/ready' }, body: Buffer.alloc(0) };

/** HTTP/2 over the hop: the status of one request (`what`), or how it failed, and whether a GOAWAY came, once the connection is gone. */
function http2Exchange(what: { headers: OutgoingHttpHeaders; body: Buffer }): (hopPort: number) => Promise<string> {
  return (hopPort) => new Promise((resolve) => {
    const session = h2Connect(`https://127.0.0.1:${hopPort}`, { ...tlsClientOptions(pki) });
    let outcome = 'no answer';
    let goaway = '';
    session.on('error', (err: NodeJS.ErrnoException) => (outcome = err.code ?? err.message));
    session.on('goaway', (code: number, lastStreamId: number) => (goaway = `, GOAWAY ${code} last stream ${lastStreamId}`));
    const call = session.request(what.headers);
    call.on('response', (headers) => (outcome = `status ${headers[':status']}`));
    call.on('error', (err: NodeJS.ErrnoException) => (outcome = err.code ?? err.message));
    call.end(what.body);
    call.resume();
    session.on('close', () => resolve(outcome + goaway));
  });
}

const MODES: { name: string; restMode: Config['restMode']; grpcMode: Config['grpcMode'] }[] = [
  { name: 'terminate', restMode: 'terminate', grpcMode: 'terminate' },
  { name: 'relay', restMode: 'relay', grpcMode: 'relay' },
];

describe('a connection whose handshake finishes during a drain', () => {
  for (const { name, restMode, grpcMode } of MODES) {
    // Its client writes its first request at once, and a fresh connection closed under it is an error it does not
    // retry (Go: "Get ...: EOF"); before, it was closed unanswered. An HTTP/2 client is told by a GOAWAY (below) instead.
    test(`REST, ${name} mode: its first request is answered, saying connection: close, and the drain does not wait for more`, { timeout: 30_000 }, async () => {
      const local = await startTestProxy({ pki, upstream, restMode, grpcMode });
      const seen = await arriveDuringDrain(local, local.restPort, http1Exchange);
      assert.match(seen, /^HTTP\/1\.1 200 [^]*\r\nconnection: close\r\n/i);
    });

    test(`gRPC, ${name} mode: the call is not served, and the drain does not wait for it`, { timeout: 30_000 }, async () => {
      const local = await startTestProxy({ pki, upstream, restMode, grpcMode });
      const seen = await arriveDuringDrain(local, local.grpcPort, http2Exchange(GRPC_CALL));
      assert.doesNotMatch(seen, /^status 200/);
    });

    // httpx, the openai SDK's transport, fails every stream it reads when a GOAWAY comes: one before its first request failed it.
    test(`REST over HTTP/2, ${name} mode: its first request is answered, the GOAWAY coming with it, and the drain does not wait for more`, { timeout: 30_000 }, async () => {
      const local = await startTestProxy({ pki, upstream, restMode, grpcMode });
      const seen = await arriveDuringDrain(local, local.restPort, http2Exchange(REST_GET));
      assert.equal(seen, 'status 200, GOAWAY 0 last stream 1');
    });

    test(`REST over HTTP/2, ${name} mode: a client that sends no request is told to go away, and the drain does not wait for it`, { timeout: 30_000 }, async () => {
      const local = await startTestProxy({ pki, upstream, restMode, grpcMode });
      assert.equal(await arriveDuringDrain(local, local.restPort, http2Silence), 'GOAWAY 0 last stream 0');
    });
  }
});

// A client that connects and sends nothing (a port scanner, a load balancer's TCP check) held the
// drain until --mtls_handshake_timeout: a RunningProxy's shutdown(1000) took 10 s, and `ovms-mtls
// proxy --mtls_shutdown_timeout 1` as long to stop on SIGTERM, past a container's grace period.
describe('a connection whose handshake never starts', () => {
  test('is cut at the shutdown timeout, not waited for until the handshake timeout', { timeout: 120_000 }, async () => {
    const local = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, limits: { handshakeTimeoutMs: 600_000 } });
    const silent = netConnect({ host: '127.0.0.1', port: local.restPort });
    silent.on('error', () => {});
    try {
      await once(silent, 'connect');
      const closed = once(silent, 'close');
      // Served after it, so the proxy has taken the silent connection in too (it accepts in order).
      assert.equal((await https1(local.restPort, pki, { path: '/v2/health/live' })).status, 200);
      await settlesWithin(local.proxy.shutdown(1000), 60_000, 'the shutdown, held by a connection that never starts its handshake');
      await closed;
    } finally {
      silent.destroy();
    }
  });
});

// A program that stopped the proxy twice (its own shutdown, then a signal's) ran the drain twice:
// two `shutdown_timeout` lines, and the second call's timeout started over.
test('a second shutdown() waits for the first: one drain, one shutdown_timeout line', { timeout: 120_000 }, async () => {
  const held = await startUpstream({ sseGate: () => new Promise(() => {}) });
  const local = await startTestProxy({ pki, upstream: { restPort: held.restPort! } });
  const client = await heldChatStream(local.restPort, pki, held);
  try {
    const first = local.proxy.shutdown(1000);
    const second = local.proxy.shutdown(1000);
    await settlesWithin(Promise.all([first, second]), 60_000, 'two shutdowns of a proxy holding a stream that never ends');
    assert.equal(local.logs.lines.filter((l) => l.event === 'shutdown_timeout').length, 1);
  } finally {
    client.destroy();
    await held.close();
  }
});
