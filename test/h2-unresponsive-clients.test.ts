/**
 * HTTP/2 client connections whose end Node 20 never reports while streams are open: a client
 * killed while the answers to it were backed up, and a client's protocol error after which
 * nghttp2 sends GOAWAY and stops reading. Both were held, with their requests to the model server,
 * until the process ended. The idle sweep's PING now finds them (http-fronts.ts watch()). Found by
 * probing REST over HTTP/2 with curl, nghttp and a frame-level client.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { startTestProxy, startUpstream, type StartedProxy } from './helpers/harness.js';
import { scriptedUpstream, type ScriptedUpstream } from './helpers/scripted-upstream.js';
import { eventually } from './helpers/ops.js';
import { assertSlowDownloadCompletes, curlTls, type SlowDownload } from './helpers/slow-download.js';
import { END_HEADERS, END_STREAM, H2, answerPings, h2Frame, headerBlock, headerFrames, literalField, rawH2Client } from './helpers/raw-h2.js';
import type { ModelServer } from '../src/demo/model-server.js';
import { FORWARD_MODES } from '../src/config.js';
import { freeLoopbackPorts } from '../src/ports.js';
import { startCli, type LongRunningCli } from './helpers/cli.js';

/** Short, so that the sweeps (a quarter of it each) come within the test's bounds. */
const IDLE_MS = 2000;
/** Far more than a client reading 100 KB/s takes in the test's time: the proxy's writes to it back up. */
const DOWNLOAD_BYTES = 400 * 1024 * 1024;

let pki: TestPki;
let upstream: ModelServer;

before(async () => {
  [pki, upstream] = await Promise.all([createTestPki(), startUpstream()]);
});

after(() => Promise.all([upstream.close(), pki.cleanup()]));

function restListener(local: StartedProxy) {
  return local.proxy.listeners().find((l) => l.name === 'rest')!;
}

/** Bounded: the connection is let go, or the test fails naming what was held. */
async function released(local: StartedProxy, what: string): Promise<void> {
  await eventually(() => restListener(local).connections.size === 0, what, 30_000);
}

const postHeaders = (path: string, extra: Record<string, string> = {}) =>
  headerBlock({ ':method': 'POST', ':scheme': 'https', ':path': path, ':authority': 'localhost', ...extra });

