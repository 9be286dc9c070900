/**
 * The two REST modes held to each other: the same generated exchange goes from an HTTP/1.1 client
 * with a client certificate through a terminate-mode proxy (Node's server, undici upstream) and
 * through a relay-mode proxy (heads parsed, bodies relayed as they are) to the same recording model
 * server. What the model server got, what the client got and the access lines must be the same in
 * both, up to what the README lists as where the modes knowingly differ (REST relay): the
 * connection-level fields and the body's framing the relay passes on as sent, names the relay does
 * not lower-case, `100 Continue` to an empty body expected to come, a `103 Early Hints` only the
 * relay passes on. Node's HTTPS client sends one exchange per connection; raw-socket clients send
 * what Node's would not: odd casing, obs-text, chunk extensions and trailer fields, 2 or 3 requests
 * pipelined, HTTP/1.0, and requests both modes refuse.
 *
 * REST_MODES_RUNS=N runs each property N times (default 60, for CI); REST_MODES_SEED and
 * REST_MODES_PATH replay what a failure reported.
 */
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import fc from 'fast-check';
import { NOOP_OBSERVER, type AccessRecord } from '../src/observer.js';
import { FORWARD_MODES, type ForwardMode } from '../src/config.js';
import { restModeFrontsOf, startTestProxy, type StartedProxy } from './helpers/harness.js';
import { assertSameBytes } from './helpers/integrity-peers.js';
import { eventually, settlesWithin } from './helpers/ops.js';
import { pick } from './helpers/http1-streams.js';
import { chunked } from './helpers/chunks.js';
import { openRaw, parseResponses, readToCloseWithin, type ParsedResponse } from './helpers/raw-http1.js';
import {
  EXCHANGE_ID, HOP_BY_HOP, answerArb, endToEnd, exchangeArb, fieldMap, rawRequestArb, rawRequestBytes, recordingModelServer, requestLines, sendHttp1, shown,
  type AnswerSpec, type Answered, type ClientRequestSpec, type Exchange, type FieldMap, type Lines, type RawRequestSpec, type Received,
} from './helpers/exchange-fidelity.js';

/** Runs per property: REST_MODES_RUNS, or 60, which keeps the file under 20 s here (about 8). */
const RUNS = Number(process.env['REST_MODES_RUNS']) || 60;
/** A run that has not ended by HANG_MS is a request that never came or an answer that never ended: it fails, naming which. */
const HANG_MS = 20_000;
const PROPERTY_MS = Math.max(240_000, RUNS * 4_000);
/** REST_MODES_SEED and REST_MODES_PATH replay a failure fast-check reported. */
const replay = process.env['REST_MODES_SEED'] ? { seed: Number(process.env['REST_MODES_SEED']), path: process.env['REST_MODES_PATH'] } : {};
const params = { numRuns: RUNS, includeErrorInReport: true, interruptAfterTimeLimit: PROPERTY_MS - 60_000, ...replay };

interface Front {
  readonly proxy: StartedProxy;
  readonly records: AccessRecord[];
}

/** Each mode's access lines, in the order they were logged. */
const records = new Map<ForwardMode, AccessRecord[]>(FORWARD_MODES.map((mode) => [mode, []]));
const both = restModeFrontsOf(recordingModelServer, (model) => model.port, (restMode) => ({
  observer: { ...NOOP_OBSERVER, request: (record) => records.get(restMode)!.push(record) },
}));
const frontOf = (mode: ForwardMode): Front => ({ proxy: both.front(mode), records: records.get(mode)! });
let nextId = 0;

/** What one request came to in one mode. */
interface Seen {
  /** What reached the model server; undefined when nothing did. */
  readonly received: Received | undefined;
  readonly answered: Answered | ParsedResponse | undefined;
  readonly record: AccessRecord | undefined;
}

/** The access lines `front` logs from `from` on, once there are `count` of them. */
async function recordsFrom(front: Front, from: number, count: number, mode: ForwardMode): Promise<AccessRecord[]> {
  await eventually(() => front.records.length >= from + count, `${count} access lines in ${mode} mode`).catch((err: Error) => {
    throw new Error(`${err.message}; got ${JSON.stringify(front.records.slice(from).map(accessLine))}`);
  });
  return front.records.slice(from, from + count);
}

// ---------------------------------------------------------------------------------------------
// What the README lets differ.
// ---------------------------------------------------------------------------------------------

