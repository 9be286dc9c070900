import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer as createTcpServer, type AddressInfo, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import type { TLSSocket } from 'node:tls';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { h2Request, h2Session, startTestProxy, startUpstream } from './helpers/harness.js';
import { scriptedUpstream } from './helpers/scripted-upstream.js';
import { openRaw as openRawWith, readToClose } from './helpers/raw-http1.js';
import { eventually } from './helpers/ops.js';
import { END_HEADERS, H2, h2Frame, headerBlock, rawH2Client, streamFrames } from './helpers/raw-h2.js';
import type { ModelServer } from '../src/demo/model-server.js';
import { FORWARD_MODES } from '../src/config.js';
import { NOOP_OBSERVER } from '../src/observer.js';

/**
 * A REST request whose head or body stops arriving is given up after
 * --mtls_idle_timeout (nginx's client_header_timeout and
 * client_body_timeout): otherwise a client holds a connection, and with a
 * body a model server connection too, for as long as it likes.
 */

const INFER_BODY = JSON.stringify({ inputs: [{ name: 'b', shape: [1, 10], datatype: 'FP32', data: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] }] });
const IDLE_MS = 400;
/** A body part past the 64 KiB that terminate mode reads whole before it sends a request on. */
const STREAMED_BYTES = 70_000;

let pki: TestPki;

before(async () => {
  pki = await createTestPki();
});

after(async () => {
  await pki.cleanup();
});

const openRaw = (port: number): Promise<TLSSocket> => openRawWith(port, pki);

/**
 * A model server that reads what it gets and never answers; `closed` settles
 * when the proxy drops its first connection; `heads` holds each connection's
 * first bytes.
 */
async function silentUpstream() {
  const heads: string[] = [];
  const upstream = await scriptedUpstream((_socket, first) => heads.push(first.toString('latin1')));
  const closed = eventually(() => upstream.sockets.length > 0, 'a connection at the model server').then(() => once(upstream.sockets[0]!, 'close'));
  return { upstream, closed, heads };
}

/**
 * A model server that does not read a request until `release()`, then reads
 * all of it (head and `bodyBytes`) and answers 200 "done": the proxy has to
 * hold the client back meanwhile, and that is not the client stalling.
 */
