/**
 * Differential tests of the REST relay's HTTP/1.1 request reader (src/http1-framing.ts) against
 * llhttp, the parser of Node's HTTP server, on generated request streams near the edges of
 * RFC 9112 framing. Where the two split a stream differently, an authenticated client could have
 * the model server see a request the relay never saw (no x-forwarded-client-cert of ours, no
 * access line), or responses paired with the wrong requests.
 */
import { test, describe, before, after } from 'node:test';
import { once } from 'node:events';
import type { Socket } from 'node:net';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { NOOP_OBSERVER, type AccessRecord } from '../src/observer.js';
import { FORWARD_MODES, type ForwardMode } from '../src/config.js';
import { freeLoopbackPorts } from '../src/ports.js';
import { startTestProxy, type StartedProxy } from './helpers/harness.js';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { openRaw, readToCloseWithin } from './helpers/raw-http1.js';
import { eventually } from './helpers/ops.js';
import { behindProxy } from './helpers/scripted-upstream.js';
import {
  answerStatuses, exchange, llhttpSplit, recordingServer, relayDefect, relaySplit, splitDisagreement, streamArb, type Exchanged, type RecordingServer,
} from './helpers/http1-streams.js';

/** A proxy in one REST mode in front of its own recording model server, and the access lines it logged. */
interface Front {
  readonly proxy: StartedProxy;
  readonly upstream: RecordingServer;
  readonly records: AccessRecord[];
}

let pki: TestPki;
/** The llhttp that the unit-level property splits the relay's output with. */
let llhttp: RecordingServer;
const fronts = new Map<ForwardMode, Front>();
/** The x-forwarded-client-cert the relay sets for the test's client. */
let xfcc: string;

before(async () => {
  pki = await createTestPki();
  llhttp = await recordingServer();
  for (const restMode of FORWARD_MODES) {
    const upstream = await recordingServer();
    const records: AccessRecord[] = [];
    // A short idle timeout: a stream whose last body never ends (a Content-Length too large) gets its 408 soon.
    const proxy = await startTestProxy({ pki, upstream: { restPort: upstream.port }, restMode, limits: { idleTimeoutMs: 2000 }, observer: { ...NOOP_OBSERVER, request: (record) => records.push(record) } });
    fronts.set(restMode, { proxy, upstream, records });
  }
  const first = (await through('relay', '')).parsed[0]!.rawHeaders;
  xfcc = first[first.findIndex((name) => name === 'x-forwarded-client-cert') + 1]!;
});

after(async () => {
  for (const front of fronts.values()) {
    await front.proxy.proxy.shutdown(1000);
    await front.upstream.close();
  }
  await llhttp?.close();
  await pki?.cleanup();
});

/** `text` (latin1, one character a byte) through the proxy in `restMode`, a closing request after it. */
function through(restMode: ForwardMode, text: string): Promise<Exchanged> {
  const front = fronts.get(restMode)!;
  return exchange({ restPort: front.proxy.restPort, pki, upstream: front.upstream, records: front.records, relay: restMode === 'relay' }, Buffer.from(text, 'latin1'));
}

const parsedBy = (result: Exchanged) => result.parsed.map((r) => `${r.method} ${r.target}${r.complete ? '' : ' (incomplete)'}`);
/** Terminate mode's requests may go out on several pooled connections: their order at the model server is not the client's. */
const inOrder = (restMode: ForwardMode, requests: string[]) => (restMode === 'relay' ? requests : [...requests].sort());
const parseErrors = (result: Exchanged) => result.upstream.map((c) => c.parseError).filter((code) => code !== undefined);

