import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import type { ClientHttp2Session } from 'node:http2';
import type { TestPki } from './helpers/pki.js';
import { grpcClients, grpcFrame, h2Request, h2Session, startTestProxy, startUpstreamFixture, type StartedProxy } from './helpers/harness.js';
import { ECHO_UNARY_HEADERS } from './helpers/grpc-calls.js';
import { eventually } from './helpers/ops.js';
import { H2, rawH2Client } from './helpers/raw-h2.js';
import { unary } from '../src/demo/grpc-client.js';
import type { ModelServer } from '../src/demo/model-server.js';
import { NOOP_OBSERVER } from '../src/observer.js';

/** Short, so that each test waits through a few idle spells. */
const IDLE_MS = 400;
/** A connection that is never closed fails its test instead of hanging the run. */
const NOT_FOR_EVER = { timeout: 30_000 };
const BIDI_HEADERS = { ...ECHO_UNARY_HEADERS, ':path': '/ovmsmtls.test.Echo/Bidi' };
/** EchoRequest { payload: "hi" } */
const HI = grpcFrame(Buffer.from([0x0a, 0x02, 0x68, 0x69]));

let pki: TestPki;
let upstream: ModelServer;
let closeAll: () => Promise<void>;

before(async () => ({ pki, upstream, close: closeAll } = await startUpstreamFixture()));
after(() => closeAll());

/** What a session saw: the GOAWAY's error code, and whether it came before `mark()`. */
function watchGoAway(session: ClientHttp2Session) {
  let marked = false;
  const seen: { code: number; beforeMark: boolean }[] = [];
  // Judged a turn later: trailers and a GOAWAY read together emit 'goaway' at once but 'trailers' on the next tick.
  session.on('goaway', (code) => setImmediate(() => seen.push({ code, beforeMark: !marked })));
  const turnLater = () => new Promise((resolve) => setImmediate(resolve));
  return { seen, mark: () => (marked = true), closed: once(session, 'close').then(turnLater) };
}

/** A client that ignores a GOAWAY (and answers no PING), the GOAWAY error codes it got, and the PINGs. */
async function stubbornH2Client(port: number): Promise<{ goAwayCodes: () => number[]; pings: () => number; ended: Promise<unknown> }> {
  const client = await rawH2Client(port, pki);
  const goAwayCodes = () => client.frames.filter((f) => f.type === H2.GOAWAY).map((f) => f.payload.readUInt32BE(4));
  return { goAwayCodes, pings: () => client.frames.filter((f) => f.type === H2.PING).length, ended: client.closed };
}

for (const grpcMode of ['terminate', 'relay'] as const) {
  describe(`gRPC port, ${grpcMode} mode: an HTTP/2 connection with no stream open for --mtls_idle_timeout`, () => {
    let front: StartedProxy;
    let handshakes = 0;
    let open = 0;

    before(async () => {
      const observer = { ...NOOP_OBSERVER, handshakeAccepted: () => void handshakes++, connectionOpened: () => void open++, connectionClosed: () => void open-- };
      front = await startTestProxy({ pki, upstream: { grpcPort: upstream.grpcPort! }, grpcMode, limits: { idleTimeoutMs: IDLE_MS }, observer });
    });

    after(() => front.proxy.shutdown(1000));

    test('gets a GOAWAY with NO_ERROR after its last call and closes', NOT_FOR_EVER, async () => {
      const session = h2Session(front.grpcPort, pki);
      const watch = watchGoAway(session);
      const res = await h2Request(session, ECHO_UNARY_HEADERS, HI);
      assert.equal(res.trailers?.['grpc-status'], '0');
      await watch.closed;
      assert.deepEqual(watch.seen.map((g) => g.code), [0]);
    });

    test('stays open while a stream is open, however quiet, and closes once it has ended', NOT_FOR_EVER, async () => {
      const session = h2Session(front.grpcPort, pki);
      const watch = watchGoAway(session);
      const stream = session.request(BIDI_HEADERS);
      const replies: Buffer[] = [];
      stream.on('data', (chunk: Buffer) => replies.push(chunk));
      stream.write(HI);
      await once(stream, 'data');
      await sleep(IDLE_MS * 4);
      stream.end(HI);
      const [trailers] = (await once(stream, 'trailers')) as [Record<string, string>];
      watch.mark();
      assert.equal(trailers['grpc-status'], '0');
      assert.equal(Buffer.concat(replies).length, 2 * (5 + 4 + 2), 'both messages were answered');
      await watch.closed;
      assert.deepEqual(watch.seen, [{ code: 0, beforeMark: false }]);
    });

    test('PINGs do not count as use: a connection that only pings is closed too', NOT_FOR_EVER, async () => {
      const session = h2Session(front.grpcPort, pki);
      const watch = watchGoAway(session);
      await h2Request(session, ECHO_UNARY_HEADERS, HI);
      let acked = 0;
      // ping() throws on a session already closing, which it is between our GOAWAY and its 'close'.
      const pinger = setInterval(() => session.closed || session.destroyed || session.ping((err) => void (err || acked++)), IDLE_MS / 8);
      try {
        await watch.closed;
      } finally {
        clearInterval(pinger);
      }
      assert.ok(acked >= 1, `pings went both ways while it was open (${acked} acknowledged)`);
      assert.deepEqual(watch.seen.map((g) => g.code), [0]);
    });

    test('a gRPC client makes its next call on a new connection as if nothing happened', NOT_FOR_EVER, async () => {
      const clients = grpcClients(front.grpcAddress, pki);
      const before = handshakes;
      try {
        await unary(clients.echo, 'Unary', { payload: Buffer.from('one') });
        // Waits for the close itself, however loaded the machine: no race between the sweep and the next call.
        await eventually(() => open === 0, 'the idle connection to close');
        const { response } = await unary(clients.echo, 'Unary', { payload: Buffer.from('two') });
        assert.equal(Buffer.from(response.payload).toString(), 'two');
        assert.equal(handshakes - before, 2, 'the first connection was closed while idle');
      } finally {
        clients.close();
      }
    });

    test('a client that ignores the GOAWAY has its connection ended', NOT_FOR_EVER, async () => {
      const client = await stubbornH2Client(front.grpcPort);
      await client.ended;
      assert.deepEqual(client.goAwayCodes(), [0]);
      // The sweep's PING is for a connection with a stream the proxy never saw: this one opened none. The
      // relay's one PING follows its GOAWAY, to learn when the client has read it.
      assert.equal(client.pings(), grpcMode === 'relay' ? 1 : 0, 'the proxy sent PINGs to a connection that never opened a stream');
      if (grpcMode === 'relay') {
        const line = await front.logs.waitFor((l) => l.event === 'relay_access' && l.calls === 0);
        assert.equal(line.idle, true, 'the connection line says why it closed');
        assert.equal(line.goAway, true);
      }
    });
  });
}

describe('REST port: an HTTP/2 connection with no request open for --mtls_idle_timeout', () => {
  for (const restMode of ['terminate', 'relay'] as const) {
    test(`gets a GOAWAY with NO_ERROR and closes (${restMode} mode)`, NOT_FOR_EVER, async () => {
      const front = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, restMode, limits: { idleTimeoutMs: IDLE_MS } });
      try {
        const session = h2Session(front.restPort, pki);
        const watch = watchGoAway(session);
        const res = await h2Request(session, { ':method': 'GET', ':path': '/v2/health/live' });
        assert.equal(res.headers[':status'], 200);
        await watch.closed;
        assert.deepEqual(watch.seen.map((g) => g.code), [0]);
      } finally {
        await front.proxy.shutdown(1000);
      }
    });
  }
});
