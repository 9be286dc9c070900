/**
 * What clients that are busy when the proxy starts draining see: a keep-alive
 * client must learn from the answer it is waiting for that the connection ends,
 * so that its next request opens a new one (another replica, behind a Service)
 * instead of being sent down a connection that is closing.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer, type Server, type ServerResponse } from 'node:http';
import { Agent, request as httpsRequest } from 'node:https';
import type { AddressInfo } from 'node:net';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { h2Request, h2Session, startTestProxy, tlsClientOptions, type StartedProxy } from './helpers/harness.js';
import { eventually } from './helpers/ops.js';
import type { ClientHttp2Session } from 'node:http2';
import { openRaw, readToClose, readUntil } from './helpers/raw-http1.js';
import { NOOP_OBSERVER } from '../src/observer.js';
import { FORWARD_MODES, type ForwardMode } from '../src/config.js';
import type { TLSSocket } from 'node:tls';
import { END_HEADERS, END_STREAM, H2, h2Frame, headerBlock, rawH2Client, streamFrames } from './helpers/raw-h2.js';

let pki: TestPki;

before(async () => {
  pki = await createTestPki();
});

after(async () => {
  await pki.cleanup();
});

/** A REST model server that holds each answer until the test releases it. */
interface HeldAnswers {
  server: Server;
  port: number;
  arrived: Promise<void>;
  heldCount(): number;
  release(): void;
}

/** Starts one: its answers wait for release(). */
async function heldAnswers(): Promise<HeldAnswers> {
  const held: ServerResponse[] = [];
  let arrive = (): void => {};
  const arrived = new Promise<void>((resolve) => (arrive = resolve));
  const server = createServer((_req, res) => {
    held.push(res);
    arrive();
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const release = () => {
    for (const res of held.splice(0)) res.end('{"ready":true}');
  };
  return { server, port: (server.address() as AddressInfo).port, arrived, heldCount: () => held.length, release };
}

/** One GET through a keep-alive agent: its status and `connection` field, or the code of the error it failed with. */
function keptAliveGet(port: number, agent: Agent): Promise<string> {
  return new Promise((resolve) => {
    const req = httpsRequest({ host: '127.0.0.1', port, path: '/v2/models/dummy', agent, ...tlsClientOptions(pki) }, (res) => {
      res.resume();
      res.on('end', () => resolve(`${res.statusCode} connection: ${res.headers.connection}`));
    });
    req.on('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? err.message));
    req.end();
  });
}

describe('a keep-alive HTTP/1.1 client whose request is in flight when the drain begins', () => {
  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}: its answer says connection: close, so its next request opens a new connection (refused here: no other replica) rather than dying on the closing one`, { timeout: 30_000 }, async () => {
      const upstream = await heldAnswers();
      const local = await startTestProxy({ pki, upstream: { restPort: upstream.port }, restMode });
      const agent = new Agent({ keepAlive: true, maxSockets: 1 });
      try {
        const answer = keptAliveGet(local.restPort, agent);
        await upstream.arrived;
        const drained = local.proxy.shutdown(20_000);
        upstream.release();
        assert.equal(await answer, '200 connection: close');
        // Before the fix: ECONNRESET ("socket hang up"), the request sent on the connection the proxy was closing.
        assert.equal(await keptAliveGet(local.restPort, agent), 'ECONNREFUSED');
        await drained;
      } finally {
        agent.destroy();
        upstream.server.close();
      }
    });
  }
});

/**
 * A proxy in `restMode` and a raw keep-alive HTTP/1.1 connection that has had one answer (held by `upstream`, then
 * released), then `use`; both closed after it. The model server keeps its idle connections, as OVMS does for 60 s:
 * Node's 5 s would close the relay's, and with it the client's, within a drain.
 */
async function afterOneAnswer(restMode: ForwardMode, use: (local: StartedProxy, socket: TLSSocket, upstream: HeldAnswers) => Promise<void>, options: { allowHalfOpen?: boolean } = {}): Promise<void> {
  const upstream = await heldAnswers();
  upstream.server.keepAliveTimeout = 0;
  const local = await startTestProxy({ pki, upstream: { restPort: upstream.port }, restMode });
  const socket = await openRaw(local.restPort, pki, options);
  try {
    socket.write('GET /v2/models/dummy HTTP/1.1\r\nhost: a\r\n\r\n');
    await upstream.arrived;
    upstream.release();
    await readUntil(socket, /\{"ready":true\}$/);
    await use(local, socket, upstream);
  } finally {
    socket.destroy();
    upstream.server.close();
    await local.proxy.shutdown(1000);
  }
}

describe('an idle keep-alive HTTP/1.1 connection whose client leaves its side open once the proxy has closed its own (Python requests does so until its next use of the connection)', () => {
  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}: the drain closes it and finishes without waiting for the client to close its side`, { timeout: 30_000 }, async () => {
      await afterOneAnswer(restMode, async (local) => {
        // Left as it is: the proxy's close_notify and FIN do not make it close, as in a pool.
        await local.proxy.shutdown(20_000);
        // Before the fix the drain waited for the client until the timeout ran out, and then forced it.
        assert.equal(local.logs.lines.find((l) => l.event === 'shutdown_timeout'), undefined, 'the drain had to force the idle connection closed');
      }, { allowHalfOpen: true });
    });
  }
});

