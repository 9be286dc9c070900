/**
 * Requests Node's HTTP/1.1 server and its HTTP/2 compatibility layer would answer (or drop)
 * on their own in REST terminate mode, before our code saw them: each gets an answer and
 * exactly one access line, as in relay mode, where the relay answers them itself.
 */
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { h2Request, h2Session, restModeFronts, startTestProxy, type LogLine } from './helpers/harness.js';
import { openRaw, parseResponses, readToClose } from './helpers/raw-http1.js';
import { eventually, sample } from './helpers/ops.js';
import { ProxyMetrics } from '../src/metrics.js';
import { FORWARD_MODES, type ForwardMode } from '../src/config.js';

const both = restModeFronts();

const statuses = (text: string) => [...text.matchAll(/HTTP\/1\.[01] (\d{3}) /g)].map((m) => Number(m[1]));

/** `raw` on a new HTTP/1.1 connection: what came back until the proxy closed it, and the access lines it made, once `lineCount` are in. */
async function exchangeHttp1(restMode: ForwardMode, raw: string, lineCount: number): Promise<{ text: string; lines: LogLine[] }> {
  const front = both.front(restMode);
  const from = front.logs.lines.length;
  const socket = await openRaw(front.restPort, both.pki);
  socket.write(raw);
  const text = await readToClose(socket);
  const accessLines = () => front.logs.lines.slice(from).filter((l) => l.event === 'access');
  await eventually(() => accessLines().length >= lineCount, `${lineCount} access line(s)`);
  // A second line for the same request would come from the same turn of events as the first.
  await new Promise((resolve) => setImmediate(resolve));
  return { text, lines: accessLines() };
}

/** What a test checks of an access line. */
const summary = (l: LogLine) => ({ status: l.status, error: l.error, method: l.method, path: l.path, protocol: l.protocol });

/** One HTTP/2 request on a new connection: its status and body, and the access lines made once `lineCount` are in. */
async function exchangeH2(restMode: ForwardMode, headers: Record<string, string>, body: string, lineCount: number): Promise<{ status: unknown; body: string; lines: LogLine[] }> {
  const front = both.front(restMode);
  const from = front.logs.lines.length;
  const session = h2Session(front.restPort, both.pki);
  try {
    const answer = await h2Request(session, headers, body);
    const accessLines = () => front.logs.lines.slice(from).filter((l) => l.event === 'access');
    await eventually(() => accessLines().length >= lineCount, `${lineCount} access line(s)`);
    await new Promise((resolve) => setImmediate(resolve));
    return { status: answer.headers[':status'], body: answer.body.toString(), lines: accessLines() };
  } finally {
    session.close();
  }
}

/** Who the access line names: the client certificate's, never empty. */
function identity(l: LogLine): { subject: unknown; serial: unknown } {
  assert.ok(typeof l.subject === 'string' && l.subject !== '' && typeof l.serial === 'string' && l.serial !== '', JSON.stringify(l));
  return { subject: l.subject, serial: l.serial };
}