/** Fields the relay passes on as the client sent them and terminate mode does not: connection-level ones and the body's framing (README, REST relay). */
function connectionLevel(fields: FieldMap): FieldMap {
  const listed = new Set((fields.get('connection') ?? []).flatMap((v) => v.split(',')).map((v) => v.trim().toLowerCase()));
  return new Map([...fields].filter(([name]) => HOP_BY_HOP.has(name) || listed.has(name) || name === 'content-length'));
}

/** Fields neither mode passes on: the relay answers Expect itself and never switches protocols (README). */
const RELAY_DROPS = new Set(['expect', 'upgrade', 'http2-settings']);

/** What the relay should pass on of the connection-level and framing fields `sent`. */
function relayPasses(sent: Lines): FieldMap {
  return new Map([...connectionLevel(fieldMap(sent))].filter(([name]) => !RELAY_DROPS.has(name)));
}

/** The fields both modes must agree on at the model server: the end-to-end ones (names lower-cased: README), the exchange id aside. */
function endToEndReceived(received: Received): FieldMap {
  const fields = endToEnd(fieldMap(received.rawHeaders));
  fields.delete('content-length');
  fields.delete(EXCHANGE_ID);
  return fields;
}

/**
 * The interim answers a client gets (README, REST relay): `100 Continue` to an HTTP/1.1 request
 * expecting it, from the relay only when a body is to come (not Content-Length 0); a `103 Early
 * Hints` from the relay alone, to HTTP/1.1 clients.
 */
function documentedInterim(mode: ForwardMode, request: ClientRequestSpec, answer: AnswerSpec, http10: boolean): number[] {
  if (http10) return [];
  const bodyToCome = request.framing === 'unframed' || (request.framing === 'length' && request.body.length > 0);
  const continued = request.expectContinue && (mode === 'terminate' || bodyToCome) ? [100] : [];
  return [...continued, ...(mode === 'relay' && answer.earlyHints ? [103] : [])];
}

/** `request` and its `answer` as each mode saw them, the same but for what the README lists. */
function assertModesAgree(request: ClientRequestSpec, answer: AnswerSpec, http10: boolean, seen: Record<ForwardMode, Seen>): void {
  const { terminate, relay } = seen;
  assert.equal(relay.received === undefined, terminate.received === undefined, 'whether the request reached the model server');
  if (terminate.received && relay.received) {
    assert.equal(`${relay.received.method} ${relay.received.url}`, `${terminate.received.method} ${terminate.received.url}`, 'the request line at the model server');
    assert.deepEqual(shown(endToEndReceived(relay.received)), shown(endToEndReceived(terminate.received)), 'the end-to-end fields at the model server');
    assertSameBytes(relay.received.body, terminate.received.body, 'the body at the model server');
    assert.deepEqual([relay.received.rawTrailers, terminate.received.rawTrailers], [[], []], 'trailer fields at the model server');
  }
  assert.equal(relay.answered === undefined, terminate.answered === undefined, 'whether the client got an answer');
  if (terminate.answered && relay.answered) {
    assert.equal(relay.answered.status, terminate.answered.status, 'the status');
    for (const mode of FORWARD_MODES) assert.deepEqual(seen[mode].answered!.interim, documentedInterim(mode, request, answer, http10), `the interim answers in ${mode} mode`);
    assert.deepEqual(shown(endToEnd(fieldMap(relay.answered.rawHeaders))), shown(endToEnd(fieldMap(terminate.answered.rawHeaders))), 'the end-to-end fields the client got');
    assertSameBytes(relay.answered.body, terminate.answered.body, 'the body the client got');
    assert.deepEqual(relay.answered.rawTrailers, terminate.answered.rawTrailers, 'the trailer fields the client got');
  }
  assert.deepEqual(accessLine(relay.record), accessLine(terminate.record), 'the access line');
}

const accessLine = (record: AccessRecord | undefined) => record && { method: record.method, path: record.path, status: record.status, error: record.error };

// ---------------------------------------------------------------------------------------------
// Node's HTTPS client: one exchange per connection.
// ---------------------------------------------------------------------------------------------

async function viaNodeClient(mode: ForwardMode, { request, answer }: Exchange): Promise<Seen> {
  const front = frontOf(mode);
  const id = `${mode}-${nextId++}`;
  const from = front.records.length;
  const received = both.upstream.expect(id, answer);
  const answered = await sendHttp1(front.proxy.restPort, both.pki, request, id);
  return { received: await received, answered, record: (await recordsFrom(front, from, 1, mode))[0] };
}