describe('the REST relay reader against llhttp, on generated request streams', () => {
  test('unit level, the stream cut into reads anywhere: every request the relay reads whole, llhttp reads the same from what the relay forwards (method, target, body length), and no request more; the relay forwards the same bytes as when the stream comes in one read', { timeout: 120_000 }, async () => {
    await fc.assert(
      fc.asyncProperty(streamArb, fc.array(fc.nat(), { maxLength: 6 }), async (text, cuts) => {
        const bytes = Buffer.from(text, 'latin1');
        const relay = relaySplit(bytes, cuts);
        const disagreement = splitDisagreement(relay, await llhttpSplit(llhttp, relay.forwarded));
        assert.equal(disagreement, undefined, `${JSON.stringify(text)} cut at ${cuts.join(', ')}`);
        // Nothing of a line the relay refuses (a chunk line split across reads, say) goes on before it is judged.
        assert.equal(relay.forwarded.toString('latin1'), relaySplit(bytes).forwarded.toString('latin1'), `${JSON.stringify(text)} cut at ${cuts.join(', ')}`);
      }),
      { numRuns: 3000, includeErrorInReport: true },
    );
  });

  test('end to end through the relay: the model server (llhttp) parses exactly the requests the relay logged as forwarded, each with one x-forwarded-client-cert, ours; a refusal is answered and nothing of it goes upstream', { timeout: 120_000 }, async () => {
    await fc.assert(
      fc.asyncProperty(streamArb, async (text) => {
        assert.equal(relayDefect(await through('relay', text), xfcc), undefined, JSON.stringify(text));
      }),
      { numRuns: 1200, includeErrorInReport: true },
    );
  });
});

/**
 * Streams the relay forwarded though llhttp refuses them (found by the properties above, shrunk):
 * the model server answered 400 and closed, so the relay's pairing held, but a parser that splits
 * them otherwise could read a request the relay never saw. Each now gets the relay's 400 naming
 * what is wrong, after the answer to the request before it, and none reaches the model server.
 */
const REFUSED_IN_THE_HEAD: readonly [string, string, RegExp][] = [
  ['a tab after the Content-Length value', 'POST /v2/models/m/infer HTTP/1.1\r\nhost: a\r\ncontent-length: 3\t\r\n\r\nabc', /tab within or after a Content-Length or Transfer-Encoding value/],
  ['a tab between Content-Length values', 'POST /v2/models/m/infer HTTP/1.1\r\nhost: a\r\ncontent-length: 3,\t3\r\n\r\nabc', /tab within or after a Content-Length or Transfer-Encoding value/],
  ['a tab after the Transfer-Encoding value', 'POST /v2/models/m/infer HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\t\r\n\r\n3\r\nabc\r\n0\r\n\r\n', /tab within or after a Content-Length or Transfer-Encoding value/],
  ['a method llhttp does not know', 'FOO /v2/health/live HTTP/1.1\r\nhost: a\r\n\r\n', /unknown method "FOO"/],
  ['a method in lower case', 'get /v2/health/live HTTP/1.1\r\nhost: a\r\n\r\n', /unknown method "get"/],
  ['PRI outside the HTTP/2 preface', 'PRI /v2/health/live HTTP/1.1\r\nhost: a\r\n\r\n', /unknown method "PRI"/],
  ['a byte above 0x7e in the target', 'GET /v2/\x80 HTTP/1.1\r\nhost: a\r\n\r\n', /request target must be printable ASCII/],
];

/** Chunk-size lines with an extension llhttp refuses (white space around it, no name, a bare obs-text value). */
const REFUSED_CHUNK_LINES = ['3 ;a', '3\t;a', '3; a', '3;a =b', '3;a= b', '3;a=b ', '3;', '3;a b', '3;a=\x80', '3;a="x'];

const unescaped = (text: string) => text.replace(/\\([rnt]|x[0-9a-f]{2})/g, (_, e: string) => (e === 'r' ? '\r' : e === 'n' ? '\n' : e === 't' ? '\t' : String.fromCharCode(parseInt(e.slice(1), 16))));

