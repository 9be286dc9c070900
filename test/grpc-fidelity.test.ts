/**
 * gRPC fidelity, in both gRPC modes: generated calls (metadata of every kind, paths, messages,
 * streaming shapes) go from Node's HTTP/2 client, with a client certificate, through the proxy
 * to a model server that records what reached it and answers as generated (response metadata,
 * Trailers-Only, statuses known and unknown, `-bin` trailers, early statuses). What the model
 * server got must be what the client sent, and what the client got what the model server
 * answered, up to what the README documents: terminate mode's forwarding fields, `:scheme` and
 * `te`; the relay changes nothing.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { connect as connectH2, type ClientHttp2Session } from 'node:http2';
import * as grpc from '@grpc/grpc-js';
import fc from 'fast-check';
import { clientCredentials, grpcFrame, startTestProxy, tlsClientOptions, type StartedProxy } from './helpers/harness.js';
import { grpcJsCall, type GrpcJsOutcome } from './helpers/grpc-js-fidelity.js';
import { framedH2cUpstream } from './helpers/scripted-upstream.js';
import { h2Frame, literalField } from './helpers/raw-h2.js';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { assertSameBytes } from './helpers/integrity-peers.js';
import {
  answerFrames, callArb, exchangeArb, expectedResponse, expectedTerminated, fieldMap, firstOfCarriedOnce, framed, framedAnswerArb, recordingGrpcServer, sendCall, sentFields, shown, terminated, CALL_ID,
  type FieldMap, type FramedAnswerSpec,
  type AnsweredCall, type GrpcExchange, type ReceivedCall, type RecordingGrpcServer,
} from './helpers/grpc-fidelity.js';
import { FORWARD_MODES, type ForwardMode } from '../src/config.js';
import { XFCC } from '../src/forwarding-headers.js';

/** Runs per mode; GRPC_FIDELITY_RUNS=N runs N instead (the file stays under about 30 s with the default). */
const RUNS = Number(process.env['GRPC_FIDELITY_RUNS'] ?? 60);

/**
 * A run whose calls have not all ended after RUN_HANG_MS, far beyond what any takes, has hung: it fails.
 * A property stops (runs and shrinking) after LIMIT_MS, counted as a failure, so the counterexample found
 * so far is still reported within the test's TEST_MS; both grow with the runs asked for (runs take
 * milliseconds each here, 40 at most).
 */
const RUN_HANG_MS = 20_000;
const LIMIT_MS = 60_000 + RUNS * 150;
const TEST_MS = LIMIT_MS + 60_000;
const params = (numRuns: number) => ({ numRuns, includeErrorInReport: true, timeout: RUN_HANG_MS, interruptAfterTimeLimit: LIMIT_MS, markInterruptAsFailure: true });
/** GRPC_FIDELITY_MODE=terminate (or relay) runs the properties of that mode alone. */
const ONLY_MODE = process.env['GRPC_FIDELITY_MODE'];

// grpc-js logs each answer field it will not report (values outside printable ASCII): the property compares what it reports.
grpc.setLogVerbosity(grpc.logVerbosity.NONE);

let pki: TestPki;
let upstream: RecordingGrpcServer;
const fronts = new Map<ForwardMode, StartedProxy>();
let nextId = 0;

before(async () => {
  pki = await createTestPki();
  upstream = await recordingGrpcServer();
  for (const mode of FORWARD_MODES) fronts.set(mode, await startTestProxy({ pki, upstream: { grpcPort: upstream.port }, grpcMode: mode }));
});

after(async () => {
  for (const front of fronts.values()) await front.proxy.shutdown(1000);
  await upstream?.close();
  await pki?.cleanup();
});

function openSession(port: number): ClientHttp2Session {
  const session = connectH2(`https://localhost:${port}`, { ...tlsClientOptions(pki), settings: { maxHeaderListSize: 4 * 1024 * 1024 }, maxHeaderListPairs: 100_000, maxSendHeaderBlockLength: 4 * 1024 * 1024 });
  session.on('error', () => {});
  return session;
}

/**
 * A proxy in `mode` in front of a model server written frame by frame (framedH2cUpstream) answering each
 * stream with `answer`, and a session to it: `run` gets the proxy's port and the session; all are closed after.
 */
async function behindFramedUpstream(mode: ForwardMode, answer: (streamId: number) => Buffer, run: (port: number, session: ClientHttp2Session) => Promise<void>): Promise<void> {
  const scripted = await framedH2cUpstream(answer);
  const local = await startTestProxy({ pki, upstream: { grpcPort: scripted.port }, grpcMode: mode });
  const session = openSession(local.grpcPort);
  try {
    await run(local.grpcPort, session);
  } finally {
    session.close();
    await local.proxy.shutdown(1000);
    scripted.close();
  }
}

