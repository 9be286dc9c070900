import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import type { TLSSocket } from 'node:tls';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { h2Request, h2Session, startTestProxy, startUpstream } from './helpers/harness.js';
import { scriptedUpstream } from './helpers/scripted-upstream.js';
import { openRaw as openRawWith, readToClose } from './helpers/raw-http1.js';
import { eventually } from './helpers/ops.js';
import type { ModelServer } from '../src/demo/model-server.js';
import { FORWARD_MODES } from '../src/config.js';

/**
 * A REST request whose body stops arriving is given up after
 * --mtls_idle_timeout (nginx's client_body_timeout): otherwise it holds a
 * model server connection for as long as the client likes.
 */

const INFER_BODY = JSON.stringify({ inputs: [{ name: 'b', shape: [1, 10], datatype: 'FP32', data: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] }] });
const IDLE_MS = 400;

let pki: TestPki;

before(async () => {
  pki = await createTestPki();
});

after(async () => {
  await pki.cleanup();
});

async function openRaw(port: number): Promise<TLSSocket> {
  const socket = await openRawWith(port, pki);
  socket.on('error', () => {});
  return socket;
}

/** A model server that reads what it gets and never answers; `closed` settles when the proxy drops its connection. */
async function silentUpstream() {
  const upstream = await scriptedUpstream(() => {});
  const closed = eventually(() => upstream.sockets.length > 0, 'a connection at the model server').then(() => once(upstream.sockets[0]!, 'close'));
  return { upstream, closed };
}

describe('a request body that stops arriving', () => {
  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}, HTTP/1.1: 408 naming --mtls_idle_timeout, the connection closes, the model server's connection is dropped, the access line says why`, { timeout: 20_000 }, async () => {
      const { upstream, closed } = await silentUpstream();
      const local = await startTestProxy({ pki, upstream: { restPort: upstream.port }, restMode, limits: { idleTimeoutMs: IDLE_MS } });
      try {
        const socket = await openRaw(local.restPort);
        socket.write('POST /v2/models/dummy/infer HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{"in');
        const text = await readToClose(socket);
        assert.match(text, /^HTTP\/1\.1 408 Request Timeout\r\n/);
        assert.match(text, /\r\nconnection: close\r\n/i);
        assert.match(text, /the request body stopped arriving: no byte of it for 0\.4 s \(--mtls_idle_timeout\)/);
        await closed;
        const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/models/dummy/infer');
        assert.equal(line.status, 408);
        assert.equal(line.error, 'client_body_timeout');
        assert.equal(line.bytesIn, 4);
      } finally {
        await local.proxy.shutdown(1000);
        upstream.close();
      }
    });

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

  test('HTTP/2: the stream gets 408, the model server connection is dropped, and the session goes on serving', { timeout: 20_000 }, async () => {
    const { upstream, closed } = await silentUpstream();
    const local = await startTestProxy({ pki, upstream: { restPort: upstream.port }, limits: { idleTimeoutMs: IDLE_MS } });
    const session = h2Session(local.restPort, pki);
    try {
      const stream = session.request({ ':method': 'POST', ':path': '/v2/models/dummy/infer', 'content-type': 'application/json', 'content-length': '10' });
      stream.write('{"in');
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
      await eventually(() => upstream.sockets.length === 2, 'the second request at the model server');
      assert.equal(session.closed || session.destroyed, false);
    } finally {
      session.destroy();
      await local.proxy.shutdown(1000);
      upstream.close();
    }
  });
});
