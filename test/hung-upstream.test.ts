/**
 * A model server that hangs: it accepts and never answers, stops in the middle of a
 * response, or does not read an upload. The proxy has no upstream response timeout on
 * purpose (README: no default timeout on a live response), so clients wait; what these
 * tests hold is that whatever ends the wait (the client, or the proxy's own shutdown)
 * ends it cleanly, says why, and frees what the call held on both sides.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer as createH2cServer, constants as h2, type ClientHttp2Stream, type Http2Server, type ServerHttp2Stream } from 'node:http2';
import { createServer as createTcpServer, type AddressInfo, type Socket } from 'node:net';
import * as grpc from '@grpc/grpc-js';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { clientCredentials, grpcFrame, h2Request, h2Session, https1, startTestProxy, type StartedProxy } from './helpers/harness.js';
import { h2Frame, scriptedUpstream, type ScriptedUpstream } from './helpers/scripted-upstream.js';
import { openRaw, readToClose, readUntil } from './helpers/raw-http1.js';
import { eventually, heldConnectionsTo, sample } from './helpers/ops.js';
import { ProxyMetrics } from '../src/metrics.js';
import { freeLoopbackPorts } from '../src/ports.js';
import { startCli } from './helpers/cli.js';
import { tlsArgs } from './helpers/entrypoint.js';

const SHUTDOWN_MS = 2000;
/** An SSE head and first event, then nothing more: a stream that stalls. */
const SSE_START = 'HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n';
/** One gRPC message of one byte. */
const ONE_MESSAGE = Buffer.from([0, 0, 0, 0, 1, 7]);

let pki: TestPki;

before(async () => {
  pki = await createTestPki();
});

after(async () => {
  await pki.cleanup();
});

/**
 * An h2c model server that never finishes a call: `/hung.Svc/Hold` gets nothing at all,
 * `/hung.Svc/Stall` its response headers and one message. It records how each call ended.
 */