/** One exchange through the proxy on `session`. */
async function through(session: ClientHttp2Session, exchange: GrpcExchange): Promise<{ id: string; received: ReceivedCall; answered: AnsweredCall }> {
  const id = `c${nextId++}`;
  const received = upstream.expect(id, exchange.answer);
  const answered = await sendCall(session, exchange.call, id);
  return { id, received: await received, answered };
}

/** The x-forwarded-client-cert terminate mode sends for the test's client, as the model server got it. */
function ourXfcc(received: ReceivedCall): string {
  return received.raw[received.raw.indexOf(XFCC) + 1] ?? '(none)';
}

/** Every way the exchange departs from what the README documents for `mode`, or none. */
function departures(mode: ForwardMode, { call, answer }: GrpcExchange, authority: string, { id, received, answered }: Awaited<ReturnType<typeof through>>): void {
  assert.equal(received.answerError, undefined, 'the model server sent its answer');
  const expectedRequest = mode === 'relay' ? sentFields(call, id, authority) : expectedTerminated(call, id, authority, ourXfcc(received), '127.0.0.1');
  assert.deepEqual(shown(fieldMap(received.raw)), shown(expectedRequest), 'the request fields the model server got');
  if (answer.timing !== 'early') assertSameBytes(received.body, framed(call.messages), 'the messages the model server got');
  assert.deepEqual(shown(fieldMap(answered.raw)), shown(expectedResponse(mode, answer, fieldMap(answered.raw))), 'the response fields the client got');
  assert.equal(answered.endedWithHeaders, answer.trailersOnly, 'Trailers-Only');
  assertSameBytes(answered.body, answer.trailersOnly ? Buffer.alloc(0) : framed(answer.messages), 'the messages the client got');
  assert.deepEqual(shown(fieldMap(answered.rawTrailers)), shown(fieldMap(answer.trailersOnly ? [] : answer.trailers)), 'the trailers the client got');
}

/**
 * What the model server got through `mode`, given what it got of the same call made directly: terminate
 * mode's forwarding fields and `:scheme` (expectedTerminated), the relay's `:scheme` as the client sent it
 * over TLS. The call id and `:authority` (the address each call went to) are left out of both.
 */
function expectedThrough(mode: ForwardMode, direct: ReceivedCall, xfcc: string): FieldMap {
  const fields = withoutAddressing(fieldMap(direct.raw));
  if (mode === 'relay') return fields.set(':scheme', ['https']);
  return terminated(fields, xfcc, '127.0.0.1');
}

function withoutAddressing(fields: FieldMap): FieldMap {
  fields.delete(CALL_ID);
  fields.delete(':authority');
  return fields;
}

/**
 * What grpc-js reports through terminate mode, the Date that mode adds to an answer without one (README)
 * taken out: from the response metadata, or from the trailers of a Trailers-Only answer, as grpc-js reports its fields.
 */
function withoutAddedDate(mode: ForwardMode, proxied: GrpcJsOutcome, direct: GrpcJsOutcome): GrpcJsOutcome {
  if (mode !== 'terminate') return proxied;
  const without = (fields: Record<string, string[]>, had: Record<string, string[]>) => {
    if (had['date'] !== undefined || fields['date'] === undefined) return fields;
    const { date: _date, ...rest } = fields;
    return rest;
  };
  const headersOnly = Object.keys(direct.metadata).length === 0;
  return { ...proxied, metadata: without(proxied.metadata, direct.metadata), trailers: headersOnly ? without(proxied.trailers, direct.trailers) : proxied.trailers };
}

/**
 * Past 128 fields in a header block grpc-js's HTTP/2 client (Node's default maxHeaderListPairs) resets the
 * stream itself, and reports ENHANCE_YOUR_CALM or INTERNAL_ERROR as the bytes happen to arrive (the relay's
 * too, which passes them unchanged): those answers are the Node client's part of the property.
 */
function withinGrpcJsFieldCount({ answer }: GrpcExchange): boolean {
  const headers = answer.metadata.length + (answer.trailersOnly ? answer.trailers.length : 0);
  return headers < 100 && answer.trailers.length < 100;
}

/** An outcome but for its messages (assertSameMessages()). */
function comparable({ messages: _messages, ...rest }: GrpcJsOutcome): Omit<GrpcJsOutcome, 'messages'> {
  return rest;
}

/**
 * The messages grpc-js reported: all of them after an OK status; after an error status grpc-js drops
 * those it had not delivered yet (it destroys the stream on its 'error'), as many as timing makes it,
 * so one list is where the other starts.
 */