async function slowReadingUpstream(bodyBytes: number) {
  let release!: () => void;
  const released = new Promise<void>((resolve) => (release = resolve));
  const server = createTcpServer((socket: Socket) => {
    socket.on('error', () => {});
    socket.pause();
    void released.then(() => {
      let head = '';
      let body = -1;
      socket.on('data', (chunk: Buffer) => {
        if (body < 0) {
          head += chunk.toString('latin1');
          const end = head.indexOf('\r\n\r\n');
          if (end < 0) return;
          body = head.length - end - 4;
        } else {
          body += chunk.length;
        }
        if (body >= bodyBytes) socket.end('HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\ndone');
      });
      socket.resume();
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return { port: (server.address() as AddressInfo).port, release, close: () => server.close() };
}

/** More than the socket buffers and the proxy's own body buffer take, so the client is held back. */
const LARGE_BODY = Buffer.alloc(48 * 1024 * 1024, 0x61);

describe('a request body that stops arriving', () => {
  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}, HTTP/1.1: 408 naming --mtls_idle_timeout, the connection closes, the model server's connection is dropped, the access line says why`, { timeout: 20_000 }, async () => {
      const { upstream, closed } = await silentUpstream();
      const local = await startTestProxy({ pki, upstream: { restPort: upstream.port }, restMode, limits: { idleTimeoutMs: IDLE_MS } });
      try {
        const socket = await openRaw(local.restPort);
        // Past 64 KiB, so both modes stream it to the model server as it comes (the next test: a smaller one).
        socket.write(`POST /v2/models/dummy/infer HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: 200000\r\n\r\n${'x'.repeat(STREAMED_BYTES)}`);
        const text = await readToClose(socket);
        assert.match(text, /^HTTP\/1\.1 408 Request Timeout\r\n/);
        assert.match(text, /\r\nconnection: close\r\n/i);
        assert.match(text, /the request body stopped arriving: no byte of it for 0\.4 s \(--mtls_idle_timeout\)/);
        await closed;
        const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/models/dummy/infer');
        assert.equal(line.status, 408);
        assert.equal(line.error, 'client_body_timeout');
        assert.equal(line.bytesIn, STREAMED_BYTES);
      } finally {
        await local.proxy.shutdown(1000);
        upstream.close();
      }
    });

    if (restMode === 'terminate') {
      test('--mtls_rest_mode terminate: a body up to 64 KiB, chunked or not, is read whole before the model server sees the request, so a stalled one never reaches it (408 all the same)', { timeout: 20_000 }, async () => {
        const upstream = await scriptedUpstream(() => {});
        const local = await startTestProxy({ pki, upstream: { restPort: upstream.port }, restMode, limits: { idleTimeoutMs: IDLE_MS } });
        let session: ReturnType<typeof h2Session> | undefined;
        try {
          const socket = await openRaw(local.restPort);
          socket.write('POST /v2/models/dummy/infer HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\na\r\n{"in');
          assert.match(await readToClose(socket), /^HTTP\/1\.1 408 Request Timeout\r\n[\s\S]*the request body stopped arriving/);
          // Opened now: a session idle through the wait above would be closed as idle.
          session = h2Session(local.restPort, pki);
          const stream = session.request({ ':method': 'POST', ':path': '/v2/models/dummy/infer', 'content-length': '10' });
          stream.write('{"in');
          const [headers] = (await once(stream, 'response')) as [Record<string, unknown>];
          assert.equal(headers[':status'], 408);
          const lines = await local.logs.waitFor((l) => l.event === 'access' && l.protocol === 'h2');
          assert.equal(lines.error, 'client_body_timeout');
          assert.equal(upstream.sockets.length, 0, 'the model server never got a connection');
        } finally {
          session?.destroy();
          await local.proxy.shutdown(1000);
          upstream.close();
        }
      });
    }

    test(`--mtls_rest_mode ${restMode}, HTTP/1.1: a slow upload that keeps moving is not cut, though it takes several times the timeout`, { timeout: 20_000 }, async () => {
      const model: ModelServer = await startUpstream({ grpcPort: null });
      const local = await startTestProxy({ pki, upstream: { restPort: model.restPort! }, restMode, limits: { idleTimeoutMs: 1000 } });
      try {
        const socket = await openRaw(local.restPort);
        const answer = readToClose(socket);
        socket.write(`POST /v2/models/dummy/infer HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: ${INFER_BODY.length}\r\nconnection: close\r\n\r\n`);
        const pieces = 16;
        const size = Math.ceil(INFER_BODY.length / pieces);
        for (let i = 0; i < pieces; i++) {
          await sleep(150);
          socket.write(INFER_BODY.slice(i * size, (i + 1) * size));
        }
        const text = await answer;
        assert.match(text, /^HTTP\/1\.1 200 OK\r\n/);
        assert.match(text, /"data":\[1,2,3,4,5,6,7,8,9,10\]/);
      } finally {
        await local.proxy.shutdown(1000);
        await model.close();
      }
    });
  }

  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}, HTTP/1.1: a body held back because the model server is not reading it is not a stall`, { timeout: 30_000 }, async () => {
      const slow = await slowReadingUpstream(LARGE_BODY.length);
      const local = await startTestProxy({ pki, upstream: { restPort: slow.port }, restMode, limits: { idleTimeoutMs: IDLE_MS } });
      try {
        const socket = await openRaw(local.restPort);
        const answer = readToClose(socket);
        socket.write(`POST /v2/models/dummy/infer HTTP/1.1\r\nhost: a\r\ncontent-length: ${LARGE_BODY.length}\r\n\r\n`);
        socket.write(LARGE_BODY);
        // Three idle timeouts with the client's bytes stuck behind the model server.
        await sleep(3 * IDLE_MS);
        assert.ok(socket.writableLength > 0, 'the client is being held back');
        slow.release();
        assert.match(await answer, /^HTTP\/1\.1 200 OK\r\n[\s\S]*done$/);
      } finally {
        await local.proxy.shutdown(1000);
        slow.close();
      }
    });
  }

  test('HTTP/2: a body held back because the model server is not reading it is not a stall', { timeout: 30_000 }, async () => {
    const slow = await slowReadingUpstream(LARGE_BODY.length);
    const local = await startTestProxy({ pki, upstream: { restPort: slow.port }, limits: { idleTimeoutMs: IDLE_MS } });
    const session = h2Session(local.restPort, pki);
    try {
      const answer = h2Request(session, { ':method': 'POST', ':path': '/v2/models/dummy/infer', 'content-length': String(LARGE_BODY.length) }, LARGE_BODY);
      await sleep(3 * IDLE_MS);
      slow.release();
      const res = await answer;
      assert.equal(res.headers[':status'], 200);
      assert.equal(res.body.toString(), 'done');
    } finally {
      session.destroy();
      await local.proxy.shutdown(1000);
      slow.close();
    }
  });

  test('HTTP/2: the stream gets 408, the model server connection is dropped, and the session goes on serving', { timeout: 20_000 }, async () => {
    const { upstream, closed, heads } = await silentUpstream();
    const local = await startTestProxy({ pki, upstream: { restPort: upstream.port }, limits: { idleTimeoutMs: IDLE_MS } });
    const session = h2Session(local.restPort, pki);
    try {
      // Past 64 KiB: the body streams to the model server as it comes.
      const stream = session.request({ ':method': 'POST', ':path': '/v2/models/dummy/infer', 'content-type': 'application/json' });
      stream.write('x'.repeat(STREAMED_BYTES));
      const [headers] = (await once(stream, 'response')) as [Record<string, unknown>];
      assert.equal(headers[':status'], 408);
      const chunks: Buffer[] = [];
      stream.on('data', (c: Buffer) => chunks.push(c));
      await once(stream, 'close');
      assert.match(JSON.parse(Buffer.concat(chunks).toString()).error, /stopped arriving.*--mtls_idle_timeout/);
      await closed;
      const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/models/dummy/infer');
      assert.equal(line.protocol, 'h2');
      assert.equal(line.status, 408);
      assert.equal(line.error, 'client_body_timeout');
      // The next request on the same connection reaches the model server (which never answers it): the session was not torn down.
      const next = h2Request(session, { ':method': 'GET', ':path': '/v2/health/ready' });
      next.catch(() => {});
      await eventually(() => heads.some((head) => head.startsWith('GET /v2/health/ready ')), 'the second request at the model server');
      assert.equal(session.closed || session.destroyed, false);
    } finally {
      session.destroy();
      await local.proxy.shutdown(1000);
      upstream.close();
    }
  });
});

describe('the end of a stream answered 408', () => {
  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}, HTTP/2: the whole 408 and its END_STREAM leave before the RST_STREAM(NO_ERROR) that stops the upload (RFC 9113 8.1)`, { timeout: 20_000 }, async () => {
      const { upstream } = await silentUpstream();
      const local = await startTestProxy({ pki, upstream: { restPort: upstream.port }, restMode, limits: { idleTimeoutMs: IDLE_MS } });
      const client = await rawH2Client(local.restPort, pki);
      try {
        const head = headerBlock({ ':method': 'POST', ':scheme': 'https', ':path': '/v2/models/dummy/infer', ':authority': 'localhost' });
        const body = Array.from({ length: 5 }, () => h2Frame(H2.DATA, 0, 1, Buffer.alloc(16 * 1024, 0x78)));
        client.socket.write(Buffer.concat([h2Frame(H2.HEADERS, END_HEADERS, 1, head), ...body]));
        await client.waitForFrame(H2.RST_STREAM);
        assert.deepEqual(streamFrames(client.frames, 1).filter((f) => f !== 'data'), ['headers', 'end', 'reset 0']);
        const answer = Buffer.concat(client.frames.filter((f) => f.streamId === 1 && f.type === H2.DATA).map((f) => f.payload));
        assert.match(JSON.parse(answer.toString()).error, /stopped arriving/);
      } finally {
        client.socket.destroy();
        await local.proxy.shutdown(1000);
        upstream.close();
      }
    });
  }
});

