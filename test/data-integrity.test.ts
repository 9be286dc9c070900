/**
 * Every byte arrives, on every forwarding path, under concurrency: generated gRPC calls
 * (every shape, many at once on one connection and across connections, some cancelled
 * partway, some read slowly), HTTP/1.1 keep-alive and pipelined REST requests (Content-Length
 * and chunked bodies cut into generated writes), HTTP/2 REST streams and SSE event streams go
 * through the real proxy, in each mode, with small and default flow-control windows, to echo
 * model servers; what comes back must be what was sent (or computed from it), byte for byte,
 * trailing metadata included. A call cancelled partway must have got a prefix of its answer,
 * and disturbs no other.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { connect as connectH2, type ClientHttp2Session } from 'node:http2';
import fc from 'fast-check';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { grpcFrame, startTestProxy, tlsClientOptions, type StartedProxy } from './helpers/harness.js';
import { chunked } from './helpers/chunks.js';
import {
  assertPrefix, assertSameBytes, flights, grpcMessages, h2Exchange, Http1Connection, patternBytes, sseBody, startGrpcEcho, startRestEcho,
  ECHOED_PREFIX, GRPC_PATHS, GRPC_SHAPES, REPLY_FRAMING_HEADER, REPLY_SEED, REPLY_SIZES, SSE_SPEC_HEADER, TRAILED_PREFIX,
  type CancelPoint, type GrpcShape, type H2Outcome, type Peer, type SseSpec,
} from './helpers/integrity-peers.js';
import { FORWARD_MODES, type ForwardMode, type Limits } from '../src/config.js';

/**
 * A run in which no byte has moved anywhere for this long has hung (slow readers pause for
 * milliseconds): it fails naming how far each exchange got.
 */
const STALL_MS = 15_000;

/** The smallest windows the proxy accepts (--mtls_stream_window, --mtls_connection_window), and its defaults. */
const WINDOWS = { small: { streamWindow: 65_535, connectionWindow: 65_535 }, default: {} } satisfies Record<string, Partial<Limits>>;
type Windows = keyof typeof WINDOWS;

/** Sizes at HTTP/2's edges: a 16 KiB frame (a gRPC message of 16,379 bytes fills one exactly) and a 64 KiB window. */
const EDGE_SIZES = [0, 1, 16_379, 16_380, 16_383, 16_384, 16_385, 65_530, 65_531, 65_535, 65_536, 65_540, 131_072];
const sizeArb = fc.oneof(fc.constantFrom(...EDGE_SIZES), fc.nat(20_000));
/** At most two of these per run, so a run moves a few MB at most. */
const bigArb = fc.array(fc.record({ at: fc.nat(), size: fc.integer({ min: 200_000, max: 3 * 1024 * 1024 }) }), { maxLength: 2 });
const cutsArb = fc.array(fc.nat(), { maxLength: 6 });
const cancelArb = fc.oneof(
  { weight: 3, arbitrary: fc.constant(undefined) },
  { weight: 1, arbitrary: fc.record({ after: fc.constantFrom('sent' as const, 'received' as const), bytes: fc.nat() }) },
);

let pki: TestPki;
let grpcEcho: Peer;
let restEcho: Peer;
const fronts = new Map<string, StartedProxy>();
const frontKey = (mode: ForwardMode, windows: Windows) => `${mode}/${windows}`;
const front = (mode: ForwardMode, windows: Windows) => fronts.get(frontKey(mode, windows))!;

before(async () => {
  pki = await createTestPki();
  grpcEcho = await startGrpcEcho();
  restEcho = await startRestEcho();
  for (const mode of FORWARD_MODES) {
    for (const windows of Object.keys(WINDOWS) as Windows[]) {
      const proxy = await startTestProxy({ pki, upstream: { grpcPort: grpcEcho.port, restPort: restEcho.port }, grpcMode: mode, restMode: mode, limits: WINDOWS[windows] });
      fronts.set(frontKey(mode, windows), proxy);
    }
  }
});

after(async () => {
  for (const proxy of fronts.values()) await proxy.proxy.shutdown(1000);
  await grpcEcho?.close();
  await restEcho?.close();
  await pki?.cleanup();
});

function openSession(port: number, clientWindow: number): ClientHttp2Session {
  const session = connectH2(`https://localhost:${port}`, { ...tlsClientOptions(pki), settings: { initialWindowSize: clientWindow } });
  session.on('error', () => {});
  return session;
}