/** A request answered at once, to pipeline others behind. */
const FIRST = 'GET /v2/health/live HTTP/1.1\r\nhost: a\r\n\r\n';
/** A chunked request to the model server's echo; `body` after its head, as sent. */
const chunkedRequest = (body: string) => `POST /echo-body HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n${body}`;

/** Malformed chunk lines, each then cut into two reads at every one of its bytes (its CRLF included). */
const SPLIT_CHUNK_LINES = ['zz', '3;a b', '3;a=\x80', '3 ;a'];
/** A chunked request whose first chunk is whole and whose second has `line` for its chunk line. */
const secondChunkLine = (line: string) => ({ before: chunkedRequest('3\r\nabc\r\n'), line: `${unescaped(line)}\r\n`, after: 'abc\r\n0\r\n\r\n' });

describe('a malformed chunk line split across reads', () => {
  test('unit level: nothing of the line is forwarded before the refusal, wherever the read ends in it', () => {
    for (const spelled of SPLIT_CHUNK_LINES) {
      const { before, line, after } = secondChunkLine(spelled);
      const stream = Buffer.from(before + line + after, 'latin1');
      const whole = relaySplit(stream);
      assert.match(whole.refused ?? '', /malformed chunk/);
      assert.ok(whole.forwarded.toString('latin1').endsWith('3\r\nabc\r\n'));
      for (let at = before.length + 1; at < before.length + line.length; at++) {
        const cut = relaySplit(stream, [at]);
        assert.equal(cut.refused, whole.refused, `${JSON.stringify(line)} cut after ${at - before.length} bytes`);
        assert.equal(cut.forwarded.toString('latin1'), whole.forwarded.toString('latin1'), `${JSON.stringify(line)} cut after ${at - before.length} bytes`);
      }
    }
  });

  test('--mtls_rest_mode relay: written in two parts cut at every byte of the line, the model server gets the head and the whole chunk before it, not a byte of the line; the client gets the 400 naming it', { timeout: 60_000 }, () => {
    const received = new Map<Socket, Buffer[]>();
    const record = (socket: Socket, first: Buffer) => {
      received.set(socket, [first]);
      socket.on('data', (bytes: Buffer) => received.get(socket)!.push(bytes));
    };
    return behindProxy({ pki, restMode: 'relay', answer: record }, async (local, upstream) => {
      const { before, line, after } = secondChunkLine('3;a b');
      for (let cut = 1; cut < line.length; cut++) {
        const connection = upstream.sockets.length;
        const socket = await openRaw(local.restPort, pki);
        socket.write(before + line.slice(0, cut));
        await eventually(() => upstream.sockets[connection] !== undefined, 'the relay\'s connection to the model server');
        const bytes = () => Buffer.concat(received.get(upstream.sockets[connection]!) ?? []).toString('latin1');
        // Its first read handled: the head and the whole chunk before the line are with the model server.
        await eventually(() => bytes().includes('\r\n\r\n3\r\nabc\r\n'), 'the first part at the model server');
        socket.write(line.slice(cut) + after);
        const text = await readToCloseWithin(socket, 20_000);
        assert.deepEqual(answerStatuses(text), [400], text);
        assert.match(text, /malformed chunk extension/);
        if (!upstream.sockets[connection]!.closed) await once(upstream.sockets[connection]!, 'close');
        assert.ok(bytes().endsWith('\r\n\r\n3\r\nabc\r\n'), `cut after ${cut} bytes of ${JSON.stringify(line)}, the model server got ${JSON.stringify(bytes().slice(-40))}`);
      }
    });
  });
});