describe('a request without a body (--mtls_rest_mode terminate)', () => {
  test('HTTP/2: a GET and a POST with content-length: 0 whose answers take longer than --mtls_idle_timeout get them, not a 408', { timeout: 20_000 }, async () => {
    // Every answer on its own connection, each after three idle timeouts.
    const upstream = await scriptedUpstream((socket) => setTimeout(() => socket.end('HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\nslow'), 3 * IDLE_MS));
    const local = await startTestProxy({ pki, upstream: { restPort: upstream.port }, limits: { idleTimeoutMs: IDLE_MS } });
    const session = h2Session(local.restPort, pki);
    try {
      const answers = await Promise.all([
        h2Request(session, { ':method': 'GET', ':path': '/v2/models/dummy' }),
        h2Request(session, { ':method': 'POST', ':path': '/v2/models/dummy/infer', 'content-length': '0' }, ''),
      ]);
      for (const answer of answers) {
        assert.equal(answer.headers[':status'], 200);
        assert.equal(answer.body.toString(), 'slow');
      }
      for (const method of ['GET', 'POST']) {
        const line = await local.logs.waitFor((l) => l.event === 'access' && l.method === method);
        assert.deepEqual([line.status, line.error], [200, undefined]);
      }
    } finally {
      session.destroy();
      await local.proxy.shutdown(1000);
      upstream.close();
    }
  });

  test('HTTP/2: an event stream answering a GET outlives --mtls_idle_timeout and ends cleanly', { timeout: 20_000 }, async () => {
    const upstream = await scriptedUpstream((socket) => {
      socket.write('HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n');
      setTimeout(() => socket.write('9\r\ndata: 2\n\n\r\n0\r\n\r\n'), 3 * IDLE_MS);
    });
    const local = await startTestProxy({ pki, upstream: { restPort: upstream.port }, limits: { idleTimeoutMs: IDLE_MS } });
    const session = h2Session(local.restPort, pki);
    try {
      const answer = await h2Request(session, { ':method': 'GET', ':path': '/v3/events' });
      assert.equal(answer.headers[':status'], 200);
      assert.equal(answer.body.toString(), 'data: 1\n\ndata: 2\n\n');
      const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v3/events');
      assert.equal(line.error, undefined);
    } finally {
      session.destroy();
      await local.proxy.shutdown(1000);
      upstream.close();
    }
  });
});

