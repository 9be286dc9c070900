/**
 * The REST port driven by Python's httpx (Debian's python3-httpx 0.23 with python3-h2), the transport of the
 * openai SDK that OVMS's LLM users call `/v3/chat/completions` with: one pooled Client over HTTP/1.1 or HTTP/2
 * (ALPN h2), streamed answers read with iter_lines, an AsyncClient with many requests at once on one HTTP/2
 * connection, and the proxy draining under it. test/fixtures/rest_httpx.py is the client.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { h2Session, readyStatus, startTestProxy, startUpstream, type StartedProxy } from './helpers/harness.js';
import { GateBoard } from './helpers/sse.js';
import { eventually } from './helpers/ops.js';
import { assertChatStream, clientEnv, releasedOneByOne, runClient } from './helpers/client-processes.js';
import type { ModelServer } from '../src/demo/model-server.js';
import { FORWARD_MODES, type ForwardMode } from '../src/config.js';

const PYTHON = '/usr/bin/python3';
const SCRIPT = fileURLToPath(new URL('../../test/fixtures/rest_httpx.py', import.meta.url));
const INPUT = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];
const LARGE_BYTES = 4_000_000;
const CHAT_PATH = '/v3/chat/completions';
const HTTP_VERSIONS = ['1.1', '2'] as const;
type HttpVersion = (typeof HTTP_VERSIONS)[number];

let pki: TestPki;
let upstream: ModelServer;
let board = new GateBoard();

before(async () => {
  const httpx = await runClient(PYTHON, ['-c', 'import httpx, h2']);
  if (httpx.code !== 0) throw new Error(`${PYTHON} cannot import httpx and h2: these tests need Debian's python3-httpx and python3-h2 (apt-get install -y python3-httpx python3-h2; .ci/run does it)`);
  pki = await createTestPki();
  upstream = await startUpstream({ grpcPort: null, sseGate: (i) => board.wait(i) });
});

after(async () => {
  board.openAll();
  await upstream.close();
  await pki.cleanup();
});

const scriptArgs = (port: number, http: HttpVersion, cases: string[]) => [SCRIPT, String(port), pki.dir, 'client', http, ...cases];

/** Each case's result line, by case; the lines a case prints as it goes (events, waiting) are left out. */
async function httpx(port: number, http: HttpVersion, cases: string[]): Promise<Record<string, Record<string, unknown>>> {
  const run = await runClient(PYTHON, scriptArgs(port, http, cases));
  assert.equal(run.code, 0, run.stderr);
  const results: Record<string, Record<string, unknown>> = {};
  for (const line of run.stdout.split('\n').filter(Boolean)) {
    const result = JSON.parse(line) as Record<string, unknown>;
    if (!('event' in result) && !('waiting' in result)) results[String(result.case)] = result;
  }
  return results;
}

/**
 * Runs one case that stops at a `waiting` line until `step` has done what the test does meanwhile (then it goes on);
 * returns the case's result line.
 */
