import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer as createH2cServer, constants, type ServerHttp2Session } from 'node:http2';
import type { AddressInfo } from 'node:net';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { grpcClients, startTestProxy, startUpstream, type StartedProxy } from './helpers/harness.js';
import { eventually, sample } from './helpers/ops.js';
import { END_HEADERS, H2, grpcHeaderBlock, h2Frame, literalField, rawH2Client, type H2Frame, type RawH2Client } from './helpers/raw-h2.js';
import { unary } from '../src/demo/grpc-client.js';
import { ProxyMetrics } from '../src/metrics.js';
import { STREAMS_BEFORE_SETTINGS } from '../src/grpc-relay.js';
import { SETTINGS_MAX_CONCURRENT_STREAMS } from '../src/h2-frames.js';
import type { ModelServer, ModelServerOptions } from '../src/demo/model-server.js';

/** --mtls_max_concurrent_streams in these tests. */
const LIMIT = 8;
/** A unary call the stand-in never answers: its stream stays open until cancelled. */
const HOLD = '/ovmsmtls.test.Echo/Hold';

let pki: TestPki;

before(async () => {
  pki = await createTestPki();
});

after(async () => {
  await pki.cleanup();
});

interface Relayed {
  readonly upstream: ModelServer;
  readonly front: StartedProxy;
  readonly metrics: ProxyMetrics;
}

/** A stand-in and a relaying proxy with --mtls_max_concurrent_streams=LIMIT in front of it, for `run`. */
async function withRelay(standIn: ModelServerOptions, run: (relayed: Relayed) => Promise<void>): Promise<void> {
  const upstream = await startUpstream(standIn);
  const metrics = new ProxyMetrics({ processMetrics: false });
  const front = await startTestProxy({ pki, upstream: { grpcPort: upstream.grpcPort! }, grpcMode: 'relay', limits: { maxConcurrentStreams: LIMIT }, observer: metrics });
  try {
    await run({ upstream, front, metrics });
  } finally {
    await front.proxy.shutdown(1000);
    await upstream.close();
  }
}

/** The SETTINGS_MAX_CONCURRENT_STREAMS of each SETTINGS frame (not an ACK) the client got, in order; undefined for one without it. */
function advertisedLimits(frames: readonly H2Frame[]): (number | undefined)[] {
  return frames.filter((f) => f.type === H2.SETTINGS && (f.flags & 0x1) === 0).map((f) => {
    let limit: number | undefined;
    for (let at = 0; at + 6 <= f.payload.length; at += 6) if (f.payload.readUInt16BE(at) === SETTINGS_MAX_CONCURRENT_STREAMS) limit = f.payload.readUInt32BE(at + 2);
    return limit;
  });
}

/** HEADERS opening `count` Hold calls from stream id `firstId` on, in one write, each with `x-client: <client>`. */
function openHolds(client: RawH2Client, firstId: number, count: number, tag = 'raw'): void {
  const block = Buffer.concat([grpcHeaderBlock(HOLD), literalField('x-client', tag)]);
  client.socket.write(Buffer.concat(Array.from({ length: count }, (_, i) => h2Frame(H2.HEADERS, END_HEADERS, firstId + 2 * i, block))));
}

const holdsReceived = (upstream: ModelServer, tag = 'raw') => upstream.received.filter((r) => r.path === HOLD && r.headers['x-client'] === tag).length;

/** The [last stream id, error code] of each GOAWAY the client got. */
const goAways = (client: RawH2Client) => client.frames.filter((f) => f.type === H2.GOAWAY).map((f) => [f.payload.readUInt32BE(0), f.payload.readUInt32BE(4)]);