describe('a keep-alive HTTP/1.1 client that begins a request head in the drain\'s grace and never finishes it', () => {
  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}: the connection closes once the grace is over; the drain does not wait for the rest of the head until its timeout`, { timeout: 60_000 }, async () => {
      await afterOneAnswer(restMode, async (local, socket, upstream) => {
        const closed = once(socket, 'close');
        const drained = local.proxy.shutdown(20_000);
        socket.write('GET /v2/models/dummy HTTP/1.1\r\nhos');
        await drained;
        await closed;
        // Before the fix the drain waited for the rest of the head until its timeout ran out, and then forced the connection.
        assert.equal(local.logs.lines.find((l) => l.event === 'shutdown_timeout'), undefined, 'the drain waited for the head until its timeout');
        assert.equal(upstream.heldCount(), 0, 'the part of a head went upstream');
      });
    });
  }
});

describe('an idle keep-alive HTTP/1.1 connection whose client leaves in the drain\'s grace', () => {
  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}: nothing of it outlives the shutdown (a program using the package exits at once)`, { timeout: 30_000 }, async () => {
      const timers = () => process.getActiveResourcesInfo().filter((resource) => resource === 'Timeout').length;
      const timersBefore = timers();
      await afterOneAnswer(restMode, async (local, socket) => {
        const drained = local.proxy.shutdown(20_000);
        socket.destroy();
        await drained;
        // Before the fix (relay mode) the drain's timer for this connection ran on for up to its second.
        assert.equal(timers(), timersBefore, `timers left: ${process.getActiveResourcesInfo().join(', ')}`);
      });
    });
  }
});

describe('a keep-alive HTTP/1.1 client whose connection was taken just before the drain, its first request written at once', () => {
  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}: that request is answered, saying connection: close (the relay was still connecting to the model server when the drain began)`, { timeout: 30_000 }, async () => {
      const upstream = await heldAnswers();
      upstream.server.keepAliveTimeout = 0;
      let drained: Promise<void> | undefined;
      // After the connection is handed over (the relay starts its upstream connection then) and before any I/O completes.
      const observer = { ...NOOP_OBSERVER, handshakeAccepted: () => process.nextTick(() => (drained ??= local.proxy.shutdown(20_000))) };
      const local = await startTestProxy({ pki, upstream: { restPort: upstream.port }, restMode, observer });
      const socket = await openRaw(local.restPort, pki);
      try {
        const answer = readToClose(socket);
        void upstream.arrived.then(() => upstream.release());
        socket.write('GET /v2/models/dummy HTTP/1.1\r\nhost: a\r\n\r\n');
        // Before the fix (relay mode): nothing, the connection closed under the request (Go: "Get ...: EOF", not retried on a new connection).
        assert.match(await answer, /^HTTP\/1\.1 200 [^]*\r\nconnection: close\r\n[^]*\{"ready":true\}$/i);
        await drained;
      } finally {
        socket.destroy();
        upstream.server.close();
      }
    });
  }
});

/** Resolves once `session`'s PING is answered: whatever the proxy wrote on the connection before it has arrived. */
function pinged(session: ClientHttp2Session): Promise<void> {
  return new Promise((resolve, reject) => session.ping((err) => (err ? reject(err) : resolve())));
}

describe('an HTTP/2 client of the REST port whose request is in flight when the drain begins', () => {
  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}: its connection gets no GOAWAY while only that request runs (httpx fails every stream it reads at one), and gets it with the next request it starts, which is served too`, { timeout: 30_000 }, async () => {
      const upstream = await heldAnswers();
      const front = await startTestProxy({ pki, upstream: { restPort: upstream.port }, restMode });
      const busy = h2Session(front.restPort, pki);
      const idle = h2Session(front.restPort, pki);
      const goaways: number[] = [];
      busy.on('goaway', (_code: number, lastStreamId: number) => goaways.push(lastStreamId));
      try {
        await once(idle, 'connect');
        const first = h2Request(busy, { ':path': '/v2/models/dummy' });
        await upstream.arrived;
        const drained = front.proxy.shutdown(20_000);
        await once(idle, 'goaway');
        await pinged(busy);
        assert.deepEqual(goaways, [], 'a GOAWAY while only the first request ran');
        const second = h2Request(busy, { ':path': '/v2/models/dummy' });
        await eventually(() => upstream.heldCount() === 2, 'the second request to reach the model server');
        // Held upstream, the requests cannot end: a GOAWAY now is the one their start brought.
        await eventually(() => goaways.length > 0, 'a GOAWAY once the client started another request');
        assert.deepEqual(goaways, [3], 'the GOAWAY names the second request as the last served');
        upstream.release();
        assert.deepEqual([(await first).headers[':status'], (await second).headers[':status']], [200, 200]);
        await drained;
        assert.equal(front.logs.lines.filter((l) => l.event === 'shutdown_timeout').length, 0);
      } finally {
        upstream.release();
        busy.destroy();
        idle.destroy();
        upstream.server.close();
      }
    });
  }
});

