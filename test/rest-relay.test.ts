import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { execFile } from 'node:child_process';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { createServer as createHttpServer, type ServerResponse } from 'node:http';
import { connect as netConnect, type AddressInfo, type Socket } from 'node:net';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { https1, startTestProxy, startUpstream, tlsClientOptions, type StartedProxy } from './helpers/harness.js';
import { behindProxy, closingWhenReused, scriptedUpstream } from './helpers/scripted-upstream.js';
import { openRaw as openRawWith, readToClose, readToCloseWithin, readUntil } from './helpers/raw-http1.js';
import { eventually } from './helpers/ops.js';
import type { ModelServer } from '../src/demo/model-server.js';
import { FORWARD_MODES } from '../src/config.js';
import { NOOP_OBSERVER } from '../src/observer.js';

const INFER_BODY = JSON.stringify({ inputs: [{ name: 'b', shape: [1, 10], datatype: 'FP32', data: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] }] });

let pki: TestPki;
let upstream: ModelServer;
let front: StartedProxy;

before(async () => {
  pki = await createTestPki();
  upstream = await startUpstream({ grpcPort: null });
  front = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, restMode: 'relay' });
});

after(async () => {
  await front.proxy.shutdown(1000);
  await upstream.close();
  await pki.cleanup();
});

const openRaw = (port: number): Promise<TLSSocket> => openRawWith(port, pki);

const statuses = (text: string) => [...text.matchAll(/HTTP\/1\.[01] (\d{3}) /g)].map((m) => Number(m[1]));

/** A relay in front of an upstream that answers the first bytes of each connection with `reply` and closes (or, with keepOpen, reads on). */
function withScriptedUpstream(reply: string, run: (local: StartedProxy, upstreamPort: number) => Promise<void>, options: { keepOpen?: boolean } = {}): Promise<void> {
  const answer = (s: Socket): void => void (options.keepOpen ? s.write(reply) : s.end(reply));
  return behindProxy({ pki, restMode: 'relay', answer }, (local, upstream) => run(local, upstream.port));
}