/** Sends each of `arb`'s values through terminate mode, then relay mode, and `check`s what each came to. */
function holdModesTogether<T, S>(arb: fc.Arbitrary<T>, via: (mode: ForwardMode, value: T) => Promise<S>, check: (value: T, terminate: S, relay: S) => void): Promise<void> {
  return fc.assert(
    fc.asyncProperty(arb, async (value) => {
      const terminate = await via('terminate', value);
      check(value, terminate, await via('relay', value));
    }),
    params,
  );
}

describe('the two REST modes agree on what Node\'s HTTPS client sends', () => {
  test('the model server gets the same request, the client the same answer, the access lines say the same', { timeout: PROPERTY_MS }, () =>
    holdModesTogether(exchangeArb, viaNodeClient, ({ request, answer }, terminate, relay) => assertModesAgree(request, answer, false, { terminate, relay })));
});

// ---------------------------------------------------------------------------------------------
// Raw-socket clients: pipelined requests, bytes Node's client never sends, refusals.
// ---------------------------------------------------------------------------------------------

/**
 * Requests both modes refuse, the last of a connection (README: after a refusal terminate mode
 * answers requests pipelined behind, the relay closes). Each says `Connection: close` where its
 * head is whole, so terminate mode closes after its answer too.
 */
const REFUSALS: readonly string[] = [
  'GET /v2/health/live HTTP/1.1\r\nconnection: close\r\n\r\n',
  'GET /v2/health/live HTTP/1.1\r\nhost: a\r\nHost: b\r\nconnection: close\r\n\r\n',
  'FOO /v2/health/live HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n',
  'get /v2/health/live HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n',
  'POST /v2/models/m/infer HTTP/1.1\r\nhost: a\r\nexpect: something-else\r\ncontent-length: 2\r\nconnection: close\r\n\r\nab',
  'POST /v2/models/m/infer HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n0\r\n\r\n',
  'POST /v2/models/m/infer HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\nconnection: close\r\n\r\n0\r\n\r\n',
  'POST /v2/models/m/infer HTTP/1.1\r\nhost: a\r\ncontent-length: 2, 2\r\nconnection: close\r\n\r\nab',
  'POST /v2/models/m/infer HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\ncontent-length: 3\r\nconnection: close\r\n\r\nab',
  'POST /v2/models/m/infer HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked, chunked\r\nconnection: close\r\n\r\n0\r\n\r\n',
  'POST /v2/models/m/infer HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\nzz\r\nab\r\n0\r\n\r\n',
  'POST /v2/models/m/infer HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n2 ;a\r\nab\r\n0\r\n\r\n',
  'GET /v2/health/live#frag HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n',
  'OPTIONS * HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n',
  'GET /v2/health/live HTTP/1.1\r\nhost: user@a\r\nconnection: close\r\n\r\n',
  'GET /v2/health/live HTTP/1.1\r\nhost: a\r\nx-folded: a\r\n b\r\nconnection: close\r\n\r\n',
  'GET /v2/health/live HTTP/1.1\r\nhost: a\r\nx-ctl: a\x01b\r\nconnection: close\r\n\r\n',
  'GET /v2/health/live HTTP/1.1\r\nhost: a\r\nx-space : a\r\nconnection: close\r\n\r\n',
  'GET /v2/health/live HTTP/1.1\nhost: a\nconnection: close\n\n',
  'GET /v2/\x80 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n',
  `GET /v2/health/live HTTP/1.1\r\nhost: a\r\nx-big: ${'v'.repeat(70_000)}\r\nconnection: close\r\n\r\n`,
];

/** A connection's requests: all but the last answered by the model server without a close; the last one ending the connection, or refused. */
interface RawStream {
  readonly requests: readonly { readonly raw: RawRequestSpec; readonly answer: AnswerSpec }[];
  /** A request both modes refuse, after the others. */
  readonly refusal: string | undefined;
  /** Where the stream is cut into writes. */
  readonly writes: readonly number[];
}