describe('gRPC relay mode: the stream limit a client is told', () => {
  test(`the client's SETTINGS say the smaller of the model server's limit and --mtls_max_concurrent_streams (${LIMIT}): added where the model server names none (unlimited), lowered where it allows more`, async () => {
    for (const [standInLimit, told] of [[undefined, LIMIT], [1000, LIMIT], [4, 4]] as const) {
      await withRelay({ grpcMaxConcurrentStreams: standInLimit }, async ({ front }) => {
        const client = await rawH2Client(front.grpcPort, pki);
        try {
          await client.waitForFrame(H2.SETTINGS);
          assert.deepEqual(advertisedLimits(client.frames), [told], `model server limit ${standInLimit ?? 'none'}`);
        } finally {
          client.socket.destroy();
        }
      });
    }
  });

  test("a later SETTINGS of the model server's that changes its limit reaches the client lowered to ours, or as it is when smaller", async () => {
    const sessions: ServerHttp2Session[] = [];
    const h2c = createH2cServer();
    h2c.on('session', (session) => sessions.push(session));
    h2c.listen(0, '127.0.0.1');
    await once(h2c, 'listening');
    const front = await startTestProxy({ pki, upstream: { grpcPort: (h2c.address() as AddressInfo).port }, grpcMode: 'relay', limits: { maxConcurrentStreams: LIMIT } });
    const client = await rawH2Client(front.grpcPort, pki);
    try {
      await client.waitForFrame(H2.SETTINGS);
      const settingsSeen = () => advertisedLimits(client.frames).length;
      for (const serverLimit of [3, 5000, LIMIT - 1]) {
        const before = settingsSeen();
        sessions[0]!.settings({ maxConcurrentStreams: serverLimit });
        await eventually(() => settingsSeen() > before, `the SETTINGS with ${serverLimit}`);
      }
      assert.deepEqual(advertisedLimits(client.frames), [LIMIT, 3, LIMIT, LIMIT - 1]);
    } finally {
      client.socket.destroy();
      await front.proxy.shutdown(1000);
      h2c.close();
      for (const session of sessions) session.destroy();
    }
  });
});