/** A GET of `/v2/models/dummy` on stream `id`, whole in one HEADERS frame. */
function rawGet(id: number): Buffer {
  return h2Frame(H2.HEADERS, END_HEADERS | END_STREAM, id, headerBlock({ ':method': 'GET', ':scheme': 'https', ':path': '/v2/models/dummy', ':authority': 'localhost' }));
}

describe('an HTTP/2 client of the REST port that sends a request past the last stream id of the GOAWAY a drain sent it', () => {
  for (const restMode of FORWARD_MODES) {
    // Java's HttpClient sends such requests (JDK 17 and 25 alike) and fails them when the connection ends (README,
    // Clients, Java): what the proxy does with them is what tells a client it may send them again elsewhere.
    test(`--mtls_rest_mode ${restMode}: that request never reaches the model server and gets no frame, those up to the last stream id are answered whole, and the connection then ends with a FIN, not a reset`, { timeout: 30_000 }, async () => {
      const upstream = await heldAnswers();
      const front = await startTestProxy({ pki, upstream: { restPort: upstream.port }, restMode });
      const client = await rawH2Client(front.restPort, pki);
      const errors: string[] = [];
      client.socket.on('error', (err: NodeJS.ErrnoException) => errors.push(err.code ?? err.message));
      const ended = once(client.socket, 'end');
      try {
        client.socket.write(rawGet(1));
        await upstream.arrived;
        const drained = front.proxy.shutdown(20_000);
        client.socket.write(rawGet(3));
        const goaway = await client.waitForFrame(H2.GOAWAY);
        assert.equal(goaway.payload.readUInt32BE(0) & 0x7fffffff, 3, 'the GOAWAY names the request that brought it as the last one taken');
        // Written after the GOAWAY came, as a client whose request had already picked the connection sends it.
        client.socket.write(Buffer.concat([rawGet(5), h2Frame(H2.PING, 0, 0, Buffer.alloc(8))]));
        // Its PING answered: the proxy has read stream 5's HEADERS, sent before it.
        await eventually(() => client.frames.some((f) => f.type === H2.PING && (f.flags & 0x1) !== 0), 'the answer to the PING sent after stream 5');
        assert.equal(upstream.heldCount(), 2, 'requests at the model server: streams 1 and 3, not 5');
        upstream.release();
        await ended;
        await client.closed;
        assert.deepEqual([1, 3, 5].map((id) => streamFrames(client.frames, id)), [['headers', 'data', 'end'], ['headers', 'data', 'end'], []]);
        assert.equal(upstream.heldCount(), 0, 'stream 5 reached the model server');
        assert.deepEqual(errors, []);
        await drained;
        assert.equal(front.logs.lines.filter((l) => l.event === 'shutdown_timeout').length, 0);
      } finally {
        upstream.release();
        client.socket.destroy();
        upstream.server.close();
      }
    });
  }
});