function assertSameMessages(through: GrpcJsOutcome, direct: GrpcJsOutcome): void {
  if (direct.code === grpc.status.OK) {
    assert.deepEqual(through.messages, direct.messages, 'the messages grpc-js reports');
    return;
  }
  const shorter = Math.min(through.messages.length, direct.messages.length);
  assert.deepEqual(through.messages.slice(0, shorter), direct.messages.slice(0, shorter), 'the messages grpc-js reports before an error status');
}

for (const mode of FORWARD_MODES.filter((m) => ONLY_MODE === undefined || m === ONLY_MODE)) {
  describe(`--mtls_grpc_mode ${mode}: calls pass as documented`, () => {
    test('Node HTTP/2 client: metadata, paths, messages, statuses and trailers, several calls at once on one connection', { timeout: TEST_MS }, async () => {
      const front = fronts.get(mode)!;
      const session = openSession(front.grpcPort);
      const authority = `localhost:${front.grpcPort}`;
      try {
        await fc.assert(
          fc.asyncProperty(fc.array(exchangeArb, { minLength: 1, maxLength: 3 }), async (exchanges) => {
            const results = await Promise.all(exchanges.map((exchange) => through(session, exchange)));
            exchanges.forEach((exchange, i) => departures(mode, exchange, authority, results[i]!));
          }),
          params(RUNS),
        );
      } finally {
        session.close();
      }
    });

    test('grpc-js: the same call made directly and through the proxy; the model server gets it as documented, and grpc-js reports the same answer', { timeout: TEST_MS }, async () => {
      const front = fronts.get(mode)!;
      const direct = new grpc.Client(`127.0.0.1:${upstream.port}`, grpc.credentials.createInsecure());
      const proxied = new grpc.Client(front.grpcAddress, clientCredentials(pki));
      /** The same call and answer made by `client`. */
      const made = async (client: grpc.Client, { call, answer }: GrpcExchange) => {
        const id = `j${nextId++}`;
        const received = upstream.expect(id, answer);
        const outcome = await grpcJsCall(client, call, id);
        // A call grpc-js failed itself (metadata over its own limits) never reached the model server.
        return { outcome, received: upstream.reached(id) ? await received : undefined };
      };
      try {
        await fc.assert(
          fc.asyncProperty(exchangeArb.filter(withinGrpcJsFieldCount), async (exchange) => {
            const straight = await made(direct, exchange);
            const through = await made(proxied, exchange);
            assert.equal(through.received === undefined, straight.received === undefined, 'the call reached the model server');
            if (through.received && straight.received) {
              assert.deepEqual(shown(withoutAddressing(fieldMap(through.received.raw))), shown(expectedThrough(mode, straight.received, ourXfcc(through.received))), 'the request fields the model server got');
              if (exchange.answer.timing !== 'early' && straight.received.complete) assertSameBytes(through.received.body, straight.received.body, 'the messages the model server got');
            }
            assert.deepEqual(comparable(withoutAddedDate(mode, through.outcome, straight.outcome)), comparable(straight.outcome), 'what grpc-js reports');
            assertSameMessages(through.outcome, straight.outcome);
          }),
          params(Math.ceil(RUNS / 2)),
        );
      } finally {
        direct.close();
        proxied.close();
      }
    });
  });
}

/** A unary call with `metadata`, answered OK with `answerMetadata` and `trailers`, through `mode`. */
async function example(mode: ForwardMode, metadata: GrpcExchange['call']['metadata'], answer: Partial<GrpcExchange['answer']> = {}): Promise<Awaited<ReturnType<typeof through>>> {
  const front = fronts.get(mode)!;
  const session = openSession(front.grpcPort);
  try {
    const exchange: GrpcExchange = {
      call: { path: '/t.S/Example', metadata: [['content-type', 'application/grpc'], ...metadata], messages: [{ compressed: false, size: 3, tag: 1 }] },
      answer: { status: 200, contentType: 'application/grpc', metadata: [], trailersOnly: false, messages: [{ compressed: false, size: 2, tag: 2 }], trailers: [['grpc-status', '0']], timing: 'after-request', ...answer },
    };
    return await through(session, exchange);
  } finally {
    session.close();
  }
}