/** An answer that does not end the connection: one whose body runs until close would leave the requests behind it unanswered in relay mode (README). */
const keepsConnection = answerArb.map((answer): AnswerSpec => (answer.framing === 'close' ? { ...answer, framing: 'length' } : answer));
/** Request lines without a `Connection: close`, which would end the connection before the requests behind it (in both modes). */
const stayingOpen = (raw: RawRequestSpec): RawRequestSpec => ({ ...raw, request: { ...raw.request, lines: raw.request.lines.filter(([name, value]) => !(name.toLowerCase() === 'connection' && /close/i.test(value))) } });

const rawStreamArb: fc.Arbitrary<RawStream> = fc
  .tuple(
    fc.array(fc.record({ raw: rawRequestArb(false).map(stayingOpen), answer: keepsConnection }), { maxLength: 2 }),
    fc.oneof(
      { weight: 3, arbitrary: fc.record({ raw: rawRequestArb(false), answer: answerArb }) },
      { weight: 1, arbitrary: fc.record({ raw: rawRequestArb(true), answer: answerArb }) },
      { weight: 1, arbitrary: pick(...REFUSALS) },
    ),
    fc.array(fc.nat(), { maxLength: 4 }),
  )
  .map(([before, last, writes]) => (typeof last === 'string' ? { requests: before, refusal: last, writes } : { requests: [...before, last], refusal: undefined, writes }));

/** The stream's `i`th request is its last, which ends the connection: no refusal follows it. */
const endsConnection = (stream: RawStream, i: number): boolean => i === stream.requests.length - 1 && stream.refusal === undefined;

/** The stream through the proxy in `mode` on one connection: what each request came to, and the refusal's answer. */
/** What a raw client's connection came to in one mode; `text`: everything it read. */
interface RawSeen {
  readonly seen: Seen[];
  readonly refused: Seen | undefined;
  readonly rest: string;
  readonly text: string;
}

async function viaRawClient(mode: ForwardMode, stream: RawStream): Promise<RawSeen> {
  const front = frontOf(mode);
  const ids = stream.requests.map(() => `${mode}-${nextId++}`);
  const received = stream.requests.map(({ answer }, i) => both.upstream.expect(ids[i]!, answer));
  const bytes = Buffer.concat([...stream.requests.map(({ raw }, i) => rawRequestBytes(raw, ids[i]!, endsConnection(stream, i))), Buffer.from(stream.refusal ?? '', 'latin1')]);
  const from = front.records.length;
  const socket = await openRaw(front.proxy.restPort, both.pki);
  for (const piece of chunked(bytes, [...stream.writes])) socket.write(piece);
  const text = await readToCloseWithin(socket, HANG_MS);
  const methods = [...stream.requests.map(({ raw }) => raw.request.method), ...(stream.refusal === undefined ? [] : [stream.refusal.slice(0, stream.refusal.indexOf(' '))])];
  const { responses, rest } = parseResponses(Buffer.from(text, 'latin1'), methods);
  const records = await recordsFrom(front, from, methods.length, mode).catch((err: Error) => { throw new Error(`${err.message}; read ${JSON.stringify(text.slice(0, 2000))}`); });
  const seen = await Promise.all(stream.requests.map(async (_, i) => ({ received: await settlesWithin(received[i]!, HANG_MS, `request ${i} to reach the model server (${mode} mode)`), answered: responses[i], record: records[i] })));
  const refused = stream.refusal === undefined ? undefined : { received: undefined, answered: responses.at(-1), record: records.at(-1) };
  return { seen, refused, rest: rest.toString('latin1'), text };
}

describe('the two REST modes agree on what raw-socket clients send', () => {
  test('pipelined requests with odd casing, obs-text, chunk extensions, trailer fields, HTTP/1.0 last, or a refusal last: the same at the model server, to the client and in the access lines', { timeout: PROPERTY_MS }, () =>
    holdModesTogether(rawStreamArb, viaRawClient, (stream, terminate, relay) => {
      try {
        assertRawAgree(stream, terminate, relay);
      } catch (err) {
        // What each client read, for a failure that a replay may not show again (timing).
        const read = (seen: RawSeen) => JSON.stringify(seen.text.replace(/(.)\1{40,}/g, '$1...').slice(0, 3000));
        throw new Error(`${(err as Error).message}\nterminate mode's client read ${read(terminate)}\nrelay mode's client read ${read(relay)}`, { cause: err });
      }
    }));
});

