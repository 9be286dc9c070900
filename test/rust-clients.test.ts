/**
 * reqwest 0.11 (hyper 0.14, tokio) on rustls 0.20 and webpki on the REST port (test/fixtures/rust-rest-client,
 * built here offline from Debian's crates), as Rust services call OVMS, in both REST modes over HTTP/1.1 and
 * HTTP/2 (ALPN). rustls has habits of its own: webpki is the strictest certificate validator around, and a
 * TCP close that comes without a TLS close_notify is an error (UnexpectedEof) wherever hyper reads to the end
 * of the connection, where OpenSSL-based clients say nothing.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import type { Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { baseConfig, refusedWording, restModeFrontsOf, startTestProxy, startUpstream, withDownAndStartingFronts } from './helpers/harness.js';
import { behindProxy } from './helpers/scripted-upstream.js';
import { buildRustFixture } from './helpers/rust-build.js';
import { GateBoard } from './helpers/sse.js';
import { reloaderFor } from './helpers/reload.js';
import { runCli } from './helpers/cli.js';
import { createCrl } from '../src/x509.js';
import { JsonLinesClient, assertChatStream, failuresOf, type ClientSpec } from './helpers/client-processes.js';
import { eventually, heldConnectionsTo } from './helpers/ops.js';
import { FORWARD_MODES } from '../src/config.js';

const INFER_BODY = JSON.stringify({ inputs: [{ name: 'b', shape: [1, 10], datatype: 'FP32', data: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] }] });
const CHAT_BODY = JSON.stringify({ model: 'm', stream: true, messages: [{ role: 'user', content: 'hi' }] });
const LARGE_BYTES = 4_000_000;
/** What reqwest reports for a request it could not send anywhere once the proxy stopped listening: not lost, refused. */
const CONNECT_REFUSED = /error trying to connect: tcp connect error: Connection refused/;

interface RustResult {
  status?: number;
  proto?: string;
  header?: Record<string, string[]>;
  body?: string;
  bytes?: number;
  pattern_ok?: boolean;
  events?: string[];
  /** The reqwest error with each of its sources. */
  err?: string;
}

type RustClient = JsonLinesClient<RustResult>;

let binary: string;
let board = new GateBoard();

/** The files a client is given: the CA it trusts the proxy by, its certificate and key. */
interface ClientFiles {
  ca: string;
  cert: string;
  key: string;
}

/** The test PKI's files for its certificate `cert` (client, revoked_client, ...). */
const pkiFiles = (cert: string): ClientFiles => ({ ca: setup.pki.paths['server_ca.pem']!, cert: setup.pki.paths[`${cert}.pem`]!, key: setup.pki.paths[`${cert}.key`]! });

/** A Rust client process on `port` for the good client's certificate or `cert`'s (or other files), with clients `h1` and `h2` defined. */
async function rustClient(port: number, cert: string | ClientFiles = 'client', spec: Omit<ClientSpec, 'h2'> = {}): Promise<RustClient> {
  const files = typeof cert === 'string' ? pkiFiles(cert) : cert;
  const rust = new JsonLinesClient<RustResult>('Rust client', binary, ['--port', String(port), '--ca', files.ca, '--cert', files.cert, '--key', files.key, '--server-name', 'localhost']);
  await rust.client('h1', { ...spec, h2: false });
  await rust.client('h2', { ...spec, h2: true });
  return rust;
}

/** Runs `use` with a Rust client on `port`, closed after it. */
async function withRustClient(port: number, use: (rust: RustClient) => Promise<void>, cert: string | ClientFiles = 'client', spec: Omit<ClientSpec, 'h2'> = {}): Promise<void> {
  const rust = await rustClient(port, cert, spec);
  try {
    await use(rust);
  } finally {
    rust.close();
  }
}

// Registered first, so that it runs before the model server closes: a stream held at a gate would keep it open.
after(() => board.openAll());
const setup = restModeFrontsOf(() => startUpstream({ grpcPort: null, sseGate: (i) => board.wait(i) }), (server) => server.restPort!);

before(async () => {
  binary = await buildRustFixture('rust-rest-client');
});

const patternSha256 = (n: number) => createHash('sha256').update(Buffer.from(Array.from({ length: n }, (_, i) => (i * 7) & 0xff))).digest('hex');