describe('answers written frame by frame (what Node\'s HTTP/2 server cannot send): repeated single-valued keys, messages cut anywhere, a reset after the trailers', () => {
  for (const mode of FORWARD_MODES.filter((m) => ONLY_MODE === undefined || m === ONLY_MODE)) {
    test(`--mtls_grpc_mode ${mode}`, { timeout: TEST_MS }, async () => {
      let answer: FramedAnswerSpec | undefined;
      let requestBytes = 0;
      await behindFramedUpstream(mode, (id) => answerFrames(id, answer!, requestBytes), async (port, first) => {
        let session = first;
        // One small request message at most: this model server reads none, and grants the connection window back as it answers.
        const smallCall = callArb.map((call) => ({ ...call, messages: call.messages.slice(0, 1).map((m) => ({ ...m, size: m.size % 100 })) }));
        try {
          await fc.assert(
            fc.asyncProperty(smallCall, framedAnswerArb, async (call, planned) => {
              answer = planned;
              requestBytes = framed(call.messages).length;
              if (session.closed || session.destroyed) session = openSession(port);
              const answered = await sendCall(session, call, 'f');
              const headers = fieldMap(answered.raw);
              const trailers = fieldMap(answered.rawTrailers);
              const expectedHeaders = expectedResponse(mode, planned, headers);
              const expectedTrailers = fieldMap(planned.trailersOnly ? [] : planned.trailers);
              assert.deepEqual(shown(headers), shown(mode === 'relay' ? expectedHeaders : firstOfCarriedOnce(expectedHeaders)), 'the response fields the client got');
              assert.equal(answered.endedWithHeaders, planned.trailersOnly, 'Trailers-Only');
              assertSameBytes(answered.body, planned.trailersOnly ? Buffer.alloc(0) : framed(planned.messages), 'the messages the client got');
              assert.deepEqual(shown(trailers), shown(mode === 'relay' ? expectedTrailers : firstOfCarriedOnce(expectedTrailers)), 'the trailers the client got');
            }),
            params(RUNS),
          );
        } finally {
          session.close();
        }
      });
    });
  }
});

describe('examples the property found', () => {
  test('terminate mode: a call\'s `cookie` metadata values reach the model server one field each, as sent, not joined into one "a=1; b=2"', async () => {
    const { received } = await example('terminate', [['cookie', 'a=1'], ['cookie', 'b=2']]);
    assert.deepEqual(fieldMap(received.raw).get('cookie'), ['a=1', 'b=2']);
  });

  test('terminate mode: `cookie` fields of the model server\'s response metadata and trailers reach the client one field each', async () => {
    const { answered } = await example('terminate', [], { metadata: [['cookie', 'c=3'], ['cookie', 'd=4']], trailers: [['grpc-status', '0'], ['cookie', 'e'], ['cookie', 'f']] });
    assert.deepEqual(fieldMap(answered.raw).get('cookie'), ['c=3', 'd=4']);
    assert.deepEqual(fieldMap(answered.rawTrailers).get('cookie'), ['e', 'f']);
  });
});

describe('what terminate mode changes, as the README documents it', () => {
  test('a response without a Date gets one from terminate mode (RFC 9110 6.6.1), the model server\'s own is kept, and the relay adds none', async () => {
    for (const mode of FORWARD_MODES) {
      const { answered } = await example(mode, []);
      const dates = fieldMap(answered.raw).get('date');
      if (mode === 'relay') assert.equal(dates, undefined, mode);
      else assert.match(String(dates), /^\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT$/, mode);
      const kept = await example(mode, [], { metadata: [['date', 'Tue, 01 Dec 2026 00:00:00 GMT']] });
      assert.deepEqual(fieldMap(kept.answered.raw).get('date'), ['Tue, 01 Dec 2026 00:00:00 GMT'], mode);
    }
  });

  test('a key Node carries once (etag, location, ...), repeated in the model server\'s response metadata or trailers, reaches a client of terminate mode with its first value, of the relay with all', async () => {
    const fields = (id: number, list: [string, string][], flags: number) => h2Frame(0x1, flags, id, Buffer.concat(list.map(([name, value]) => literalField(name, value))));
    const answer = (id: number) => Buffer.concat([
      fields(id, [[':status', '200'], ['content-type', 'application/grpc'], ['etag', 'a'], ['etag', 'b'], ['x-k', '1'], ['x-k', '2']], 0x4),
      h2Frame(0x0, 0, id, grpcFrame(Buffer.from('hi'))),
      fields(id, [['grpc-status', '0'], ['location', 'l1'], ['location', 'l2']], 0x5),
    ]);
    for (const mode of FORWARD_MODES) {
      await behindFramedUpstream(mode, answer, async (_port, session) => {
        const answered = await sendCall(session, { path: '/t.S/Repeated', metadata: [['content-type', 'application/grpc']], messages: [] }, 'r');
        const all = mode === 'relay';
        assert.deepEqual(fieldMap(answered.raw).get('etag'), all ? ['a', 'b'] : ['a'], mode);
        assert.deepEqual(fieldMap(answered.raw).get('x-k'), ['1', '2'], mode);
        assert.deepEqual(fieldMap(answered.rawTrailers).get('location'), all ? ['l1', 'l2'] : ['l1'], mode);
      });
    }
  });
});