describe('rest relay: HTTP/1.1 framing', () => {
  test('a request two parsers could split differently gets 400 naming the problem, and nothing of it reaches the model server', async () => {
    const before = upstream.received.length;
    const socket = await openRaw(front.restPort);
    // The classic smuggling shape: a front that trusts Content-Length and a back that trusts chunked would see a second request.
    socket.write('POST /v2/models/dummy/infer HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /v2/health/live HTTP/1.1\r\nhost: a\r\n\r\n');
    const text = await readToClose(socket);
    assert.deepEqual(statuses(text), [400]);
    assert.match(text, /connection: close/);
    assert.match(text, /both Content-Length and Transfer-Encoding/);
    assert.equal(upstream.received.length, before);
    const line = await front.logs.waitFor((l) => l.event === 'access' && l.status === 400 && l.error === 'bad_request');
    assert.equal(line.subject, 'CN=client,OU=tests');
    assert.equal(line.method, 'POST');
    assert.equal(line.path, '/v2/models/dummy/infer');
  });

  test('a chunked body framed wrongly, after its head went upstream, gets 400 naming the problem and the connection closes, not a bare reset', async () => {
    const bodies: readonly [string, RegExp][] = [
      ['0x5\r\nhello\r\n0\r\n\r\n', /malformed chunk-size line/],
      ['5 \r\nhello\r\n0\r\n\r\n', /malformed chunk-size line/],
      ['10000000000000005\r\nhello\r\n0\r\n\r\n', /chunk size too large/],
      ['3\r\nhello\r\n0\r\n\r\n', /chunk data not followed by CRLF/],
      ['5\r\nhello\r\n0\r\nbad trailer\r\n\r\n', /malformed trailer/],
    ];
    for (const [body, problem] of bodies) {
      const from = upstream.received.length;
      const logged = front.logs.lines.length;
      const socket = await openRaw(front.restPort);
      socket.write('POST /echo-body HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n');
      // The head has reached the model server, which waits for the body.
      await eventually(() => upstream.received.length > from, 'the head upstream');
      socket.write(body);
      const text = await readToClose(socket);
      assert.deepEqual(statuses(text), [400], body);
      assert.match(text, /\r\nconnection: close\r\n/);
      assert.match(text, problem);
      const line = () => front.logs.lines.slice(logged).find((l) => l.event === 'access' && l.path === '/echo-body');
      await eventually(() => line() !== undefined, 'its access line');
      assert.deepEqual([line()!.status, line()!.error], [400, 'bad_request_body']);
    }
  });

  // A peer ending its lines with LF alone never sends CRLF CRLF: the client got 408 after --mtls_idle_timeout, naming the timeout; the model server's answer was waited for for ever.
  test('a request head whose lines end with a bare LF gets 400 naming it at once, as in terminate mode, not a 408 after the idle timeout', async () => {
    const before = upstream.received.length;
    const socket = await openRaw(front.restPort);
    socket.write('GET /v2/health/ready HTTP/1.1\nhost: a\n\n');
    const text = await readToCloseWithin(socket, 10_000);
    assert.deepEqual(statuses(text), [400]);
    assert.match(text, /bare CR or LF/);
    assert.equal(upstream.received.length, before);
  });

  test('a model server answer whose lines end with a bare LF is a 502 naming it, not an answer waited for for ever', () =>
    withScriptedUpstream('HTTP/1.1 200 OK\ncontent-length: 2\n\nok', async (local) => {
      const socket = await openRaw(local.restPort);
      socket.write('GET /v2/health/ready HTTP/1.1\r\nhost: a\r\n\r\n');
      const text = await readToCloseWithin(socket, 10_000);
      assert.deepEqual(statuses(text), [502]);
      assert.match(text, /bare CR or LF/);
      const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/health/ready');
      assert.deepEqual([line.status, line.error], [502, 'bad_response']);
    }, { keepOpen: true }));

  test('a refused request after good ones is answered after their responses, in order', async () => {
    const socket = await openRaw(front.restPort);
    socket.write('GET /v2/health/ready HTTP/1.1\r\nhost: a\r\n\r\nGET /v2/health/live HTTP/1.1\r\nhost : a\r\n\r\n');
    const text = await readToClose(socket);
    assert.deepEqual(statuses(text), [200, 400]);
    assert.match(text, /malformed header line/);
  });

  test('pipelined requests are answered in order on one connection', async () => {
    const socket = await openRaw(front.restPort);
    socket.write(
      'GET /v2/models/dummy HTTP/1.1\r\nhost: a\r\n\r\n' +
        'GET /v2/models/nope HTTP/1.1\r\nhost: a\r\n\r\n' +
        `POST /v2/models/dummy/infer HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: ${INFER_BODY.length}\r\nconnection: close\r\n\r\n${INFER_BODY}`,
    );
    const text = await readToClose(socket);
    assert.deepEqual(statuses(text), [200, 404, 200]);
    assert.match(text, /"name":"dummy"/);
    assert.match(text, /"data":\[1,2,3,4,5,6,7,8,9,10\]/);
  });

  test('Expect: 100-continue: the client gets 100 Continue before it sends the body, then the answer', async () => {
    const socket = await openRaw(front.restPort);
    socket.write(`POST /v2/models/dummy/infer HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: ${INFER_BODY.length}\r\nexpect: 100-continue\r\n\r\n`);
    assert.match(await readUntil(socket, /\r\n\r\n/), /^HTTP\/1\.1 100 Continue\r\n/);
    const answer = readUntil(socket, /\[1,2,3,4,5,6,7,8,9,10\]/);
    socket.write(INFER_BODY);
    assert.deepEqual(statuses(await answer), [200]);
    socket.destroy();
  });

  test('Expect: 100-continue on a chunked body (curl -T -): the relay sends the 100 itself and the model server never sees the field, which OVMS\'s Drogon 1.9.7 (as the stand-in) answers there with 400', async () => {
    const socket = await openRaw(front.restPort);
    socket.write('POST /echo-body HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\nexpect: 100-continue\r\n\r\n');
    assert.match(await readUntil(socket, /\r\n\r\n/), /^HTTP\/1\.1 100 Continue\r\n\r\n$/);
    const answer = readUntil(socket, /"sha256"/);
    socket.write('3\r\nabc\r\n0\r\n\r\n');
    const text = await answer;
    assert.deepEqual(statuses(text), [200]);
    assert.match(text, /"bytes":3/);
    assert.equal(upstream.received.at(-1)?.headers['expect'], undefined);
    socket.destroy();
  });

  test('Expect: 100-continue on an empty body (Content-Length: 0, as boto3 sends for an empty object): no 100, the answer, and the model server, which as Drogon 1.9.7 would answer 400, never sees the field', async () => {
    const socket = await openRaw(front.restPort);
    socket.write('POST /echo-body HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n');
    const text = await readToClose(socket);
    assert.deepEqual(statuses(text), [200]);
    assert.match(text, /"bytes":0/);
  });

  test('Expect: 100-continue behind a request still being answered: the relay\'s 100 comes after that whole response, never inside it', async () => {
    const socket = await openRaw(front.restPort);
    socket.write('GET /stream-bytes?n=300000 HTTP/1.1\r\nhost: a\r\n\r\nPOST /echo-body HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n');
    const before = await readUntil(socket, /HTTP\/1\.1 100 Continue\r\n\r\n/);
    const [first, rest] = before.split(/(?=HTTP\/1\.1 100 )/);
    assert.match(first!, /^HTTP\/1\.1 200 OK\r\n/);
    assert.equal(first!.length - first!.indexOf('\r\n\r\n') - 4, 300_000);
    assert.equal(rest, 'HTTP/1.1 100 Continue\r\n\r\n');
    const closed = readToClose(socket);
    socket.write('abc');
    assert.match(await closed, /^HTTP\/1\.1 200 OK\r\n[\s\S]*"bytes":3/);
  });

  test('a HEAD response carries no body, and the next request on the connection is read right', async () => {
    const socket = await openRaw(front.restPort);
    socket.write('HEAD /v2/health/ready HTTP/1.1\r\nhost: a\r\n\r\nGET /v2/models/dummy HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n');
    const text = await readToClose(socket);
    assert.equal(statuses(text).length, 2);
    assert.match(text, /"name":"dummy"/);
  });

  test('a client Upgrade request is served as a plain request, never switched', async () => {
    const res = await https1(front.restPort, pki, { path: '/v2/health/ready', headers: { connection: 'upgrade', upgrade: 'websocket' } });
    assert.equal(res.status, 200);
    assert.equal(upstream.received.at(-1)!.headers.upgrade, undefined);
  });

  test('no request trailer reaches the model server, neither one that would forge our fields or reframe the request nor any other; the chunked framing stays whole', async () => {
    let received = '';
    const scripted = await scriptedUpstream((s, first) => {
      const take = (bytes: Buffer) => {
        received += bytes.toString('latin1');
        if (received.endsWith('\r\n0\r\n\r\n')) s.write('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok');
      };
      s.on('data', take);
      take(first);
    });
    const local = await startTestProxy({ pki, upstream: { restPort: scripted.port }, restMode: 'relay' });
    try {
      const socket = await openRaw(local.restPort);
      const forged = ['X-Forwarded-Client-Cert: Hash=evil;Subject="CN=admin"', 'X_Forwarded_Client_Cert: Hash=evil', 'x-forwarded-for: 6.6.6.6', 'X-Forwarded-Proto: http', 'Content-Length: 99', 'transfer-encoding: chunked', 'Host: admin'];
      socket.write(`POST /v2/models/dummy/infer HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n${forged.join('\r\n')}\r\nx-checksum: abc\r\n\r\n`);
      assert.match(await readUntil(socket, /ok$/), /^HTTP\/1\.1 200 OK\r\n/);
      assert.equal(received.slice(received.indexOf('\r\n\r\n') + 4), '5\r\nhello\r\n0\r\n\r\n');
      socket.destroy();
    } finally {
      await local.proxy.shutdown(1000);
      scripted.close();
    }
  });

  for (const [shape, fields, says] of [['no Host', '', /needs a Host field/], ['two Host fields', 'host: a\r\nhost: b\r\n', /one Host field at most/]] as const) {
    test(`an HTTP/1.1 request with ${shape} gets 400 and never reaches the model server (RFC 9112 3.2)`, async () => {
      const before = upstream.received.length;
      const socket = await openRaw(front.restPort);
      socket.write(`GET /v2/health/live HTTP/1.1\r\n${fields}\r\n`);
      const text = await readToClose(socket);
      assert.deepEqual(statuses(text), [400]);
      assert.match(text, says);
      assert.equal(upstream.received.length, before);
    });
  }

  test('a Connection field naming a field we set loses that option, so no hop after the model server drops ours; its other options stay', async () => {
    let head = '';
    const scripted = await scriptedUpstream((s, first) => {
      head = first.toString('latin1');
      s.end('HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok');
    });
    const local = await startTestProxy({ pki, upstream: { restPort: scripted.port }, restMode: 'relay' });
    try {
      const socket = await openRaw(local.restPort);
      socket.write('GET /v2/health/live HTTP/1.1\r\nhost: a\r\nConnection: keep-alive, X-Forwarded-Client-Cert , x-forwarded-for\r\n\r\n');
      assert.match(await readToClose(socket), /^HTTP\/1\.1 200 OK\r\n/);
      assert.match(head, /\r\nConnection: keep-alive\r\n/);
      assert.doesNotMatch(head, /connection:[^\r]*forwarded/i);
      assert.match(head, /\r\nx-forwarded-client-cert: Hash=[0-9a-f]{64};/);
    } finally {
      await local.proxy.shutdown(1000);
      scripted.close();
    }
  });

  test('a client that sends its whole body before reading (as Python requests does), behind a head we refuse, can finish that write: it gets the 400 and the close', { timeout: 60_000 }, async () => {
    const socket = await openRaw(front.restPort);
    // Far more than the kernel buffers between us: the write ends only if the relay reads it.
    const body = Buffer.alloc(32 * 1024 * 1024, 7);
    socket.write(`POST /v2/models/dummy/infer HTTP/1.1\r\nhost: user@localhost\r\ncontent-length: ${body.length}\r\n\r\n`);
    const written = new Promise<Error | null | undefined>((resolve) => socket.write(body, resolve));
    const text = readToClose(socket);
    assert.ifError(await written);
    assert.match(await text, /^HTTP\/1\.1 400 Bad Request\r\n[^]*connection: close\r\n[^]*request authority \\"user@localhost\\" is not forwarded/);
  });

  test('a client that keeps its end open after the relay closed its own is let go after --mtls_idle_timeout, not held for ever', { timeout: 30_000 }, async () => {
    let released!: () => void;
    const connectionClosed = new Promise<void>((resolve) => (released = resolve));
    const observer = { ...NOOP_OBSERVER, connectionClosed: () => released() };
    const local = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, restMode: 'relay', limits: { idleTimeoutMs: 300 }, observer });
    // A TLS socket is half-open when the TCP socket under it is.
    const tcp = netConnect({ host: '127.0.0.1', port: local.restPort, allowHalfOpen: true });
    const socket = tlsConnect({ socket: tcp, ALPNProtocols: ['http/1.1'], ...tlsClientOptions(pki) });
    socket.on('error', () => {});
    try {
      await once(socket, 'secureConnect');
      const ended = once(socket, 'end');
      socket.write('GET /v2/health/live HTTP/1.1\r\nhost: a\r\ncontent-length: x\r\n\r\n');
      socket.resume();
      await ended;
      // Our end stays open and silent; the client cannot see the proxy let go (its FIN came already), the proxy's count can.
      await connectionClosed;
    } finally {
      socket.destroy();
      await local.proxy.shutdown(1000);
    }
  });

  test('a client-supplied x-forwarded-client-cert is replaced by the verified one', async () => {
    await https1(front.restPort, pki, { path: '/v2/health/live', headers: { 'x-forwarded-client-cert': 'Hash=evil;Subject="CN=admin"', 'x-forwarded-proto': 'http' } });
    const seen = upstream.received.at(-1)!;
    assert.match(String(seen.headers['x-forwarded-client-cert']), /^Hash=[0-9a-f]{64};Subject="CN=client,OU=tests"/);
    assert.equal(seen.headers['x-forwarded-proto'], 'https');
  });
});

