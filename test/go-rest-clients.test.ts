/**
 * Go's standard net/http client (test/fixtures/go-rest-client, built here offline) on the REST
 * port, as Go services (KServe tooling, gateways, batch jobs) call OVMS: `tls.Config{Certificates,
 * RootCAs}`, HTTP/2 by ALPN unless turned off, in both REST modes. Go has its own habits: it sends
 * a request again on a new connection only when it can tell the first never took it (a GET on a
 * pooled connection that closed; a POST only if none of it was written, or an HTTP/2 stream past a
 * GOAWAY's last stream id when the body has a GetBody), Expect: 100-continue only with
 * ExpectContinueTimeout, large HTTP/2 windows, no `te`. Where a drain closes a connection under a
 * request Go had already written, Go reports `EOF` and the user's POST is lost.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { once } from 'node:events';
import { connect as tlsConnect } from 'node:tls';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { baseConfig, refusedWording, startTestProxy, startUpstream, tlsClientOptions, type StartedProxy } from './helpers/harness.js';
import { readUntil } from './helpers/raw-http1.js';
import { buildGoFixture } from './helpers/go-build.js';
import { GateBoard } from './helpers/sse.js';
import { reloaderFor } from './helpers/reload.js';
import { eventually } from './helpers/ops.js';
import { CHAT_REPLY_WORDS } from '../src/demo/openai-chat.js';
import type { ModelServer } from '../src/demo/model-server.js';
import { FORWARD_MODES, type ForwardMode } from '../src/config.js';

const INFER_BODY = JSON.stringify({ inputs: [{ name: 'b', shape: [1, 10], datatype: 'FP32', data: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] }] });
const CHAT_BODY = JSON.stringify({ model: 'm', stream: true, messages: [{ role: 'user', content: 'hi' }] });
const UPLOAD_BYTES = 3_000_000;
const DOWNLOAD_BYTES = 20_000_000;
/** The discard port, which nothing here serves: connections to it are refused. */
const DISCARD_PORT = 9;

interface GoResult {
  status: number;
  proto: string;
  header?: Record<string, string[]>;
  body?: string;
  bytes: number;
  sha256?: string;
  pattern_ok?: boolean;
  events?: string[];
  err?: string;
  reused: boolean;
  conn?: string;
  continued: boolean;
  /** The answer said `connection: close` (Go's Response.Close). */
  close: boolean;
}

interface SteadyOutcome {
  ok: number;
  failures: GoResult[] | null;
  statuses: Record<string, number>;
}

interface ClientSpec {
  h2: boolean;
  expect_continue_ms?: number;
  no_cert?: boolean;
}

interface RequestSpec {
  method?: string;
  path: string;
  body?: string;
  body_bytes?: number;
  unknown_length?: boolean;
  headers?: Record<string, string>;
  read?: 'body' | 'sse' | 'pattern';
  parallel?: number;
}

let pki: TestPki;
let workDir: string;
let binary: string;
let board = new GateBoard();
let upstream: ModelServer;
const fronts = new Map<ForwardMode, StartedProxy>();

/** One Go process, its commands and their results by id (test/fixtures/go-rest-client). */
class GoRestClient {
  readonly #child: ChildProcessWithoutNullStreams;
  readonly #waiting = new Map<number, (line: Record<string, unknown>) => void>();
  readonly #events = new Map<number, (line: Record<string, unknown>) => void>();
  #next = 1;
  #stderr = '';