for (const restMode of FORWARD_MODES) {
  describe(`REST over HTTP/2, --mtls_rest_mode ${restMode}: connections Node never says ended`, () => {
    // Node 22+ reports its close; Node 20 never does, and the kernel's tables tell (client-acks.ts): client_closed either way.
    test('a client killed while its download is backed up (curl --limit-rate, then SIGKILL): connection, stream and model-server request released, logged client_closed, with no h2_session_error line', async () => {
      // Long enough that the client, which takes nothing for seconds at a time as it reads, is not found unresponsive before it is killed.
      const local = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, restMode, limits: { idleTimeoutMs: 5 * IDLE_MS } });
      const curl = spawn('curl', ['-sS', '--http2', ...curlTls(pki), '--limit-rate', '100k', '-o', '/dev/null', `https://localhost:${local.restPort}/stream-bytes?n=${DOWNLOAD_BYTES}`], { stdio: 'ignore' });
      try {
        await eventually(() => upstream.received.some((r) => r.path.startsWith('/stream-bytes')), 'the download at the model server');
        // A wait for the moment, not a timed assertion: by then more was sent than curl's windows and buffers take at 100 KB/s.
        await sleep(2500);
        curl.kill('SIGKILL');
        await released(local, "the killed client's connection released");
        await upstream.waitFor('restAborted', '/stream-bytes');
        const line = await local.logs.waitFor((l) => l.event === 'access' && String(l.path).startsWith('/stream-bytes'));
        assert.equal(line.error, 'client_closed');
        assert.deepEqual(local.logs.lines.filter((l) => l.event === 'h2_session_error'), []);
      } finally {
        curl.kill('SIGKILL');
        await local.proxy.shutdown(1000);
      }
    });

    // The PING waits behind what the client has not read; each byte its kernel takes as it reads starts the wait again.
    test('a live client reading slowly, far longer than an idle timeout, is not closed: its download completes', async () => {
      // An idle timeout shorter than the time the PING waits behind what curl has not read yet at 100 KB/s.
      const local = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, restMode, limits: { idleTimeoutMs: 1000 } });
      try {
        await assertSlowDownloadCompletes(local, pki, { protocol: '--http2', rate: '100k', bytes: 1536 * 1024, closedAs: 'h2_session_error' });
      } finally {
        await local.proxy.shutdown(1000);
      }
    });

    for (const [what, frames] of [
      ['DATA after END_STREAM (GOAWAY STREAM_CLOSED)', [h2Frame(H2.DATA, END_STREAM, 1, Buffer.from('abc')), h2Frame(H2.DATA, 0, 1, Buffer.from('def'))]],
      ['a DATA frame over SETTINGS_MAX_FRAME_SIZE (GOAWAY FRAME_SIZE_ERROR)', [h2Frame(H2.DATA, 0, 1, Buffer.alloc(20_000, 0x61))]],
    ] as const) {
      // Node 22+ says at once that nghttp2 gave up on it; Node 20 never does, and the idle sweep finds it: the same line either way.
      test(`a connection nghttp2 ends for the client's protocol error, ${what}: closed, with its access line and an h2_session_error line, PROTOCOL_ERROR`, async () => {
        const local = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, restMode, limits: { idleTimeoutMs: IDLE_MS } });
        const client = await rawH2Client(local.restPort, pki);
        try {
          client.socket.write(Buffer.concat([h2Frame(H2.HEADERS, END_HEADERS, 1, postHeaders('/echo-body')), ...frames]));
          await client.waitForFrame(H2.GOAWAY);
          client.socket.end();
          await released(local, 'the connection closed');
          // Its line is written now, not at shutdown; what it says depends on how far the answer got before nghttp2 stopped.
          await local.logs.waitFor((l) => l.event === 'access' && l.path === '/echo-body');
          assert.equal((await local.logs.waitFor((l) => l.event === 'h2_session_error'))['code'], 'PROTOCOL_ERROR');
        } finally {
          client.socket.destroy();
          await local.proxy.shutdown(1000);
        }
      });
    }

    test('a request held when the proxy ends its connection itself (a header field over 64 KiB on another stream) is logged proxy_closed_undecodable_header, not as an answer delivered whole', async () => {
      const model = await scriptedUpstream(() => {});
      const local = await startTestProxy({ pki, upstream: { restPort: model.port }, restMode, limits: { idleTimeoutMs: IDLE_MS } });
      const client = await rawH2Client(local.restPort, pki);
      answerPings(client);
      try {
        client.socket.write(h2Frame(H2.HEADERS, END_HEADERS | END_STREAM, 1, postHeaders('/held')));
        await eventually(() => model.sockets.length > 0, 'the held request at the model server');
        client.socket.write(headerFrames(3, Buffer.concat([postHeaders('/big'), literalField('x-big', 'a'.repeat(70_000))])));
        await released(local, 'the connection closed by the proxy');
        const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/held');
        assert.equal(line.error, 'proxy_closed_undecodable_header', JSON.stringify({ status: line.status, bytesOut: line.bytesOut }));
      } finally {
        client.socket.destroy();
        await local.proxy.shutdown(1000);
        model.close();
      }
    });
  });
}

/**
 * The PING of the idle sweep waits behind what the client has not read. Node counts what it hands to its
 * own kernel, whose send buffer (MBs, autotuned) fills whether the client reads or not: a client reading
 * slowly what was already there looked dead once the model server went quiet, and one that stopped
 * reading looked alive while that buffer filled. The kernel's own count (/proc/net/tcp) tells them apart.
 * Found with grpcio, grpc-go and curl on the gRPC port; the REST port's HTTP/2 side is the same code.
 */