describe('what the relay forwarded and llhttp refused, refused by the relay now', () => {
  for (const [what, request, message] of REFUSED_IN_THE_HEAD) {
    test(`--mtls_rest_mode relay: ${what}: 400 naming it after the answer to the request before it; the model server parses only that one`, { timeout: 30_000 }, async () => {
      const result = await through('relay', 'GET /v2/health/live HTTP/1.1\r\nhost: a\r\n\r\n' + unescaped(request));
      assert.deepEqual(answerStatuses(result.answer), [200, 400], result.answer);
      assert.match(result.answer, message);
      assert.deepEqual(parsedBy(result), ['GET /v2/health/live']);
      assert.deepEqual(parseErrors(result), []);
    });
  }

  test('--mtls_rest_mode relay: a body one byte short, the next request line read from its last byte on ("ET /v2/..."): that request is answered, the rest refused as an unknown method; the model server never parses it', { timeout: 30_000 }, async () => {
    const result = await through('relay', 'POST /echo-body HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\n\r\nabcGET /v2/health/live HTTP/1.1\r\nhost: a\r\n\r\n');
    assert.deepEqual(answerStatuses(result.answer), [200, 400], result.answer);
    assert.match(result.answer, /unknown method "ET"/);
    assert.deepEqual(parsedBy(result), ['POST /echo-body']);
    assert.deepEqual(parseErrors(result), []);
  });

  for (const line of REFUSED_CHUNK_LINES) {
    test(`--mtls_rest_mode relay: chunk-size line ${JSON.stringify(unescaped(line))}: 400 naming the chunk extension; the model server never gets a whole request`, { timeout: 30_000 }, async () => {
      const result = await through('relay', `POST /v2/models/m/infer HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n${unescaped(line)}\r\nabc\r\n0\r\n\r\n`);
      assert.deepEqual(answerStatuses(result.answer), [400], result.answer);
      assert.match(result.answer, /malformed chunk extension/);
      assert.deepEqual(parsedBy(result).filter((r) => !r.endsWith('(incomplete)')), []);
      assert.deepEqual(parseErrors(result).filter((code) => code !== 'HPE_INVALID_EOF_STATE'), []);
    });
  }
});

/** Connection values of an HTTP/1.0 request: Node 20's llhttp (9.3) closes after one where a tab follows `keep-alive`. */
const KEEP_ALIVE_THEN_TAB = ['keep-alive\t', 'keep-alive \t', 'Keep-Alive\t, x'];
const KEEP_ALIVE = ['keep-alive', 'keep-alive ', '\tkeep-alive', 'x,\tkeep-alive'];
const http10Then11 = (connection: string) => `GET /v2/health/live HTTP/1.0\r\nhost: a\r\nconnection: ${connection}\r\n\r\nGET /v2/health/ready HTTP/1.1\r\nhost: a\r\n\r\n`;

describe('an HTTP/1.0 request whose keep-alive option a tab follows (found by the unit-level property)', () => {
  test('unit level: the relay reads nothing after it, as Node 20\'s llhttp does; with no tab after the option it reads on', () => {
    const readByRelay = (connection: string) => relaySplit(Buffer.from(http10Then11(connection), 'latin1')).requests.map((r) => `${r.method} ${r.target}`);
    for (const connection of KEEP_ALIVE_THEN_TAB) assert.deepEqual(readByRelay(connection), ['GET /v2/health/live'], JSON.stringify(connection));
    for (const connection of KEEP_ALIVE) assert.deepEqual(readByRelay(connection), ['GET /v2/health/live', 'GET /v2/health/ready'], JSON.stringify(connection));
  });

  test('--mtls_rest_mode relay: answered, then the connection closes; the model server parses that request alone and no bytes after it', { timeout: 30_000 }, async () => {
    const result = await through('relay', 'GET /v2/health/live HTTP/1.0\r\nhost: a\r\nconnection: keep-alive\t\r\n\r\n');
    assert.deepEqual(answerStatuses(result.answer), [200], result.answer);
    assert.deepEqual(parsedBy(result), ['GET /v2/health/live']);
    assert.deepEqual(parseErrors(result), []);
  });
});

/**
 * Where the two REST modes knowingly answer a client otherwise (README, REST relay): found by running
 * the generated streams through both. Each row: the stream (the closing request follows it), then per
 * mode the statuses the client reads and the requests the model server parses.
 */