  constructor(port: number, cert: string) {
    const identity = ['-cert', pki.paths[`${cert}.pem`]!, '-key', pki.paths[`${cert}.key`]!];
    // No proxy variables: net/http honours HTTPS_PROXY.
    this.#child = spawn(binary, ['-base', `https://127.0.0.1:${port}`, '-ca', pki.paths['server_ca.pem']!, ...identity, '-server-name', 'localhost'], { env: { PATH: process.env.PATH } });
    this.#child.stderr.on('data', (chunk: Buffer) => (this.#stderr += chunk.toString()));
    createInterface({ input: this.#child.stdout }).on('line', (text) => {
      const line = JSON.parse(text) as Record<string, unknown> & { id: number };
      if ('event' in line || 'progress' in line) this.#events.get(line.id)?.(line);
      else this.#waiting.get(line.id)?.(line);
    });
    this.#child.once('exit', (code) => {
      for (const settle of this.#waiting.values()) settle({ exited: code, stderr: this.#stderr });
    });
  }

  /** Sends a command; its id, and its final line once it comes. `onEvent`: SSE events and progress lines on the way. */
  send(command: Record<string, unknown>, onEvent?: (line: Record<string, unknown>) => void): { id: number; done: Promise<Record<string, unknown>> } {
    const id = this.#next++;
    if (onEvent) this.#events.set(id, onEvent);
    const done = new Promise<Record<string, unknown>>((resolve) => this.#waiting.set(id, resolve));
    this.#child.stdin.write(`${JSON.stringify({ id, ...command })}\n`);
    return { id, done: done.then((line) => (assert.ok(!('exited' in line), `the Go client exited: ${this.#stderr}`), line)) };
  }

  async client(name: string, spec: ClientSpec): Promise<void> {
    await this.send({ op: 'client', name, ...spec }).done;
  }

  async request(client: string, spec: RequestSpec): Promise<GoResult> {
    return (await this.send({ op: 'request', client, ...spec }).done).result as GoResult;
  }

  async parallel(client: string, spec: RequestSpec): Promise<GoResult[]> {
    return (await this.send({ op: 'request', client, ...spec }).done).results as GoResult[];
  }

  /** Requests back to back from `workers` goroutines until stop(); resolves once 20 were answered. */
  async steady(client: string, spec: RequestSpec, workers: number): Promise<{ stop: () => Promise<SteadyOutcome> }> {
    let running!: () => void;
    const started = new Promise<void>((resolve) => (running = resolve));
    const { id, done } = this.send({ op: 'steady', client, workers, ...spec }, () => running());
    await started;
    return {
      stop: async () => {
        await this.send({ op: 'stop', target: id }).done;
        return (await done).steady as SteadyOutcome;
      },
    };
  }

  close(): void {
    this.#child.stdin.end();
  }
}

/** Starts a Go client of the given certificate (default: the good client's) on `port`, with clients `h1` and `h2` defined. */
async function goClient(port: number, cert = 'client', spec: Omit<ClientSpec, 'h2'> = {}): Promise<GoRestClient> {
  const go = new GoRestClient(port, cert);
  await go.client('h1', { ...spec, h2: false });
  await go.client('h2', { ...spec, h2: true });
  return go;
}

before(async () => {
  pki = await createTestPki();
  workDir = await mkdtemp(join(tmpdir(), 'ovms-mtls-go-rest-'));
  binary = await buildGoFixture('go-rest-client', workDir, []);
  upstream = await startUpstream({ grpcPort: null, sseGate: (i) => board.wait(i) });
  for (const restMode of FORWARD_MODES) fronts.set(restMode, await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, restMode }));
});

after(async () => {
  board.openAll();
  for (const front of fronts.values()) await front.proxy.shutdown(1000);
  await upstream?.close();
  if (workDir) await rm(workDir, { recursive: true, force: true });
  await pki.cleanup();
});

/** The Go outcomes of a steady stream, each failure by its message with addresses taken out, and how many. */
function failuresOf(outcome: SteadyOutcome): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const failure of outcome.failures ?? []) {
    const what = failure.err!.replace(/127\.0\.0\.1:\d+/g, 'ADDR');
    counts[what] = (counts[what] ?? 0) + 1;
  }
  return counts;
}


/** A proxy of its own in front of the stand-in, for a test that reloads or drains it; stopped after `use`. */
async function withOwnProxy(restMode: ForwardMode, use: (front: StartedProxy) => Promise<void>): Promise<void> {
  const front = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, restMode });
  try {
    await use(front);
  } finally {
    await front.proxy.shutdown(1000);
  }
}