describe('HTTP/2 clients behind on their reading: what the client\'s kernel took, not what ours did', () => {
  const head = (length: number) => `HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: ${length}\r\n\r\n`;

  /** curl's download from `model` through a proxy closing unresponsive clients after `idleTimeoutMs` completes whole. */
  async function assertCompletesThrough(model: ScriptedUpstream, idleTimeoutMs: number, download: Omit<SlowDownload, 'protocol' | 'closedAs'>): Promise<void> {
    const local = await startTestProxy({ pki, upstream: { restPort: model.port }, limits: { idleTimeoutMs } });
    try {
      await assertSlowDownloadCompletes(local, pki, { ...download, protocol: '--http2', closedAs: 'h2_session_error' });
    } finally {
      await local.proxy.shutdown(1000);
      model.close();
    }
  }

  test('a live client reading slowly while the model server is quiet is not closed: a pause longer than the idle timeout, then the rest', async () => {
    const part = 4.5 * 1024 * 1024;
    // The model server sends 4.5 MiB, more than the proxy's kernel takes in, then is quiet for 20 s: longer than
    // curl at 250 KB/s takes to read what that kernel holds (MBs on loopback, ~15 s), which Node does not see.
    const model = await scriptedUpstream((socket) => {
      socket.write(head(part + 1) + 'a'.repeat(part));
      setTimeout(() => socket.end('b'), 20_000);
    });
    await assertCompletesThrough(model, 10_000, { rate: '250k', path: '/quiet', bytes: part + 1 });
  });

  test('a client that stops reading (SIGSTOP) a stream that trickles on is closed, and its model-server request with it', async () => {
    let ended = false;
    // 1 KB every 50 ms: far less than the proxy's kernel would buffer in the test's time.
    const model = await scriptedUpstream((socket) => {
      socket.write(head(1e12));
      const timer = setInterval(() => socket.write('t'.repeat(1000)), 50);
      socket.once('close', () => {
        ended = true;
        clearInterval(timer);
      });
    });
    const local = await startTestProxy({ pki, upstream: { restPort: model.port }, limits: { idleTimeoutMs: IDLE_MS } });
    const curl = spawn('curl', ['-sS', '--http2', ...curlTls(pki), '-o', '/dev/null', `https://localhost:${local.restPort}/trickle`], { stdio: 'ignore' });
    try {
      await eventually(() => model.sockets.length > 0, 'the request at the model server');
      curl.kill('SIGSTOP');
      await released(local, "the stopped client's connection released");
      await eventually(() => ended, 'the model-server request ended', 5000);
      const line = await local.logs.waitFor((l) => l.event === 'h2_session_error');
      assert.equal(line['code'], 'PING_UNANSWERED');
      // A protocol error of the client's has its own line (PROTOCOL_ERROR): this one names only what it can still be.
      assert.equal(
        line['message'],
        'the client answered no PING, and no byte moved either way, for an idle timeout with 1 request(s) open (stopped or wedged, or gone without a FIN or reset reaching the proxy): closed',
      );
      assert.equal((await local.logs.waitFor((l) => l.event === 'access' && l.path === '/trickle')).error, 'proxy_closed_unresponsive');
    } finally {
      curl.kill('SIGKILL');
      await local.proxy.shutdown(1000);
      model.close();
    }
  });

  // The kernel's count is of the moment /proc/net/tcp was read; Node's counts, taken before and after, had to be equal for
  // it to be used, and three reads more were tried when they were not. A model server writing more often than /proc is
  // read (every 2 ms here) left no read without a write in it: the client, reading all along, had no sample, and its
  // PING, waiting behind what it had not read yet, went unanswered: closed as unresponsive within an idle timeout.
  test('a live client reading slowly a stream the model server writes in small pieces (every 2 ms, more often than /proc is read) is not closed: its download completes', async () => {
    // 150 KB/s for 10 s, to curl reading 100 KB/s: what it is behind grows to ~500 KB, which the kernels hold once the answer ends.
    const size = 1.5 * 1024 * 1024;
    const bytesPerMs = 150;
    const model = await scriptedUpstream((socket) => {
      socket.write(head(size));
      const start = performance.now();
      let sent = 0;
      const timer = setInterval(() => {
        // As much as brings it to the rate, however late the timer fires on a loaded machine.
        const piece = Math.min(Math.round((performance.now() - start) * bytesPerMs), size) - sent;
        sent += piece;
        socket.write('p'.repeat(piece));
        if (sent === size) clearInterval(timer);
      }, 2);
      socket.once('close', () => clearInterval(timer));
    });
    await assertCompletesThrough(model, IDLE_MS, { rate: '100k', path: '/pieces', bytes: size });
  });

  test('a slow reader whose answer has ended, its PING still behind what it has not read: no connection closed as unresponsive', async () => {
    const size = 3 * 1024 * 1024;
    // Held open across a sweep (a PING goes out behind the 3 MiB), then ended while curl still reads at 100 KB/s.
    const model = await scriptedUpstream((socket) => {
      socket.write(head(size) + 'a'.repeat(size - 1));
      setTimeout(() => socket.end('b'), IDLE_MS / 2);
    });
    await assertCompletesThrough(model, IDLE_MS, { rate: '100k', path: '/ending', bytes: size });
  });
});