describe('reqwest on rustls with the files of ovms-mtls certs init', () => {
  for (const key of ['ec', 'rsa2048']) {
    test(`certs init --key ${key}: webpki takes the server certificate (SAN localhost), the proxy the client's PEM certificate and key, over HTTP/1.1 and HTTP/2`, async () => {
      const dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-rust-certs-'));
      try {
        const init = await runCli(['certs', 'init', '--dir', dir, '--key', key]);
        assert.equal(init.code, 0, init.stderr);
        const file = (name: string) => join(dir, name);
        const tls = { cert: file('server.pem'), key: file('server.key'), clientCa: file('client_cert_ca.pem'), crl: file('client_cert_ca.crl') };
        const front = await startTestProxy({ pki: setup.pki, upstream: { restPort: setup.upstream.restPort! }, tls });
        try {
          await withRustClient(front.restPort, async (rust) => {
            for (const [protocol, version] of [['h1', 'HTTP/1.1'], ['h2', 'HTTP/2.0']] as const) {
              const ready = await rust.request(protocol, { path: '/v2/health/ready' });
              assert.deepEqual([ready.status, ready.proto, ready.err], [200, version, undefined]);
            }
          }, { ca: file('server_ca.pem'), cert: file('client.pem'), key: file('client.key') });
        } finally {
          await front.proxy.shutdown(1000);
        }
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
    });
  }
});

for (const restMode of FORWARD_MODES) {
  describe(`reqwest on rustls through --mtls_rest_mode ${restMode}`, () => {
    for (const protocol of ['h1', 'h2'] as const) {
      const version = protocol === 'h1' ? 'HTTP/1.1' : 'HTTP/2.0';

      test(`${version}: webpki takes the server certificate, the proxy the client's; readiness, a KServe JSON infer, a 4 MB upload and a 4 MB download byte-exact`, async () => {
        await withRustClient(setup.front(restMode).restPort, async (rust) => {
          const ready = await rust.request(protocol, { path: '/v2/health/ready' });
          assert.deepEqual([ready.status, ready.proto, ready.err], [200, version, undefined]);
          const infer = await rust.request(protocol, { method: 'POST', path: '/v2/models/dummy/infer', body: INFER_BODY, headers: { 'content-type': 'application/json' } });
          assert.equal(infer.err, undefined);
          assert.deepEqual((JSON.parse(infer.body!) as { outputs: { data: number[] }[] }).outputs[0]!.data, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
          const upload = await rust.request(protocol, { method: 'POST', path: '/echo-body', body_bytes: LARGE_BYTES });
          assert.equal(upload.err, undefined);
          assert.deepEqual(JSON.parse(upload.body!), { bytes: LARGE_BYTES, sha256: patternSha256(LARGE_BYTES) });
          const download = await rust.request(protocol, { path: `/stream-bytes?n=${LARGE_BYTES}`, read: 'pattern' });
          assert.deepEqual([download.err, download.bytes, download.pattern_ok], [undefined, LARGE_BYTES, true]);
        });
      });

      test(`${version}: a streamed chat completion is read chunk by chunk as it arrives, each event before the next is even written, to data: [DONE]`, async () => {
        await withRustClient(setup.front(restMode).restPort, async (rust) => {
          // Event i+1 is released only once Rust has reported event i: an answer buffered to its end would hang here.
          const { result: whole, released } = await rust.releasedOneByOne(board = new GateBoard(), { op: 'request', client: protocol, method: 'POST', path: '/v3/chat/completions', body: CHAT_BODY, read: 'sse' });
          assert.equal(whole.err, undefined);
          assert.equal(whole.header?.['content-type']?.[0], 'text/event-stream');
          assertChatStream(whole.events!.map((e) => e.trimEnd()));
          assert.equal(released, whole.events!.length);
        });
      });
    }

    test('refused certificates: reqwest reads the 403 naming why, over HTTP/1.1 and HTTP/2, a 4 MB upload as well (rustls sends a foreign CA\'s certificate: unknown_ca)', async () => {
      const port = setup.front(restMode).restPort;
      for (const [cert, spec, reason] of [['foreign_client', {}, 'unknown_ca'], ['revoked_client', {}, 'revoked'], ['expired_client', {}, 'expired'], ['client', { no_cert: true }, 'no_certificate']] as const) {
        await withRustClient(port, async (rust) => {
          for (const protocol of ['h1', 'h2']) {
            for (const request of [{ path: '/v2/health/ready' }, { method: 'POST', path: '/echo-body', body_bytes: LARGE_BYTES }]) {
              const refused = await rust.request(protocol, request);
              assert.equal(refused.status, 403, `${cert} ${protocol} ${request.path}: ${refused.err}`);
              assert.equal(refused.err, undefined, `${cert} ${protocol} ${request.path}: the answer was read whole`);
              assert.match((JSON.parse(refused.body!) as { error: string }).error, refusedWording(reason));
            }
          }
        }, cert, spec);
      }
    });

    test('a model server that is down, or not ready: 502 naming the refused connection, 503 with Retry-After, each read whole', async () => {
      await withDownAndStartingFronts(setup.pki, restMode, async (front, status, words) => {
        await withRustClient(front.restPort, async (rust) => {
          for (const protocol of ['h1', 'h2']) {
            for (const spec of [{ path: '/v2/health/ready' }, { method: 'POST', path: '/v2/models/dummy/infer', body: INFER_BODY }]) {
              const answer = await rust.request(protocol, spec);
              assert.deepEqual([answer.status, answer.err], [status, undefined]);
              assert.match((JSON.parse(answer.body!) as { error: string }).error, words);
              if (status === 503) assert.deepEqual(answer.header?.['retry-after'], ['1']);
            }
          }
        });
      });
    });

    test('a model server answer delimited by its close (HTTP/1.0 and HTTP/1.1 without a length): read whole, no UnexpectedEof; one cut short by the model server dying mid-body is an error', async () => {
      const answers: [string, (socket: Socket) => void, (r: RustResult) => void][] = [
        ['HTTP/1.0', (socket) => socket.end('HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nwhole answer'), (r) => assert.deepEqual([r.status, r.body, r.err], [200, 'whole answer', undefined])],
        ['HTTP/1.1 to the close', (socket) => socket.end('HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nwhole answer'), (r) => assert.deepEqual([r.status, r.body, r.err], [200, 'whole answer', undefined])],
        // HTTP/2: the proxy resets the stream (INTERNAL_ERROR), as it must.
        ['dying mid-body', (socket) => { socket.write('HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhalf'); setImmediate(() => socket.destroy()); }, (r) => assert.match(r.err ?? 'no error', /^request or response body error: error reading a body from connection: (unexpected end of file|stream error received: unexpected internal error encountered)$/)],
      ];
      for (const [what, answer, check] of answers) {
        await behindProxy({ pki: setup.pki, restMode, answer: (socket) => answer(socket) }, async (local) => {
          await withRustClient(local.restPort, async (rust) => {
            for (const protocol of ['h1', 'h2']) {
              const result = await rust.request(protocol, { path: '/v2/models/dummy' });
              try {
                check(result);
              } catch (err) {
                throw new Error(`${what} over ${protocol}: ${(err as Error).message}`, { cause: err });
              }
            }
          });
        });
      }
    });

    test('an HTTP/1.0 request for a chat stream: the answer runs to the close of the connection, read whole to data: [DONE] (the proxy sends close_notify: no UnexpectedEof)', async () => {
      board.openAll();
      await withRustClient(setup.front(restMode).restPort, async (rust) => {
        const streamed = await rust.request('h1', { method: 'POST', path: '/v3/chat/completions', version: '1.0', body: CHAT_BODY, read: 'sse' });
        // Answered as HTTP/1.1 (the server's version, RFC 9110 2.5), without a length or chunks: it ends at the close.
        assert.deepEqual([streamed.status, streamed.err, streamed.header?.['content-length'], streamed.header?.['transfer-encoding']], [200, undefined, undefined, undefined]);
        assertChatStream(streamed.events!.map((e) => e.trimEnd()));
      });
    });

    test('a revocation on reload: the chat stream in flight is cut after the grace (an error, as it must be), and the next requests are answered 403 revoked, read whole', async () => {
      const dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-rust-crl-'));
      const crl = join(dir, 'client_cert_ca.crl');
      await writeFile(crl, await createCrl({ issuer: setup.pki.clientCa }));
      const front = await startTestProxy({ pki: setup.pki, upstream: { restPort: setup.upstream.restPort! }, restMode, tls: { crl } });
      const reloader = reloaderFor(front, { ...baseConfig({ pki: setup.pki }).tls, crl }, { revokedGraceMs: 200 });
      try {
        // A client process for each: its pool keeps the refused connections, which are answered 403 for up to 2 s.
        for (const protocol of ['h1', 'h2'] as const) {
          await withRustClient(front.restPort, async (rust) => {
            board = new GateBoard();
            board.open(0);
            let firstEvent!: () => void;
            const started = new Promise<void>((resolve) => (firstEvent = resolve));
            const streamed = rust.send({ op: 'request', client: protocol, method: 'POST', path: '/v3/chat/completions', body: CHAT_BODY, read: 'sse' }, () => firstEvent());
            await started;
            await writeFile(crl, await createCrl({ issuer: setup.pki.clientCa, revoked: [{ serialHex: setup.pki.client.serialHex }] }));
            const outcome = await reloader.reload('api');
            assert.equal(outcome.ok, true, outcome.ok ? '' : outcome.reason);
            const cut = (await streamed.done).result as RustResult;
            assert.equal(cut.events?.length, 1);
            // What a Rust user reads, on both protocols: the connection ended, no reason (the proxy logs connection_revoked).
            assert.equal(cut.err, 'request or response body error: error reading a body from connection: unexpected end of file');
            for (const next of ['h1', 'h2']) {
              const refused = await rust.request(next, { path: '/v2/health/ready' });
              assert.deepEqual([refused.status, refused.err], [403, undefined], `${protocol} then ${next}`);
              assert.match((JSON.parse(refused.body!) as { error: string }).error, refusedWording('revoked'));
            }
            await writeFile(crl, await createCrl({ issuer: setup.pki.clientCa }));
            const restored = await reloader.reload('api');
            assert.equal(restored.ok, true);
          });
        }
      } finally {
        board.openAll();
        reloader.close();
        await front.proxy.shutdown(1000);
        await rm(dir, { recursive: true, force: true });
      }
    });

    test('the idle timeout closes a pooled connection: the next request on the same client is answered', async () => {
      const front = await startTestProxy({ pki: setup.pki, upstream: { restPort: setup.upstream.restPort! }, restMode, limits: { idleTimeoutMs: 500 } });
      try {
        await withRustClient(front.restPort, async (rust) => {
          for (const protocol of ['h1', 'h2']) {
            assert.equal((await rust.request(protocol, { path: '/v2/health/ready' })).status, 200);
          }
          await eventually(() => heldConnectionsTo(front.restPort) === 0, 'the idle connections to close, on both sides');
          for (const protocol of ['h1', 'h2']) {
            const next = await rust.request(protocol, { path: '/v2/health/ready' });
            assert.deepEqual([next.status, next.err], [200, undefined], protocol);
          }
        });
      } finally {
        await front.proxy.shutdown(1000);
      }
    });

    test('a drain (SIGTERM) under a steady stream of GETs and POSTs over an HTTP/1.1 pool and HTTP/2: no request is lost, each one reqwest could not send is refused at its connect', async () => {
      const front = await startTestProxy({ pki: setup.pki, upstream: { restPort: setup.upstream.restPort! }, restMode });
      try {
        await withRustClient(front.restPort, async (rust) => {
          const streams = await Promise.all(['h1', 'h2'].flatMap((protocol) => [
            rust.steady(protocol, { path: '/v2/health/ready' }, 2),
            rust.steady(protocol, { method: 'POST', path: '/v2/models/dummy/infer', body: INFER_BODY }, 3),
          ]));
          await front.proxy.shutdown(20_000);
          for (const stream of streams) {
            const outcome = await stream.stop();
            const lost = Object.entries(failuresOf(outcome)).filter(([what]) => !CONNECT_REFUSED.test(what));
            assert.deepEqual(lost, []);
            assert.ok(outcome.ok >= 20);
          }
        });
      } finally {
        await front.proxy.shutdown(1000);
      }
    });
  });
}