for (const restMode of FORWARD_MODES) {
  describe(`Go net/http through --mtls_rest_mode ${restMode}`, () => {
    for (const protocol of ['h1', 'h2'] as const) {
      const version = protocol === 'h1' ? 'HTTP/1.1' : 'HTTP/2.0';

      test(`${version}: readiness, a KServe JSON infer, 3 MB uploads with and without a length, each with Expect: 100-continue answered, a 20 MB answer, 200 requests at once`, async () => {
        const go = await goClient(fronts.get(restMode)!.restPort, 'client', { expect_continue_ms: 60_000 });
        try {
          const ready = await go.request(protocol, { path: '/v2/health/ready' });
          assert.equal(ready.status, 200, ready.err);
          assert.equal(ready.proto, version);
          const infer = await go.request(protocol, { method: 'POST', path: '/v2/models/dummy/infer', body: INFER_BODY, headers: { 'content-type': 'application/json' } });
          assert.deepEqual((JSON.parse(infer.body!) as { outputs: { data: number[] }[] }).outputs[0]!.data, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
          assert.equal(infer.reused, true, 'the connection was kept for the next request');
          for (const unknownLength of [false, true]) {
            // Go sends Expect only when asked to, and with ExpectContinueTimeout waits for the 100 (here longer than the test's own timeout).
            const upload = await go.request(protocol, { method: 'POST', path: '/echo-body', body_bytes: UPLOAD_BYTES, unknown_length: unknownLength, headers: { expect: '100-continue' } });
            assert.equal(upload.status, 200, upload.err ?? upload.body);
            assert.equal(upload.continued, true, 'a 100 (Continue) came');
            assert.equal((JSON.parse(upload.body!) as { bytes: number }).bytes, UPLOAD_BYTES, `the upload${unknownLength ? ' of unknown length' : ''} arrived whole`);
          }
          const download = await go.request(protocol, { path: `/stream-bytes?n=${DOWNLOAD_BYTES}`, read: 'pattern' });
          assert.equal(download.bytes, DOWNLOAD_BYTES, download.err);
          assert.equal(download.pattern_ok, true);
          const many = await go.parallel(protocol, { method: 'POST', path: '/v2/models/dummy/infer', body: INFER_BODY, parallel: 200 });
          assert.deepEqual(many.filter((r) => r.status !== 200).map((r) => r.err ?? r.status), []);
        } finally {
          go.close();
        }
      });

      test(`${version}: a streamed chat completion arrives event by event, ending with data: [DONE]; cancelling the context mid-stream frees the model server's request`, async () => {
        const go = await goClient(fronts.get(restMode)!.restPort);
        try {
          board = new GateBoard();
          board.open(0);
          let released = 0;
          // Each event is released only once Go has read the one before it: nothing is held back in the proxy.
          const streamed = go.send({ op: 'request', client: protocol, method: 'POST', path: '/v3/chat/completions', body: CHAT_BODY, read: 'sse' }, () => board.open(++released));
          const whole = (await streamed.done).result as GoResult;
          assert.equal(whole.err, undefined);
          assert.equal(whole.events!.length, CHAT_REPLY_WORDS.length + 1);
          assert.equal(whole.events!.at(-1), 'data: [DONE]\n');

          board = new GateBoard();
          board.open(0);
          const abortedBefore = upstream.restAborted.length;
          const cancelled = go.send({ op: 'request', client: protocol, method: 'POST', path: '/v3/chat/completions', body: CHAT_BODY, read: 'sse' }, () => {
            go.send({ op: 'cancel', target: cancelled.id });
          });
          const result = (await cancelled.done).result as GoResult;
          assert.equal(result.err, 'context canceled');
          await eventually(() => upstream.restAborted.length > abortedBefore, 'the model server to see the cancelled stream end');
          assert.equal((await go.request(protocol, { path: '/v2/health/ready' })).status, 200, 'the client goes on');
        } finally {
          board.openAll();
          go.close();
        }
      });
    }

    test('refused certificates: Go reads a 403 naming why, over HTTP/1.1 and HTTP/2, an upload as well (a foreign CA\'s certificate, which Go does not send, is no_certificate)', async () => {
      const port = fronts.get(restMode)!.restPort;
      for (const [cert, reason] of [['foreign_client', 'no_certificate'], ['revoked_client', 'revoked'], ['expired_client', 'expired']] as const) {
        const go = await goClient(port, cert);
        try {
          for (const protocol of ['h1', 'h2']) {
            for (const spec of [{ path: '/v2/health/ready' }, { method: 'POST', path: '/echo-body', body_bytes: UPLOAD_BYTES }]) {
              const refused = await go.request(protocol, spec);
              assert.equal(refused.status, 403, `${cert} ${protocol}: ${refused.err}`);
              assert.match((JSON.parse(refused.body!) as { error: string }).error, refusedWording(reason));
            }
          }
        } finally {
          go.close();
        }
      }
    });

    test('HTTP/1.1: a refused client is answered once its request has begun, never before (Go takes an answer before its request for an unsolicited one: "readLoopPeekFailLocked: <nil>", the reason never read)', async () => {
      const front = fronts.get(restMode)!;
      const silent = tlsConnect({ host: '127.0.0.1', port: front.restPort, ...tlsClientOptions(pki, pki.expiredClient), ALPNProtocols: ['http/1.1'] });
      silent.on('error', () => {});
      let received = '';
      silent.on('data', (chunk: Buffer) => (received += chunk.toString()));
      await once(silent, 'close');
      // Before the fix: the 403, sent unasked as soon as the certificate was judged.
      assert.equal(received, '', 'a client that sent no request was sent nothing');

      const asking = tlsConnect({ host: '127.0.0.1', port: front.restPort, ...tlsClientOptions(pki, pki.expiredClient), ALPNProtocols: ['http/1.1'] });
      asking.on('error', () => {});
      await once(asking, 'secureConnect');
      asking.write('GET /v2/health/ready HTTP/1.1\r\nhost: localhost\r\n\r\n');
      const answer = await readUntil(asking, /\r\n\r\n\{.*\}$/s);
      assert.match(answer, /^HTTP\/1\.1 403 /);
      assert.match(answer, /client certificate refused \(expired\)/);
      asking.destroy();
    });

    test('a model server that is down, or not ready: 502 naming the refused connection, 503 with Retry-After, and the connection kept', async () => {
      const down = await startTestProxy({ pki, upstream: { restPort: DISCARD_PORT }, restMode });
      const starting = await startTestProxy({ pki, upstream: { restPort: DISCARD_PORT }, restMode, notReady: { rest: () => 'OVMS is starting' } });
      try {
        for (const [front, status, words] of [[down, 502, /refused the connection \(is the model server running\?\)/], [starting, 503, /^OVMS is starting$/]] as const) {
          const go = await goClient(front.restPort);
          try {
            for (const protocol of ['h1', 'h2']) {
              for (const spec of [{ path: '/v2/health/ready' }, { method: 'POST', path: '/v2/models/dummy/infer', body: INFER_BODY }]) {
                const answer = await go.request(protocol, spec);
                assert.equal(answer.status, status, answer.err);
                assert.match((JSON.parse(answer.body!) as { error: string }).error, words);
                if (status === 503) assert.deepEqual(answer.header?.['Retry-After'], ['1']);
              }
              assert.equal((await go.request(protocol, { path: '/v2/health/ready' })).reused, true);
            }
          } finally {
            go.close();
          }
        }
      } finally {
        await down.proxy.shutdown(1000);
        await starting.proxy.shutdown(1000);
      }
    });

    test('certificate reloads (SIGHUP) under a steady stream of GETs and POSTs over an HTTP/1.1 pool and HTTP/2: no request fails', async () => {
      await withOwnProxy(restMode, async (front) => {
        const reloader = reloaderFor(front, baseConfig({ pki }).tls, { revokedGraceMs: 1000 });
        const go = await goClient(front.restPort);
        try {
          const streams = await Promise.all(['h1', 'h2'].flatMap((protocol) => [
            go.steady(protocol, { path: '/v2/health/ready' }, 3),
            go.steady(protocol, { method: 'POST', path: '/v2/models/dummy/infer', body: INFER_BODY }, 3),
          ]));
          for (let i = 0; i < 5; i++) {
            const outcome = await reloader.reload('api');
            assert.equal(outcome.ok, true, outcome.ok ? '' : outcome.reason);
          }
          for (const stream of streams) {
            const outcome = await stream.stop();
            assert.deepEqual(failuresOf(outcome), {});
            assert.deepEqual(Object.keys(outcome.statuses), ['200']);
          }
        } finally {
          go.close();
          reloader.close();
        }
      });
    });
  });
}