/** An upstream whose responses wait until the test releases them. */
async function gatedUpstream(): Promise<{ port: number; release(): void; arrived: Promise<void>; close(): Promise<void> }> {
  const held: ServerResponse[] = [];
  let arrive!: () => void;
  const arrived = new Promise<void>((resolve) => (arrive = resolve));
  const server = createHttpServer((req, res) => {
    if (req.url === '/slow') {
      held.push(res);
      arrive();
    } else {
      res.end('quick');
    }
  });
  // Longer than any test: a connection that closes did so because of the proxy, not Node's 5 s keep-alive default here.
  server.keepAliveTimeout = 60_000;
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: (server.address() as AddressInfo).port,
    arrived,
    release: () => {
      for (const res of held) res.end('slow done');
    },
    close: async () => {
      server.closeAllConnections();
      server.close();
    },
  };
}

describe("rest relay: a client's last request", () => {
  // The idle timeout is long: a relay that waited for it instead of closing fails by the test's own timeout.
  for (const [what, request] of [
    ['`Connection: close`', 'GET /v2/health/ready HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n'],
    ['an HTTP/1.0 request without keep-alive', 'GET /v2/health/ready HTTP/1.0\r\n\r\n'],
  ] as const) {
    test(`after the response to ${what} the connection closes, though the model server answers keep-alive and stays open; a request pipelined after it never reaches the model server`, { timeout: 30_000 }, async () => {
      let received = '';
      const scripted = await scriptedUpstream((s, first) => {
        received += first.toString('latin1');
        s.on('data', (bytes: Buffer) => (received += bytes.toString('latin1')));
        s.write('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok');
      });
      const local = await startTestProxy({ pki, upstream: { restPort: scripted.port }, restMode: 'relay', limits: { idleTimeoutMs: 600_000 } });
      try {
        const socket = await openRaw(local.restPort);
        socket.write(`${request}GET /after-close HTTP/1.1\r\nhost: a\r\n\r\n`);
        const text = await readToClose(socket);
        assert.deepEqual(statuses(text), [200]);
        // RFC 9112 9.6: the server SHOULD say so in its final response.
        assert.match(text, /\r\nconnection: close\r\n\r\nok$/);
        assert.doesNotMatch(received, /after-close/);
        const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/health/ready');
        assert.deepEqual({ status: line.status, error: line.error }, { status: 200, error: undefined });
      } finally {
        await local.proxy.shutdown(1000);
        scripted.close();
      }
    });
  }
});