/**
 * Where /proc/net/tcp cannot be read (a /proc mounted with subset=pid, as hardened containers have it; not Linux),
 * ClientAcks gives up the kernel's count at its first sample (covers() turns false) and the idle sweep goes by Node's
 * own counts of the connection's bytes, as the README says. A client that stopped reading is still closed, and named
 * as unresponsive: with no tables to say the client left, nothing names it client_closed.
 */
describe('without /proc/net/tcp (the proxy in a private mount namespace whose /proc shows processes only)', () => {
  const HIDE_PROC_NET = ['unshare', '--mount', '--propagation', 'private', 'sh', '-c', 'mount -t proc -o subset=pid proc /proc && exec "$@"', 'sh'];
  const SAFETY = { timeout: 120_000 };

  /** `ovms-mtls proxy`, one worker, REST over the stand-in model server, in that namespace. */
  async function startWithoutProcNet(): Promise<{ cli: LongRunningCli; restPort: number }> {
    const [restPort] = (await freeLoopbackPorts(1)) as [number];
    const cli = startCli([
      'proxy', '--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`,
      '--mtls_idle_timeout', String(IDLE_MS / 1000), '--mtls_workers', '1',
      '--mtls_cert', pki.paths['server.pem']!, '--mtls_key', pki.paths['server.key']!, '--mtls_client_ca', pki.paths['client_cert_ca.pem']!,
    ], { wrap: HIDE_PROC_NET });
    await Promise.race([cli.logs.waitFor((l) => l.event === 'listening' && l.listener === 'rest'), cli.exited.then((code) => assert.fail(`proxy exited ${code}: ${cli.stderr()}`))]);
    return { cli, restPort };
  }

  async function stop(cli: LongRunningCli): Promise<void> {
    cli.child.kill('SIGTERM');
    await cli.exited;
  }

  test('a client that stops reading (SIGSTOP) mid-download is closed by Node\'s counts: h2_session_error PING_UNANSWERED, its access line proxy_closed_unresponsive, the model-server request ended', SAFETY, async () => {
    const { cli, restPort } = await startWithoutProcNet();
    // A download that never ends (1 TB): read at full speed until the client stops, then Node's counts stand still.
    const path = '/stream-bytes?n=1000000000000';
    let curl: ReturnType<typeof spawn> | undefined;
    try {
      curl = spawn('curl', ['-sS', '--http2', ...curlTls(pki), '-o', '/dev/null', `https://localhost:${restPort}${path}`], { stdio: 'ignore' });
      await eventually(() => upstream.received.some((r) => r.path === path), 'the download at the model server');
      const abortedBefore = upstream.restAborted.length;
      curl.kill('SIGSTOP');
      assert.equal((await cli.logs.waitFor((l) => l.event === 'h2_session_error'))['code'], 'PING_UNANSWERED');
      assert.equal((await cli.logs.waitFor((l) => l.event === 'access' && l.path === path)).error, 'proxy_closed_unresponsive');
      await eventually(() => upstream.restAborted.length > abortedBefore, 'the model-server request ended');
    } finally {
      curl?.kill('SIGKILL');
      await stop(cli);
    }
  });

  // Its PING waits behind what it has not read for longer than the idle timeout; Node's count, which moves as the proxy's
  // kernel drains, is what keeps it. With no count at all (the kernel's given up, Node's not taken up) it was cut.
  test('a live client reading slowly (curl --limit-rate 2M, 24 MB) for several idle timeouts is not closed: its download completes', SAFETY, async () => {
    const { cli, restPort } = await startWithoutProcNet();
    try {
      await assertSlowDownloadCompletes({ restPort, logs: cli.logs }, pki, { protocol: '--http2', rate: '2M', bytes: 24 * 1024 * 1024, closedAs: 'h2_session_error' });
    } finally {
      await stop(cli);
    }
  });
});
