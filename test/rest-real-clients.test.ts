/**
 * The REST port driven by the clients users copy from READMEs: curl (the command lines the
 * demo prints: --cert/--key/--cacert, HTTP/1.1 and HTTP/2) and Python (Debian's requests on
 * urllib3, and the stdlib http.client), in both REST modes, with the stand-in model server
 * behind the proxy. Node's own clients, which the other tests use, are lenient where these
 * are not (curl's Expect: 100-continue on large uploads, requests' chunked generators,
 * urllib3's per-chunk streaming of an event stream).
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { refusedWording, startTestProxy, startUpstream, type StartedProxy } from './helpers/harness.js';
import { GateBoard } from './helpers/sse.js';
import { CHAT_REPLY_WORDS } from '../src/demo/openai-chat.js';
import type { ModelServer } from '../src/demo/model-server.js';
import { FORWARD_MODES } from '../src/config.js';
import { eventually } from './helpers/ops.js';
import { assertChatStream, releasedOneByOne, runClient } from './helpers/client-processes.js';

const PYTHON = '/usr/bin/python3';
const SCRIPT = fileURLToPath(new URL('../../test/fixtures/rest_requests.py', import.meta.url));
const INPUT = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];
const INFER_BODY = JSON.stringify({ inputs: [{ name: 'b', shape: [1, 10], datatype: 'FP32', data: INPUT }] });
/** Over 1 MiB: curl sends `Expect: 100-continue` and waits for the 100 (1 s at most) before the body. */
const LARGE_BYTES = 3_000_000;

let pki: TestPki;
let upstream: ModelServer;
let board = new GateBoard();
let largeFile: string;
let largeSha256: string;
let inferFile: string;

before(async () => {
  const requests = await runClient(PYTHON, ['-c', 'import requests']);
  if (requests.code !== 0) throw new Error(`${PYTHON} cannot import requests: these tests need Debian's python3-requests (apt-get install -y python3-requests; .ci/run does it)`);
  pki = await createTestPki();
  upstream = await startUpstream({ grpcPort: null, sseGate: (i) => board.wait(i) });
  const large = Buffer.alloc(LARGE_BYTES);
  for (let i = 0; i < LARGE_BYTES; i++) large[i] = (i * 7) & 0xff;
  largeFile = join(pki.dir, 'large.bin');
  largeSha256 = createHash('sha256').update(large).digest('hex');
  inferFile = join(pki.dir, 'infer.json');
  await Promise.all([writeFile(largeFile, large), writeFile(inferFile, INFER_BODY)]);
});

after(async () => {
  board.openAll();
  await upstream.close();
  await pki.cleanup();
});

/** curl with a certificate of the test PKI by base name (`null`: none), trusting the server CA. */
function curlArgs(client: string | null = 'client'): string[] {
  const cert = client ? ['--cert', pki.paths[`${client}.pem`]!, '--key', pki.paths[`${client}.key`]!] : [];
  return ['-sS', ...cert, '--cacert', pki.paths['server_ca.pem']!];
}

/** Each case's result, in order; SSE events are skipped here (see pythonSse). */
async function python(port: number, client: string, cases: string[]): Promise<Record<string, Record<string, unknown>>> {
  const run = await runClient(PYTHON, [SCRIPT, String(port), pki.dir, client, ...cases]);
  assert.equal(run.code, 0, run.stderr);
  const results: Record<string, Record<string, unknown>> = {};
  for (const line of run.stdout.split('\n').filter(Boolean)) {
    const result = JSON.parse(line) as Record<string, unknown>;
    if (!('event' in result)) results[String(result.case)] = result;
  }
  return results;
}