const MODES_DIFFER: readonly { what: string; stream: string; relay: [number[], string[]]; terminate: [number[], string[]] }[] = [
  {
    // RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing; Node reads the body as chunked.
    what: 'Transfer-Encoding in an HTTP/1.0 request: the relay refuses it (RFC 9112 6.1), terminate mode reads a chunked body',
    stream: 'POST /echo-body HTTP/1.0\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n',
    relay: [[400], []],
    terminate: [[200], ['POST /echo-body']],
  },
  {
    what: 'two spaces after the method: the relay refuses the request line (RFC 9112 3: one SP), terminate mode (llhttp) takes it',
    stream: 'GET  /v2/health/live HTTP/1.1\r\nhost: a\r\n\r\n',
    relay: [[400], []],
    terminate: [[200, 200], ['GET /v2/health/live', 'GET /v2/health/ready']],
  },
  {
    // RFC 9110 6.5.1: a recipient may discard trailers; neither mode passes them on.
    what: 'a trailer Content-Length that is no number: the relay drops trailers unread, terminate mode (llhttp) refuses it',
    stream: 'POST /echo-body HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\ncontent-length: x\r\n\r\n',
    relay: [[200, 200], ['POST /echo-body', 'GET /v2/health/ready']],
    terminate: [[400], []],
  },
];

const AGREED: readonly { what: string; stream: string }[] = [
  { what: 'a tab before the Content-Length value (optional white space llhttp takes too)', stream: 'POST /echo-body HTTP/1.1\r\nhost: a\r\ncontent-length:\t3\r\n\r\nabc' },
  { what: 'chunk extensions as RFC 9112 7.1.1 has them, a quoted string with ; and \\" among them', stream: 'POST /echo-body HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n3;a;b=c;d="x;\\"y"\r\nabc\r\n0;e=f\r\n\r\n' },
];

/** Chunked applied more than once (RFC 9112 6.1 forbids it): faulty framing, not a coding the server lacks (501). */
const CHUNKED_TWICE = ['transfer-encoding: chunked, chunked\r\n', 'transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n'];

describe('the two REST modes on streams from the generated corpus', () => {
  for (const fields of CHUNKED_TWICE) {
    for (const restMode of FORWARD_MODES) {
      test(`--mtls_rest_mode ${restMode}: ${JSON.stringify(fields)}: 400, as in the other mode; nothing reaches the model server`, { timeout: 30_000 }, async () => {
        const result = await through(restMode, `POST /echo-body HTTP/1.1\r\nhost: a\r\n${fields}\r\n3\r\nabc\r\n0\r\n\r\n`);
        assert.deepEqual(answerStatuses(result.answer), [400], result.answer);
        if (restMode === 'relay') assert.match(result.answer, /chunked applied more than once/);
        assert.deepEqual(parsedBy(result), []);
      });
    }
  }

  for (const row of MODES_DIFFER) {
    for (const restMode of FORWARD_MODES) {
      test(`--mtls_rest_mode ${restMode}: ${row.what}`, { timeout: 30_000 }, async () => {
        const result = await through(restMode, row.stream);
        const [statuses, parsed] = row[restMode];
        assert.deepEqual(answerStatuses(result.answer), statuses, result.answer);
        assert.deepEqual(inOrder(restMode, parsedBy(result)), inOrder(restMode, parsed));
        assert.deepEqual(parseErrors(result), []);
      });
    }
  }

  for (const row of AGREED) {
    for (const restMode of FORWARD_MODES) {
      test(`--mtls_rest_mode ${restMode}: ${row.what}: forwarded, the body whole`, { timeout: 30_000 }, async () => {
        const result = await through(restMode, row.stream);
        assert.deepEqual(answerStatuses(result.answer), [200, 200], result.answer);
        assert.deepEqual(inOrder(restMode, parsedBy(result)), inOrder(restMode, ['POST /echo-body', 'GET /v2/health/ready']));
        assert.equal(result.parsed.find((r) => r.method === 'POST')!.body, 3);
      });
    }
  }
});