async function httpxStepped(port: number, http: HttpVersion, name: string, step: () => Promise<void>): Promise<Record<string, unknown>> {
  const child = spawn(PYTHON, scriptArgs(port, http, [name]), { env: clientEnv(), stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (chunk: Buffer) => { stderr += chunk.toString(); });
  const exited = once(child, 'exit');
  let result: Record<string, unknown> | undefined;
  try {
    for await (const line of createInterface({ input: child.stdout })) {
      const printed = JSON.parse(line) as Record<string, unknown>;
      if ('waiting' in printed) {
        await step();
        child.stdin.write('\n');
      } else if (!('event' in printed)) result = printed;
    }
    const [code] = await exited;
    assert.equal(code, 0, stderr);
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
  }
  assert.ok(result, `no result line: ${stderr}`);
  return result;
}

const chatStreamsReceived = () => upstream.received.filter((r) => r.path === CHAT_PATH).length;

for (const mode of FORWARD_MODES) {
  describe(`httpx, --mtls_rest_mode ${mode}`, () => {
    let front: StartedProxy;

    before(async () => {
      front = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, restMode: mode });
    });

    after(async () => {
      board.openAll();
      await front.proxy.shutdown(1000);
    });

    for (const http of HTTP_VERSIONS) {
      const client = `httpx.Client(http2=${http === '2' ? 'True' : 'False'})`;

      test(`${client}: a readiness GET, a KServe infer, a 4 MB upload and a 4 MB download, then 200 GETs, infers and chat streams in turn, all on one pooled connection over HTTP/${http}`, async () => {
        board.openAll();
        const results = await httpx(front.restPort, http, ['ready', 'infer', 'large', 'sequential']);
        assert.deepEqual([results.ready!.status, results.ready!.httpVersion], [200, `HTTP/${http}`]);
        assert.deepEqual(results.infer!.data, INPUT.map((x) => x + 1));
        const large = results.large as { upload: { bytes: number; sha256: string }; uploadExpected: string; download: unknown; connections: number };
        assert.deepEqual(large.upload, { bytes: LARGE_BYTES, sha256: large.uploadExpected });
        assert.deepEqual(large.download, { status: 200, bytes: LARGE_BYTES, matches: true });
        assert.equal(large.connections, 1);
        assert.deepEqual(results.sequential, { case: 'sequential', statuses: [200], count: 200, connections: 1 });
      });

      test(`${client}, stream() and iter_lines(): a chat completion's events arrive one by one, each before the stream ends, then data: [DONE]`, async () => {
        const { events, code, lines } = await releasedOneByOne(board = new GateBoard(), PYTHON, scriptArgs(front.restPort, http, ['sse']), (line) => (JSON.parse(line) as { event?: string }).event);
        assert.equal(code, 0);
        assertChatStream(events);
        assert.deepEqual(JSON.parse(lines.at(-1)!), { case: 'sse', status: 200, httpVersion: `HTTP/${http}`, contentType: 'text/event-stream', events: events.length });
      });

      test(`${client}: breaking out of iter_lines() after the first event frees the model server's request, and the Client's next request is answered`, async () => {
        board = new GateBoard();
        board.open(0);
        const result = await httpxStepped(front.restPort, http, 'sse_early_close', () => upstream.waitFor('restAborted', CHAT_PATH));
        assert.deepEqual([result.status, result.after], [200, 200]);
        assert.ok(front.logs.lines.some((l) => l.path === CHAT_PATH && l.error === 'client_closed'), 'the access line says the client closed it');
      });
    }

    test('httpx.AsyncClient(http2=True): 50 infers at once share one connection, each getting its own answer; so do 10 chat streams at once, each whole', async () => {
      board.openAll();
      const { concurrent, concurrent_streams: streams } = await httpx(front.restPort, '2', ['concurrent', 'concurrent_streams']);
      assert.deepEqual(concurrent, { case: 'concurrent', right: 50, versions: ['HTTP/2'], connections: 1 });
      assert.equal(streams!.connections, 1);
      const all = streams!.streams as string[][];
      assert.equal(all.length, 10);
      for (const events of all) assertChatStream(events);
    });
  });
}

describe('httpx and a draining proxy (SIGTERM)', () => {
  /** A proxy of its own: the test drains it. */
  async function drainedWhileStreaming(mode: ForwardMode): Promise<{ result: Record<string, unknown>; front: StartedProxy }> {
    board = new GateBoard();
    const front = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, restMode: mode });
    const idle = h2Session(front.restPort, pki);
    try {
      assert.equal(await readyStatus(idle), 200);
      const received = chatStreamsReceived();
      const client = httpx(front.restPort, '2', ['stream_while_signalled']);
      await eventually(() => chatStreamsReceived() > received, 'the chat stream to reach the model server');
      const drained = front.proxy.shutdown(20_000);
      // The drain has begun, and a connection with nothing in flight is told at once.
      await once(idle, 'goaway');
      board.openAll();
      const { stream_while_signalled: result } = await client;
      await drained;
      return { result: result!, front };
    } finally {
      idle.destroy();
    }
  }

  for (const mode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${mode}: an idle pooled HTTP/1.1 connection is closed by the drain (once quiet for its second), so httpx's next request, sent after the drain, opens a new one (httpx.ConnectError here, no replica left: what HTTPTransport(retries=N) retries) instead of dying on the closed one`, async () => {
      const front = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, restMode: mode });
      const result = await httpxStepped(front.restPort, '1.1', 'pooled_twice', () => front.proxy.shutdown(20_000));
      assert.equal(result.first, 200);
      assert.deepEqual(result.then, { exception: 'httpx.ConnectError', message: '[Errno 111] Connection refused', transportError: true });
    });

    test(`--mtls_rest_mode ${mode}: an httpx.Client(http2=True) chat stream in flight when the drain begins arrives whole, to data: [DONE] (httpx failed it at the drain's GOAWAY: RemoteProtocolError ConnectionTerminated)`, async () => {
      const { result, front } = await drainedWhileStreaming(mode);
      assert.equal(result.exception, undefined, JSON.stringify(result));
      assert.equal(result.status, 200);
      assertChatStream(result.events as string[]);
      assert.equal(front.logs.lines.filter((l) => l.event === 'shutdown_timeout').length, 0, 'the drain ended when the stream did');
      assert.ok(front.logs.lines.some((l) => l.event === 'access' && l.path === CHAT_PATH && l.status === 200 && l.error === undefined), 'the access line says it was delivered');
    });
  }
});