describe('REST requests Node would answer on its own get an answer and one access line, both modes', () => {
  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}: an HTTP/1.1 connection's request line saying HTTP/2.0 gets 400 and a close, and its access line; the proxy keeps running`, { timeout: 20_000 }, async () => {
      const { text, lines } = await exchangeHttp1(restMode, 'GET /v2/health/live HTTP/2.0\r\nhost: a\r\n\r\n', 1);
      assert.deepEqual(statuses(text), [400]);
      assert.match(text, /connection: close\r\n/i);
      assert.equal(lines.length, 1);
      assert.deepEqual({ status: lines[0]!.status, error: lines[0]!.error }, { status: 400, error: 'bad_request' });
      const after = await exchangeHttp1(restMode, 'GET /v2/health/live HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n', 1);
      assert.deepEqual(statuses(after.text), [200]);
      assert.deepEqual(identity(lines[0]!), identity(after.lines[0]!));
    });

    test(`--mtls_rest_mode ${restMode}: the HTTP/2 preface on a connection that negotiated no h2 gets 400 naming ALPN, and its access line`, { timeout: 20_000 }, async () => {
      // A TLS client that speaks HTTP/2 without offering it by ALPN (HAProxy's \`proto h2\` without \`alpn h2\`).
      const { text, lines } = await exchangeHttp1(restMode, 'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n', 1);
      assert.deepEqual(statuses(text), [400]);
      assert.match(text, /HTTP\/2 without ALPN: this connection negotiated HTTP\/1\.1; offer h2 by ALPN/);
      assert.deepEqual({ status: lines[0]!.status, error: lines[0]!.error }, { status: 400, error: 'bad_request' });
    });

    test(`--mtls_rest_mode ${restMode}: an HTTP/1.1 request without a Host field gets 400 and a close, and an access line naming it; an HTTP/1.0 one needs none`, { timeout: 20_000 }, async () => {
      const { text, lines } = await exchangeHttp1(restMode, 'GET /v2/health/live HTTP/1.1\r\n\r\n' + 'GET /v2/models/dummy HTTP/1.1\r\nhost: a\r\n\r\n', 1);
      assert.deepEqual(statuses(text), [400]);
      assert.match(text, /connection: close\r\n/i);
      assert.deepEqual(lines.map(summary), [{ status: 400, error: 'bad_request', method: 'GET', path: '/v2/health/live', protocol: 'http/1.1' }]);
      identity(lines[0]!);
      const http10 = await exchangeHttp1(restMode, 'GET /v2/health/live HTTP/1.0\r\n\r\n', 1);
      assert.deepEqual(statuses(http10.text), [200]);
      assert.deepEqual(http10.lines.map(summary), [{ status: 200, error: undefined, method: 'GET', path: '/v2/health/live', protocol: 'http/1.1' }]);
    });

    test(`--mtls_rest_mode ${restMode}: a request pipelined behind an answer that closes the connection is not read: the model server never gets it, and it has no access line`, { timeout: 20_000 }, async () => {
      const behind = `/v2/models/dummy?behind-a-closing-answer-${restMode}`;
      const { text, lines } = await exchangeHttp1(restMode, 'GET /v2/health/live HTTP/1.1\r\n\r\n' + `GET ${behind} HTTP/1.1\r\nhost: a\r\n\r\n`, 1);
      assert.deepEqual(statuses(text), [400]);
      // Sent after that connection closed: once the model server has it, anything forwarded before it has arrived too.
      const marker = `/v2/health/live?after-${restMode}`;
      await exchangeHttp1(restMode, `GET ${marker} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n`, 1);
      await eventually(() => both.upstream.received.some((r) => r.path === marker), 'the model server to get the request sent after');
      assert.deepEqual(both.upstream.received.filter((r) => r.path === behind), []);
      assert.deepEqual(lines.map(summary), [{ status: 400, error: 'bad_request', method: 'GET', path: '/v2/health/live', protocol: 'http/1.1' }]);
    });

    test(`--mtls_rest_mode ${restMode}: CONNECT gets 405 and a close, after the answer to the request before it, and an access line naming it`, { timeout: 20_000 }, async () => {
      const { text, lines } = await exchangeHttp1(restMode, 'GET /v2/health/live HTTP/1.1\r\nhost: a\r\n\r\n' + 'CONNECT a:443 HTTP/1.1\r\nhost: a:443\r\n\r\n', 2);
      assert.deepEqual(statuses(text), [200, 405]);
      assert.match(text, /connection: close\r\n[^]*CONNECT is not supported\n$/);
      // In the order each mode logs them: the refusal may come first.
      const byStatus = lines.map(summary).sort((a, b) => Number(a.status) - Number(b.status));
      assert.deepEqual(byStatus, [
        { status: 200, error: undefined, method: 'GET', path: '/v2/health/live', protocol: 'http/1.1' },
        { status: 405, error: 'bad_request', method: 'CONNECT', path: 'a:443', protocol: 'http/1.1' },
      ]);
      identity(lines.find((l) => l.status === 405)!);
    });

    test(`--mtls_rest_mode ${restMode}: an HTTP/2 CONNECT gets 405 and an access line naming it`, { timeout: 20_000 }, async () => {
      const { status, lines } = await exchangeH2(restMode, { ':method': 'CONNECT', ':authority': 'a:443' }, '', 1);
      assert.equal(status, 405);
      assert.deepEqual(lines.map(summary), [{ status: 405, error: 'bad_request', method: 'CONNECT', path: 'a:443', protocol: 'h2' }]);
      identity(lines[0]!);
    });

    // Terminate mode answered as Node does, a bare 400: only the relay said what was missing.
    test(`--mtls_rest_mode ${restMode}: an HTTP/1.1 request without Host gets 400 saying so, and an access line`, { timeout: 20_000 }, async () => {
      const { text, lines } = await exchangeHttp1(restMode, 'GET /v2/health/live HTTP/1.1\r\n\r\n', 1);
      assert.deepEqual(statuses(text), [400]);
      assert.match(text, /\r\n\r\nan HTTP\/1\.1 request needs a Host field\n$/);
      assert.deepEqual(lines.map((l) => [l.status, l.error]), [[400, 'bad_request']]);
    });

    test(`--mtls_rest_mode ${restMode}: an HTTP/1.1 Expect other than 100-continue gets 417 and an access line naming the request`, { timeout: 20_000 }, async () => {
      const { text, lines } = await exchangeHttp1(
        restMode,
        'POST /echo-body HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\nexpect: x-fast-lane\r\n\r\nabc' + 'GET /v2/health/live HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n',
        restMode === 'terminate' ? 2 : 1,
      );
      // Node keeps the connection for the next request (the relay closes it, rest-relay-drogon.test.ts): both are logged.
      assert.deepEqual(statuses(text), restMode === 'terminate' ? [417, 200] : [417]);
      // Node's own 417 had no body in terminate mode: the client was not told why.
      assert.match(text, /\r\n\r\nExpect: "x-fast-lane" cannot be met; the only expectation supported is 100-continue\n/);
      assert.deepEqual(lines.map(summary), [
        { status: 417, error: 'bad_request', method: 'POST', path: '/echo-body', protocol: 'http/1.1' },
        ...(restMode === 'terminate' ? [{ status: 200, error: undefined, method: 'GET', path: '/v2/health/live', protocol: 'http/1.1' }] : []),
      ]);
      identity(lines[0]!);
    });

    test(`--mtls_rest_mode ${restMode}: a transfer coding besides chunked (gzip, chunked; on one line or two) gets 501 naming it, and the model server never gets the body, still gzip-coded, as if it were plain`, { timeout: 20_000 }, async () => {
      for (const codings of ['transfer-encoding: gzip, chunked', 'transfer-encoding: gzip\r\ntransfer-encoding: chunked', 'transfer-encoding: identity, chunked']) {
        const seen = both.upstream.received.length;
        const { text, lines } = await exchangeHttp1(restMode, `POST /echo-body HTTP/1.1\r\nhost: a\r\nconnection: close\r\n${codings}\r\n\r\n3\r\nabc\r\n0\r\n\r\n`, 1);
        const coding = codings.includes('identity') ? 'identity' : 'gzip';
        assert.deepEqual(statuses(text), [501], codings);
        assert.match(text, new RegExp(`\\r\\n\\r\\nTransfer-Encoding "${coding}, chunked" is not supported \\(only chunked\\)\\n$`), codings);
        assert.deepEqual(lines.map(summary), [{ status: 501, error: 'bad_request', method: 'POST', path: '/echo-body', protocol: 'http/1.1' }], codings);
        assert.equal(both.upstream.received.length, seen, codings);
      }
    });

    test(`--mtls_rest_mode ${restMode}: an HTTP/2 Expect other than 100-continue gets 417 and an access line; 100-Continue is a 100-continue there too`, { timeout: 20_000 }, async () => {
      const refused = await exchangeH2(restMode, { ':method': 'POST', ':path': '/echo-body', expect: 'x-fast-lane' }, 'abc', 1);
      assert.equal(refused.status, 417);
      assert.equal(refused.body, 'Expect: "x-fast-lane" cannot be met; the only expectation supported is 100-continue\n');
      assert.deepEqual(refused.lines.map(summary), [{ status: 417, error: 'bad_request', method: 'POST', path: '/echo-body', protocol: 'h2' }]);
      identity(refused.lines[0]!);
      const met = await exchangeH2(restMode, { ':method': 'POST', ':path': '/echo-body', expect: '100-Continue' }, 'abc', 1);
      assert.equal(met.status, 200);
      assert.match(met.body, /"bytes":3/);
      assert.deepEqual(met.lines.map(summary), [{ status: 200, error: undefined, method: 'POST', path: '/echo-body', protocol: 'h2' }]);
    });
  }
});