/**
 * A single transfer coding other than chunked (RFC 9112 6.1: 501). In terminate mode llhttp refuses such a
 * request itself, after the head our 501 answers: its refusal went out too, a second answer (400) to one
 * request with a second access line, method and path empty. Relay mode, a relay port whose model server is
 * down (served by the terminating path) and terminate mode each answer the 501 alone and log it once.
 */
const SINGLE_CODINGS = ['foo', 'identity'];

/** Writes `text` on a new connection to `restPort`: what the client read until the proxy closed. */
async function readAnswer(restPort: number, text: string): Promise<string> {
  const socket = await openRaw(restPort, pki);
  socket.write(text);
  return readToCloseWithin(socket, 20_000);
}

describe('a single transfer coding other than chunked', () => {
  const request = (coding: string) => `POST /echo-body HTTP/1.1\r\nhost: a\r\ntransfer-encoding: ${coding}\r\n\r\n`;

  for (const coding of SINGLE_CODINGS) {
    for (const restMode of FORWARD_MODES) {
      test(`--mtls_rest_mode ${restMode}: Transfer-Encoding: ${coding}: one answer, the 501 naming it, one access line, and the connection closes; nothing reaches the model server`, { timeout: 30_000 }, async () => {
        const result = await through(restMode, request(coding));
        assert.deepEqual(answerStatuses(result.answer), [501], result.answer);
        assert.match(result.answer, new RegExp(`\\r\\n\\r\\nTransfer-Encoding "${coding}" is not supported \\(only chunked\\)\\n$`));
        assert.deepEqual(logged(result.records), [['POST', '/echo-body', 501, 'bad_request']]);
        assert.deepEqual(parsedBy(result), []);
      });
    }
  }

  test('--mtls_rest_mode relay, the model server down (the terminating path answers): one answer, the 501, and one access line', { timeout: 30_000 }, async () => {
    const [downPort] = (await freeLoopbackPorts(1)) as [number];
    const local = await startTestProxy({ pki, upstream: { restPort: downPort }, restMode: 'relay' });
    try {
      for (const coding of SINGLE_CODINGS) {
        const from = local.logs.lines.length;
        const answer = await readAnswer(local.restPort, request(coding));
        assert.deepEqual(answerStatuses(answer), [501], answer);
        await local.logs.waitFor((l) => l.event === 'access', from);
        // A second answer's line would come in the same turn of events as the first.
        await new Promise((resolve) => setImmediate(resolve));
        const lines = local.logs.lines.slice(from).filter((l) => l.event === 'access');
        assert.deepEqual(lines.map((l) => [l.method, l.path, l.status, l.error]), [['POST', '/echo-body', 501, 'bad_request']], coding);
      }
    } finally {
      await local.proxy.shutdown(1000);
    }
  });
});

/**
 * A request whose chunked body is malformed, pipelined behind one not yet answered. The relay used to
 * cut the connection: the first request, still in its write batch, never reached the model server, and
 * was logged status 0 `bad_request_body` with the client answered nothing. Each body: after the head.
 */
const BAD_BODIES: readonly [string, string][] = [
  ['a chunk size that is not hex', 'zz\r\nabc\r\n0\r\n\r\n'],
  ['white space in a chunk extension', '3;a b\r\nabc\r\n0\r\n\r\n'],
  ['chunk data not followed by CRLF', '3\r\nabc\n0\r\n\r\n'],
];

/** An access line as these tests compare it. */
const logged = (records: readonly AccessRecord[]) => records.map((r) => [r.method, r.path, r.status, r.error]);