async function hungGrpcServer(): Promise<{ server: Http2Server; port: number; open: Set<ServerHttp2Stream>; resets: number[] }> {
  const open = new Set<ServerHttp2Stream>();
  const resets: number[] = [];
  const server = createH2cServer();
  server.on('stream', (stream, headers) => {
    open.add(stream);
    stream.on('error', () => {});
    stream.on('close', () => {
      open.delete(stream);
      resets.push(stream.rstCode);
    });
    if (headers[':path'] === '/hung.Svc/Stall') {
      stream.respond({ ':status': 200, 'content-type': 'application/grpc' });
      stream.write(ONE_MESSAGE);
    }
    if (headers[':path'] === '/hung.Svc/Echo') {
      stream.resume();
      stream.on('end', () => stream.respond({ ':status': 200, 'content-type': 'application/grpc', 'grpc-status': '0' }, { endStream: true }));
    }
    // Any other call's request body is never read: an upload stuck at the model server.
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return { server, port: (server.address() as AddressInfo).port, open, resets };
}

/** A REST model server that reads every request and never answers, except `/sse`, which starts an event stream and stalls. */
function hungRestServer(): Promise<ScriptedUpstream> {
  return scriptedUpstream((socket: Socket, first: Buffer) => {
    if (first.toString('latin1').startsWith('GET /sse ')) socket.write(SSE_START);
    socket.resume();
  });
}

const openSockets = (upstream: ScriptedUpstream) => upstream.sockets.filter((s) => !s.destroyed).length;

interface CallEnd {
  code: grpc.status;
  details: string;
}

/** A unary call with raw bytes (no protobuf): the upstream never decodes it anyway. */
function unary(client: grpc.Client, path: string, options: grpc.CallOptions = {}): { ended: Promise<CallEnd>; call: grpc.ClientUnaryCall } {
  let call!: grpc.ClientUnaryCall;
  const ended = new Promise<CallEnd>((resolve) => {
    call = client.makeUnaryRequest(path, (b: Buffer) => b, (b: Buffer) => b, Buffer.from('x'), new grpc.Metadata(), options, (err) => resolve({ code: err?.code ?? grpc.status.OK, details: err?.details ?? '' }));
  });
  return { ended, call };
}

/** A server-streaming call that resolves once its first message is in. */
function streamToFirstMessage(client: grpc.Client, path: string): { ended: Promise<CallEnd>; first: Promise<void> } {
  const call = client.makeServerStreamRequest(path, (b: Buffer) => b, (b: Buffer) => b, Buffer.from('x'));
  const first = once(call, 'data').then(() => undefined);
  const ended = new Promise<CallEnd>((resolve) => {
    call.on('error', (err: grpc.ServiceError) => resolve({ code: err.code, details: err.details }));
    call.on('status', (s: grpc.StatusObject) => {
      if (s.code === grpc.status.OK) resolve({ code: s.code, details: s.details });
    });
  });
  return { ended, first };
}

/**
 * Writes an endless upload into `stream` and resolves once it is stuck: the write blocked and
 * nothing more taken since the last look (every buffer on the way full), and `arrived()` true.
 */
/** SETTINGS (every stream window at its largest), the ACK of ours, and a WINDOW_UPDATE opening the connection's as wide. */
const WIDE_OPEN = (() => {
  const wide = 0x7fffffff;
  const settings = Buffer.alloc(6);
  settings.writeUInt16BE(0x4, 0);
  settings.writeUInt32BE(wide, 2);
  const increment = Buffer.alloc(4);
  increment.writeUInt32BE(wide - 65535);
  return Buffer.concat([h2Frame(0x4, 0, 0, settings), h2Frame(0x4, 0x1, 0), h2Frame(0x8, 0, 0, increment)]);
})();

async function uploadUntilStuck(stream: ClientHttp2Stream, arrived: () => boolean): Promise<void> {
  const chunk = Buffer.alloc(1 << 20);
  let sent = 0;
  let blocked = false;
  const pump = () => {
    while (!stream.destroyed) {
      sent += chunk.length;
      if (!stream.write(chunk)) {
        blocked = true;
        stream.once('drain', () => {
          blocked = false;
          pump();
        });
        return;
      }
    }
  };
  pump();
  let before = -1;
  await eventually(() => {
    const stuck = arrived() && blocked && sent === before;
    before = sent;
    return stuck;
  }, 'the upload stuck: every buffer between the client and the model server full');
}

describe('shutdown with calls stuck on a model server that never answers', () => {
  for (const mode of ['terminate', 'relay'] as const) {
    test(`REST ${mode}: requests waiting for an answer get 503 saying the proxy is shutting down (HTTP/1.1 and HTTP/2), a stalled event stream is cut short, and the model server's connections close`, { timeout: 30_000 }, async () => {
      const rest = await hungRestServer();
      const local = await startTestProxy({ pki, upstream: { restPort: rest.port }, restMode: mode });
      const session = h2Session(local.restPort, pki);
      try {
        const waitingH1 = https1(local.restPort, pki, { path: '/v2/models/m/ready' });
        const waitingH2 = new Promise<{ status: unknown; body: string }>((resolve, reject) => {
          const stream = session.request({ ':path': '/v2/models/m/ready' });
          let status: unknown;
          let body = '';
          stream.on('response', (h) => (status = h[':status']));
          stream.on('data', (c: Buffer) => (body += c.toString()));
          stream.on('end', () => resolve({ status, body }));
          stream.on('error', reject);
        });
        const sse = await openRaw(local.restPort, pki);
        sse.write('GET /sse HTTP/1.1\r\nhost: localhost\r\n\r\n');
        await readUntil(sse, /data: 1/);
        const sseRest = readToClose(sse);
        await eventually(() => rest.sockets.length === 3, 'the three requests at the model server');

        await local.proxy.shutdown(SHUTDOWN_MS);

        for (const [client, answer] of [['HTTP/1.1', await waitingH1], ['HTTP/2', await waitingH2]] as const) {
          assert.equal(answer.status, 503, client);
          assert.match(JSON.parse(answer.body).error, /the proxy is shutting down: --mtls_shutdown_timeout ran out/, client);
        }
        // Cut short: no last chunk, so the client cannot take it for a whole answer.
        assert.doesNotMatch(await sseRest, /\r\n0\r\n\r\n/);
        await eventually(() => openSockets(rest) === 0, "the model server's connections closed");
        const lines = local.logs.lines.filter((l) => l.event === 'access');
        assert.equal(lines.filter((l) => l.error === 'shutdown_timeout').length, 3, JSON.stringify(lines));
      } finally {
        session.destroy();
        rest.close();
      }
    });
  }

  test('gRPC terminate: a call never answered gets UNAVAILABLE saying the proxy is shutting down, a stalled server stream too (in its trailers), and the model server sees both cancelled', { timeout: 30_000 }, async () => {
    const upstream = await hungGrpcServer();
    const local = await startTestProxy({ pki, upstream: { grpcPort: upstream.port } });
    const client = new grpc.Client(local.grpcAddress, clientCredentials(pki));
    try {
      const held = unary(client, '/hung.Svc/Hold');
      const stalled = streamToFirstMessage(client, '/hung.Svc/Stall');
      await stalled.first;
      await eventually(() => upstream.open.size === 2, 'both calls at the model server');

      await local.proxy.shutdown(SHUTDOWN_MS);

      for (const [what, ended] of [['unanswered', await held.ended], ['stalled stream', await stalled.ended]] as const) {
        assert.equal(ended.code, grpc.status.UNAVAILABLE, what);
        assert.match(ended.details, /the proxy is shutting down: --mtls_shutdown_timeout ran out/, what);
      }
      await eventually(() => upstream.open.size === 0, 'both calls ended at the model server');
      assert.deepEqual(upstream.resets, [h2.NGHTTP2_CANCEL, h2.NGHTTP2_CANCEL]);
      const lines = local.logs.lines.filter((l) => l.event === 'access');
      assert.deepEqual(lines.map((l) => [l.grpcStatus, l.error]), [['14', 'shutdown_timeout'], ['14', 'shutdown_timeout']]);
    } finally {
      client.close();
      upstream.server.close();
    }
  });

  test('gRPC terminate: a model server that stops reading its connection mid-upload (as a SIGSTOPped one does) does not keep the proxy from finishing its shutdown, and the call gets UNAVAILABLE saying why', { timeout: 60_000 }, async () => {
    // Its SETTINGS and WINDOW_UPDATE open every window wide, then it reads nothing more: what the proxy
    // forwards fills the socket buffers between them, and the proxy's writes to it never complete.
    const stopped = await scriptedUpstream((socket) => {
      socket.write(WIDE_OPEN);
      socket.pause();
    });
    const local = await startTestProxy({ pki, upstream: { grpcPort: stopped.port } });
    const session = h2Session(local.grpcPort, pki);
    try {
      const upload = session.request({ ':method': 'POST', ':path': '/hung.Svc/Upload', 'content-type': 'application/grpc', te: 'trailers' });
      const status = new Promise<unknown[]>((resolve, reject) => {
        upload.on('response', (headers) => resolve([headers['grpc-status'], headers['grpc-message']]));
        upload.on('error', reject);
      });
      await uploadUntilStuck(upload, () => stopped.sockets.length === 1);

      await local.proxy.shutdown(SHUTDOWN_MS);

      const [grpcStatus, message] = await status;
      assert.equal(grpcStatus, String(grpc.status.UNAVAILABLE));
      assert.match(String(message), /the proxy is shutting down/);
    } finally {
      session.destroy();
      stopped.close();
    }
  });

  test('gRPC terminate: an upstream connection no longer current (the model server sent GOAWAY) whose call is stuck is ended by the shutdown too, not left open for good', { timeout: 60_000 }, async () => {
    // GOAWAY(last stream 1, NO_ERROR) at once: the call on stream 1 may go on, the next would take a new
    // connection. Then it reads nothing more, and the call's upload fills the socket buffers.
    const goaway = Buffer.alloc(8);
    goaway.writeUInt32BE(1, 0);
    const stopped = await scriptedUpstream((socket) => {
      socket.write(Buffer.concat([WIDE_OPEN, h2Frame(0x7, 0, 0, goaway)]));
      socket.pause();
    });
    const local = await startTestProxy({ pki, upstream: { grpcPort: stopped.port } });
    const session = h2Session(local.grpcPort, pki);
    try {
      const upload = session.request({ ':method': 'POST', ':path': '/hung.Svc/Upload', 'content-type': 'application/grpc', te: 'trailers' });
      upload.on('error', () => {});
      await uploadUntilStuck(upload, () => stopped.sockets.length === 1);

      await local.proxy.shutdown(SHUTDOWN_MS);

      // Still open, it would hold its descriptor, and keep a proxy process from exiting.
      await eventually(() => heldConnectionsTo(stopped.port) === 0, 'no connection of the proxy to the model server left open');
    } finally {
      session.destroy();
      stopped.close();
    }
  });

  test('gRPC relay: frames are not decoded, so a call still open is ended with its connection (UNAVAILABLE, logged shutdown_timeout), and the model server connection closes', { timeout: 30_000 }, async () => {
    const upstream = await hungGrpcServer();
    const local = await startTestProxy({ pki, upstream: { grpcPort: upstream.port }, grpcMode: 'relay' });
    const client = new grpc.Client(local.grpcAddress, clientCredentials(pki));
    try {
      const held = unary(client, '/hung.Svc/Hold');
      await eventually(() => upstream.open.size === 1, 'the call at the model server');
      await local.proxy.shutdown(SHUTDOWN_MS);
      assert.equal((await held.ended).code, grpc.status.UNAVAILABLE);
      await eventually(() => upstream.open.size === 0, 'the call ended at the model server');
      // The proxy cut the connection: its line says why, not nothing (a clean close) or the client's doing.
      assert.equal((await local.logs.waitFor((l) => l.event === 'relay_access')).error, 'shutdown_timeout');
    } finally {
      client.close();
      upstream.server.close();
    }
  });
});

describe('the proxy command, whose process exits once its shutdown is over', () => {
  for (const workers of [1, 2]) {
    test(`--mtls_workers ${workers}: the access lines of the event streams the shutdown timeout cut short are written before the process exits`, { timeout: 60_000 }, async () => {
      const rest = await hungRestServer();
      const [restPort] = (await freeLoopbackPorts(1)) as [number];
      const cli = startCli([
        'proxy', '--mtls_workers', String(workers), '--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1',
        '--mtls_rest_upstream', `127.0.0.1:${rest.port}`, ...tlsArgs(pki), '--mtls_shutdown_timeout', '1',
      ]);
      // Every line is read once stdout has closed, not at the exit.
      const closed = once(cli.child, 'close');
      const clients: Socket[] = [];
      try {
        await cli.logs.waitFor((l) => l.event === (workers > 1 ? 'workers_listening' : 'listening'));
        for (let i = 0; i < 3; i += 1) {
          const client = await openRaw(restPort, pki);
          clients.push(client);
          client.write('GET /sse HTTP/1.1\r\nhost: localhost\r\n\r\n');
          await readUntil(client, /data: 1/);
        }
        cli.child.kill('SIGTERM');
        assert.equal(await cli.exited, 0);
        await closed;
        const lines = cli.logs.lines.filter((l) => l.event === 'access');
        assert.deepEqual(lines.map((l) => [l.path, l.status, l.error]), Array(3).fill(['/sse', 200, 'shutdown_timeout']));
      } finally {
        for (const client of clients) client.destroy();
        if (cli.child.exitCode === null && cli.child.signalCode === null) cli.child.kill('SIGTERM');
        await cli.exited;
        rest.close();
      }
    });
  }
});

describe('shutdown in front of a frozen model server', () => {
  // Its kernel accepts and buffers; the process never reads, writes or closes (SIGSTOP, a deadlock).
  test('gRPC terminate: with no call left, the upstream connection does not hold the stop for the shutdown timeout', { timeout: 60_000 }, async () => {
    const frozen: Socket[] = [];
    const server = createTcpServer((socket) => {
      socket.pause();
      frozen.push(socket);
    });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    const local = await startTestProxy({ pki, upstream: { grpcPort: (server.address() as AddressInfo).port } });
    const session = h2Session(local.grpcPort, pki);
    try {
      const call = session.request({ ':method': 'POST', ':path': '/hung.Svc/Hold', 'content-type': 'application/grpc', te: 'trailers' });
      call.on('error', () => {});
      call.end(ONE_MESSAGE);
      await eventually(() => frozen.length === 1, 'the proxy connected to the model server');
      call.close(h2.NGHTTP2_CANCEL);
      await local.logs.waitFor((l) => l.event === 'access' && l.path === '/hung.Svc/Hold');
      session.close();
      // Ten minutes: past the test's own limit, so a stop that waits for the model server's FIN fails the test.
      await local.proxy.shutdown(600_000);
    } finally {
      session.destroy();
      for (const socket of frozen) socket.destroy();
      server.close();
    }
  });
});

describe('a client that stops waiting for a model server that never answers', () => {
  let upstream: Awaited<ReturnType<typeof hungGrpcServer>>;
  let rest: ScriptedUpstream;

  before(async () => {
    upstream = await hungGrpcServer();
    rest = await hungRestServer();
  });

  after(() => {
    upstream.server.close();
    rest.close();
  });

  for (const mode of ['terminate', 'relay'] as const) {
    test(`${mode} mode: a gRPC deadline, a gRPC stream cancelled mid-response, an HTTP/2 reset and an HTTP/1.1 hang-up (mid-event-stream too) free the model server's calls and connections, and the proxy's gauges are back at rest`, { timeout: 30_000 }, async () => {
      const metrics = new ProxyMetrics({ processMetrics: false });
      const local: StartedProxy = await startTestProxy({ pki, upstream: { grpcPort: upstream.port, restPort: rest.port }, grpcMode: mode, restMode: mode, observer: metrics });
      try {
        const client = new grpc.Client(local.grpcAddress, clientCredentials(pki));
        const deadline = await unary(client, '/hung.Svc/Hold', { deadline: Date.now() + 300 }).ended;
        assert.equal(deadline.code, grpc.status.DEADLINE_EXCEEDED);
        const stalled = client.makeServerStreamRequest('/hung.Svc/Stall', (b: Buffer) => b, (b: Buffer) => b, Buffer.from('x'));
        stalled.on('error', () => {});
        await once(stalled, 'data');
        stalled.cancel();
        await eventually(() => upstream.open.size === 0, 'the gRPC calls ended at the model server');
        client.close();

        const session = h2Session(local.restPort, pki);
        const stream = session.request({ ':path': '/v2/models/m/ready' });
        stream.on('error', () => {});
        await eventually(() => openSockets(rest) === 1, 'the HTTP/2 request at the model server');
        stream.close(h2.NGHTTP2_CANCEL);
        await eventually(() => openSockets(rest) === 0, 'the HTTP/2 request ended at the model server');
        session.close();

        const waiting = await openRaw(local.restPort, pki);
        waiting.write('GET /v2/models/m/ready HTTP/1.1\r\nhost: localhost\r\n\r\n');
        const sse = await openRaw(local.restPort, pki);
        sse.write('GET /sse HTTP/1.1\r\nhost: localhost\r\n\r\n');
        await readUntil(sse, /data: 1/);
        await eventually(() => openSockets(rest) === 2, 'both HTTP/1.1 requests at the model server');
        waiting.destroy();
        sse.destroy();
        await eventually(() => openSockets(rest) === 0, 'the HTTP/1.1 requests ended at the model server');

        const gauges = async () => {
          const text = await metrics.text();
          return ['grpc', 'rest'].flatMap((listener) => ['open_connections', 'open_streams'].map((name) => sample(text, `ovms_mtls_${name}`, { listener })));
        };
        await eventually(async () => (await gauges()).every((v) => v === 0), 'open_connections and open_streams at 0 on both listeners');
      } finally {
        await local.proxy.shutdown(1000);
      }
    });
  }
});

describe('an upload the model server does not read', () => {
  test('gRPC terminate: it stalls only its own call; calls of another client, 2.9 MB ones too, complete on the upstream connection all clients share', { timeout: 60_000 }, async () => {
    const upstream = await hungGrpcServer();
    const local = await startTestProxy({ pki, upstream: { grpcPort: upstream.port } });
    const stuckClient = h2Session(local.grpcPort, pki);
    const otherClient = h2Session(local.grpcPort, pki);
    try {
      const upload = stuckClient.request({ ':method': 'POST', ':path': '/hung.Svc/Upload', 'content-type': 'application/grpc', te: 'trailers' });
      upload.on('error', () => {});
      await uploadUntilStuck(upload, () => upstream.open.size === 1);
      const echo = { ':method': 'POST', ':path': '/hung.Svc/Echo', 'content-type': 'application/grpc', te: 'trailers' };
      const answers = await Promise.all([0, 1, 2].map(() => h2Request(otherClient, echo, grpcFrame(Buffer.alloc(2_900_000)))));
      assert.deepEqual(answers.map((a) => a.headers['grpc-status']), ['0', '0', '0']);
      assert.equal(upstream.open.size, 1, 'the stuck upload is still open');
    } finally {
      stuckClient.destroy();
      otherClient.destroy();
      await local.proxy.shutdown(1000);
      upstream.server.close();
    }
  });
});

describe('calls cut when the proxy itself ends the connection', () => {
  for (const mode of ['terminate', 'relay'] as const) {
    test(`${mode} mode: a revoked client's connection still busy when its grace runs out: what was cut is logged proxy_closed_revoked (gRPC, REST over HTTP/2 and HTTP/1.1), not as the client's doing`, { timeout: 30_000 }, async () => {
      const grpcUpstream = await hungGrpcServer();
      const restUpstream = await hungRestServer();
      const local = await startTestProxy({ pki, upstream: { grpcPort: grpcUpstream.port, restPort: restUpstream.port }, grpcMode: mode, restMode: mode });
      const client = new grpc.Client(local.grpcAddress, clientCredentials(pki));
      const session = h2Session(local.restPort, pki);
      const http1 = await openRaw(local.restPort, pki);
      try {
        const held = unary(client, '/hung.Svc/Hold');
        session.request({ ':method': 'GET', ':path': '/v1/models/held' }).on('error', () => {});
        http1.write('GET /v1/models/held HTTP/1.1\r\nHost: localhost\r\n\r\n');
        await eventually(() => grpcUpstream.open.size === 1 && restUpstream.sockets.length === 2, 'the three requests at the model servers');

        // What the reload does for a client whose certificate it finds revoked (tls-reload.ts), with a short grace.
        for (const listener of local.proxy.listeners()) for (const socket of listener.connections.keys()) listener.closeConnection(socket, 200);

        await held.ended;
        const lines = () => local.logs.lines.filter((l) => l.event === 'access' || l.event === 'relay_access');
        await eventually(() => lines().length === 3, 'a line per request (per connection in gRPC relay)');
        const seen = lines().map((l) => `${l.event} ${l.listener} ${l.protocol} ${l.error}`).sort();
        const grpcLine = mode === 'relay' ? 'relay_access grpc undefined proxy_closed_revoked' : 'access grpc h2 proxy_closed_revoked';
        assert.deepEqual(seen, [grpcLine, 'access rest h2 proxy_closed_revoked', 'access rest http/1.1 proxy_closed_revoked'].sort());
      } finally {
        http1.destroy();
        session.destroy();
        client.close();
        await local.proxy.shutdown(1000);
        grpcUpstream.server.close();
        restUpstream.close();
      }
    });
  }
});