/** Opens `count` sessions, runs `work` over them, closes them. */
async function withSessions<T>(port: number, count: number, clientWindow: number, work: (sessions: ClientHttp2Session[]) => Promise<T>): Promise<T> {
  const sessions = Array.from({ length: count }, () => openSession(port, clientWindow));
  try {
    return await work(sessions);
  } finally {
    for (const s of sessions) s.destroy();
  }
}

/** Generated metadata: text and -bin keys (base64 values), empty values included. */
const metadataArb = (prefix: string) =>
  fc.uniqueArray(
    fc.record({ token: fc.stringMatching(/^[a-z][a-z0-9]{0,8}$/), bin: fc.boolean(), text: fc.oneof(fc.constant(''), fc.stringMatching(/^[\x21-\x7e]([\x20-\x7e]{0,30}[\x21-\x7e])?$/)), bytes: fc.uint8Array({ maxLength: 40 }) }),
    { selector: (r) => `${r.token}${r.bin}`, maxLength: 4 },
  ).map((fields) => Object.fromEntries(fields.map((f) => (f.bin ? [`${prefix}${f.token}-bin`, Buffer.from(f.bytes).toString('base64')] : [`${prefix}${f.token}`, f.text]))));

function assertFields(got: Record<string, unknown> | undefined, want: Record<string, string>, what: string): void {
  for (const [name, value] of Object.entries(want)) assert.equal(got?.[name], value, `${what}: ${name}`);
}

/** A cancelled exchange got a prefix of its answer; any other got all of it, status 200. */
function assertExchange(outcome: H2Outcome, expected: Buffer, what: string): void {
  if (outcome.cancelled) {
    assertPrefix(outcome.body, expected, what);
    return;
  }
  assert.equal(outcome.error, undefined, `${what}: stream error ${outcome.error?.message}`);
  assert.equal(outcome.rstCode, 0, `${what}: reset with code ${outcome.rstCode}`);
  assert.equal(outcome.headers[':status'], 200, `${what}: status`);
  assertSameBytes(outcome.body, expected, what);
}

// ---------------------------------------------------------------------------------------------
// gRPC

const grpcCallArb = (cancels: boolean) => fc.record({
  shape: fc.constantFrom(...GRPC_SHAPES),
  sizes: fc.array(sizeArb, { minLength: 1, maxLength: 5 }),
  cuts: cutsArb,
  echoed: metadataArb(ECHOED_PREFIX),
  trailed: metadataArb(TRAILED_PREFIX),
  cancel: cancels ? cancelArb : fc.constant(undefined),
  slow: fc.boolean(),
  connection: fc.nat(2),
});
type GrpcCallSpec = { shape: GrpcShape; sizes: number[]; cuts: number[]; echoed: Record<string, string>; trailed: Record<string, string>; cancel: CancelPoint | undefined; slow: boolean; connection: number };

const grpcWorkloadArb = (cancels: boolean) => fc.record({
  calls: fc.array(grpcCallArb(cancels), { minLength: 1, maxLength: 8 }),
  big: bigArb,
  clientWindow: fc.constantFrom(65_535, 1024 * 1024),
  seed: fc.nat(1_000_000),
});
type GrpcWorkload = { calls: GrpcCallSpec[]; big: { at: number; size: number }[]; clientWindow: number; seed: number };

/** The message sizes a call carries, the big ones added: Unary carries one message. */
function messageSizes(workload: GrpcWorkload, index: number): number[] {
  const call = workload.calls[index]!;
  const big = workload.big.filter((b) => b.at % workload.calls.length === index).map((b) => b.size);
  const sizes = [...call.sizes, ...big];
  return call.shape === 'unary' ? [sizes[sizes.length - 1]!] : sizes;
}

/** Each call's bytes made from tags of its own: a message that lands in another call does not match there. */
const callTag = (workload: GrpcWorkload, index: number) => workload.seed + index * 1000;