/** README (REST relay): the relay passes the connection-level fields and the body's framing on as the client sent them. */
function assertRelayPassesConnectionLevel(raw: RawRequestSpec, received: Received, last: boolean): void {
  const sent = [...requestLines(raw.request, '', false), ...(last && raw.version === '1.1' ? [['Connection', 'close'] as const] : [])];
  assert.deepEqual(shown(connectionLevel(fieldMap(received.rawHeaders))), shown(relayPasses(sent)), 'the connection-level and framing fields the relay passed on');
}

/** What both modes' refusals share: a content type and one line, or a JSON object for a target or authority not forwarded. */
function refusalShape(answered: ParsedResponse | undefined): string | undefined {
  if (!answered) return undefined;
  const type = fieldMap(answered.rawHeaders).get('content-type')?.join() ?? '';
  const text = answered.body.toString('latin1');
  return `${type}: ${type.startsWith('application/json') ? Object.keys(JSON.parse(text) as object).join() : `${text.split('\n').length - 1} line(s)`}`;
}

// ---------------------------------------------------------------------------------------------
// Found by the properties above, shrunk.
// ---------------------------------------------------------------------------------------------

describe('found by comparing the modes', () => {
  /**
   * Terminate mode answered a request it refused, pipelined behind a forwarded one, after that
   * one's answer, as it should, but logged it first: a refusal of its own (no Host) when Node
   * parsed it, one of Node's parser (`chunked, chunked`) in the same 'close' event of the answer
   * before it, ahead of that answer's own line. The relay logs them in turn.
   */
  const REFUSED_BEHIND: readonly [string, string][] = [
    ['no Host (our refusal)', 'GET /v2/health/ready HTTP/1.1\r\nconnection: close\r\n\r\n'],
    ['chunked applied twice (Node\'s parser)', 'POST /v2/models/m/infer HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked, chunked\r\nconnection: close\r\n\r\n0\r\n\r\n'],
  ];
  for (const mode of FORWARD_MODES) {
    for (const [what, refused] of REFUSED_BEHIND) {
      test(`--mtls_rest_mode ${mode}: ${what}, pipelined behind a request forwarded: the access lines in the order the requests came`, { timeout: 30_000 }, async () => {
        const front = frontOf(mode);
        const id = `${mode}-${nextId++}`;
        const received = both.upstream.expect(id, { status: 200, lines: [], body: Buffer.from('ok'), framing: 'length', trailers: [], earlyHints: false });
        const from = front.records.length;
        const socket = await openRaw(front.proxy.restPort, both.pki);
        socket.write(`GET /v2/health/live HTTP/1.1\r\nhost: a\r\n${EXCHANGE_ID}: ${id}\r\n\r\n${refused}`);
        const { responses } = parseResponses(Buffer.from(await readToCloseWithin(socket, HANG_MS), 'latin1'), ['GET', 'POST']);
        await received;
        assert.deepEqual(responses.map((r) => r.status), [200, 400]);
        const records = await recordsFrom(front, from, 2, mode);
        assert.deepEqual(records.map((r) => [r.status, r.error]), [[200, undefined], [400, 'bad_request']]);
      });
    }
  }
});

/**
 * Terminate mode, on a request with `Expect: 100-continue` pipelined behind an answer still going
 * out: Node's server wrote the `100 Continue` at once, held back with the queued response, and
 * Node 20 then put the final answer's head in front of it (OutgoingMessage _send unshifts a head
 * that waits for a Buffer body), so the client read `HTTP/1.1 200 OK ... content-length: 6`, then
 * `HTTP/1.1 100 Continue` as the body and the real body as the next response. Here the first
 * answer is 4 MB to a client that reads nothing until the second answer has reached the proxy (the
 * model server's connection for it closed, in terminate mode; its request at the model server, in
 * relay mode, which answers in turn on one connection).
 */