/** Requests the proxy refuses itself, in either mode: each row, what it is, the bytes, and its status and error. */
const REFUSED: readonly [string, string, number, string][] = [
  ['two Content-Length fields', 'POST /echo-body HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabc', 400, 'bad_request'],
  ['a folded header line', 'GET /v2/health/live HTTP/1.1\r\nhost: a\r\nx-a: 1\r\n 2\r\n\r\n', 400, 'bad_request'],
  ['a bare LF ending the request line', 'GET /v2/health/live HTTP/1.1\nhost: a\r\n\r\n', 400, 'bad_request'],
  ['a chunk size that is not hex', 'POST /echo-body HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n', 400, 'bad_request_body'],
  // Terminate mode keeps the connection after this 400: the request asks for the close.
  ['a #fragment in the target', 'GET /v2/health/live#x HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n', 400, 'bad_request_target'],
];

/** What the proxy's one answer in `text` told the client: its line of text, or the `error` of its JSON. */
function reasonGiven(text: string): string {
  const { responses } = parseResponses(Buffer.from(text, 'latin1'), ['GET']);
  const body = responses[0]!.body.toString();
  return body.startsWith('{') ? (JSON.parse(body) as { error: string }).error : body.replace(/\n$/, '');
}

describe('a request the proxy refuses has an access line saying why, as its answer told the client, both modes', () => {
  for (const restMode of FORWARD_MODES) {
    for (const [what, raw, status, error] of REFUSED) {
      test(`--mtls_rest_mode ${restMode}: ${what}: ${status} ${error}, and the line's detail is the answer's reason`, { timeout: 20_000 }, async () => {
        const { text, lines } = await exchangeHttp1(restMode, raw, 1);
        assert.deepEqual(statuses(text), [status], text);
        assert.equal(lines.length, 1);
        assert.deepEqual([lines[0]!.status, lines[0]!.error], [status, error]);
        assert.ok(reasonGiven(text).length > 0, text);
        assert.equal(lines[0]!.detail, reasonGiven(text));
      });
    }

    test(`--mtls_rest_mode ${restMode}: a reason holding what the client sent (a Transfer-Encoding of 400 characters) is cut in the line past 256 characters, saying how much was cut; the client gets it whole`, { timeout: 20_000 }, async () => {
      const { text, lines } = await exchangeHttp1(restMode, `POST /echo-body HTTP/1.1\r\nhost: a\r\ntransfer-encoding: ${'x'.repeat(400)}\r\n\r\n`, 1);
      assert.deepEqual(statuses(text), [501], text);
      const reason = reasonGiven(text);
      assert.match(reason, /^Transfer-Encoding "x{400}" is not supported \(only chunked\)$/);
      assert.equal(lines[0]!.detail, `${reason.slice(0, 256)}... (${reason.length - 256} more characters)`);
    });
  }

  test('a request forwarded and answered by the model server has no detail', { timeout: 20_000 }, async () => {
    for (const restMode of FORWARD_MODES) {
      const { lines } = await exchangeHttp1(restMode, 'GET /v2/health/live HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n', 1);
      assert.deepEqual(lines.map((l) => [l.status, 'detail' in l]), [[200, false]], restMode);
    }
  });
});