async function runGrpcCall(session: ClientHttp2Session, workload: GrpcWorkload, index: number): Promise<void> {
  const call = workload.calls[index]!;
  const tag = callTag(workload, index);
  const sizes = messageSizes(workload, index);
  const server = call.shape === 'server';
  const request = server ? grpcFrame(patternBytes(tag + 999, 16)) : grpcMessages(tag, sizes);
  const expected = server ? grpcMessages(tag, sizes) : request;
  const headers = {
    ':method': 'POST', ':path': GRPC_PATHS[call.shape], 'content-type': 'application/grpc', te: 'trailers',
    ...call.echoed, ...call.trailed,
    ...(server ? { [REPLY_SIZES]: sizes.join(','), [REPLY_SEED]: String(tag) } : {}),
  };
  const what = `call ${index} (${call.shape}, messages of ${sizes.join(', ')} bytes${call.cancel ? `, cancel after ${call.cancel.bytes} ${call.cancel.after}` : ''}${call.slow ? ', slow reader' : ''})`;
  const outcome = await h2Exchange(session, headers, chunked(request, call.cuts), expected.length, { cancel: call.cancel, slow: call.slow, label: what });
  if (!outcome.cancelled) assert.equal(outcome.headers['grpc-status'], undefined, `${what}: a Trailers-Only answer, grpc-status ${String(outcome.headers['grpc-status'])}: ${String(outcome.headers['grpc-message'])}`);
  assertExchange(outcome, expected, what);
  if (outcome.cancelled) return;
  assertFields(outcome.headers, call.echoed, `${what}: response metadata`);
  assert.ok(outcome.trailers, `${what}: no trailers`);
  assertFields(outcome.trailers, { ...call.trailed, 'grpc-status': '0' }, `${what}: trailing metadata`);
}

async function runGrpcWorkload(proxy: StartedProxy, workload: GrpcWorkload): Promise<void> {
  const connections = Math.max(...workload.calls.map((c) => c.connection)) + 1;
  await withSessions(proxy.grpcPort, connections, workload.clientWindow, (sessions) =>
    flights.guard(Promise.all(workload.calls.map((call, i) => runGrpcCall(sessions[call.connection]!, workload, i))), STALL_MS));
}

// ---------------------------------------------------------------------------------------------
// SSE

const sseSpecArb = fc.record({
  seed: fc.nat(1_000_000),
  events: fc.array(fc.array(fc.oneof(fc.constant(0), fc.nat(300), fc.integer({ min: 2_000, max: 40_000 })), { minLength: 1, maxLength: 3 }), { minLength: 1, maxLength: 12 }),
  cuts: fc.array(fc.nat(), { maxLength: 6 }),
});

// ---------------------------------------------------------------------------------------------
// REST over HTTP/1.1

const h1RequestArb = fc.oneof(
  {
    weight: 4,
    arbitrary: fc.record({ kind: fc.constant('echo' as const), size: sizeArb, framing: fc.constantFrom('length' as const, 'chunked' as const), bodyCuts: cutsArb, reply: fc.constantFrom('length', 'chunked') }),
  },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('sse' as const), spec: sseSpecArb }) },
);
type H1Request = { kind: 'echo'; size: number; framing: 'length' | 'chunked'; bodyCuts: number[]; reply: string } | { kind: 'sse'; spec: SseSpec };

const h1ConnectionArb = fc.record({
  requests: fc.array(h1RequestArb, { minLength: 1, maxLength: 6 }),
  pipelined: fc.boolean(),
  writeCuts: fc.array(fc.nat(), { maxLength: 8 }),
  slow: fc.boolean(),
});
type H1ConnectionSpec = { requests: H1Request[]; pipelined: boolean; writeCuts: number[]; slow: boolean };

const h1WorkloadArb = fc.record({ connections: fc.array(h1ConnectionArb, { minLength: 1, maxLength: 3 }), big: bigArb, seed: fc.nat(1_000_000) });
type H1Workload = { connections: H1ConnectionSpec[]; big: { at: number; size: number }[]; seed: number };

/** A request's bytes on the wire and the body its answer must carry. */
function h1Exchange(request: H1Request, body: Buffer): { wire: Buffer; expected: Buffer } {
  if (request.kind === 'sse') {
    return { wire: Buffer.from(`GET /sse HTTP/1.1\r\nhost: localhost\r\n${SSE_SPEC_HEADER}: ${JSON.stringify(request.spec)}\r\n\r\n`), expected: sseBody(request.spec) };
  }
  const head = `POST /echo HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/octet-stream\r\n${REPLY_FRAMING_HEADER}: ${request.reply}\r\n`;
  if (request.framing === 'length') return { wire: Buffer.concat([Buffer.from(`${head}content-length: ${body.length}\r\n\r\n`), body]), expected: body };
  const chunks = chunked(body, request.bodyCuts).flatMap((c) => [Buffer.from(`${c.length.toString(16)}\r\n`), c, Buffer.from('\r\n')]);
  return { wire: Buffer.concat([Buffer.from(`${head}transfer-encoding: chunked\r\n\r\n`), ...chunks, Buffer.from('0\r\n\r\n')]), expected: body };
}

