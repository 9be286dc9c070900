/**
 * How many header fields pass, in both REST modes: --mtls_max_header_size (bytes) is the
 * one limit, whatever the count. The model server here is raw TCP, so no HTTP library in
 * front of it counts or drops fields: it reports how many `x-f-` fields a request had,
 * and answers with as many `x-r-` fields as the request's `?fields=` asks for, each value
 * `?size=` bytes long (1 unless given).
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { connect as connectH2, constants as h2Constants, type ClientHttp2Session } from 'node:http2';
import * as grpc from '@grpc/grpc-js';
import { grpcClients, grpcFrame, h2Request, startTestProxy, startUpstream, tlsClientOptions, type ProxySetup, type StartedProxy, type LogLine } from './helpers/harness.js';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { openRaw, readToClose } from './helpers/raw-http1.js';
import { setTimeout as sleep } from 'node:timers/promises';
import { END_HEADERS, END_STREAM, H2, answerPings, grpcHeaderBlock, h2Frame, headerFrames, literalField, rawH2Client, streamFrames } from './helpers/raw-h2.js';
import { eventually, sample } from './helpers/ops.js';
import { headReadingUpstream } from './helpers/scripted-upstream.js';
import { FORWARD_MODES, type ForwardMode } from '../src/config.js';
import { ProxyMetrics } from '../src/metrics.js';
import { unary } from '../src/demo/grpc-client.js';
import type { ModelServer } from '../src/demo/model-server.js';

/** What the upstream saw of each request: its count of `x-f-` fields. */
interface FieldCountingUpstream {
  readonly port: number;
  readonly counts: number[];
  close(): void;
}

async function fieldCountingUpstream(): Promise<FieldCountingUpstream> {
  const counts: number[] = [];
  const upstream = await headReadingUpstream((socket, lines) => {
    counts.push(lines.filter((l) => l.startsWith('x-f-')).length);
    const wanted = Number(/[?&]fields=(\d+)/.exec(lines[0]!)?.[1] ?? 0);
    const size = Number(/[?&]size=(\d+)/.exec(lines[0]!)?.[1] ?? 1);
    // One answer per connection: the relay passes the client's `connection: close` on and waits for the model server to close.
    socket.end(`HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n${numberedFields('x-r-', wanted, size)}\r\nok`);
  });
  return { port: upstream.port, counts, close: upstream.close };
}

/** `count` lines `<prefix>N: 111...` (`size` digits), each with its CRLF. */
function numberedFields(prefix: string, count: number, size = 1): string {
  const value = '1'.repeat(size);
  let text = '';
  for (let i = 0; i < count; i++) text += `${prefix}${i}: ${value}\r\n`;
  return text;
}

const DEFAULT_LIMIT = 65_536;

/** A request head of `bytes` bytes as sent, CRLFs included, with `fields` fields `x-f-N: 1` and one more to pad it. */
function headOfSize(bytes: number, fields: number): string {
  const start = `GET /v2/health/live HTTP/1.1\r\nhost: a\r\nconnection: close\r\n${numberedFields('x-f-', fields)}`;
  const padding = bytes - start.length - 'x-pad: \r\n\r\n'.length;
  assert.ok(padding >= 0, `a head of ${fields} fields is already over ${bytes} bytes`);
  return `${start}x-pad: ${'a'.repeat(padding)}\r\n\r\n`;
}

/** The fields of a response head named `<prefix>N`. */
function countFields(text: string, prefix: string): number {
  const head = text.slice(0, text.indexOf('\r\n\r\n'));
  return head.split('\r\n').filter((l) => l.startsWith(prefix)).length;
}

/** A proxy in each REST mode, each with a metrics registry of its own. */
async function startMeteredFronts(fronts: Map<ForwardMode, StartedProxy>, metrics: Map<ForwardMode, ProxyMetrics>, setup: Omit<ProxySetup, 'restMode' | 'observer'>): Promise<void> {
  for (const restMode of FORWARD_MODES) {
    const observer = new ProxyMetrics({ processMetrics: false });
    metrics.set(restMode, observer);
    fronts.set(restMode, await startTestProxy({ ...setup, restMode, observer }));
  }
}

