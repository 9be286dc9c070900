/**
 * Clients that stop reading while an answer flows to them, on the paths whose answers go through
 * the TLS socket's own writes: HTTP/1.1 in both REST modes and the gRPC relay (HTTP/2 terminated by
 * Node has its PING rule, h2-unresponsive-clients.test.ts). Backpressure held such a client's
 * connection and its model-server request for as long as it stayed stopped (a stopped client's
 * kernel answers with a zero window, so TCP never gives up): minutes in the probe, without end.
 * Now a client that takes none of the bytes waiting for it, and sends none, for --mtls_idle_timeout
 * is closed (send-stall.ts), as nginx's send_timeout closes it; a reader that keeps taking bytes is not.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { grpcFrame, startTestProxy, startUpstream, type StartedProxy } from './helpers/harness.js';
import { eventually } from './helpers/ops.js';
import { assertSlowDownloadCompletes, curlTls } from './helpers/slow-download.js';
import { END_HEADERS, END_STREAM, H2, grpcHeaderBlock, h2Frame, rawH2Client } from './helpers/raw-h2.js';
import type { ModelServer } from '../src/demo/model-server.js';
import { FORWARD_MODES } from '../src/config.js';
import type { ListenerName } from '../src/observer.js';

/** Short, so that the sweeps (a quarter of it each) come within the test's bounds. */
const IDLE_MS = 2000;
/** An answer no client finishes in the test's time: the proxy's writes to a stopped one back up. */
const ENDLESS_BYTES = 64 * 1024 ** 3;

let pki: TestPki;
let upstream: ModelServer;

before(async () => {
  [pki, upstream] = await Promise.all([createTestPki(), startUpstream()]);
});

after(() => Promise.all([upstream.close(), pki.cleanup()]));

/** Bounded: the connection is let go, or the test fails naming what was held. */
async function released(local: StartedProxy, listener: ListenerName, what: string): Promise<void> {
  await eventually(() => local.proxy.listeners().find((l) => l.name === listener)!.connections.size === 0, what, 30_000);
}


async function assertClosedAsUnresponsive(local: StartedProxy, listener: ListenerName): Promise<void> {
  const warned = await local.logs.waitFor((l) => l.event === 'client_unresponsive');
  assert.equal(warned['listener'], listener);
  assert.ok(Number(warned['waitingBytes']) > 0, JSON.stringify(warned));
}

for (const restMode of FORWARD_MODES) {
  describe(`REST over HTTP/1.1, --mtls_rest_mode ${restMode}: a client that stops reading`, () => {
    test('stopped (SIGSTOP) mid-download: its connection and model-server request are released, logged proxy_closed_unresponsive', async () => {
      const local = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, restMode, limits: { idleTimeoutMs: IDLE_MS } });
      const downloads = () => upstream.received.filter((r) => r.path.startsWith('/stream-bytes')).length;
      const aborted = () => upstream.restAborted.filter((path) => path === '/stream-bytes').length;
      const [downloadsBefore, abortedBefore] = [downloads(), aborted()];
      const curl = spawn('curl', ['-sS', '--http1.1', ...curlTls(pki), '-o', '/dev/null', `https://localhost:${local.restPort}/stream-bytes?n=${ENDLESS_BYTES}`], { stdio: 'ignore' });
      try {
        await eventually(() => downloads() > downloadsBefore, 'the download at the model server');
        curl.kill('SIGSTOP');
        await released(local, 'rest', "the stopped client's connection released");
        await eventually(() => aborted() > abortedBefore, 'the model server request aborted');
        const line = await local.logs.waitFor((l) => l.event === 'access' && String(l.path).startsWith('/stream-bytes'));
        assert.equal(line.error, 'proxy_closed_unresponsive');
        await assertClosedAsUnresponsive(local, 'rest');
      } finally {
        curl.kill('SIGKILL');
        await local.proxy.shutdown(1000);
      }
    });

    // Always behind (the model server sends faster), so bytes wait for it the whole time: only its progress keeps it.
    test('a live client reading steadily for several idle timeouts is not closed: its download completes', async () => {
      const local = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, restMode, limits: { idleTimeoutMs: IDLE_MS } });
      try {
        await assertSlowDownloadCompletes(local, pki, { protocol: '--http1.1', rate: '2M', bytes: 16 * 1024 * 1024, closedAs: 'client_unresponsive' });
      } finally {
        await local.proxy.shutdown(1000);
      }
    });
  });
}

/** An ovmsmtls.test.Echo request: `payload` (field 1), `count` (field 2). */
function echoRequest(payload: Buffer, count: number): Buffer {
  return Buffer.concat([Buffer.from([0x0a]), varint(payload.length), payload, Buffer.from([0x10]), varint(count)]);
}

function varint(n: number): Buffer {
  const octets: number[] = [];
  for (; n >= 0x80; n = Math.floor(n / 0x80)) octets.push((n % 0x80) | 0x80);
  octets.push(n);
  return Buffer.from(octets);
}

const SETTINGS_INITIAL_WINDOW_SIZE = 0x4;
const MAX_WINDOW = 2 ** 31 - 1;

/** Flow-control windows as large as HTTP/2 allows: the model server is held back by nothing but TCP. */
function widestWindows(): Buffer {
  const setting = Buffer.alloc(6);
  setting.writeUInt16BE(SETTINGS_INITIAL_WINDOW_SIZE, 0);
  setting.writeUInt32BE(MAX_WINDOW, 2);
  const increment = Buffer.alloc(4);
  increment.writeUInt32BE(MAX_WINDOW - 65_535, 0);
  return Buffer.concat([h2Frame(H2.SETTINGS, 0, 0, setting), h2Frame(0x8, 0, 0, increment)]);
}

describe('gRPC relay (--mtls_grpc_mode relay): a client that stops reading', () => {
  test('a server stream to a client that never reads again: connection released, the model server call cancelled, relay_access proxy_closed_unresponsive', async () => {
    const local = await startTestProxy({ pki, upstream: { grpcPort: upstream.grpcPort! }, grpcMode: 'relay', limits: { idleTimeoutMs: IDLE_MS } });
    const client = await rawH2Client(local.grpcPort, pki);
    try {
      const path = '/ovmsmtls.test.Echo/ServerStream';
      client.socket.write(Buffer.concat([
        widestWindows(),
        h2Frame(H2.HEADERS, END_HEADERS, 1, grpcHeaderBlock(path)),
        h2Frame(H2.DATA, END_STREAM, 1, grpcFrame(echoRequest(Buffer.alloc(8 * 1024, 0x61), 10_000_000))),
      ]));
      await eventually(() => upstream.received.some((r) => r.path === path), 'the call at the model server');
      // Reads nothing more: its kernel's buffers fill, then the proxy's writes to it back up.
      client.socket.pause();
      await released(local, 'grpc', "the stopped client's relayed connection released");
      await upstream.waitFor('cancelled', path);
      const line = await local.logs.waitFor((l) => l.event === 'relay_access');
      assert.equal(line.error, 'proxy_closed_unresponsive');
      await assertClosedAsUnresponsive(local, 'grpc');
    } finally {
      client.socket.destroy();
      await local.proxy.shutdown(1000);
    }
  });
});