async function runH1Connection(proxy: StartedProxy, workload: H1Workload, index: number): Promise<void> {
  const spec = workload.connections[index]!;
  const exchanges = spec.requests.map((request, r) => {
    const big = workload.big.find((b) => b.at % workload.connections.length === index && Math.floor(b.at / 7) % spec.requests.length === r);
    const size = request.kind === 'echo' ? (big?.size ?? request.size) : 0;
    return h1Exchange(request, patternBytes(workload.seed + index * 1000 + r, size));
  });
  const connection = await Http1Connection.open(proxy.restPort, tlsClientOptions(pki), { slow: spec.slow, label: `HTTP/1.1 connection ${index}` });
  try {
    const sending = spec.pipelined ? connection.write(chunked(Buffer.concat(exchanges.map((e) => e.wire)), spec.writeCuts)) : Promise.resolve();
    for (const [r, exchange] of exchanges.entries()) {
      if (!spec.pipelined) await connection.write(chunked(exchange.wire, spec.writeCuts));
      const answer = await connection.reader.next();
      const request = spec.requests[r]!;
      const what = `connection ${index}${spec.pipelined ? ' (pipelined)' : ''}, request ${r} (${request.kind === 'sse' ? `SSE of ${request.spec.events.length} events` : `${request.framing} body of ${exchange.expected.length} bytes, ${request.reply} answer`})`;
      assert.equal(answer.status, 200, `${what}: status`);
      if (request.kind === 'sse') assert.match(answer.headers['content-type'] ?? '', /^text\/event-stream/, `${what}: content-type`);
      assertSameBytes(answer.body, exchange.expected, what);
    }
    await sending;
  } finally {
    connection.close();
  }
}

async function runH1Workload(proxy: StartedProxy, workload: H1Workload): Promise<void> {
  await flights.guard(Promise.all(workload.connections.map((_, i) => runH1Connection(proxy, workload, i))), STALL_MS);
}

// ---------------------------------------------------------------------------------------------
// REST over HTTP/2 (terminated in both REST modes)

const h2StreamArb = fc.oneof(
  {
    weight: 4,
    arbitrary: fc.record({ kind: fc.constant('echo' as const), size: sizeArb, cuts: cutsArb, declareLength: fc.boolean(), reply: fc.constantFrom('length', 'chunked'), cancel: cancelArb, slow: fc.boolean(), connection: fc.nat(1) }),
  },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('sse' as const), spec: sseSpecArb, cancel: cancelArb, slow: fc.boolean(), connection: fc.nat(1) }) },
);
type H2Stream = { cancel: CancelPoint | undefined; slow: boolean; connection: number } & ({ kind: 'echo'; size: number; cuts: number[]; declareLength: boolean; reply: string } | { kind: 'sse'; spec: SseSpec });

const h2WorkloadArb = fc.record({ streams: fc.array(h2StreamArb, { minLength: 1, maxLength: 8 }), big: bigArb, clientWindow: fc.constantFrom(65_535, 1024 * 1024), seed: fc.nat(1_000_000) });
type H2Workload = { streams: H2Stream[]; big: { at: number; size: number }[]; clientWindow: number; seed: number };

async function runH2Stream(session: ClientHttp2Session, workload: H2Workload, index: number): Promise<void> {
  const stream = workload.streams[index]!;
  const what = `stream ${index} (${stream.kind === 'sse' ? `SSE of ${stream.spec.events.length} events` : 'echo'}${stream.cancel ? `, cancel after ${stream.cancel.bytes} ${stream.cancel.after}` : ''}${stream.slow ? ', slow reader' : ''})`;
  if (stream.kind === 'sse') {
    const expected = sseBody(stream.spec);
    const outcome = await h2Exchange(session, { ':method': 'GET', ':path': '/sse', [SSE_SPEC_HEADER]: JSON.stringify(stream.spec) }, [], expected.length, { ...stream, label: what });
    assertExchange(outcome, expected, what);
    return;
  }
  const big = workload.big.find((b) => b.at % workload.streams.length === index);
  const body = patternBytes(workload.seed + index * 1000, big?.size ?? stream.size);
  const headers = {
    ':method': 'POST', ':path': '/echo', 'content-type': 'application/octet-stream', [REPLY_FRAMING_HEADER]: stream.reply,
    ...(stream.declareLength ? { 'content-length': String(body.length) } : {}),
  };
  // An empty body still needs a DATA frame with END_STREAM: no pieces would end the stream with the HEADERS.
  const pieces = body.length === 0 ? [Buffer.alloc(0)] : chunked(body, stream.cuts);
  const outcome = await h2Exchange(session, headers, pieces, body.length, { ...stream, label: `${what}, body of ${body.length} bytes` });
  assertExchange(outcome, body, `${what}, body of ${body.length} bytes`);
}