describe('gRPC relay mode: a client that opens more streams than it was told', () => {
  // Before, a client could open as many streams as the model server allows: with
  // grpc.max_concurrent_streams=2147483647 (what the README tells `proxy` users to give OVMS),
  // a C-core server (grpcio) sent HEADERS on new streams grew from 69 to 869 MB in 4 s.
  test('one stream past the limit it acknowledged: GOAWAY PROTOCOL_ERROR naming its last stream taken, a warn line, counted; the model server never gets that stream, other clients carry on', async () => {
    await withRelay({}, async ({ upstream, front, metrics }) => {
      const from = front.logs.lines.length;
      const offender = await rawH2Client(front.grpcPort, pki);
      try {
        // rawH2Client acknowledges the SETTINGS as it reads them: the ACK is out before the streams.
        await offender.waitForFrame(H2.SETTINGS);
        openHolds(offender, 1, LIMIT);
        await eventually(() => holdsReceived(upstream) === LIMIT, `the ${LIMIT} streams at the model server`);
        openHolds(offender, 2 * LIMIT + 1, 1);
        await offender.waitForFrame(H2.GOAWAY);
        await offender.closed;
      } finally {
        offender.socket.destroy();
      }
      assert.deepEqual(goAways(offender), [[2 * LIMIT - 1, constants.NGHTTP2_PROTOCOL_ERROR]]);
      const line = await front.logs.waitFor((l) => front.logs.lines.indexOf(l) >= from && l.event === 'h2_session_error');
      assert.deepEqual([line.level, line.listener, line.code], ['warn', 'grpc', 'TOO_MANY_STREAMS']);
      assert.match(String(line.subject), /CN=client/);
      assert.match(String(line.msg), new RegExp(`^The proxy ended this client's HTTP/2 connection: the client opened more streams at once than the limit it had acknowledged \\(--mtls_max_concurrent_streams=${LIMIT}\\)`));
      const access = await front.logs.waitFor((l) => front.logs.lines.indexOf(l) >= from && l.event === 'relay_access');
      assert.equal(access.error, 'client_too_many_streams');
      assert.equal(sample(await metrics.registry.metrics(), 'ovms_mtls_h2_session_errors_total', { listener: 'grpc', code: 'TOO_MANY_STREAMS' }), 1);
      const other = grpcClients(front.grpcAddress, pki);
      try {
        const reply = await unary(other.echo, 'Unary', { payload: Buffer.from('still served') });
        assert.equal(Buffer.from(reply.response.payload!).toString(), 'still served');
      } finally {
        other.close();
      }
      assert.equal(holdsReceived(upstream), LIMIT);
      assert.ok(upstream.mostGrpcStreamsOpen <= LIMIT, `the model server had ${upstream.mostGrpcStreamsOpen} streams open at once`);
    });
  });

  test(`before it has acknowledged the SETTINGS, a client may open the ${STREAMS_BEFORE_SETTINGS} streams clients open before they have them, not one more; once it has, it opens none past the limit`, async () => {
    await withRelay({}, async ({ upstream, front }) => {
      // Written at once after the preface, before the client has read anything: they come before its ACK.
      const greedy = await rawH2Client(front.grpcPort, pki);
      try {
        openHolds(greedy, 1, STREAMS_BEFORE_SETTINGS + 1, 'greedy');
        await greedy.waitForFrame(H2.GOAWAY);
        await greedy.closed;
      } finally {
        greedy.socket.destroy();
      }
      assert.deepEqual(goAways(greedy), [[2 * STREAMS_BEFORE_SETTINGS - 1, constants.NGHTTP2_PROTOCOL_ERROR]]);
      assert.equal(greedy.frames[0]?.type, H2.SETTINGS, 'a GOAWAY comes after a SETTINGS frame');
      const early = await rawH2Client(front.grpcPort, pki);
      try {
        openHolds(early, 1, STREAMS_BEFORE_SETTINGS, 'early');
        await eventually(() => holdsReceived(upstream, 'early') === STREAMS_BEFORE_SETTINGS, `the ${STREAMS_BEFORE_SETTINGS} streams at the model server`);
        await early.waitForFrame(H2.SETTINGS);
        assert.deepEqual(goAways(early), []);
        // Its ACK has gone out: with 100 open, far past the limit, a new stream is one too many.
        openHolds(early, 2 * STREAMS_BEFORE_SETTINGS + 1, 1, 'early');
        await early.waitForFrame(H2.GOAWAY);
        await early.closed;
      } finally {
        early.socket.destroy();
      }
      assert.deepEqual(goAways(early), [[2 * STREAMS_BEFORE_SETTINGS - 1, constants.NGHTTP2_PROTOCOL_ERROR]]);
      const lines = front.logs.lines.filter((l) => l.event === 'h2_session_error');
      assert.equal(lines.length, 2);
      assert.ok(lines.some((l) => new RegExp(`than the ${STREAMS_BEFORE_SETTINGS} the proxy allows before the client has acknowledged its SETTINGS`).test(String(l.msg))), JSON.stringify(lines));
      assert.equal(holdsReceived(upstream, 'early'), STREAMS_BEFORE_SETTINGS);
      assert.ok(holdsReceived(upstream, 'greedy') <= STREAMS_BEFORE_SETTINGS, `${holdsReceived(upstream, 'greedy')} of its streams at the model server`);
    });
  });
});

describe('gRPC relay mode: a client that keeps to the limit', () => {
  test(`grpc-js: 200 calls at once on one connection through a limit of ${LIMIT} wait their turn and all succeed; the model server never has more than ${LIMIT} open`, async () => {
    await withRelay({}, async ({ upstream, front }) => {
      const client = grpcClients(front.grpcAddress, pki);
      try {
        const replies = await Promise.all(Array.from({ length: 200 }, (_, i) => unary(client.echo, 'Unary', { payload: Buffer.from(`call ${i}`) })));
        assert.deepEqual(replies.map((r) => Buffer.from(r.response.payload!).toString()), Array.from({ length: 200 }, (_, i) => `call ${i}`));
      } finally {
        client.close();
      }
      const access = await front.logs.waitFor((l) => l.event === 'relay_access');
      assert.deepEqual([access.calls, access.error], [200, undefined]);
      assert.deepEqual(front.logs.lines.filter((l) => l.event === 'h2_session_error'), []);
      assert.ok(upstream.mostGrpcStreamsOpen <= LIMIT, `the model server had ${upstream.mostGrpcStreamsOpen} streams open at once`);
    });
  });
});