describe('a request head that does not arrive in time', () => {
  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}: a head trickled in a line at a time gets 408 naming --mtls_idle_timeout and the connection closes; nothing reaches the model server`, { timeout: 20_000 }, async () => {
      let reached = false;
      const upstream = await scriptedUpstream(() => (reached = true));
      // Long enough that the trickle (every 50 ms) always keeps the connection from looking idle.
      const local = await startTestProxy({ pki, upstream: { restPort: upstream.port }, restMode, limits: { idleTimeoutMs: 1000 } });
      try {
        const socket = await openRaw(local.restPort);
        const text = readToClose(socket);
        socket.write('GET /v2/health/ready HTTP/1.1\r\n');
        const trickle = setInterval(() => socket.write('x-a: b\r\n'), 50);
        try {
          const answer = await text;
          assert.match(answer, /^HTTP\/1\.1 408 Request Timeout\r\n/);
          assert.match(answer, /\r\nconnection: close\r\n/i);
          assert.match(answer, /the request head did not arrive within 1 s \(--mtls_idle_timeout\)/);
        } finally {
          clearInterval(trickle);
        }
        assert.equal(reached, false);
        const line = await local.logs.waitFor((l) => l.event === 'access' && l.status === 408);
        assert.equal(line.error, 'client_header_timeout');
        assert.equal(line.subject, 'CN=client,OU=tests');
      } finally {
        await local.proxy.shutdown(1000);
        upstream.close();
      }
    });

    test(`--mtls_rest_mode ${restMode}: a head that stops arriving halfway gets 408 naming --mtls_idle_timeout and an access line (metrics and log), on a new connection and after a first request (answered, or pipelined with it), not a silent idle close`, { timeout: 20_000 }, async () => {
      const model: ModelServer = await startUpstream({ grpcPort: null });
      const local = await startTestProxy({ pki, upstream: { restPort: model.restPort! }, restMode, limits: { idleTimeoutMs: IDLE_MS } });
      try {
        const first = 'GET /v2/health/ready HTTP/1.1\r\nhost: a\r\n\r\n';
        const half = 'GET /v2/health/ready HTTP/1.1\r\nho';
        // 'pipelined': the half head comes in the same write as a first request, so no byte arrives after its answer.
        for (const before of ['nothing', 'an answered request', 'pipelined'] as const) {
          const socket = await openRaw(local.restPort);
          const text = readToClose(socket);
          if (before === 'an answered request') {
            const answered = once(socket, 'data');
            socket.write(first);
            await answered;
          }
          socket.write(before === 'pipelined' ? first + half : half);
          const answer = await text;
          assert.match(answer, before === 'nothing' ? /^HTTP\/1\.1 408 Request Timeout\r\n/ : /^HTTP\/1\.1 200 OK\r\n[\s\S]*HTTP\/1\.1 408 Request Timeout\r\n/, `after ${before}`);
          assert.match(answer, /the request head did not arrive within 0\.4 s \(--mtls_idle_timeout\)/);
        }
        await eventually(() => local.logs.lines.filter((l) => l.event === 'access' && l.status === 408).length === 3, 'an access line for each 408');
        for (const line of local.logs.lines.filter((l) => l.event === 'access' && l.status === 408)) assert.equal(line.error, 'client_header_timeout');
      } finally {
        await local.proxy.shutdown(1000);
        await model.close();
      }
    });

    if (restMode === 'terminate') {
      test('--mtls_rest_mode terminate: an upload answered early (413) whose client then goes quiet mid-body is closed as idle: no 408 after the 413, one access line', { timeout: 20_000 }, async () => {
        const upstream = await scriptedUpstream((socket) => socket.write('HTTP/1.1 413 Payload Too Large\r\ncontent-length: 5\r\n\r\nlarge'));
        const local = await startTestProxy({ pki, upstream: { restPort: upstream.port }, restMode, limits: { idleTimeoutMs: IDLE_MS } });
        try {
          const socket = await openRaw(local.restPort);
          const text = readToClose(socket);
          socket.write(`POST /v2/models/dummy/infer HTTP/1.1\r\nhost: a\r\ncontent-length: 200000\r\n\r\n${'x'.repeat(STREAMED_BYTES)}`);
          await once(socket, 'data');
          // The rest of the body, part of it, after the answer: read and dropped, then nothing more.
          socket.write('x'.repeat(1000));
          const answer = await text;
          assert.match(answer, /^HTTP\/1\.1 413 Payload Too Large\r\n/);
          assert.doesNotMatch(answer, /408/);
          await eventually(() => local.logs.lines.some((l) => l.event === 'access'), 'the access line');
          assert.deepEqual(local.logs.lines.filter((l) => l.event === 'access').map((l) => [l.status, l.error]), [[413, undefined]]);
        } finally {
          await local.proxy.shutdown(1000);
          upstream.close();
        }
      });
    }

    test(`--mtls_rest_mode ${restMode}: a kept-alive connection quiet between requests is closed as idle, without a 408`, { timeout: 20_000 }, async () => {
      const model: ModelServer = await startUpstream({ grpcPort: null });
      const local = await startTestProxy({ pki, upstream: { restPort: model.restPort! }, restMode, limits: { idleTimeoutMs: IDLE_MS } });
      try {
        const socket = await openRaw(local.restPort);
        const text = readToClose(socket);
        socket.write('GET /v2/health/ready HTTP/1.1\r\nhost: a\r\n\r\n');
        const answer = await text;
        assert.match(answer, /^HTTP\/1\.1 200 OK\r\n/);
        assert.doesNotMatch(answer, /408/);
      } finally {
        await local.proxy.shutdown(1000);
        await model.close();
      }
    });

    test(`--mtls_rest_mode ${restMode}: a connection that never sends a byte is closed as idle, without a 408 or an access line, also when the event loop stalls past the timeout (as on a loaded machine)`, { timeout: 20_000 }, async () => {
      const model: ModelServer = await startUpstream({ grpcPort: null });
      // Once the connection is handed over, the proxy's event loop is held for two idle timeouts: every timer then runs late, in whatever order.
      const stall = () => setImmediate(() => {
        const until = Date.now() + 2 * IDLE_MS;
        while (Date.now() < until);
      });
      const observer = { ...NOOP_OBSERVER, handshakeAccepted: stall };
      const local = await startTestProxy({ pki, upstream: { restPort: model.restPort! }, restMode, limits: { idleTimeoutMs: IDLE_MS }, observer });
      try {
        const socket = await openRaw(local.restPort);
        assert.equal(await readToClose(socket), '');
        const rest = local.proxy.listeners().find((l) => l.name === 'rest')!;
        await eventually(() => rest.connections.size === 0, 'the connection closed on the proxy side');
        assert.deepEqual(local.logs.lines.filter((l) => l.event === 'access'), []);
      } finally {
        await local.proxy.shutdown(1000);
        await model.close();
      }
    });
  }
});