async function runH2Workload(proxy: StartedProxy, workload: H2Workload): Promise<void> {
  const connections = Math.max(...workload.streams.map((s) => s.connection)) + 1;
  await withSessions(proxy.restPort, connections, workload.clientWindow, (sessions) =>
    flights.guard(Promise.all(workload.streams.map((s, i) => runH2Stream(sessions[s.connection]!, workload, i))), STALL_MS));
}

// ---------------------------------------------------------------------------------------------

/**
 * DATA_INTEGRITY_TIMES=N runs each property N times as often, its time limits N times as long: to look for what
 * CI's runs are too few to meet (each CI run draws a new seed).
 */
const TIMES = Math.max(1, Math.floor(Number(process.env['DATA_INTEGRITY_TIMES']) || 1));

/** Runs per mode and window size; the whole file stays within about 90 s on an idle machine. */
const RUNS = { grpc: 24 * TIMES, http1: 24 * TIMES, http2: 16 * TIMES, all: 8 * TIMES };

/**
 * A dropped byte can leave a client waiting for ever (a Content-Length never reached, a frame never
 * completed): such a run fails after RUN_HANG_MS, far beyond what any run takes, and shrinking
 * stops after SHRINK_MS so the counterexample found so far is still reported within the test's time.
 */
const RUN_HANG_MS = 60_000;
const SHRINK_MS = 100_000 * TIMES;
const TEST_MS = 200_000 * TIMES;
const params = (numRuns: number) => ({ numRuns, includeErrorInReport: true, timeout: RUN_HANG_MS, interruptAfterTimeLimit: SHRINK_MS });

/**
 * Not in terminate mode with the smallest windows: there, on Node 20, 22 and 24, uploads cancelled partway leave Node's HTTP/2
 * client miscounting its upstream connection's memory once in about a hundred runs, after which it resets every answer
 * on that connection (ENHANCE_YOUR_CALM). The proxy now replaces such a connection, but the calls under way on it when
 * that happens still fail (README, "Choices": gRPC terminate mode). Every other mode and window size cancels calls.
 */
const cancelsCalls = (mode: ForwardMode, windows: Windows): boolean => mode !== 'terminate' || windows !== 'small';

for (const mode of FORWARD_MODES) {
  for (const windows of Object.keys(WINDOWS) as Windows[]) {
    const cancels = cancelsCalls(mode, windows);
    const grpcWorkloads = grpcWorkloadArb(cancels);
    describe(`every byte arrives: --mtls_grpc_mode ${mode} --mtls_rest_mode ${mode}, ${windows} windows`, () => {
      test(`gRPC calls of every shape, many at once on one connection and across connections, ${cancels ? 'some cancelled, ' : ''}some read slowly: bodies and trailing metadata intact`, { timeout: TEST_MS }, async () => {
        await fc.assert(fc.asyncProperty(grpcWorkloads, (w) => runGrpcWorkload(front(mode, windows), w as GrpcWorkload)), params(RUNS.grpc));
      });

      test('REST over HTTP/1.1: keep-alive and pipelined requests with Content-Length and chunked bodies, cut into generated writes, and SSE streams, echoed whole and in order', { timeout: TEST_MS }, async () => {
        await fc.assert(fc.asyncProperty(h1WorkloadArb, (w) => runH1Workload(front(mode, windows), w as H1Workload)), params(RUNS.http1));
      });

      test('REST over HTTP/2: concurrent streams with bodies and SSE streams, some cancelled, some read slowly, echoed whole', { timeout: TEST_MS }, async () => {
        await fc.assert(fc.asyncProperty(h2WorkloadArb, (w) => runH2Workload(front(mode, windows), w as H2Workload)), params(RUNS.http2));
      });

      test('all of them at once on both ports', { timeout: TEST_MS }, async () => {
        await fc.assert(
          fc.asyncProperty(grpcWorkloads, h1WorkloadArb, h2WorkloadArb, async (g, h1, h2) => {
            const proxy = front(mode, windows);
            await Promise.all([runGrpcWorkload(proxy, g as GrpcWorkload), runH1Workload(proxy, h1 as H1Workload), runH2Workload(proxy, h2 as H2Workload)]);
          }),
          params(RUNS.all),
        );
      });
    });
  }
}