describe('a malformed chunked body pipelined behind a request still unanswered', () => {
  for (const [what, body] of BAD_BODIES) {
    for (const restMode of FORWARD_MODES) {
      test(`--mtls_rest_mode ${restMode}: ${what}: the request before it is forwarded and answered, then the 400 it gets alone; its own bytes never reach the model server`, { timeout: 30_000 }, async () => {
        const alone = await through(restMode, chunkedRequest(body));
        assert.deepEqual(answerStatuses(alone.answer), [400], alone.answer);
        const result = await through(restMode, FIRST + chunkedRequest(body));
        assert.deepEqual(answerStatuses(result.answer), [200, 400], result.answer);
        // Node's 400 (terminate mode) has a Date field: the two may be a second apart.
        const undated = (text: string) => text.replace(/^date: .*$/gim, 'date: -');
        assert.ok(undated(result.answer).endsWith(undated(alone.answer)), `${JSON.stringify(result.answer)} does not end with ${JSON.stringify(alone.answer)}`);
        assert.deepEqual(parsedBy(result), ['GET /v2/health/live']);
        assert.deepEqual(parseErrors(result), []);
        assert.deepEqual(logged(result.records), [['GET', '/v2/health/live', 200, undefined], ['POST', '/echo-body', 400, 'bad_request_body']]);
      });
    }
  }

  test('--mtls_rest_mode relay: the malformed request\'s head went to the model server in an earlier read: the request before it is still answered, then the 400, not the model server\'s early answer to it', { timeout: 30_000 }, () => {
    // A model server that answers the first request only once the second's first chunk is with it (the
    // malformed chunk line behind that chunk, in the same read, is refused while the first waits for its
    // answer), and answers the second at once, as a server may on its head alone.
    const received = new Map<Socket, string>();
    const answer = (socket: Socket, first: Buffer) => {
      const read = (bytes: Buffer) => {
        received.set(socket, (received.get(socket) ?? '') + bytes.toString('latin1'));
        if (received.get(socket)!.endsWith('3\r\nabc\r\n')) socket.write('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n');
      };
      read(first);
      socket.on('data', read);
    };
    return behindProxy({ pki, restMode: 'relay', answer }, async (local, upstream) => {
      const socket = await openRaw(local.restPort, pki);
      socket.write(FIRST + chunkedRequest(''));
      await eventually(() => upstream.sockets[0] !== undefined && received.get(upstream.sockets[0])?.endsWith('\r\n\r\n') === true && received.get(upstream.sockets[0])!.includes('POST /echo-body'), 'both heads at the model server');
      socket.write('3\r\nabc\r\nzz\r\n');
      const text = await readToCloseWithin(socket, 20_000);
      assert.deepEqual(answerStatuses(text), [200, 400], text);
      assert.match(text, /malformed chunk-size line/);
      const lines = () => local.logs.lines.filter((l) => l.event === 'access').map((l) => [l.method, l.path, l.status, l.error]);
      await eventually(() => lines().length === 2, 'both access lines');
      assert.deepEqual(lines(), [['GET', '/v2/health/live', 200, undefined], ['POST', '/echo-body', 400, 'bad_request_body']]);
      // Its answer, read after the relay ended the connection, is no failure of the model server's.
      assert.deepEqual(local.logs.lines.filter((l) => l.event === 'upstream_error'), []);
    });
  });
});

/**
 * The other direction: a model server that sends a body where its answer can have none (RFC 9112 6.3).
 * The relay, as llhttp in a client, ends that answer at its head, so the stray bytes are read as the
 * next answer, a malformed one: the request behind gets a 502, never those bytes as its answer.
 */
const BODY_WHERE_NONE_GOES: readonly [string, string][] = [
  ['GET', 'HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\nhello'],
  ['GET', 'HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\nhello'],
  ['HEAD', 'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n'],
];