describe('Expect: 100-continue on a request pipelined behind an answer still going out', () => {
  for (const mode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${mode}: the first answer, then 100 Continue, then the second answer whole`, { timeout: 60_000 }, async () => {
      const { createServer } = await import('node:http');
      const first = Buffer.alloc(4 * 1024 * 1024, 0x66);
      const seen = { second: false, secondClosed: false };
      const model = createServer((req, res) => {
        req.resume();
        if (req.url === '/second') {
          seen.second = true;
          req.socket.once('close', () => (seen.secondClosed = true));
          req.on('end', () => res.writeHead(200, { 'content-length': '6', connection: 'close' }).end(Buffer.from('second')));
        } else {
          res.writeHead(200, { 'content-length': String(first.length) }).end(first);
        }
      });
      model.listen(0, '127.0.0.1');
      await once(model, 'listening');
      const local = await startTestProxy({ pki: both.pki, upstream: { restPort: (model.address() as AddressInfo).port }, restMode: mode });
      try {
        const socket = await openRaw(local.restPort, both.pki);
        socket.pause();
        socket.write('GET /first HTTP/1.1\r\nhost: a\r\n\r\nPOST /second HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\ncontent-length: 1\r\nconnection: close\r\n\r\nx');
        await eventually(() => (mode === 'terminate' ? seen.secondClosed : seen.second), 'the second answer at the proxy');
        const read = readToCloseWithin(socket, HANG_MS);
        socket.resume();
        const text = await read;
        const { responses, rest } = parseResponses(Buffer.from(text, 'latin1'), ['GET', 'POST']);
        assert.deepEqual(responses.map((r) => [r.interim, r.status, r.body.length]), [[[], 200, first.length], [[100], 200, 6]], JSON.stringify(text.slice(first.length, first.length + 400)));
        assert.equal(responses[1]!.body.toString(), 'second');
        assert.equal(rest.length, 0);
      } finally {
        await local.proxy.shutdown(1000);
        model.closeAllConnections();
        model.close();
      }
    });
  }
});

/**
 * A request head over --mtls_max_header_size (64 KiB) that came in two writes: terminate mode had
 * its 431 on the way (end()) when Node's parser reported the next read too, and that second report
 * destroyed the connection under the answer: the client read nothing. The relay answers 431.
 */
describe('a request head too large, written in two parts', () => {
  const head = Buffer.from(`GET /v2/health/live HTTP/1.1\r\nhost: a\r\nx-big: ${'v'.repeat(70_000)}\r\nconnection: close\r\n\r\n`, 'latin1');
  for (const mode of FORWARD_MODES) {
    for (const cut of [21, 1000, 65_600, 69_000]) {
      test(`--mtls_rest_mode ${mode}: cut after ${cut} bytes: 431, and its access line`, { timeout: 30_000 }, async () => {
        const front = frontOf(mode);
        const from = front.records.length;
        const socket = await openRaw(front.proxy.restPort, both.pki);
        socket.write(head.subarray(0, cut));
        socket.write(head.subarray(cut));
        const { responses } = parseResponses(Buffer.from(await readToCloseWithin(socket, HANG_MS), 'latin1'), ['GET']);
        assert.deepEqual(responses.map((r) => r.status), [431]);
        assert.deepEqual((await recordsFrom(front, from, 1, mode)).map((r) => [r.status, r.error]), [[431, 'bad_request']]);
      });
    }
  }
});

/** The stream as each mode handled it, the same but for what the README lists. */
function assertRawAgree(stream: RawStream, terminate: RawSeen, relay: RawSeen): void {
  // Every request is answered, in both modes: none follows an answer that ends the connection.
  assert.deepEqual([terminate, relay].map(({ seen }) => seen.filter(({ answered }) => answered !== undefined).length), [stream.requests.length, stream.requests.length], 'requests answered');
  for (const [i, { raw, answer }] of stream.requests.entries()) {
    const http10 = raw.version === '1.0';
    assertModesAgree(raw.request, answer, http10, { terminate: terminate.seen[i]!, relay: relay.seen[i]! });
    assertRelayPassesConnectionLevel(raw, relay.seen[i]!.received!, endsConnection(stream, i));
  }
  if (stream.refusal !== undefined) {
    assert.equal(relay.refused!.answered?.status, terminate.refused!.answered?.status, 'the refusal\'s status');
    // One line saying why, in both modes (README, REST errors), each in its own words: terminate mode's are llhttp's.
    assert.deepEqual([relay, terminate].map(({ refused }) => refusalShape(refused!.answered)), [refusalShape(terminate.refused!.answered), refusalShape(terminate.refused!.answered)], 'the refusal\'s content type and lines');
    // README (Logs): a request refused before its head was read has an empty method and path in terminate mode.
    const headUnread = terminate.refused!.record?.method === '';
    const line = (record: AccessRecord | undefined) => ({ ...accessLine(record), ...(headUnread ? { method: '', path: '' } : {}) });
    assert.deepEqual(line(relay.refused!.record), line(terminate.refused!.record), 'the refusal\'s access line');
  }
  assert.deepEqual([relay.rest, terminate.rest], ['', ''], 'bytes after the answers');
}