test('terminate mode: requests Node would have answered itself are in the request metrics, and leave no stream counted open', { timeout: 30_000 }, async () => {
  const metrics = new ProxyMetrics({ processMetrics: false });
  const local = await startTestProxy({ pki: both.pki, upstream: { restPort: both.upstream.restPort! }, observer: metrics });
  try {
    for (const raw of ['GET /v2/health/live HTTP/2.0\r\nhost: a\r\n\r\n', 'GET /v2/health/live HTTP/1.1\r\n\r\n', 'CONNECT a:443 HTTP/1.1\r\nhost: a:443\r\n\r\n', 'GET /v2/health/live HTTP/1.1\r\nhost: a\r\nexpect: x-fast-lane\r\nconnection: close\r\n\r\n']) {
      const socket = await openRaw(local.restPort, both.pki);
      socket.write(raw);
      await readToClose(socket);
    }
    const session = h2Session(local.restPort, both.pki);
    try {
      await h2Request(session, { ':method': 'POST', ':path': '/echo-body', expect: 'x-fast-lane' }, 'abc');
      await h2Request(session, { ':method': 'CONNECT', ':authority': 'a:443' }, '');
    } finally {
      session.close();
    }
    const count = async (method: string, status: string) => sample(await metrics.text(), 'ovms_mtls_requests_total', { listener: 'rest', method, status });
    await eventually(async () => (await count('OTHER', '405')) === 2, 'both CONNECTs counted (method OTHER)');
    assert.equal(await count('GET', '400'), 2);
    assert.equal(await count('GET', '417'), 1);
    assert.equal(await count('POST', '417'), 1);
    await eventually(async () => sample(await metrics.text(), 'ovms_mtls_open_streams', { listener: 'rest' }) === 0, 'no stream left open');
  } finally {
    await local.proxy.shutdown(1000);
  }
});