for (const mode of FORWARD_MODES) {
  describe(`real REST clients, --mtls_rest_mode ${mode}`, () => {
    let front: StartedProxy;
    const url = (path: string) => `https://localhost:${front.restPort}${path}`;
    const refusedWithoutCertificate = () => front.logs.lines.filter((l) => l.event === 'client_refused' && l.reason === 'no_certificate').length;

    /** Runs a client that presents no certificate; the refusal must be logged, and nothing reach the model server. */
    async function refused<T>(client: () => Promise<T>): Promise<T> {
      const [logged, received] = [refusedWithoutCertificate(), upstream.received.length];
      const result = await client();
      await eventually(() => refusedWithoutCertificate() === logged + 1, 'the client_refused line');
      assert.equal(upstream.received.length, received);
      return result;
    }

    before(async () => {
      front = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, restMode: mode });
    });

    after(async () => {
      board.openAll();
      await front.proxy.shutdown(1000);
    });

    for (const version of ['1.1', '2'] as const) {
      const flag = `--http${version}`;

      test(`curl ${flag}: a KServe JSON infer returns the dummy model output`, async () => {
        const run = await runClient('curl', [...curlArgs(), flag, '-w', '\n%{http_version}', url('/v2/models/dummy/infer'), '-H', 'content-type: application/json', '-d', INFER_BODY]);
        assert.equal(run.code, 0, run.stderr);
        const [body, httpVersion] = run.stdout.split('\n');
        assert.equal(httpVersion, version === '1.1' ? '1.1' : '2');
        assert.deepEqual(JSON.parse(body!).outputs[0].data, INPUT.map((x) => x + 1));
      });

      test(`curl ${flag}: a 3 MB upload arrives whole${version === '1.1' ? ', its Expect: 100-continue answered with 100 (curl does not wait out its timeout)' : ''}`, async () => {
        const run = await runClient('curl', [...curlArgs(), flag, '-v', url('/echo-body'), '--data-binary', `@${largeFile}`]);
        assert.equal(run.code, 0, run.stderr);
        assert.deepEqual(JSON.parse(run.stdout), { bytes: LARGE_BYTES, sha256: largeSha256 });
        if (version === '1.1') {
          assert.match(run.stderr, /^> Expect: 100-continue\r?$/m);
          assert.match(run.stderr, /^< HTTP\/1\.1 100 Continue\r?$/m);
        }
        assert.doesNotMatch(run.stderr, /Done waiting for 100-continue/);
      });

      test(`curl ${flag}: a chunked upload (-H 'Transfer-Encoding: chunked' --data-binary @file) arrives whole${version === '1.1' ? ', the large one with its Expect: 100-continue answered (OVMS\'s Drogon 1.9.7, as the stand-in, answers that field on a chunked body with 400)' : ''}`, async () => {
        for (const [file, bytes, sha256] of [[inferFile, INFER_BODY.length, createHash('sha256').update(INFER_BODY).digest('hex')], [largeFile, LARGE_BYTES, largeSha256]] as const) {
          const run = await runClient('curl', [...curlArgs(), flag, '-v', url('/echo-body'), '-H', 'Transfer-Encoding: chunked', '--data-binary', `@${file}`]);
          assert.equal(run.code, 0, run.stderr);
          assert.deepEqual(JSON.parse(run.stdout), { bytes, sha256 });
          if (version === '1.1' && file === largeFile) {
            assert.match(run.stderr, /^> Expect: 100-continue\r?$/m);
            assert.match(run.stderr, /^< HTTP\/1\.1 100 Continue\r?$/m);
          }
          assert.doesNotMatch(run.stderr, /Done waiting for 100-continue/);
        }
      });

      test(`curl ${flag} -I (HEAD): the GET's status and headers, no body, and curl ends`, async () => {
        const run = await runClient('curl', [...curlArgs(), flag, '-I', url('/v2/models/dummy')]);
        assert.equal(run.code, 0, run.stderr);
        assert.match(run.stdout, /^HTTP\/(?:1\.1 200 OK|2 200 )\r\n/);
        assert.match(run.stdout, /^content-length: \d+\r$/im);
        assert.ok(run.stdout.endsWith('\r\n\r\n'), JSON.stringify(run.stdout));
      });

      test(`curl ${flag}: a model that does not exist gets the model server's 404 and its JSON error`, async () => {
        const run = await runClient('curl', [...curlArgs(), flag, '-w', '\n%{http_code}', url('/v2/models/missing/infer'), '-d', INFER_BODY]);
        assert.equal(run.code, 0, run.stderr);
        const [body, status] = run.stdout.split('\n');
        assert.equal(status, '404');
        assert.deepEqual(JSON.parse(body!), { error: 'Model with requested name is not found' });
      });

      test(`curl ${flag} URL1 URL2 URL3 (after an upload) reuses one connection for all`, async () => {
        const run = await runClient('curl', [
          ...curlArgs(), flag, '-o', '/dev/null', '-w', '%{http_code} %{num_connects}\n', url('/echo-body'), '--data-binary', `@${largeFile}`,
          '--next', ...curlArgs(), flag, '-o', '/dev/null', '-o', '/dev/null', '-o', '/dev/null', '-w', '%{http_code} %{num_connects}\n',
          url('/v2/health/ready'), url('/v2/models/dummy'), url('/v2/models/missing'),
        ]);
        assert.equal(run.code, 0, run.stderr);
        assert.deepEqual(run.stdout.trim().split('\n'), ['200 1', '200 0', '200 0', '404 0']);
      });

      if (version === '2') {
        test('curl --http2 with 3,000 URLs from a --config list: every one answered; curl\'s reset after each (RST_STREAM on a closed stream, curl 7.88) no longer has nghttp2 cut the connection with GOAWAY(INTERNAL_ERROR) ("Error in the HTTP2 framing layer") every ~1,000', async () => {
          const urls = 3000;
          const list = join(pki.dir, `urls-${mode}.cfg`);
          await writeFile(list, `url = "${url('/v2/health/ready')}"\noutput = "/dev/null"\n`.repeat(urls));
          const run = await runClient('curl', [...curlArgs(), flag, '-w', '%{http_code}\n', '--config', list]);
          assert.equal(run.stderr, '');
          assert.equal(run.code, 0);
          assert.deepEqual(run.stdout.trim().split('\n'), Array.from({ length: urls }, () => '200'));
        });
      }

      test(`curl ${flag} -N: Server-Sent Events arrive one by one, each before the stream ends`, async () => {
        const body = JSON.stringify({ model: 'm', stream: true });
        const { events, code } = await releasedOneByOne(board = new GateBoard(), 'curl', [...curlArgs(), flag, '-N', url('/v3/chat/completions'), '-H', 'content-type: application/json', '-d', body],
          (line) => (line.startsWith('data: ') ? line : undefined));
        assert.equal(code, 0);
        assertChatStream(events);
      });

      test(`curl ${flag} without a client certificate gets 403 naming no_certificate; the model server never sees it`, async () => {
        const run = await refused(() => runClient('curl', [...curlArgs(null), flag, '-w', '\n%{http_code}', url('/v2/models/dummy/infer'), '-d', INFER_BODY]));
        assert.equal(run.code, 0, run.stderr);
        const [body, status] = run.stdout.split('\n');
        assert.equal(status, '403');
        assert.match((JSON.parse(body!) as { error: string }).error, refusedWording('no_certificate'));
      });
    }

    test('curl --http1.0 (ALPN http/1.0, as nginx accepts it): an infer, and Server-Sent Events one by one on a connection that closes at their end', async () => {
      const run = await runClient('curl', [...curlArgs(), '--http1.0', url('/v2/models/dummy/infer'), '-d', INFER_BODY]);
      assert.equal(run.code, 0, run.stderr);
      assert.deepEqual(JSON.parse(run.stdout).outputs[0].data, INPUT.map((x) => x + 1));
      const { events, code } = await releasedOneByOne(board = new GateBoard(), 'curl', [...curlArgs(), '--http1.0', '-N', url('/v3/chat/completions'), '-d', JSON.stringify({ stream: true })],
        (line) => (line.startsWith('data: ') ? line : undefined));
      assert.equal(code, 0);
      assertChatStream(events);
    });

    test('Python requests and http.client: infer, 404, a chunked upload from a generator, three requests on one http.client connection', async () => {
      const results = await python(front.restPort, 'client', ['infer', 'not_found', 'chunked_upload', 'stdlib']);
      assert.deepEqual(results.infer, { case: 'infer', status: 200, data: INPUT.map((x) => x + 1) });
      assert.deepEqual(results.not_found, { case: 'not_found', status: 404, body: { error: 'Model with requested name is not found' } });
      const upload = results.chunked_upload as { status: number; body: { bytes: number; sha256: string }; expected: string };
      assert.equal(upload.status, 200);
      assert.deepEqual(upload.body, { bytes: 3_000_000, sha256: upload.expected });
      const stdlib = results.stdlib as { infers: unknown[]; upload: typeof upload };
      assert.deepEqual(stdlib.infers, Array(3).fill({ status: 200, data: INPUT.map((x) => x + 1) }));
      assert.deepEqual(stdlib.upload.body, { bytes: 3_000_000, sha256: stdlib.upload.expected });
    });

    test('Python requests: one Session serves a GET, a chunked upload, a whole event stream and an infer in a row on one connection', async () => {
      board.openAll();
      const results = await python(front.restPort, 'client', ['session_reuse']);
      assert.deepEqual(results.session_reuse, { case: 'session_reuse', statuses: [200, 200, 200, 200], events: CHAT_REPLY_WORDS.length + 1, connections: 1 });
    });

    test('Python requests: a generator that yields an empty chunk ends the body there (requests 2.28 sends "0\\r\\n\\r\\n"), and the user gets the model server\'s answer to what came before it, not a 400', async () => {
      const results = await python(front.restPort, 'client', ['empty_chunk_upload']);
      assert.equal(results.empty_chunk_upload!.status, 200, JSON.stringify(results.empty_chunk_upload));
      assert.equal(JSON.parse(String(results.empty_chunk_upload!.body)).bytes, 3);
    });

    test('Python requests stream=True, iter_lines(): Server-Sent Events arrive one by one, each before the stream ends', async () => {
      const { events, code, lines } = await releasedOneByOne(board = new GateBoard(), PYTHON, [SCRIPT, String(front.restPort), pki.dir, 'client', 'sse'], (line) => {
        const printed = JSON.parse(line) as { event?: string };
        return printed.event;
      });
      assert.equal(code, 0);
      assertChatStream(events);
      assert.deepEqual(JSON.parse(lines.at(-1)!), { case: 'sse', status: 200, contentType: 'text/event-stream', events: CHAT_REPLY_WORDS.length + 1 });
    });

    test('Python requests without a client certificate: 403 naming no_certificate, the model server never sees it', async () => {
      // not_found: a POST whose status and JSON body the script reports as they come.
      const { not_found: answer } = await refused(() => python(front.restPort, 'none', ['not_found']));
      assert.equal(answer!.status, 403, JSON.stringify(answer));
      assert.match((answer!.body as { error: string }).error, refusedWording('no_certificate'));
    });
  });
}