describe('header fields within --mtls_max_header_size all pass, however many, both REST modes', () => {
  let pki: TestPki;
  let upstream: FieldCountingUpstream;
  const fronts = new Map<ForwardMode, StartedProxy>();
  const metrics = new Map<ForwardMode, ProxyMetrics>();

  before(async () => {
    pki = await createTestPki();
    upstream = await fieldCountingUpstream();
    await startMeteredFronts(fronts, metrics, { pki, upstream: { restPort: upstream.port } });
  });
  after(async () => {
    for (const front of fronts.values()) await front.proxy.shutdown(1000);
    upstream.close();
    await pki.cleanup();
  });

  /** One request on its own connection: the answer's text and its access line. */
  async function exchange(restMode: ForwardMode, head: string): Promise<{ text: string; line: LogLine }> {
    const front = fronts.get(restMode)!;
    const from = front.logs.lines.length;
    const socket = await openRaw(front.restPort, pki);
    socket.write(head);
    const text = await readToClose(socket);
    const accessLines = () => front.logs.lines.slice(from).filter((l) => l.event === 'access');
    await eventually(() => accessLines().length >= 1, 'an access line');
    return { text, line: accessLines()[0]! };
  }

  for (const restMode of FORWARD_MODES) {
    // Fields `x-r-N: 1`: undici counts names and values only (~55 KB, within the limit); nghttp2 sends a block up to twice
    // the limit by its bound, 12 bytes more a field: 6289 of them (with :status, content-length and date) come to 131070 bytes, 6290 to 131091.
    test(`--mtls_rest_mode ${restMode}: a model-server head over twice the limit as HTTP/2 counts it is a 502 naming the option to an HTTP/2 client, whose connection goes on`, { timeout: 20_000 }, async () => {
      const front = fronts.get(restMode)!;
      const from = front.logs.lines.length;
      // A client that takes any head, so that only the proxy's limit is met.
      const session = connectH2(`https://localhost:${front.restPort}`, { ...tlsClientOptions(pki), maxHeaderListPairs: 100_000, settings: { maxHeaderListSize: 16 * 1024 * 1024 } });
      session.on('error', () => {});
      try {
        const over = await h2Request(session, { ':method': 'GET', ':path': '/v2/health/live?fields=6290' });
        assert.equal(over.headers[':status'], 502);
        assert.match(String(over.body), /larger than the 131072 bytes this proxy sends to an HTTP\/2 client \(twice --mtls_max_header_size/);
        const within = await h2Request(session, { ':method': 'GET', ':path': '/v2/health/live?fields=6289' });
        assert.equal(within.headers[':status'], 200);
        assert.equal(Object.keys(within.headers).filter((name) => name.startsWith('x-r-')).length, 6289);
      } finally {
        session.close();
      }
      const accessLines = () => front.logs.lines.slice(from).filter((l) => l.event === 'access');
      await eventually(() => accessLines().length === 2, 'two access lines');
      assert.deepEqual(accessLines().map((l) => [l.status, l.error]), [[502, 'bad_response'], [200, undefined]]);
      const text = await metrics.get(restMode)!.registry.metrics();
      assert.equal(sample(text, 'ovms_mtls_upstream_errors_total', { listener: 'rest', code: 'bad_response' }), 1);
    });

    // ~30 KB: past Node's default count (1000 fields), well within the 64 KiB default.
    test(`--mtls_rest_mode ${restMode}: a request with 2500 fields reaches the model server with all 2500`, { timeout: 20_000 }, async () => {
      const seen = upstream.counts.length;
      const { text, line } = await exchange(restMode, `GET /v2/health/live HTTP/1.1\r\nhost: a\r\nconnection: close\r\n${numberedFields('x-f-', 2500)}\r\n`);
      assert.match(text, /^HTTP\/1\.1 200 /);
      assert.deepEqual(upstream.counts.slice(seen), [2500]);
      assert.equal(line.status, 200);
    });

    // Node's own check counts the target, names and values only: 5000 fields `x-f-N: 1` are ~45 KB to it.
    test(`--mtls_rest_mode ${restMode}: a head of many short fields exactly --mtls_max_header_size bytes long passes; one byte more gets 431 naming the option`, { timeout: 20_000 }, async () => {
      const seen = upstream.counts.length;
      const fits = await exchange(restMode, headOfSize(DEFAULT_LIMIT, 5000));
      assert.match(fits.text, /^HTTP\/1\.1 200 /);
      assert.deepEqual(upstream.counts.slice(seen), [5000]);
      const over = await exchange(restMode, headOfSize(DEFAULT_LIMIT + 1, 5000));
      assert.match(over.text, /^HTTP\/1\.1 431 /);
      assert.match(over.text, /request header section larger than 65536 bytes \(--mtls_max_header_size\)\n$/);
      assert.deepEqual(upstream.counts.slice(seen), [5000]);
      assert.deepEqual({ status: over.line.status, error: over.line.error, method: over.line.method, path: over.line.path }, { status: 431, error: 'bad_request', method: '', path: '' });
    });

    // ~30 KB again: past Node's default for undici's head limit (16 KiB), well within the 64 KiB default.
    test(`--mtls_rest_mode ${restMode}: a response with 2500 fields reaches the client with all 2500`, { timeout: 20_000 }, async () => {
      const { text, line } = await exchange(restMode, 'GET /v2/health/live?fields=2500 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n');
      assert.match(text, /^HTTP\/1\.1 200 /);
      assert.equal(countFields(text, 'x-r-'), 2500);
      assert.equal(line.status, 200);
    });

    test(`--mtls_rest_mode ${restMode}: a response head over the limit becomes a 502 naming --mtls_max_header_size, logged bad_response`, { timeout: 20_000 }, async () => {
      const { text, line } = await exchange(restMode, 'GET /v2/health/live?fields=100&size=1000 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n');
      assert.match(text, /^HTTP\/1\.1 502 /);
      assert.equal(countFields(text, 'x-r-'), 0);
      // Terminate mode sends it chunked, the relay with a length: the JSON is what counts.
      assert.deepEqual(JSON.parse(/\{.*\}/.exec(text)![0]), { error: "the model server's response header section is larger than 65536 bytes (--mtls_max_header_size)" });
      assert.deepEqual({ status: line.status, error: line.error }, { status: 502, error: 'bad_response' });
    });

    // HTTP/2 takes the terminating front in both REST modes.
    test(`--mtls_rest_mode ${restMode}: an HTTP/2 request whose header list is over the limit, reset by Node, is logged and counted`, { timeout: 20_000 }, async () => {
      const front = fronts.get(restMode)!;
      const from = front.logs.lines.length;
      // Node's client refuses to send a header block over 64 KiB unless told otherwise.
      const session = connectH2(`https://localhost:${front.restPort}`, { ...tlsClientOptions(pki), maxSendHeaderBlockLength: 1 << 20 });
      session.on('error', () => {});
      try {
        // Node enforces the limit once the client has acknowledged our SETTINGS: after a first answer it has.
        assert.equal((await h2Request(session, { ':method': 'GET', ':path': '/v2/health/live' })).headers[':status'], 200);
        assert.equal(await resetCode(session, { ':method': 'GET', ':path': '/v2/health/live', 'x-big': 'a'.repeat(70_000) }), h2Constants.NGHTTP2_ENHANCE_YOUR_CALM);
        assert.equal((await h2Request(session, { ':method': 'GET', ':path': '/v2/health/live' })).headers[':status'], 200);
      } finally {
        session.close();
      }
      const line = await warnLine(front, from);
      assert.deepEqual({ level: line.level, listener: line.listener, streams: line.streams }, { level: 'warn', listener: 'rest', streams: 1 });
      assert.match(line.msg, /--mtls_max_header_size/);
      assert.ok(typeof line.subject === 'string' && line.subject !== '');
      const text = await metrics.get(restMode)!.registry.metrics();
      assert.equal(sample(text, 'ovms_mtls_h2_streams_reset_unseen_total', { listener: 'rest' }), 1);
    });

    test(`--mtls_rest_mode ${restMode}: such a request is logged too when the client then drops the connection without a GOAWAY, as curl does`, { timeout: 20_000 }, async () => {
      const front = fronts.get(restMode)!;
      const from = front.logs.lines.length;
      const client = await rawH2Client(front.restPort, pki);
      // Our SETTINGS acknowledged (the client does so as it reads them): Node now holds the stream to the limit.
      await client.waitForFrame(H2.SETTINGS);
      // Fields of 8000 bytes: one field over 64 KiB would be a connection error (COMPRESSION_ERROR), not a reset.
      const fields = [[':method', 'GET'], [':path', '/v2/health/live'], [':scheme', 'https'], [':authority', 'a'], ...Array.from({ length: 10 }, (_, i) => [`x-big-${i}`, 'a'.repeat(8000)])];
      client.socket.write(headerFrames(1, Buffer.concat(fields.map(([name, value]) => literalField(name!, value!)))));
      const reset = await client.waitForFrame(H2.RST_STREAM);
      assert.equal(reset.payload.readUInt32BE(0), h2Constants.NGHTTP2_ENHANCE_YOUR_CALM);
      client.socket.destroy();
      const line = await warnLine(front, from);
      assert.deepEqual({ listener: line.listener, streams: line.streams }, { listener: 'rest', streams: 1 });
    });
  }
});

/** The line that tells of requests Node reset unseen, logged since line `from`. */
async function warnLine(front: StartedProxy, from: number): Promise<LogLine> {
  const find = () => front.logs.lines.slice(from).find((l) => l.event === 'h2_streams_reset_unseen');
  await eventually(() => find() !== undefined, 'a h2_streams_reset_unseen line', 5000);
  return find()!;
}

/** The RST_STREAM code a request got instead of an answer. */
function resetCode(session: ClientHttp2Session, headers: Record<string, string>): Promise<number> {
  return new Promise((resolve, reject) => {
    const stream = session.request(headers);
    stream.on('response', (h) => reject(new Error(`answered ${String(h[':status'])}, not reset`)));
    stream.on('error', () => {});
    stream.on('close', () => resolve(stream.rstCode ?? -1));
    stream.resume();
  });
}

describe('gRPC port: a call whose metadata is over --mtls_max_header_size, reset by Node, is logged', () => {
  let pki: TestPki;
  let upstream: ModelServer;
  let front: StartedProxy;

  before(async () => {
    pki = await createTestPki();
    upstream = await startUpstream({ restPort: null });
    front = await startTestProxy({ pki, upstream: { grpcPort: upstream.grpcPort! } });
  });
  after(async () => {
    await front.proxy.shutdown(1000);
    await upstream.close();
    await pki.cleanup();
  });

  test('grpc-js gets RESOURCE_EXHAUSTED, and the operator a warn line naming the option once the client closes', { timeout: 20_000 }, async () => {
    const clients = grpcClients(front.grpcAddress, pki);
    try {
      const md = new grpc.Metadata();
      md.set('x-big', 'a'.repeat(70_000));
      await assert.rejects(unary(clients.echo, 'Unary', { payload: Buffer.from('hi') }, md), (err: grpc.ServiceError) => err.code === grpc.status.RESOURCE_EXHAUSTED);
    } finally {
      clients.close();
    }
    const line = await warnLine(front, 0);
    assert.deepEqual({ level: line.level, listener: line.listener, streams: line.streams }, { level: 'warn', listener: 'grpc', streams: 1 });
    assert.match(line.msg, /--mtls_max_header_size/);
    assert.equal(front.logs.lines.filter((l) => l.event === 'access').length, 0);
  });
});

/**
 * A header name or value over 64 KiB as sent (HPACK, after Huffman coding) is one nghttp2 cannot
 * decode at all: it ends the connection with GOAWAY(COMPRESSION_ERROR), whatever the limits, and
 * stops reading it. Node emits nothing. 'Z' is 8 bits in Huffman code, so 70 000 of them go out as
 * 70 000 bytes (the same count of 'a', 5 bits each, is an ordinary over-the-limit reset).
 * The idle timeout is short so that the sweeps that find such a connection (every second) come quickly,
 * and long enough that the two sweeps it takes come well before the idle close of a connection with no stream open.
 */
describe('a header field over 64 KiB, which ends the HTTP/2 connection, is logged and counted, and the connection closed', () => {
  const UNDECODABLE = 'Z'.repeat(70_000);
  let pki: TestPki;
  let upstream: ModelServer;
  const fronts = new Map<ForwardMode, StartedProxy>();
  const metrics = new Map<ForwardMode, ProxyMetrics>();

  before(async () => {
    pki = await createTestPki();
    upstream = await startUpstream();
    await startMeteredFronts(fronts, metrics, { pki, upstream, limits: { idleTimeoutMs: 4000 } });
  });
  after(async () => {
    for (const front of fronts.values()) await front.proxy.shutdown(1000);
    await upstream.close();
    await pki.cleanup();
  });

  /** The warn line of a connection Node ended, logged since line `from`. */
  async function goAwayLine(front: StartedProxy, from: number): Promise<LogLine> {
    const find = () => front.logs.lines.slice(from).find((l) => l.event === 'h2_streams_reset_unseen' && l.goAway === 'COMPRESSION_ERROR');
    await eventually(() => find() !== undefined, 'a h2_streams_reset_unseen line with goAway');
    return find()!;
  }

  test('gRPC, grpc-js: the call and one in flight on the same connection fail; the operator gets a warn line naming the option, the count, and the held call its access line, which says the proxy closed it', { timeout: 30_000 }, async () => {
    const front = fronts.get('terminate')!;
    const observer = metrics.get('terminate')!;
    const openStreams = async () => sample(await observer.registry.metrics(), 'ovms_mtls_open_streams', { listener: 'grpc' });
    const clients = grpcClients(front.grpcAddress, pki);
    try {
      const held = unary(clients.echo, 'Hold', { payload: Buffer.from('x') });
      held.catch(() => {});
      await eventually(async () => (await openStreams()) === 1, 'the held call in flight');
      const md = new grpc.Metadata();
      md.set('x-big', UNDECODABLE);
      await assert.rejects(unary(clients.echo, 'Unary', { payload: Buffer.from('hi') }, md), (err: grpc.ServiceError) => err.code === grpc.status.INTERNAL);
      await assert.rejects(held, (err: grpc.ServiceError) => err.code === grpc.status.INTERNAL);
    } finally {
      clients.close();
    }
    const line = await goAwayLine(front, 0);
    assert.deepEqual({ level: line.level, listener: line.listener, streams: line.streams }, { level: 'warn', listener: 'grpc', streams: 1 });
    assert.match(line.msg, /larger than 64 KiB[^]*--mtls_max_header_size/);
    assert.ok(typeof line.subject === 'string' && line.subject !== '');
    // Node held the connection and the call to the model server until something ended them.
    await eventually(async () => (await openStreams()) === 0, 'the held call closed');
    // Its socket closes a moment after its streams: on Node 22+, which ends the session itself, often after this line.
    await eventually(async () => sample(await observer.registry.metrics(), 'ovms_mtls_open_connections', { listener: 'grpc' }) === 0, 'the connection closed');
    const text = await observer.registry.metrics();
    assert.equal(sample(text, 'ovms_mtls_h2_streams_reset_unseen_total', { listener: 'grpc' }), 1);
    // The proxy cut it (the client can no longer be heard): its line says so, not client_cancelled.
    const heldLine = front.logs.lines.find((l) => l.event === 'access' && l.path === '/ovmsmtls.test.Echo/Hold');
    assert.equal(heldLine?.error, 'proxy_closed_undecodable_header');
  });

  // A call held open keeps the idle timeout from closing the connection meanwhile: only the probe could.
  test('after an ordinary over-the-limit reset, a client that then sends nothing keeps a working connection, and the reset is logged without a GOAWAY', { timeout: 30_000 }, async () => {
    const front = fronts.get('terminate')!;
    const from = front.logs.lines.length;
    const session = connectH2(`https://localhost:${front.grpcPort}`, { ...tlsClientOptions(pki), maxSendHeaderBlockLength: 1 << 20 });
    session.on('error', () => {});
    const call = (method: string) => ({ ':method': 'POST', ':path': `/ovmsmtls.test.Echo/${method}`, 'content-type': 'application/grpc', te: 'trailers' });
    try {
      // Node enforces the limit once the client has acknowledged our SETTINGS: after a first answer it has.
      assert.equal((await h2Request(session, call('Unary'), grpcFrame(Buffer.alloc(0)))).headers[':status'], 200);
      const held = session.request(call('Hold'));
      held.on('error', () => {});
      held.end(grpcFrame(Buffer.alloc(0)));
      assert.equal(await resetCode(session, { ...call('Unary'), 'x-big': 'a'.repeat(70_000) }), h2Constants.NGHTTP2_ENHANCE_YOUR_CALM);
      const line = await warnLine(front, from);
      assert.deepEqual({ streams: line.streams, goAway: line.goAway }, { streams: 1, goAway: undefined });
      assert.equal((await h2Request(session, call('Unary'), grpcFrame(Buffer.alloc(0)))).headers[':status'], 200);
      assert.equal(held.closed, false);
    } finally {
      session.destroy();
    }
  });

  // The PING waits behind whatever the client has not read yet, and Node's memory limit resets streams (unseen) precisely when a client reads slowly.
  test('after an ordinary over-the-limit reset, a live client that reads nothing for two sweeps keeps its connection and its call in flight', { timeout: 60_000 }, async () => {
    const front = fronts.get('terminate')!;
    const from = front.logs.lines.length;
    const client = await rawH2Client(front.grpcPort, pki);
    answerPings(client);
    const call = (id: number, method: string, ...metadata: Buffer[]) =>
      Buffer.concat([headerFrames(id, Buffer.concat([grpcHeaderBlock(`/ovmsmtls.test.Echo/${method}`), ...metadata])), h2Frame(H2.DATA, END_STREAM, id, grpcFrame(Buffer.alloc(0)))]);
    try {
      await client.waitForFrame(H2.SETTINGS);
      client.socket.write(call(1, 'Hold'));
      // Two fields Node can decode, together over the limit: reset without an event, so the next sweep PINGs.
      client.socket.write(call(3, 'Unary', literalField('x-a', 'a'.repeat(40_000)), literalField('x-b', 'b'.repeat(40_000))));
      client.socket.pause();
      // The sweeps come every second (idle timeout 4 s): the PING, then one more, before the client reads again.
      await sleep(2500);
      client.socket.resume();
      client.socket.write(call(5, 'Unary'));
      // Before the fix the proxy had destroyed the connection at the second sweep, as if nghttp2 had given up on it: no answer came.
      await eventually(() => streamFrames(client.frames, 5).includes('end'), 'the answer to a call after the pause');
      assert.deepEqual(streamFrames(client.frames, 1).filter((frame) => frame !== 'headers'), [], 'the held call goes on');
      assert.deepEqual(streamFrames(client.frames, 3), [`reset ${h2Constants.NGHTTP2_ENHANCE_YOUR_CALM}`]);
      const line = await warnLine(front, from);
      assert.deepEqual({ streams: line.streams, goAway: line.goAway }, { streams: 1, goAway: undefined });
    } finally {
      client.socket.destroy();
    }
  });

  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}: HTTP/2 on the REST port, a client that ignores the GOAWAY and stays: the proxy closes the connection, with the warn line`, { timeout: 30_000 }, async () => {
      const front = fronts.get(restMode)!;
      const from = front.logs.lines.length;
      const client = await rawH2Client(front.restPort, pki);
      await client.waitForFrame(H2.SETTINGS);
      const fields = [[':method', 'GET'], [':path', '/v2/health/live'], [':scheme', 'https'], [':authority', 'a'], ['x-big', UNDECODABLE]];
      client.socket.write(headerFrames(1, Buffer.concat(fields.map(([name, value]) => literalField(name!, value!)))));
      const goAway = await client.waitForFrame(H2.GOAWAY);
      assert.equal(goAway.payload.readUInt32BE(4), h2Constants.NGHTTP2_COMPRESSION_ERROR);
      // Before the fix Node kept it open for good: this waited for ever.
      await client.closed;
      const line = await goAwayLine(front, from);
      assert.deepEqual({ listener: line.listener, streams: line.streams }, { listener: 'rest', streams: 1 });
    });

  }

  // The line blamed a header field over 64 KiB for any header block nghttp2 could not decode: a client sending
  // malformed HPACK (an integer past its bounds, six bytes in all) had the operator look for large fields.
  test('malformed HPACK ends the connection alike, and the line names it beside the 64 KiB field', { timeout: 30_000 }, async () => {
    const front = fronts.get('terminate')!;
    const from = front.logs.lines.length;
    const client = await rawH2Client(front.grpcPort, pki);
    await client.waitForFrame(H2.SETTINGS);
    client.socket.write(h2Frame(H2.HEADERS, END_STREAM | END_HEADERS, 1, Buffer.from([0xff, 0xff, 0xff, 0xff, 0xff, 0x0f])));
    const goAway = await client.waitForFrame(H2.GOAWAY);
    assert.equal(goAway.payload.readUInt32BE(4), h2Constants.NGHTTP2_COMPRESSION_ERROR);
    await client.closed;
    const line = await goAwayLine(front, from);
    assert.match(line.msg, /cannot decode: a header field larger than 64 KiB[^]*or malformed HPACK/);
  });
});