describe("rest relay: the model server's Connection options, where the relay rewrites that field", () => {
  test('a client\'s last request: the fields the model server\'s Connection named go with that line, not passed on as end-to-end; the framing stays', { timeout: 30_000 }, async () => {
    const scripted = await scriptedUpstream((s) => {
      s.write('HTTP/1.1 200 OK\r\ncontent-length: 2\r\nConnection: keep-alive, X-Hop, content-length\r\nx-hop: gone\r\nx-kept: yes\r\nkeep-alive: timeout=5\r\n\r\nok');
    });
    const local = await startTestProxy({ pki, upstream: { restPort: scripted.port }, restMode: 'relay' });
    try {
      const socket = await openRaw(local.restPort);
      socket.write('GET /v2/health/ready HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n');
      const text = await readToClose(socket);
      assert.deepEqual(statuses(text), [200]);
      assert.doesNotMatch(text, /x-hop|keep-alive/i);
      // RFC 9110 7.6.1 would drop Content-Length too; the relay keeps what frames the answer.
      assert.match(text, /^HTTP\/1\.1 200 OK\r\ncontent-length: 2\r\nx-kept: yes\r\nconnection: close\r\n\r\nok$/);
    } finally {
      await local.proxy.shutdown(1000);
      scripted.close();
    }
  });
});

// Before: the relay answered 502 "upstream HOST:PORT closed the connection" (the model server's SETTINGS and GOAWAY
// taken for a response cut short), terminate mode "sent a response that is not valid HTTP/1.1": neither named the port.
describe("the model server's gRPC port given as its REST one", () => {
  for (const restMode of FORWARD_MODES) {
    test(`${restMode} mode: 502 saying the upstream answered in HTTP/2 and which port to give`, async () => {
      const grpcOnly = await startUpstream({ restPort: null });
      const local = await startTestProxy({ pki, upstream: { restPort: grpcOnly.grpcPort! }, restMode });
      try {
        const res = await https1(local.restPort, pki, { path: '/v2/health/ready' });
        assert.equal(res.status, 502);
        assert.deepEqual(JSON.parse(res.body), { error: `upstream 127.0.0.1:${grpcOnly.grpcPort} answered in HTTP/2 (h2c), as a gRPC server does: is it the model server's REST port (OVMS --rest_port), not its gRPC port?` });
        const line = await local.logs.waitFor((l) => l.event === 'access');
        assert.equal(line.error, 'UPSTREAM_BAD_RESPONSE');
      } finally {
        await local.proxy.shutdown(1000);
        await grpcOnly.close();
      }
    });
  }
});