describe('answers without a body from a model server that sends one anyway', () => {
  for (const [method, answer] of BODY_WHERE_NONE_GOES) {
    test(`--mtls_rest_mode relay: ${JSON.stringify(answer.slice(0, answer.indexOf('\r')))} to a ${method}: passed on without the stray bytes; the request behind it gets 502`, { timeout: 30_000 }, () =>
      behindProxy({ pki, restMode: 'relay', answer: (socket) => socket.write(answer + 'HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond') }, async (local) => {
        const socket = await openRaw(local.restPort, pki);
        socket.write(`${method} /v2/a HTTP/1.1\r\nhost: a\r\n\r\nGET /v2/b HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n`);
        const text = await readToCloseWithin(socket, 20_000);
        assert.deepEqual(answerStatuses(text), [Number(answer.slice(9, 12)), 502], text);
        assert.equal(text.slice(0, text.indexOf('\r\n\r\n') + 4), answer.slice(0, answer.indexOf('\r\n\r\n') + 4));
        assert.match(text, /malformed status line from the upstream/);
        assert.doesNotMatch(text, /hello|second/);
      }));
  }
});

/**
 * Answers with malformed framing values, which the relay passed on. llhttp, in Node's HTTP client (so
 * most clients) and in undici (terminate mode), refuses a tab within or after a Content-Length, and
 * reads `chunked\t` as another coding, its body running until the connection closes: where the relay
 * read a chunked body, its client would have read the rest of the connection as this answer. It refuses
 * a malformed Content-Length, or one beside a Transfer-Encoding, on an answer without a body too
 * (HEAD, 204, 304).
 * Each row: the request's method, the answer, and the modes that refuse it (terminate mode's undici
 * reads `chunked\t` until close).
 */
const MALFORMED_ANSWER_FRAMING: readonly [string, string, readonly ForwardMode[]][] = [
  ['GET', 'HTTP/1.1 200 OK\r\ncontent-length: 2\t\r\n\r\nok', FORWARD_MODES],
  ['GET', 'HTTP/1.1 200 OK\r\ncontent-length: 2,\t2\r\n\r\nok', FORWARD_MODES],
  ['GET', 'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\t\r\n\r\n2\r\nok\r\n0\r\n\r\n', ['relay']],
  ['HEAD', 'HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\n', FORWARD_MODES],
  ['GET', 'HTTP/1.1 204 No Content\r\ncontent-length: 2\t\r\n\r\n', FORWARD_MODES],
  ['GET', 'HTTP/1.1 304 Not Modified\r\ncontent-length: x\r\n\r\n', FORWARD_MODES],
  ['HEAD', 'HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n', FORWARD_MODES],
  ['GET', 'HTTP/1.1 204 No Content\r\ntransfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n', FORWARD_MODES],
];

describe('answers with malformed framing values', () => {
  for (const [method, answer, restModes] of MALFORMED_ANSWER_FRAMING) {
    const [statusLine, field] = answer.split('\r\n');
    for (const restMode of restModes) {
      test(`--mtls_rest_mode ${restMode}: ${method} answered ${JSON.stringify(`${statusLine!.slice(9)}, ${field}`)}: 502, nothing of that answer reaches the client; the access line says it was a bad response`, { timeout: 30_000 }, () =>
        behindProxy({ pki, restMode, answer: (socket) => socket.write(answer) }, async (local) => {
          const socket = await openRaw(local.restPort, pki);
          socket.write(`${method} /v2/a HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n`);
          const text = await readToCloseWithin(socket, 20_000);
          assert.deepEqual(answerStatuses(text), [502], text);
          assert.doesNotMatch(text, /\r\n\r\nok|\r\nok\r\n/);
          // An answer to HEAD has no body to name it in.
          if (restMode === 'relay' && method !== 'HEAD') assert.match(text, /tab within or after a Content-Length or Transfer-Encoding value|invalid Content-Length|both Content-Length and Transfer-Encoding/);
          const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/a');
          // Each mode's code for a malformed answer (README, Logs).
          assert.deepEqual([line.status, line.error], [502, restMode === 'relay' ? 'bad_response' : 'UPSTREAM_BAD_RESPONSE']);
        }));
    }
  }
});
