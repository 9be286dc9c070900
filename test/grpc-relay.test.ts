import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import type { Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import * as grpc from '@grpc/grpc-js';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { countingRelay, drainOnlyConnection, grpcClients, grpcFrame, h2Request, h2Session, https1, startTestProxy, startUpstream, type StartedProxy } from './helpers/harness.js';
import { eventually, sample } from './helpers/ops.js';
import { GRPC_RESPONSE_HEADER_BLOCK, HTTP2_REFUSALS, framedH2cUpstream, scriptedUpstream } from './helpers/scripted-upstream.js';
import { ACK, END_HEADERS, END_STREAM, H2, H2FrameReader, answerPings, byteByByte, grpcHeaderBlock, h2Frame, rawH2Client, streamFrames, type RawH2Client } from './helpers/raw-h2.js';
import { CLIENT_PREFACE_BYTES, DRAIN_PING_DATA, FrameCursor } from '../src/h2-frames.js';
import { UPSTREAM_CLOSED_MID_CALL } from '../src/grpc-relay.js';
import { UPSTREAM_NOT_HTTP2 } from '../src/upstream-errors.js';
import { FORWARD_MODES, type ForwardMode } from '../src/config.js';
import { ProxyMetrics } from '../src/metrics.js';
import { ECHO_UNARY_HEADERS, checkCancellation, checkErrorStatus, checkLargeMessage, checkMetadataRoundTrip, checkModelInfer, checkStreaming, checkTrailersOnly } from './helpers/grpc-calls.js';
import { unary } from '../src/demo/grpc-client.js';
import type { ModelServer } from '../src/demo/model-server.js';

let pki: TestPki;
let upstream: ModelServer;
let counter: Awaited<ReturnType<typeof countingRelay>>;
let front: StartedProxy;
let clients: ReturnType<typeof grpcClients>;

before(async () => {
  pki = await createTestPki();
  upstream = await startUpstream();
  counter = await countingRelay(upstream.grpcPort!);
  front = await startTestProxy({ pki, upstream: { grpcPort: counter.port }, grpcMode: 'relay' });
  clients = grpcClients(front.grpcAddress, pki);
});

after(async () => {
  clients.close();
  await front.proxy.shutdown(1000);
  counter.server.close();
  await upstream.close();
  await pki.cleanup();
});

const lastReceived = (path: string) => upstream.received.filter((r) => r.protocol === 'grpc' && r.path === path).at(-1);

describe('grpc relay mode: calls pass unchanged', () => {
  test('a KServe ModelInfer returns the dummy model output b + 1', () => checkModelInfer(clients.kserve));

  test('metadata, -bin values, trailers and error messages pass; no x-forwarded-client-cert is added', async () => {
    await checkMetadataRoundTrip(clients.echo);
    const seen = lastReceived('/ovmsmtls.test.Echo/Unary')!;
    assert.equal(seen.headers.te, 'trailers');
    assert.equal(seen.headers['x-forwarded-client-cert'], undefined);
    await checkErrorStatus(clients.echo);
  });

  test('a Trailers-Only response stays one HEADERS frame with END_STREAM', () => checkTrailersOnly(front.grpcPort, pki));

  test('client-streaming, server-streaming and bidirectional calls pass message by message', () => checkStreaming(clients.echo));

  test('a cancelled client call cancels the upstream call', () => checkCancellation(clients.echo, upstream));

  test('a 32 MiB message passes both ways, with flow control end to end', () => checkLargeMessage(clients.echo, 32 * 1024 * 1024));

  test('each client connection gets its own upstream connection, reused by all its calls', async () => {
    const before = counter.connections();
    const other = grpcClients(front.grpcAddress, pki);
    try {
      await Promise.all(Array.from({ length: 10 }, () => unary(other.echo, 'Unary', { payload: Buffer.from('x') })));
      assert.equal(counter.connections(), before + 1);
    } finally {
      other.close();
    }
  });

  test('an HTTP/1.1 client on the gRPC port still gets the plain-text explanation', async () => {
    const res = await https1(front.grpcPort, pki, { path: '/' });
    assert.equal(res.status, 426);
    assert.match(res.body, /gRPC over HTTP\/2/);
  });

  test('a closed connection is logged once, with the client and the bytes each way', async () => {
    const session = h2Session(front.grpcPort, pki);
    await h2Request(session, ECHO_UNARY_HEADERS, grpcFrame(Buffer.from([0x0a, 0x02, 0x68, 0x69])));
    session.close();
    const line = await front.logs.waitFor((l) => l.event === 'relay_access' && (l.bytesIn as number) > 0);
    assert.equal(line.listener, 'grpc');
    assert.equal(line.subject, 'CN=client,OU=tests');
    assert.ok((line.bytesOut as number) > 0);
    assert.equal(line.calls, 1);
    assert.equal(line.goAway, false);
    assert.equal(line.idle, false);
    // Node's close() sends GOAWAY(NO_ERROR); the model server sent none.
    assert.deepEqual([line.clientGoAway, line.upstreamGoAway], ['NO_ERROR', undefined]);
  });
});

describe('grpc relay mode: metrics', () => {
  test('relayed calls and bytes per direction are counted when a connection closes, not as requests', async () => {
    const metrics = new ProxyMetrics({ processMetrics: false });
    const local = await startTestProxy({ pki, upstream: { grpcPort: upstream.grpcPort! }, grpcMode: 'relay', observer: metrics });
    try {
      const session = h2Session(local.grpcPort, pki);
      await h2Request(session, ECHO_UNARY_HEADERS, grpcFrame(Buffer.alloc(100)));
      session.close();
      await local.logs.waitFor((l) => l.event === 'relay_access');
      const text = await metrics.registry.metrics();
      assert.ok((sample(text, 'ovms_mtls_relayed_bytes_total', { listener: 'grpc', direction: 'in' }) ?? 0) > 100);
      assert.ok((sample(text, 'ovms_mtls_relayed_bytes_total', { listener: 'grpc', direction: 'out' }) ?? 0) > 100);
      assert.equal(sample(text, 'ovms_mtls_relayed_calls_total', { listener: 'grpc' }), 1);
      assert.equal(sample(text, 'ovms_mtls_requests_total', { listener: 'grpc' }), undefined);
    } finally {
      await local.proxy.shutdown(1000);
    }
  });
});

describe('grpc relay mode: when the upstream cannot take the connection', () => {
  test('before the upstream is ready, calls get UNAVAILABLE with the reason; once ready, new connections are relayed', async () => {
    let reason: string | undefined = 'model server starting';
    const server = await startUpstream({ restPort: null });
    const local = await startTestProxy({ pki, upstream: { grpcPort: server.grpcPort! }, grpcMode: 'relay', notReady: { grpc: () => reason } });
    const early = grpcClients(local.grpcAddress, pki);
    try {
      const err = await unary(early.echo, 'Unary', { payload: Buffer.from('1') }).then(() => assert.fail('should fail'), (e: grpc.ServiceError) => e);
      assert.equal(err.code, grpc.status.UNAVAILABLE);
      assert.match(err.details, /model server starting/);
      reason = undefined;
      const late = grpcClients(local.grpcAddress, pki);
      try {
        await unary(late.echo, 'Unary', { payload: Buffer.from('2') });
      } finally {
        late.close();
      }
      await local.logs.waitFor((l) => l.event === 'relay_access');
    } finally {
      early.close();
      await local.proxy.shutdown(1000);
      await server.close();
    }
  });

  test('an unreachable upstream answers UNAVAILABLE with a readable message instead of dropping the client', async () => {
    const server = await startUpstream({ restPort: null });
    const port = server.grpcPort!;
    await server.close();
    const local = await startTestProxy({ pki, upstream: { grpcPort: port }, grpcMode: 'relay' });
    const c = grpcClients(local.grpcAddress, pki);
    try {
      const err = await unary(c.echo, 'Unary', { payload: Buffer.from('x') }).then(() => assert.fail('should fail'), (e: grpc.ServiceError) => e);
      assert.equal(err.code, grpc.status.UNAVAILABLE);
      assert.match(err.details, new RegExp(`upstream 127\\.0\\.0\\.1:${port}`));
      await local.logs.waitFor((l) => l.event === 'upstream_error' && l.reason === 'ECONNREFUSED');
    } finally {
      c.close();
      await local.proxy.shutdown(1000);
    }
  });

  test('an upstream connection that drops mid-call ends the call with UNAVAILABLE, not a hang', async () => {
    // A crash, not a graceful stop: the TCP connection to the upstream just goes away.
    const dropping = await countingRelay(upstream.grpcPort!);
    const local = await startTestProxy({ pki, upstream: { grpcPort: dropping.port }, grpcMode: 'relay' });
    const c = grpcClients(local.grpcAddress, pki);
    try {
      const call = c.echo.Hold({}, new grpc.Metadata(), {}, () => {});
      const status = once(call, 'status') as Promise<[grpc.StatusObject]>;
      await once(call, 'metadata');
      dropping.server.close();
      assert.equal((await status)[0].code, grpc.status.UNAVAILABLE);
    } finally {
      c.close();
      await local.proxy.shutdown(1000);
    }
  });
});

describe('a gRPC upstream that is no HTTP/2 server, or closes before its preface', () => {
  /** The status a grpc-js call gets through a proxy whose gRPC upstream is `port`, in `mode`, with the upstream_error reasons logged. */
  async function callThrough(port: number, mode: ForwardMode): Promise<{ status: grpc.ServiceError; reasons: unknown[]; messages: unknown[] }> {
    const local = await startTestProxy({ pki, upstream: { grpcPort: port }, grpcMode: mode });
    const c = grpcClients(local.grpcAddress, pki);
    try {
      const status = await unary(c.echo, 'Unary', { payload: Buffer.from('x') }).then(() => assert.fail('should fail'), (e: grpc.ServiceError) => e);
      await local.logs.waitFor((l) => l.event === 'access' || l.event === 'relay_access');
      const lines = local.logs.lines.filter((l) => l.event === 'upstream_error');
      return { status, reasons: lines.map((l) => l.reason), messages: lines.map((l) => l.msg) };
    } finally {
      c.close();
      await local.proxy.shutdown(1000);
    }
  }

  // Before, in relay mode: the model server's HTTP/1.1 answer to the preface went to the client as they were, and the
  // call failed on a broken HTTP/2 connection with no status from the proxy; in terminate mode it said "failed (ERR_HTTP2_ERROR)".
  for (const mode of FORWARD_MODES) {
    test(`${mode} mode: the model server's REST port given as its gRPC one gets UNAVAILABLE saying the upstream does not speak HTTP/2`, async () => {
      const { status, reasons } = await callThrough(upstream.restPort!, mode);
      assert.equal(status.code, grpc.status.UNAVAILABLE);
      assert.equal(status.details, `upstream 127.0.0.1:${upstream.restPort} does not speak HTTP/2 (h2c) as a gRPC server does: is it the model server's gRPC port (OVMS --port), not its REST port?`);
      assert.deepEqual(reasons, mode === 'relay' ? [UPSTREAM_NOT_HTTP2, 'ERR_HTTP2_ERROR'] : ['ERR_HTTP2_ERROR']);
    });

    // The lines said "upstream error" and the code alone: not which upstream, nor what to check.
    test(`${mode} mode: each upstream_error line says what the client was told, naming the upstream and the port to check`, async () => {
      const { status, messages } = await callThrough(upstream.restPort!, mode);
      assert.ok(messages.length > 0);
      for (const message of messages) assert.equal(message, status.details);
    });
  }

  // Before: the same hint, to check a port that was right, when a model server that had spoken HTTP/2 (its SETTINGS
  // came) later sent what nghttp2 refuses: Node reports both as ERR_HTTP2_ERROR. Relay mode passes such frames on to the client.
  for (const [what, answer, refused] of HTTP2_REFUSALS) {
    test(`terminate mode: an h2c model server that sends its SETTINGS, then ${what}, gets UNAVAILABLE saying what the proxy refused, not to check the port`, async () => {
      const h2c = await framedH2cUpstream(answer);
      try {
        const { status, reasons } = await callThrough(h2c.port, 'terminate');
        assert.equal(status.code, grpc.status.UNAVAILABLE);
        assert.equal(status.details, `upstream 127.0.0.1:${h2c.port} speaks HTTP/2, but sent ${refused}; the connection was closed, with every call on it`);
        assert.deepEqual(reasons, ['ERR_HTTP2_ERROR']);
      } finally {
        h2c.close();
      }
    });
  }

  // Before: the relay passed the close on, and grpc-js reported a dropped connection with no reason from the proxy.
  test('relay mode: one that accepts and closes at once gets UNAVAILABLE saying it closed the connection', async () => {
    const closing = await scriptedUpstream((socket) => socket.end());
    try {
      const { status, reasons } = await callThrough(closing.port, 'relay');
      assert.equal(status.code, grpc.status.UNAVAILABLE);
      assert.equal(status.details, `upstream 127.0.0.1:${closing.port} closed the connection`);
      assert.equal(reasons[0], 'UPSTREAM_CLOSED');
    } finally {
      closing.close();
    }
  });
});

/**
 * Relay mode keeps what a client sends before the model server's first frame header (KEPT_BEFORE_PREFACE_MAX, 256 KiB),
 * so that a client whose model server turns out to speak no HTTP/2 is served again by the terminating path. Past that
 * it cannot be: the connection stays relayed, and ends. The model server here says nothing until it has received
 * `answerAfter` bytes of the first connection, then answers in HTTP/1.1 (its REST port given as the gRPC one); later
 * connections (the terminating path's) get that answer at once.
 */
describe('relay mode: what a client sent before the model server spoke, on both sides of the 256 KiB kept', () => {
  /** A header value no HPACK table holds (over its 4 KiB): each request sends it, Huffman-coded (~8.5 KB), toward the kept bytes. */
  const PAD_BYTES = 12 * 1024;
  /** Safety net so a regression fails instead of hanging; nothing asserts on time. */
  const SAFETY = { timeout: 120_000 };
  const http1Answer = 'HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n';

  function quietUntil(answerAfter: number): Promise<Awaited<ReturnType<typeof scriptedUpstream>>> {
    let connections = 0;
    return scriptedUpstream((socket, first) => {
      connections += 1;
      if (connections > 1) return void socket.end(http1Answer);
      let received = first.length;
      const answerOnceEnough = () => {
        if (received <= answerAfter) return false;
        socket.end(http1Answer);
        return true;
      };
      if (answerOnceEnough()) return;
      const count = (chunk: Buffer) => {
        received += chunk.length;
        if (answerOnceEnough()) socket.off('data', count);
      };
      socket.on('data', count);
    });
  }

  /** `calls` unary calls sent together on one connection, each with a PAD_BYTES header: the grpc-status and message each got, 'no answer' (its stream ended with none), or its error's code. */
  async function callsThrough(local: StartedProxy, calls: number): Promise<(string | undefined)[]> {
    const session = h2Session(local.grpcPort, pki);
    try {
      return await Promise.all(Array.from({ length: calls }, (_, i) => {
        const headers = { ...ECHO_UNARY_HEADERS, 'x-pad': String(i % 10).repeat(PAD_BYTES) };
        return h2Request(session, headers, grpcFrame(Buffer.from('x'))).then(
          (res) => (res.headers[':status'] === undefined ? 'no answer' : `${String(res.headers['grpc-status'] ?? res.trailers?.['grpc-status'])} ${String(res.headers['grpc-message'] ?? res.trailers?.['grpc-message'])}`),
          (err: NodeJS.ErrnoException) => err.code,
        );
      }));
    } finally {
      session.destroy();
    }
  }

  test('under it (8 calls, ~70 KB, the model server answering HTTP/1.1 once it has 48 KiB): the client is served again, each call UNAVAILABLE saying the upstream does not speak HTTP/2', SAFETY, async () => {
    const model = await quietUntil(48 * 1024);
    const local = await startTestProxy({ pki, upstream: { grpcPort: model.port }, grpcMode: 'relay' });
    try {
      const said = `upstream 127.0.0.1:${model.port} does not speak HTTP/2 (h2c) as a gRPC server does: is it the model server's gRPC port (OVMS --port), not its REST port?`;
      assert.deepEqual(await callsThrough(local, 8), Array(8).fill(`14 ${said}`));
      await eventually(() => local.logs.lines.filter((l) => l.event === 'access').length === 8, 'an access line for each call');
      assert.deepEqual(local.logs.lines.filter((l) => l.event === 'relay_access'), [], 'the connection was not ended as relayed');
      assert.equal(local.logs.lines.find((l) => l.event === 'upstream_error')?.reason, UPSTREAM_NOT_HTTP2);
    } finally {
      await local.proxy.shutdown(1000);
      model.close();
    }
  });

  test('past it (40 calls, ~350 KB, the model server answering once it has more than 256 KiB): the connection stays relayed and is closed, its calls without a status, logged upstream_not_http2', SAFETY, async () => {
    const model = await quietUntil(256 * 1024);
    const local = await startTestProxy({ pki, upstream: { grpcPort: model.port }, grpcMode: 'relay' });
    try {
      const got = await callsThrough(local, 40);
      // The connection closes under them: each stream ends with no response at all (or, with a reset, an error).
      assert.ok(got.every((g) => g === 'no answer' || g?.startsWith('ERR_') || g === 'ECONNRESET'), `no call answered: ${[...new Set(got)].join(', ')}`);
      const line = await local.logs.waitFor((l) => l.event === 'relay_access');
      assert.equal(line.error, 'upstream_not_http2');
      assert.equal(local.logs.lines.find((l) => l.event === 'upstream_error')?.reason, UPSTREAM_NOT_HTTP2);
      assert.equal(model.sockets.length, 1, 'no second connection: the terminating path was not tried');
      assert.deepEqual(local.logs.lines.filter((l) => l.event === 'access'), []);
    } finally {
      await local.proxy.shutdown(1000);
      model.close();
    }
  });
});

describe('grpc relay mode: graceful endings', () => {
  const hold = { ':method': 'POST', ':path': '/ovmsmtls.test.Echo/Hold', 'content-type': 'application/grpc', te: 'trailers' };

  test('shutdown sends GOAWAY between frames; the stream already open keeps going, and the connection closes when the client is done, before the timeout', async () => {
    const local = await startTestProxy({ pki, upstream: { grpcPort: upstream.grpcPort! }, grpcMode: 'relay' });
    const session = h2Session(local.grpcPort, pki);
    try {
      const stream = session.request(hold, { endStream: false });
      stream.on('error', () => {});
      stream.end(grpcFrame(Buffer.alloc(0)));
      await once(stream, 'response');
      const goaway = once(session, 'goaway') as Promise<[number, number]>;
      const stopped = local.proxy.shutdown(30_000);
      const [code, lastStreamId] = await goaway;
      assert.equal(code, 0);
      assert.equal(lastStreamId, 2 ** 31 - 1);
      // The stream opened before the GOAWAY still works: its end reaches the upstream.
      assert.equal(stream.closed, false);
      stream.close();
      await stopped;
      assert.equal(local.logs.lines.some((l) => l.event === 'shutdown_timeout'), false);
      const line = await local.logs.waitFor((l) => l.event === 'relay_access');
      assert.equal(line.goAway, true);
    } finally {
      session.destroy();
    }
  });

  test('closing one relayed connection (what revocation does) sends it a GOAWAY and leaves the others alone', async () => {
    const local = await startTestProxy({ pki, upstream: { grpcPort: upstream.grpcPort! }, grpcMode: 'relay' });
    const first = h2Session(local.grpcPort, pki);
    const second = h2Session(local.grpcPort, pki);
    try {
      await Promise.all([first, second].map((s) => h2Request(s, ECHO_UNARY_HEADERS, grpcFrame(Buffer.alloc(0)))));
      const [listener] = local.proxy.listeners();
      await eventually(() => listener!.connections.size === 2, 'both connections tracked');
      const goaway = once(first, 'goaway');
      const firstSocket = [...listener!.connections.keys()].find((s) => s.remotePort === first.socket.localPort)!;
      listener!.closeConnection(firstSocket, 30_000);
      await goaway;
      await once(first, 'close');
      const res = await h2Request(second, ECHO_UNARY_HEADERS, grpcFrame(Buffer.alloc(0)));
      assert.equal(res.trailers?.['grpc-status'], '0');
    } finally {
      first.destroy();
      second.destroy();
      await local.proxy.shutdown(1000);
    }
  });

  /** A relay in front of a model server that answers SETTINGS and records every frame it receives. */
  async function relayToRecorder() {
    const received = new H2FrameReader();
    const model = await scriptedUpstream((socket, first) => {
      socket.write(h2Frame(H2.SETTINGS, 0, 0));
      received.push(first.subarray(CLIENT_PREFACE_BYTES));
      socket.on('data', (chunk: Buffer) => received.push(chunk));
    });
    const local = await startTestProxy({ pki, upstream: { grpcPort: model.port }, grpcMode: 'relay' });
    return { received, model, local };
  }

  /** Stream 1 open (the relay never decodes HPACK: any header block will do for the stand-in), then the drain of its connection. */
  async function openStreamThenDrain(client: RawH2Client, received: H2FrameReader, local: StartedProxy): Promise<void> {
    client.socket.write(h2Frame(H2.HEADERS, END_HEADERS, 1, Buffer.from([0x83])));
    await eventually(() => received.frames.some((f) => f.type === H2.HEADERS), 'the first stream at the model server');
    drainOnlyConnection(local);
  }

  test('a stream whose HEADERS the client wrote in one go with its ACK (as C-core writes a call it started before it read the GOAWAY) is taken: the stream in flight and the connection live on', { timeout: 30_000 }, async () => {
    const { received, model, local } = await relayToRecorder();
    try {
      const client = await rawH2Client(local.grpcPort, pki);
      await openStreamThenDrain(client, received, local);
      await client.waitForFrame(H2.GOAWAY);
      const ping = await client.waitForFrame(H2.PING);
      // One write, so one TLS record: the relay reads the ACK and the HEADERS together.
      client.socket.write(Buffer.concat([h2Frame(H2.PING, ACK, 0, ping.payload), h2Frame(H2.HEADERS, END_HEADERS, 3, Buffer.from([0x83]))]));
      await eventually(() => received.frames.filter((f) => f.type === H2.HEADERS).length === 2, 'the second stream at the model server');
      assert.deepEqual(client.frames.filter((f) => f.type === H2.GOAWAY).map((f) => f.payload.readUInt32BE(0)), [2 ** 31 - 1], 'no final GOAWAY cut it off');
      assert.equal(client.socket.destroyed, false);
      assert.deepEqual(received.frames.filter((f) => f.type === H2.PING), [], 'the model server never sent that PING');
      assert.equal(local.logs.lines.find((l) => l.event === 'relay_access'), undefined, 'the connection is still open');
    } finally {
      await local.proxy.shutdown(1000);
      model.close();
    }
  });

  test('a client that opens a stream after it has read the GOAWAY (it acknowledged the PING that follows it) is told the last stream taken and cut off; the stream never reaches the model server, nor the ACK', { timeout: 30_000 }, async () => {
    const { received, model, local } = await relayToRecorder();
    try {
      const client = await rawH2Client(local.grpcPort, pki);
      answerPings(client);
      await openStreamThenDrain(client, received, local);
      assert.equal((await client.waitForFrame(H2.GOAWAY)).payload.readUInt32BE(0), 2 ** 31 - 1);
      // Answered as it arrived: the ACK is on its way before the next stream.
      await client.waitForFrame(H2.PING);
      client.socket.write(h2Frame(H2.HEADERS, END_HEADERS, 3, Buffer.from([0x83])));
      await client.closed;
      const goAways = client.frames.filter((f) => f.type === H2.GOAWAY).map((f) => [f.payload.readUInt32BE(0), f.payload.readUInt32BE(4)]);
      assert.deepEqual(goAways, [[2 ** 31 - 1, 0], [1, 1]], 'a final GOAWAY: last stream 1, PROTOCOL_ERROR');
      const line = await local.logs.waitFor((l) => l.event === 'relay_access');
      assert.equal(line.error, 'client_ignored_goaway');
      assert.deepEqual(received.frames.filter((f) => f.type === H2.HEADERS).map((f) => f.streamId), [1]);
      assert.deepEqual(received.frames.filter((f) => f.type === H2.PING), [], 'the model server never sent that PING');
    } finally {
      await local.proxy.shutdown(1000);
      model.close();
    }
  });

  test('one TLS record per byte, preface and every frame split at every offset: a call is answered; the ACK of our PING is taken out, so the model server (Node, which ends a session on an ACK it did not ask for) goes on; a stream after it is cut off', { timeout: 60_000 }, async () => {
    const local = await startTestProxy({ pki, upstream: { grpcPort: upstream.grpcPort! }, grpcMode: 'relay' });
    try {
      const client = await rawH2Client(local.grpcPort, pki, undefined, byteByByte);
      // Acknowledged as it came: no write of the helper's own lands inside the frames below.
      await client.waitForFrame(H2.SETTINGS);
      const call = Buffer.concat([h2Frame(H2.HEADERS, END_HEADERS, 1, grpcHeaderBlock('/ovmsmtls.test.Echo/Unary')), h2Frame(H2.DATA, END_STREAM, 1, grpcFrame(Buffer.from([0x0a, 0x02, 0x68, 0x69])))]);
      await byteByByte(client.socket, call);
      await eventually(() => streamFrames(client.frames, 1).includes('end'), 'the answer to the call');
      assert.deepEqual(streamFrames(client.frames, 1), ['headers', 'data', 'end']);
      drainOnlyConnection(local);
      await client.waitForFrame(H2.GOAWAY);
      const ping = await client.waitForFrame(H2.PING);
      assert.deepEqual(ping.payload, DRAIN_PING_DATA);
      await byteByByte(client.socket, h2Frame(H2.PING, 0x1, 0, ping.payload));
      const own = Buffer.from('client!!');
      await byteByByte(client.socket, h2Frame(H2.PING, 0, 0, own));
      await eventually(() => client.frames.some((f) => f.type === H2.PING && f.payload.equals(own)), "the model server's answer to the client's own PING");
      await byteByByte(client.socket, h2Frame(H2.HEADERS, END_HEADERS, 3, grpcHeaderBlock('/ovmsmtls.test.Echo/Unary')));
      await client.closed;
      const goAways = client.frames.filter((f) => f.type === H2.GOAWAY).map((f) => [f.payload.readUInt32BE(0), f.payload.readUInt32BE(4)]);
      assert.deepEqual(goAways, [[2 ** 31 - 1, 0], [1, 1]], 'ours only: the model server never refused the connection');
    } finally {
      await local.proxy.shutdown(1000);
    }
  });

  test('a stream the client opened before it read the GOAWAY reaches the model server however late the relay reads it (a model server not reading, a slow link), and the connection is not cut', { timeout: 120_000 }, async () => {
    const headers: number[] = [];
    /** The flags of each PING the model server reads. */
    const pings: number[] = [];
    let modelSocket: Socket | undefined;
    const model = await scriptedUpstream((socket, first) => {
      socket.write(h2Frame(H2.SETTINGS, 0, 0));
      const cursor = new FrameCursor({ skip: CLIENT_PREFACE_BYTES, onFrame: (type, id, flags) => {
        if (type === H2.HEADERS) headers.push(id);
        if (type === H2.PING) pings.push(flags);
      } });
      cursor.advance(first);
      socket.on('data', (chunk: Buffer) => cursor.advance(chunk));
      // Reads nothing more until told: what the client sends from now on waits in front of the relay.
      socket.pause();
      modelSocket = socket;
    });
    const local = await startTestProxy({ pki, upstream: { grpcPort: model.port }, grpcMode: 'relay' });
    try {
      const client = await rawH2Client(local.grpcPort, pki);
      answerPings(client);
      const [listener] = local.proxy.listeners();
      await eventually(() => listener!.connections.size === 1, 'the connection tracked');
      const ours = [...listener!.connections.keys()][0]!;
      client.socket.write(h2Frame(H2.HEADERS, END_HEADERS, 1, Buffer.from([0x83])));
      const data = h2Frame(H2.DATA, 0, 1, Buffer.alloc(16 * 1024));
      while (!ours.isPaused()) {
        if (!client.socket.write(data)) await Promise.race([once(client.socket, 'drain'), sleep(100)]);
      }
      // 16 MiB more queued behind what the relay holds, then a second call: all before any GOAWAY.
      for (let i = 0; i < 1024; i++) client.socket.write(data);
      client.socket.write(h2Frame(H2.HEADERS, END_HEADERS, 3, Buffer.from([0x83])));
      listener!.closeConnection(ours, 60_000);
      await client.waitForFrame(H2.GOAWAY);
      // The PING after the GOAWAY came in the same read (one write of ours), and its ACK is queued now; a PING of the client's own follows it.
      client.socket.write(h2Frame(H2.PING, 0, 0, Buffer.from('client!!')));
      // Longer than any allowance a clock could make for streams "already on their way".
      await sleep(1500);
      modelSocket!.resume();
      await eventually(() => pings.length > 0 || client.socket.destroyed, "the client's own PING at the model server");
      assert.deepEqual(headers, [1, 3]);
      assert.deepEqual(pings, [0], 'the ACK of our PING was taken out');
      assert.deepEqual(client.frames.filter((f) => f.type === H2.GOAWAY).length, 1, 'no final GOAWAY');
      client.socket.end();
      await client.closed;
      const line = await local.logs.waitFor((l) => l.event === 'relay_access');
      assert.deepEqual([line.error, line.goAway, line.calls], [undefined, true, 2]);
    } finally {
      await local.proxy.shutdown(1000);
      model.close();
    }
  });
});

describe('grpc relay mode: a model server that closes first', () => {
  test('its GOAWAY error code and debug data (C-core: ENHANCE_YOUR_CALM, too_many_pings) and the client\'s own GOAWAY code are on the relay_access line, and the model server\'s error is a warn line', { timeout: 30_000 }, async () => {
    const model = await scriptedUpstream((socket) => {
      socket.write(h2Frame(H2.SETTINGS, 0, 0));
      const goAwayPayload = Buffer.concat([Buffer.from([0, 0, 0, 1, 0, 0, 0, 0x0b]), Buffer.from('too_many_pings')]);
      // Open until the client has had its say: a client's GOAWAY is read only while the model server is there to take it.
      socket.once('data', () => socket.write(h2Frame(H2.GOAWAY, 0, 0, goAwayPayload)));
    });
    const local = await startTestProxy({ pki, upstream: { grpcPort: model.port }, grpcMode: 'relay' });
    try {
      const client = await rawH2Client(local.grpcPort, pki);
      client.socket.write(h2Frame(H2.HEADERS, END_HEADERS, 1, Buffer.from([0x83])));
      const theirs = await client.waitForFrame(H2.GOAWAY);
      assert.equal(theirs.payload.readUInt32BE(4), 0x0b, 'passed on untouched');
      // INTERNAL_ERROR (2), as a client that gives up on the connection may send.
      client.socket.end(h2Frame(H2.GOAWAY, 0, 0, Buffer.from([0, 0, 0, 0, 0, 0, 0, 2])));
      await client.closed;
      const line = await local.logs.waitFor((l) => l.event === 'relay_access');
      assert.deepEqual([line.upstreamGoAway, line.upstreamGoAwayDebug, line.clientGoAway, line.clientGoAwayDebug], ['ENHANCE_YOUR_CALM', 'too_many_pings', 'INTERNAL_ERROR', undefined]);
      const warn = local.logs.lines.find((l) => l.event === 'upstream_goaway');
      assert.deepEqual([warn?.level, warn?.listener, warn?.code, warn?.debug, warn?.subject], ['warn', 'grpc', 'ENHANCE_YOUR_CALM', 'too_many_pings', 'CN=client,OU=tests']);
      assert.match(String(warn?.msg), /ENHANCE_YOUR_CALM[^]*too_many_pings[^]*keepalive/);
    } finally {
      await local.proxy.shutdown(1000);
      model.close();
    }
  });

  const answered = (id: number) => Buffer.concat([h2Frame(H2.HEADERS, END_HEADERS, id, GRPC_RESPONSE_HEADER_BLOCK), h2Frame(H2.HEADERS, END_HEADERS | 0x1, id, Buffer.from([0x40, 0x0b, ...Buffer.from('grpc-status'), 0x01, 0x30]))]);
  const endings: [string, (id: number) => Buffer, string | undefined][] = [
    ['under a call whose answer has begun (a crash: FIN, no GOAWAY): the line says so, with an upstream_error line', (id) => h2Frame(H2.HEADERS, END_HEADERS, id, GRPC_RESPONSE_HEADER_BLOCK), UPSTREAM_CLOSED_MID_CALL],
    ['after a GOAWAY that did not take the call (a restart; the client retries it): no error', () => h2Frame(H2.GOAWAY, 0, 0, Buffer.alloc(8)), undefined],
    ['after answering the call in full, while the client has not ended its side: no error', answered, undefined],
  ];
  for (const [name, answer, error] of endings) {
    test(`a model server that closes its connection ${name}`, { timeout: 30_000 }, async () => {
      const model = await framedH2cUpstream(answer);
      const local = await startTestProxy({ pki, upstream: { grpcPort: model.port }, grpcMode: 'relay' });
      try {
        const client = await rawH2Client(local.grpcPort, pki);
        client.socket.write(h2Frame(H2.HEADERS, END_HEADERS, 1, Buffer.from([0x83])));
        await eventually(() => client.frames.some((f) => f.type === H2.HEADERS || f.type === H2.GOAWAY), "the model server's answer");
        model.sockets[0]!.end();
        await client.closed;
        const line = await local.logs.waitFor((l) => l.event === 'relay_access');
        assert.equal(line.error, error);
        const upstreamErrors = local.logs.lines.filter((l) => l.event === 'upstream_error').map((l) => l.reason);
        assert.deepEqual(upstreamErrors, error ? ['UPSTREAM_CLOSED'] : []);
      } finally {
        await local.proxy.shutdown(1000);
        model.close();
      }
    });
  }

  test('while the client is still sending, the client connection is still read to its end, closed and logged, never left paused', { timeout: 30_000 }, async () => {
    // Takes 64 KiB and closes cleanly (FIN): the relay holds the rest of the client's bytes.
    const model = await scriptedUpstream((socket, first) => {
      socket.write(h2Frame(H2.SETTINGS, 0, 0));
      let received = first.length;
      socket.on('data', (chunk: Buffer) => {
        received += chunk.length;
        if (received > 64 * 1024) socket.end();
      });
    });
    const local = await startTestProxy({ pki, upstream: { grpcPort: model.port }, grpcMode: 'relay' });
    try {
      const client = await rawH2Client(local.grpcPort, pki);
      client.socket.write(h2Frame(H2.HEADERS, END_HEADERS, 1, Buffer.from([0x83])));
      // 4 MiB of DATA at once, ignoring flow control, as a client streaming a large request may.
      const data = h2Frame(H2.DATA, 0, 1, Buffer.alloc(16 * 1024));
      for (let i = 0; i < 256; i++) client.socket.write(data);
      // The relay ended the connection; the client gives up on what it could not send.
      await once(client.socket, 'end');
      client.socket.destroy();
      const [listener] = local.proxy.listeners();
      await eventually(() => listener!.connections.size === 0, 'the client connection released');
      const line = await local.logs.waitFor((l) => l.event === 'relay_access');
      assert.equal(line.calls, 1);
    } finally {
      await local.proxy.shutdown(1000);
      model.close();
    }
  });
});