describe('rest relay: drain and upstream failures', () => {
  test('on shutdown an idle connection closes at once; a response still coming says connection: close and completes', async () => {
    const gated = await gatedUpstream();
    const local = await startTestProxy({ pki, upstream: { restPort: gated.port }, restMode: 'relay' });
    try {
      const idle = await openRaw(local.restPort);
      idle.write('GET /quick HTTP/1.1\r\nhost: a\r\n\r\n');
      await readUntil(idle, /quick$/);
      const idleClosed = once(idle, 'close');
      const busy = await openRaw(local.restPort);
      busy.write('GET /slow HTTP/1.1\r\nhost: a\r\n\r\n');
      const busyText = readToClose(busy);
      await gated.arrived;
      const stopped = local.proxy.shutdown(10_000);
      await idleClosed;
      gated.release();
      const text = await busyText;
      assert.match(text, /^HTTP\/1\.1 200 OK\r\n/);
      assert.match(text, /\r\nconnection: close\r\n/i);
      assert.match(text, /slow done$/);
      await stopped;
      assert.equal(local.logs.lines.some((l) => l.event === 'shutdown_timeout'), false);
    } finally {
      await local.proxy.shutdown(1000);
      await gated.close();
    }
  });

  test('on shutdown the request in flight is answered with connection: close, and a request pipelined after the drain began never reaches the model server', async () => {
    let received = '';
    let answered = 0;
    let headArrived!: () => void;
    const arrived = new Promise<void>((resolve) => (headArrived = resolve));
    // Answers the first request once its whole body is in, and any request after it at once.
    const scripted = await scriptedUpstream((s, first) => {
      const take = (bytes: Buffer) => {
        received += bytes.toString('latin1');
        const requests = (received.includes('0123456789') ? 1 : 0) + (received.match(/GET \/late /g) ?? []).length;
        for (; answered < requests; answered++) s.write('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok');
      };
      s.on('data', take);
      take(first);
      headArrived();
    });
    const local = await startTestProxy({ pki, upstream: { restPort: scripted.port }, restMode: 'relay' });
    try {
      const socket = await openRaw(local.restPort);
      socket.write('POST /in-flight HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\n01234');
      await arrived;
      const stopped = local.proxy.shutdown(10_000);
      // In one write with the end of the body: a relay that still read requests would pass it on before the answer could come.
      socket.write('56789GET /late HTTP/1.1\r\nhost: a\r\n\r\n');
      const text = await readToClose(socket);
      assert.deepEqual(statuses(text), [200]);
      assert.match(text, /\r\nconnection: close\r\n\r\nok$/);
      await stopped;
      assert.doesNotMatch(received, /\/late/);
    } finally {
      await local.proxy.shutdown(1000);
      scripted.close();
    }
  });

  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}: a head no parser accepts gets 400, the connection closes, and the refusal has its access line`, { timeout: 20_000 }, async () => {
      const local = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, restMode });
      try {
        const socket = await openRaw(local.restPort);
        socket.write('GET /v2/health/ready HTTP/1.1\r\nno colon here\r\n\r\n');
        const text = await readToClose(socket);
        assert.deepEqual(statuses(text), [400]);
        // Each parser words it its own way; both name the problem.
        assert.match(text, /\r\n\r\nmalformed (request: Invalid header token|header line: "no colon here")\n$/);
        const line = await local.logs.waitFor((l) => l.event === 'access' && l.status === 400 && l.error === 'bad_request');
        assert.equal(line.subject, 'CN=client,OU=tests');
      } finally {
        await local.proxy.shutdown(1000);
      }
    });

    test(`--mtls_rest_mode ${restMode}: a head larger than --mtls_max_header_size gets 431 naming the option`, { timeout: 20_000 }, async () => {
      const local = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, restMode, limits: { maxHeaderSize: 2048 } });
      try {
        const socket = await openRaw(local.restPort);
        socket.write(`GET /v2/health/ready HTTP/1.1\r\nhost: a\r\nx-big: ${'a'.repeat(4096)}\r\n\r\n`);
        const text = await readToClose(socket);
        assert.deepEqual(statuses(text), [431]);
        assert.match(text, /larger than 2048 bytes \(--mtls_max_header_size\)/);
        const line = await local.logs.waitFor((l) => l.event === 'access' && l.status === 431);
        assert.equal(line.error, 'bad_request');
      } finally {
        await local.proxy.shutdown(1000);
      }
    });
  }

  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}: a connection silent for --mtls_idle_timeout with nothing in flight is closed, whether it was used or not; one waiting for its response is not, and closes once idle after it`, { timeout: 30_000 }, async () => {
      const gated = await gatedUpstream();
      const local = await startTestProxy({ pki, upstream: { restPort: gated.port }, restMode, limits: { idleTimeoutMs: 300 } });
      try {
        const idle = await openRaw(local.restPort);
        // Watched from the start: it may close while the busy one is still being set up.
        const idleClosed = once(idle, 'close');
        idle.write('GET /quick HTTP/1.1\r\nhost: a\r\n\r\n');
        await readUntil(idle, /quick$/);
        const busy = await openRaw(local.restPort);
        busy.write('GET /slow HTTP/1.1\r\nhost: a\r\n\r\n');
        const answer = readUntil(busy, /slow done$/);
        await gated.arrived;
        await idleClosed;
        // A connection opened only now and never used closes one idle timeout later: by then the busy one has been silent longer than that.
        const late = await openRaw(local.restPort);
        await once(late, 'close');
        assert.equal(busy.destroyed, false);
        gated.release();
        assert.match(await answer, /^HTTP\/1\.1 200 OK\r\n/);
        // Its quiet spell while waiting must not have used up the idle timeout: it still applies afterwards.
        await once(busy, 'close');
      } finally {
        await local.proxy.shutdown(1000);
        await gated.close();
      }
    });
  }

  test('an upstream that closes before answering gives the client a 502 naming it', () =>
    withScriptedUpstream('', async (local, port) => {
      const res = await https1(local.restPort, pki, { path: '/v2/health/ready' });
      assert.equal(res.status, 502);
      assert.equal(res.headers['content-type'], 'application/json');
      assert.match(JSON.parse(res.body).error, new RegExp(`upstream 127\\.0\\.0\\.1:${port} closed the connection before answering`));
    }));

  // The JSON went out after the head too: bytes a client reads as the start of the next response (RFC 9110 9.3.2: no content).
  test('a HEAD gets our own answers head alone, as in terminate mode: the 502 when the upstream closes before answering, the 400 to a refused head', () =>
    withScriptedUpstream('', async (local) => {
      const socket = await openRaw(local.restPort);
      socket.write('HEAD /v2/health/ready HTTP/1.1\r\nhost: a\r\n\r\n');
      const text = await readToClose(socket);
      assert.match(text, /^HTTP\/1\.1 502 Bad Gateway\r\n[^]*\r\ncontent-length: \d+\r\n[^]*\r\n\r\n$/);
      const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/health/ready');
      assert.deepEqual([line.status, line.bytesOut], [502, 0]);
      const refused = await openRaw(local.restPort);
      refused.write('HEAD /v2/health/live HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n');
      assert.match(await readToClose(refused), /^HTTP\/1\.1 400 Bad Request\r\n[^]*\r\n\r\n$/);
    }));

  test('an upstream that sends 100 Continue and then closes still gives the client a 502 after the 100', () =>
    withScriptedUpstream('HTTP/1.1 100 Continue\r\n\r\n', async (local) => {
      const socket = await openRaw(local.restPort);
      socket.write(`POST /v2/models/dummy/infer HTTP/1.1\r\nhost: a\r\ncontent-length: ${INFER_BODY.length}\r\nexpect: 100-continue\r\n\r\n`);
      const text = await readToClose(socket);
      assert.deepEqual(statuses(text), [100, 502]);
      assert.match(text, /closed the connection before answering/);
      const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/models/dummy/infer');
      assert.equal(line.status, 502);
    }));

  for (const [how, close] of [['closes (FIN)', (s: Socket) => s.end()], ['resets', (s: Socket) => s.resetAndDestroy()]] as const) {
    test(`a model server that ${how} a kept-alive connection as the next request arrives: the client's connection closes unanswered, as from the model server directly (which a client retries on a new connection), not with a 502`, () =>
      behindProxy({ pki, restMode: 'relay', answer: closingWhenReused(close) }, async (local) => {
        const socket = await openRaw(local.restPort);
        socket.write('GET /first HTTP/1.1\r\nhost: a\r\n\r\n');
        await readUntil(socket, /ok$/);
        socket.write('GET /second HTTP/1.1\r\nhost: a\r\n\r\n');
        assert.equal(await readToClose(socket), '');
        const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/second');
        assert.deepEqual([line.status, line.bytesOut, line.error], [0, 0, 'UPSTREAM_CLOSED_IDLE']);
      }));
  }

  test('curl with two URLs on one connection, the model server closing it as the second arrives: curl retries on a new connection and gets both answers, as directly', () =>
    behindProxy({ pki, restMode: 'relay', answer: closingWhenReused((s) => s.end()) }, async (local, scripted) => {
      const url = (path: string) => `https://localhost:${local.restPort}${path}`;
      const curl = ['-sS', '--http1.1', '--cert', pki.paths['client.pem']!, '--key', pki.paths['client.key']!, '--cacert', pki.paths['server_ca.pem']!, '-w', ' %{http_code}\n', url('/first'), url('/second')];
      const out = await new Promise<string>((resolve) => execFile('curl', curl, { timeout: 30_000 }, (err, stdout, stderr) => resolve(`${stdout}${err ? `exit ${String(err.code)}: ${stderr}` : ''}`)));
      assert.equal(out, 'ok 200\nok 200\n');
      assert.equal(scripted.sockets.length, 2);
    }));

  test('a request that already had its 100 Continue when the model server closes its kept-alive connection still gets the 502: the client heard back, and would not retry', () =>
    behindProxy({ pki, restMode: 'relay', answer: closingWhenReused((s) => s.end()) }, async (local) => {
      const socket = await openRaw(local.restPort);
      socket.write('GET /first HTTP/1.1\r\nhost: a\r\n\r\n');
      await readUntil(socket, /ok$/);
      socket.write(`POST /second HTTP/1.1\r\nhost: a\r\ncontent-length: ${INFER_BODY.length}\r\nexpect: 100-continue\r\n\r\n`);
      await readUntil(socket, /100 Continue\r\n\r\n$/);
      socket.write(INFER_BODY);
      assert.deepEqual(statuses(await readToClose(socket)), [502]);
      const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/second');
      assert.deepEqual([line.status, line.error], [502, 'UPSTREAM_CLOSED']);
    }));

  test('a response framed by both Content-Length and Transfer-Encoding becomes a 502 and never reaches the client', () =>
    withScriptedUpstream('HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n', async (local) => {
      const socket = await openRaw(local.restPort);
      socket.write('GET /v2/health/ready HTTP/1.1\r\nhost: a\r\n\r\n');
      const text = await readToClose(socket);
      assert.deepEqual(statuses(text), [502]);
      assert.match(text, /both Content-Length and Transfer-Encoding/);
      const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/health/ready');
      assert.equal(line.status, 502);
      assert.equal(line.error, 'bad_response');
    }, { keepOpen: true }));

  test('a response nobody asked for, in the same read as a complete one, closes the connection only after the complete one reached the client', () =>
    withScriptedUpstream('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n', async (local) => {
      const socket = await openRaw(local.restPort);
      socket.write('GET /v2/health/ready HTTP/1.1\r\nhost: a\r\n\r\n');
      const text = await readToClose(socket);
      assert.deepEqual(statuses(text), [200]);
      assert.match(text, /\r\n\r\nok$/);
      const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/health/ready');
      assert.equal(line.status, 200);
      assert.equal(line.error, undefined);
    }, { keepOpen: true }));

  // keepOpen: the upstream keeps its connection open, so only the response itself can tell the relay to close.
  for (const [what, reply, body, keepOpen] of [
    ['a body that ends when the upstream closes', 'HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nbody-of-1', 'body-of-1', false],
    ['a connection: close response', 'HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok', 'ok', false],
    ['a connection: close response, the upstream leaving its end open', 'HTTP/1.1 200 OK\r\nConnection: Close\r\ncontent-length: 2\r\n\r\nok', 'ok', true],
    ['an HTTP/1.0 response without keep-alive, the upstream leaving its end open', 'HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok', 'ok', true],
  ] as const) {
    test(`after ${what} nothing more is written: a request pipelined behind it gets a plain close, no 502 the client would read as part of the answer`, { timeout: 30_000 }, () =>
      withScriptedUpstream(reply, async (local) => {
        const socket = await openRaw(local.restPort);
        socket.write('GET /first HTTP/1.1\r\nhost: a\r\n\r\nGET /second HTTP/1.1\r\nhost: a\r\n\r\n');
        const text = await readToClose(socket);
        assert.deepEqual(statuses(text), [200]);
        assert.equal(text.slice(text.indexOf('\r\n\r\n') + 4), body);
        const first = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/first');
        assert.equal(first.status, 200);
        assert.equal(first.error, undefined);
        const second = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/second');
        assert.equal(second.status, 0);
        assert.equal(second.error, 'UPSTREAM_CLOSED');
      }, { keepOpen }));
  }

  test('a request refused behind the model server\'s last response (connection: close) gets no answer, and its access line claims none: status 0, with why it was refused', { timeout: 30_000 }, () =>
    withScriptedUpstream('HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok', async (local) => {
      const socket = await openRaw(local.restPort);
      socket.write('GET /first HTTP/1.1\r\nhost: a\r\n\r\nGET /second#fragment HTTP/1.1\r\nhost: a\r\n\r\n');
      assert.deepEqual(statuses(await readToClose(socket)), [200]);
      const refused = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/second#fragment');
      assert.equal(refused.status, 0);
      assert.equal(refused.error, 'bad_request_target');
    }));

  // Each shape is followed in the same write by a response to the pipelined /second: an answer made of the broken one's tail.
  for (const [what, broken, clientGets, close] of [
    ['a chunked body cut by the close', 'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n', 'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n', true],
    ['a Content-Length body cut by the close', 'HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello', 'HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello', true],
    ['a malformed chunk line', 'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5x\r\nhello\r\n0\r\n\r\n', 'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n', false],
    ['101 Switching Protocols', 'HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n', /^HTTP\/1\.1 502 Bad Gateway\r\n[^]*switched protocols/, false],
    ['connection: close, then more bytes', 'HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok', 'HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok', false],
  ] as const) {
    const tail = 'HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nEVIL!';
    test(`after ${what}, a whole response before it still reaches the client, and the connection ends: a request pipelined behind is never answered with what followed`, { timeout: 30_000 }, () =>
      withScriptedUpstream(`HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nwhole${broken}${close ? '' : tail}`, async (local) => {
        const socket = await openRaw(local.restPort);
        socket.write('GET /whole HTTP/1.1\r\nhost: a\r\n\r\nGET /first HTTP/1.1\r\nhost: a\r\n\r\nGET /second HTTP/1.1\r\nhost: a\r\n\r\n');
        const text = await readToClose(socket);
        const whole = 'HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nwhole';
        assert.ok(text.startsWith(whole), JSON.stringify(text));
        if (typeof clientGets === 'string') assert.equal(text.slice(whole.length), clientGets);
        else assert.match(text.slice(whole.length), clientGets);
        assert.doesNotMatch(text, /EVIL/);
        const second = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/second');
        assert.equal(second.status, 0);
        assert.equal((await local.logs.waitFor((l) => l.event === 'access' && l.path === '/whole')).error, undefined);
      }, { keepOpen: !close }));
  }

  test('an interim 103 Early Hints reaches an HTTP/1.1 client before the answer, and never an HTTP/1.0 one, which would take it for the answer (RFC 9110 15.2)', () =>
    withScriptedUpstream('HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok', async (local) => {
      for (const version of ['1.1', '1.0']) {
        const socket = await openRaw(local.restPort);
        socket.write(`GET /v2/health/ready HTTP/${version}\r\nhost: a\r\n\r\n`);
        const text = await readToClose(socket);
        const answer = 'HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok';
        assert.equal(text, version === '1.1' ? `HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n${answer}` : answer);
      }
    }, { keepOpen: true }));

  test('a body that runs until close, ended by a reset instead, is logged as cut short, not as a whole answer', async () => {
    const scripted = await scriptedUpstream((s) => s.write('HTTP/1.1 200 OK\r\n\r\npartial'));
    const local = await startTestProxy({ pki, upstream: { restPort: scripted.port }, restMode: 'relay' });
    try {
      const socket = await openRaw(local.restPort);
      socket.write('GET /v2/health/ready HTTP/1.1\r\nhost: a\r\n\r\n');
      await readUntil(socket, /partial$/);
      scripted.sockets[0]!.resetAndDestroy();
      const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/health/ready');
      assert.equal(line.status, 200);
      assert.equal(line.error, 'upstream_closed_mid_response');
    } finally {
      await local.proxy.shutdown(1000);
      scripted.close();
    }
  });

  test('an upstream that closes in the middle of a response cuts the client connection; the access line says why', () =>
    withScriptedUpstream('HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b', async (local) => {
      const socket = await openRaw(local.restPort);
      socket.write('GET /v2/health/ready HTTP/1.1\r\nhost: a\r\n\r\n');
      const text = await readToClose(socket);
      assert.match(text, /^HTTP\/1\.1 200 OK\r\n[\s\S]*only ten b$/);
      const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/health/ready');
      assert.equal(line.error, 'upstream_closed_mid_response');
      assert.equal(line.bytesOut, 10);
    }));

  /** A relay whose upstream answers 413 on a request's head; the client has sent 4 of its 10 body bytes when the answer arrives. */
  const withEarly413 = (path: string, run: (local: StartedProxy, socket: TLSSocket) => Promise<void>) =>
    withScriptedUpstream(
      'HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n',
      async (local) => {
        const socket = await openRaw(local.restPort);
        socket.write(`POST ${path} HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\n0123`);
        await readUntil(socket, /^HTTP\/1\.1 413 /);
        await run(local, socket);
      },
      { keepOpen: true },
    );

  test('a response that comes before the whole request body (an early 413) is logged once the body has passed, with all of its bytes', () =>
    withEarly413('/v2/models/dummy/infer', async (local, socket) => {
      socket.write('456789');
      const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/models/dummy/infer');
      assert.equal(line.status, 413);
      assert.equal(line.bytesIn, 10);
      socket.destroy();
    }));

  test('a request answered early whose client then leaves without the rest of its body is still logged, with what came and why', () =>
    withEarly413('/v2/models/dummy/gone', async (local, socket) => {
      socket.destroy();
      const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/models/dummy/gone');
      assert.equal(line.status, 413);
      assert.equal(line.bytesIn, 4);
      assert.equal(line.error, 'client_closed');
    }));

  test('while the model server is not ready the client gets 503 with the reason; once ready, relayed', async () => {
    let reason: string | undefined = 'model server starting';
    const local = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, restMode: 'relay', notReady: { rest: () => reason } });
    try {
      const waiting = await https1(local.restPort, pki, { path: '/v2/health/ready' });
      assert.equal(waiting.status, 503);
      assert.match(waiting.body, /model server starting/);
      reason = undefined;
      const before = upstream.received.length;
      assert.equal((await https1(local.restPort, pki, { path: '/v2/health/ready' })).status, 200);
      assert.equal(upstream.received.length, before + 1);
    } finally {
      await local.proxy.shutdown(1000);
    }
  });

  test('an unreachable upstream gives 502 with the reason', async () => {
    const server = await startUpstream({ grpcPort: null });
    const port = server.restPort!;
    await server.close();
    const local = await startTestProxy({ pki, upstream: { restPort: port }, restMode: 'relay' });
    try {
      const res = await https1(local.restPort, pki, { path: '/v2/health/ready' });
      assert.equal(res.status, 502);
      assert.match(JSON.parse(res.body).error, /refused the connection/);
    } finally {
      await local.proxy.shutdown(1000);
    }
  });
});
