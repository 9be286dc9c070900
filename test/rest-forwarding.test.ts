import { test, before, after, describe } from 'node:test';
import { execFile } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { constants as http2Constants } from 'node:http2';
import { createHash } from 'node:crypto';
import { request as httpsRequest, Agent as HttpsAgent } from 'node:https';
import { createServer as createHttpServer, type IncomingMessage, type ClientRequest } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import type { TestPki } from './helpers/pki.js';
import { countingRelay, h2Request, h2Session, https1, startTestProxy, startUpstream, startUpstreamFixture, tlsClientOptions, type LogLine, type StartedProxy } from './helpers/harness.js';
import { GateBoard, sseEvents } from './helpers/sse.js';
import { openRaw, readToClose, readUntil } from './helpers/raw-http1.js';
import { behindProxy } from './helpers/scripted-upstream.js';
import { CHAT_REPLY_WORDS } from '../src/demo/openai-chat.js';
import type { ModelServer } from '../src/demo/model-server.js';
import { FORWARD_MODES } from '../src/config.js';
import { eventually } from './helpers/ops.js';
import { END_HEADERS, END_STREAM, H2, SETTINGS_INITIAL_WINDOW_SIZE, h2Frame, headerBlock, rawH2Client, setting, streamFrames } from './helpers/raw-h2.js';

const INPUT = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];
const INFER_BODY = JSON.stringify({ inputs: [{ name: 'b', shape: [1, 10], datatype: 'FP32', data: INPUT }] });

let pki: TestPki;
let upstream: ModelServer;
let board = new GateBoard();
let closeAll: () => Promise<void>;

before(async () => ({ pki, upstream, close: closeAll } = await startUpstreamFixture({ sseGate: (i) => board.wait(i) })));

after(async () => {
  board.openAll();
  await closeAll();
});

const lastRest = (path: string) => upstream.received.filter((r) => r.protocol === 'rest' && r.path === path).at(-1)!;

/** Releases the upstream's SSE events one at a time: event i+1 is not even written upstream until event i arrived here. */
async function expectEventsOneByOne(events: AsyncGenerator<string>): Promise<void> {
  for (let i = 0; i < CHAT_REPLY_WORDS.length; i++) {
    board.open(i);
    const chunk = JSON.parse(String((await events.next()).value).replace(/^data: /, ''));
    assert.equal(chunk.choices[0].delta.content, CHAT_REPLY_WORDS[i]);
  }
  board.open(CHAT_REPLY_WORDS.length);
  assert.equal((await events.next()).value, 'data: [DONE]');
}

for (const mode of FORWARD_MODES) {
  describe(`rest forwarding, --mtls_rest_mode ${mode}`, () => {
    let relay: Awaited<ReturnType<typeof countingRelay>>;
    let front: StartedProxy;

    before(async () => {
      relay = await countingRelay(upstream.restPort!);
      front = await startTestProxy({ pki, upstream: { restPort: relay.port }, restMode: mode });
    });

    after(async () => {
      board.openAll();
      await front.proxy.shutdown(1000);
      relay.server.close();
    });

    /** Opens a streaming HTTPS/1.1 request and resolves once response headers arrive. */
    function openHttps1(path: string, body: string): Promise<{ req: ClientRequest; res: IncomingMessage }> {
      return new Promise((resolve, reject) => {
        const req = httpsRequest({ host: '127.0.0.1', port: front.restPort, method: 'POST', path, agent: false, headers: { 'content-type': 'application/json' }, ...tlsClientOptions(pki) },
          (res) => resolve({ req, res }));
        req.on('error', reject);
        req.end(body);
      });
    }

    test('a KServe JSON infer over HTTP/1.1 returns the dummy model output', async () => {
      const res = await https1(front.restPort, pki, { method: 'POST', path: '/v2/models/dummy/infer', body: INFER_BODY, headers: { 'content-type': 'application/json' } });
      assert.equal(res.status, 200);
      assert.deepEqual(JSON.parse(res.body).outputs[0].data, INPUT.map((x) => x + 1));
    });

    test('a KServe JSON infer over HTTP/2 returns the dummy model output', async () => {
      const session = h2Session(front.restPort, pki);
      try {
        const res = await h2Request(session, { ':method': 'POST', ':path': '/v2/models/dummy/infer', 'content-type': 'application/json' }, INFER_BODY);
        assert.equal(res.headers[':status'], 200);
        assert.deepEqual(JSON.parse(res.body.toString()).outputs[0].data, INPUT.map((x) => x + 1));
        const health = await h2Request(session, { ':method': 'GET', ':path': '/v2/health/ready' });
        assert.equal(health.headers[':status'], 200);
      } finally {
        session.close();
      }
    });

    test('Host passes through and X-Forwarded-For, X-Forwarded-Proto and the client identity are set', async () => {
      await https1(front.restPort, pki, { path: '/v2/health/live', headers: { host: 'models.example:8443', 'x-forwarded-for': '203.0.113.7' } });
      const seen = lastRest('/v2/health/live');
      assert.equal(seen.headers.host, 'models.example:8443');
      assert.equal(seen.headers['x-forwarded-for'], '203.0.113.7, 127.0.0.1');
      assert.equal(seen.headers['x-forwarded-proto'], 'https');
      assert.match(String(seen.headers['x-forwarded-client-cert']), /^Hash=[0-9a-f]{64};Subject="CN=client,OU=tests";URI=spiffe:\/\/test\.local\/client$/);
    });

    test('HTTP/2 :authority becomes the upstream Host header', async () => {
      const session = h2Session(front.restPort, pki);
      try {
        await h2Request(session, { ':method': 'GET', ':path': '/v2/models/dummy', ':authority': 'models.example' });
        assert.equal(lastRest('/v2/models/dummy').headers.host, 'models.example');
      } finally {
        session.close();
      }
    });

    if (mode === 'terminate') {
      test('requests from separate client connections reuse kept-alive upstream connections', async () => {
        await https1(front.restPort, pki, { path: '/v2/health/ready' });
        const before = relay.connections();
        for (let i = 0; i < 10; i++) assert.equal((await https1(front.restPort, pki, { path: '/v2/health/ready' })).status, 200);
        assert.equal(relay.connections(), before);
      });
    } else {
      test('each client connection gets one upstream connection, reused by all of its requests', async () => {
        const agent = new HttpsAgent({ keepAlive: true, maxSockets: 1 });
        try {
          const before = relay.connections();
          for (let i = 0; i < 10; i++) assert.equal((await https1(front.restPort, pki, { path: '/v2/health/ready', agent })).status, 200);
          assert.equal(relay.connections(), before + 1);
        } finally {
          agent.destroy();
        }
      });
    }

    test('Server-Sent Events reach an HTTP/1.1 client one by one as the upstream writes them', async () => {
      board = new GateBoard();
      const { res } = await openHttps1('/v3/chat/completions', JSON.stringify({ model: 'dummy', stream: true }));
      assert.equal(res.headers['content-type'], 'text/event-stream');
      await expectEventsOneByOne(sseEvents(res));
    });

    test('Server-Sent Events reach an HTTP/2 client one by one as the upstream writes them', async () => {
      board = new GateBoard();
      const session = h2Session(front.restPort, pki);
      try {
        const stream = session.request({ ':method': 'POST', ':path': '/v3/chat/completions', 'content-type': 'application/json' });
        stream.end(JSON.stringify({ model: 'dummy', stream: true }));
        const [headers] = (await once(stream, 'response')) as [Record<string, string>];
        assert.equal(headers['content-type'], 'text/event-stream');
        await expectEventsOneByOne(sseEvents(stream));
      } finally {
        session.close();
      }
    });

    test('a client that drops an SSE stream aborts its upstream request', async () => {
      board = new GateBoard();
      const { req, res } = await openHttps1('/v3/chat/completions', JSON.stringify({ stream: true }));
      board.open(0);
      await sseEvents(res).next();
      req.destroy();
      await upstream.waitFor('restAborted', '/v3/chat/completions');
      board.openAll();
    });

    /** A response cut short ends in 'close' without 'end', which would leave the test waiting: it fails, with what the proxy logged. */
    const failOnCutResponse = (res: IncomingMessage, reject: (err: Error) => void) => {
      res.on('error', () => {});
      res.on('close', () => {
        if (!res.complete) reject(new Error(`response cut short; proxy log: ${JSON.stringify(front.logs.lines.slice(-5))}`));
      });
    };

    test('a 256 MiB upload and a 256 MiB download stream through without being held in memory', async () => {
      const total = 256 * 1024 * 1024;
      const chunk = Buffer.alloc(1024 * 1024, 0x5a);
      const expected = createHash('sha256');
      const baseline = process.memoryUsage().rss;
      let peak = baseline;
      const reply = await new Promise<string>((resolve, reject) => {
        const req = httpsRequest({ host: '127.0.0.1', port: front.restPort, method: 'POST', path: '/echo-body', agent: false, ...tlsClientOptions(pki) }, (res) => {
          let text = '';
          res.on('data', (c: Buffer) => (text += c.toString()));
          res.on('end', () => resolve(text));
          failOnCutResponse(res, reject);
        });
        req.on('error', reject);
        let sent = 0;
        const pump = () => {
          while (sent < total) {
            sent += chunk.length;
            expected.update(chunk);
            peak = Math.max(peak, process.memoryUsage().rss);
            if (!req.write(chunk)) return void req.once('drain', pump);
          }
          req.end();
        };
        pump();
      });
      assert.deepEqual(JSON.parse(reply), { bytes: total, sha256: expected.digest('hex') });

      const download = await new Promise<number>((resolve, reject) => {
        const req = httpsRequest({ host: '127.0.0.1', port: front.restPort, path: `/stream-bytes?n=${total}`, agent: false, ...tlsClientOptions(pki) }, (res) => {
          let bytes = 0;
          res.on('data', (c: Buffer) => {
            bytes += c.length;
            peak = Math.max(peak, process.memoryUsage().rss);
          });
          res.on('end', () => resolve(bytes));
          failOnCutResponse(res, reject);
        });
        req.on('error', reject);
        req.end();
      });
      assert.equal(download, total);
      // Client, proxy and upstream share this process: holding either body would add 256 MiB.
      assert.ok(peak - baseline < 128 * 1024 * 1024, `RSS grew by ${Math.round((peak - baseline) / 1048576)} MiB`);
    });

    test('every request is logged with listener, protocol, client, path and status', async () => {
      await https1(front.restPort, pki, { path: '/v2/models/dummy/ready' });
      const line = await front.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/models/dummy/ready');
      assert.equal(line.listener, 'rest');
      assert.equal(line.protocol, 'http/1.1');
      assert.equal(line.subject, 'CN=client,OU=tests');
      assert.equal(line.status, 200);
    });

    // Python requests 2.28 (Debian's) ends a chunked body at a generator's empty chunk and sends the rest as bytes after it.
    test('bytes that are no request, behind a whole one, get their 400 after that one is answered, and the connection closes', async () => {
      const socket = await openRaw(front.restPort, pki);
      socket.write('GET /v2/models/dummy HTTP/1.1\r\nhost: a\r\n\r\n3\r\ndef\r\n0\r\n\r\n');
      const text = await readToClose(socket);
      assert.match(text, /^HTTP\/1\.1 200 OK\r\n[^]*"name":"b"[^]*HTTP\/1\.1 400 Bad Request\r\n[^]*connection: close\r\n/);
    });
  });
}

describe('request targets (--mtls_rest_mode terminate)', () => {
  test('the asterisk form (OPTIONS *) gets 400 naming the target, and the connection goes on serving', async () => {
    const model = await startUpstream({ grpcPort: null });
    const local = await startTestProxy({ pki, upstream: { restPort: model.restPort! }, restMode: 'terminate' });
    try {
      const socket = await openRaw(local.restPort, pki);
      socket.write('OPTIONS * HTTP/1.1\r\nhost: a\r\n\r\nGET /v2/health/ready HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n');
      const text = await readToClose(socket);
      assert.match(text, /^HTTP\/1\.1 400 Bad Request\r\n[\s\S]*request target \\"\*\\" is not forwarded/);
      assert.match(text, /\r\n\r\n[^]*HTTP\/1\.1 200 OK\r\n/);
      const line = await local.logs.waitFor((l) => l.event === 'access' && l.method === 'OPTIONS');
      assert.equal(line.status, 400);
      assert.equal(line.error, 'bad_request_target');
    } finally {
      await local.proxy.shutdown(1000);
      await model.close();
    }
  });
});

describe('request targets with a #fragment', () => {
  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}: an HTTP/2 :path with a #fragment (nghttp2 lets it through) gets 400 naming it and never reaches the model server`, () =>
      behindProxy({ pki, restMode, answer: (socket) => socket.write('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok') }, async (local, upstream) => {
        const session = h2Session(local.restPort, pki);
        try {
          const res = await h2Request(session, { ':method': 'GET', ':path': '/v2/models/dummy#ready' });
          assert.equal(res.headers[':status'], 400);
          assert.equal(JSON.parse(res.body.toString()).error, 'request target "/v2/models/dummy#ready" is not forwarded: a path (/v2/...) or an http(s) URL without a #fragment is');
          const line = await local.logs.waitFor((l) => l.event === 'access' && l.status === 400);
          assert.equal(line.error, 'bad_request_target');
          assert.equal(upstream.sockets.length, 0);
        } finally {
          session.destroy();
        }
      }));
  }
});

describe('a request pipelined behind an answer after which the connection closes: its line claims no answer', () => {
  const PIPELINED = 'GET /first HTTP/1.1\r\nhost: a\r\n\r\nGET /second HTTP/1.1\r\nhost: a\r\n\r\n';
  const HEAD_AND_PART = 'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc';

  /** The two lines, once both are logged; the client got the first answer alone (or the start of it). */
  async function linesOfBoth(local: StartedProxy, received: string): Promise<{ first: LogLine; second: LogLine }> {
    assert.equal(received.match(/^HTTP\/1\.1 /gm)?.length, 1, received);
    const first = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/first');
    const second = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/second');
    return { first, second };
  }

  for (const restMode of FORWARD_MODES) {
    // Terminate mode asks for each on a connection of its own: the one for /first is cut, the one for /second goes on.
    test(`--mtls_rest_mode ${restMode}: the model server cuts the first answer: the second, never sent, has status 0, no bytes out, and the first's error, not client_closed or an unlisted word`, () =>
      behindProxy({ pki, restMode, answer: (socket, first) => (first.includes('/first') ? socket.end(HEAD_AND_PART) : socket.write(HEAD_AND_PART)) }, async (local) => {
        const socket = await openRaw(local.restPort, pki);
        socket.write(PIPELINED);
        const { first, second } = await linesOfBoth(local, await readToClose(socket));
        assert.match(String(first.error), /^(UPSTREAM_CLOSED|upstream_closed_mid_response)$/);
        assert.deepEqual([second.status, second.bytesOut, second.error], [0, 0, first.error]);
      }));

    test(`--mtls_rest_mode ${restMode}: a request the proxy refuses (a #fragment target), pipelined: its 400 is logged when it goes out, and as never sent (status 0, no bytes out) when the answer before it is cut`, () => {
      // Each request answered, on a kept-alive connection too: terminate mode sends /cut on the one /whole used.
      const answer = (socket: Socket, first: Buffer) => {
        const reply = (request: Buffer) => (request.includes('/cut') ? socket.end(HEAD_AND_PART) : socket.write('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok'));
        reply(first);
        socket.on('data', reply);
      };
      return behindProxy({ pki, restMode, answer }, async (local) => {
        for (const [first, refused, statuses] of [['/whole', '/sent#x', ['200', '400']], ['/cut', '/unsent#x', ['200']]] as const) {
          const socket = await openRaw(local.restPort, pki);
          socket.write(`GET ${first} HTTP/1.1\r\nhost: a\r\n\r\nGET ${refused} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n`);
          assert.deepEqual((await readToClose(socket)).match(/(?<=HTTP\/1\.1 )\d{3}/g), statuses);
        }
        const sent = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/sent#x');
        assert.equal(sent.status, 400);
        assert.ok(Number(sent.bytesOut) > 0);
        const unsent = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/unsent#x');
        assert.deepEqual([unsent.status, unsent.bytesOut, unsent.error], [0, 0, 'bad_request_target']);
      });
    });

    test(`--mtls_rest_mode ${restMode}: the shutdown timeout runs out with both waiting: the first gets the 503, the second, never sent, has status 0 and no bytes out, shutdown_timeout`, () =>
      behindProxy({ pki, restMode, answer: () => {} }, async (local, upstream) => {
        const socket = await openRaw(local.restPort, pki);
        socket.write(PIPELINED);
        await eventually(() => upstream.sockets.length > 0, 'the model server to get the requests');
        const received = readToClose(socket);
        await local.proxy.shutdown(300);
        const { first, second } = await linesOfBoth(local, await received);
        assert.deepEqual([first.status, first.error], [503, 'shutdown_timeout']);
        assert.deepEqual([second.status, second.bytesOut, second.error], [0, 0, 'shutdown_timeout']);
      }));
  }
});

describe('request authorities (both REST modes serve HTTP/2 by forwarding)', () => {
  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}: an HTTP/2 :authority with a user@ part (malformed, RFC 9113 8.3.1) gets 400 naming it and never reaches the model server as a Host line`, () =>
      behindProxy({ pki, restMode, answer: (socket) => socket.write('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok') }, async (local, upstream) => {
        const session = h2Session(local.restPort, pki);
        try {
          for (const authority of ['user@localhost', 'localhost:1:2']) {
            const res = await h2Request(session, { ':method': 'GET', ':path': '/v2/models/dummy', ':authority': authority }).catch((err: NodeJS.ErrnoException) => err);
            if (res instanceof Error) {
              // Node 24's nghttp2 resets a userinfo authority itself (RFC 9113 8.1.1: malformed), before any handler of ours; it still never reaches the model server.
              assert.equal(authority, 'user@localhost', res.message);
              assert.match(res.message, /NGHTTP2_PROTOCOL_ERROR/);
              continue;
            }
            assert.equal(res.headers[':status'], 400, authority);
            assert.equal(JSON.parse(res.body.toString()).error, `request authority ${JSON.stringify(authority)} is not forwarded: send host[:port] only, without a user@ part`);
          }
          // A valid one on the same session still goes through.
          const ok = await h2Request(session, { ':method': 'GET', ':path': '/v2/models/dummy', ':authority': `localhost:${local.restPort}` });
          assert.equal(ok.headers[':status'], 200);
          assert.equal(upstream.sockets.length, 1);
          const line = await local.logs.waitFor((l) => l.event === 'access' && l.status === 400);
          assert.equal(line.error, 'bad_request_authority');
        } finally {
          session.destroy();
        }
      }));
  }
});

/** A model server that records each connection's first bytes (a request head) and answers it once, closing. */
const recordingHeads = (heads: string[]) => (socket: Socket, first: Buffer): void => {
  heads.push(first.toString('latin1'));
  socket.end('HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok');
};

/** One HTTP/1.1 request written as it is, on a connection of its own: the status and body of the answer. */
async function rawRequest(port: number, head: string): Promise<{ status: number; body: string }> {
  const socket = await openRaw(port, pki);
  socket.write(head);
  const text = await readToClose(socket);
  return { status: Number(/^HTTP\/1\.1 (\d{3}) /.exec(text)?.[1]), body: text.slice(text.indexOf('\r\n\r\n') + 4) };
}

/** The `error` of our JSON answer, whether it came chunked (terminate) or with a length (relay). */
const errorOf = (body: string): string => (JSON.parse(body.slice(body.indexOf('{'), body.lastIndexOf('}') + 1)) as { error: string }).error;

describe('HTTP/1.1 Host lines and absolute-form targets: the model server sees one host and the path our access line shows', () => {
  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}: a Host with a user@ part, a second colon, a port that is no number, a #fragment or a space gets 400 naming it (bad_request_authority) and never reaches the model server`, () => {
      const heads: string[] = [];
      return behindProxy({ pki, restMode, answer: recordingHeads(heads) }, async (local) => {
        const hosts = ['user@localhost', 'localhost:1:2', 'localhost:http', 'localhost#a', 'local host'];
        for (const host of hosts) {
          const res = await rawRequest(local.restPort, `GET /v2/models/dummy HTTP/1.1\r\nHost: ${host}\r\nconnection: close\r\n\r\n`);
          assert.equal(res.status, 400, host);
          assert.equal(errorOf(res.body), `request authority ${JSON.stringify(host)} is not forwarded: send host[:port] only, without a user@ part`);
        }
        const refused = () => local.logs.lines.filter((l) => l.event === 'access' && l.status === 400);
        await eventually(() => refused().length === hosts.length, 'an access line per refusal');
        const lines = refused();
        assert.ok(lines.every((l) => l.error === 'bad_request_authority' && l.path === '/v2/models/dummy'), JSON.stringify(lines));
        assert.deepEqual(heads, []);
        // A good one on a fresh connection still goes through.
        assert.equal((await rawRequest(local.restPort, `GET /v2/models/dummy HTTP/1.1\r\nHost: localhost:${local.restPort}\r\nconnection: close\r\n\r\n`)).status, 200);
        assert.equal(heads.length, 1);
      });
    });

    test(`--mtls_rest_mode ${restMode}: an HTTP/1.1 target with a #fragment (llhttp lets it through), or the asterisk form, gets 400 naming it (bad_request_target) and never reaches the model server`, () => {
      const heads: string[] = [];
      return behindProxy({ pki, restMode, answer: recordingHeads(heads) }, async (local) => {
        for (const [method, target] of [['GET', '/v2/models/dummy#ready'], ['OPTIONS', '*']] as const) {
          const res = await rawRequest(local.restPort, `${method} ${target} HTTP/1.1\r\nHost: localhost\r\nconnection: close\r\n\r\n`);
          assert.equal(res.status, 400, target);
          assert.equal(errorOf(res.body), `request target ${JSON.stringify(target)} is not forwarded: a path (/v2/...) or an http(s) URL without a #fragment is`);
          const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === target);
          assert.equal(line.error, 'bad_request_target');
        }
        assert.deepEqual(heads, []);
      });
    });

    test(`--mtls_rest_mode ${restMode}: an absolute-form target's authority wins over Host (RFC 9112 3.2.2): the model server gets it as its one Host line, and one with a user@ part gets 400`, () => {
      const heads: string[] = [];
      return behindProxy({ pki, restMode, answer: recordingHeads(heads) }, async (local) => {
        const res = await rawRequest(local.restPort, 'GET http://localhost:9/v2/models/dummy HTTP/1.1\r\nHost: 127.0.0.1\r\nconnection: close\r\n\r\n');
        assert.equal(res.status, 200);
        assert.equal(heads.length, 1);
        assert.match(heads[0]!, /^GET http:\/\/localhost:9\/v2\/models\/dummy HTTP\/1\.1\r\n/);
        assert.deepEqual([...heads[0]!.matchAll(/^host: *(.*)\r$/gim)].map((m) => m[1]), ['localhost:9']);
        const line = await local.logs.waitFor((l) => l.event === 'access' && l.status === 200);
        assert.equal(line.path, 'http://localhost:9/v2/models/dummy');

        const userinfo = await rawRequest(local.restPort, 'GET http://admin@localhost/v2/models/dummy HTTP/1.1\r\nHost: localhost\r\nconnection: close\r\n\r\n');
        assert.equal(userinfo.status, 400);
        assert.equal(errorOf(userinfo.body), 'request authority "admin@localhost" is not forwarded: send host[:port] only, without a user@ part');
        assert.equal((await local.logs.waitFor((l) => l.event === 'access' && l.status === 400)).error, 'bad_request_authority');
        assert.equal(heads.length, 1);
      });
    });
  }

  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}: a request with two Host lines gets 400 (RFC 9112 3.2), HTTP/1.1 and 1.0, logged bad_request_authority, and never reaches the model server, which might route by the other one`, () => {
      const heads: string[] = [];
      return behindProxy({ pki, restMode, answer: recordingHeads(heads) }, async (local) => {
        for (const version of ['1.1', '1.0']) {
          const res = await rawRequest(local.restPort, `GET /v2/models/dummy HTTP/${version}\r\nHost: localhost\r\nHOST: admin\r\nconnection: close\r\n\r\n`);
          assert.equal(res.status, 400, version);
          assert.equal(errorOf(res.body), 'a request may have one Host field at most');
        }
        await eventually(() => local.logs.lines.filter((l) => l.event === 'access').length === 2, 'two access lines');
        assert.deepEqual(local.logs.lines.filter((l) => l.event === 'access').map((l) => [l.path, l.status, l.error]), Array(2).fill(['/v2/models/dummy', 400, 'bad_request_authority']));
        assert.deepEqual(heads, []);
      });
    });
  }

  // Node's parser refuses these before terminate mode sees them (400 bad_request).
  test('--mtls_rest_mode relay: a target that is neither a path nor an http(s) URL gets 400 naming it', () => {
    const heads: string[] = [];
    return behindProxy({ pki, restMode: 'relay', answer: recordingHeads(heads) }, async (local) => {
      for (const target of ['v2/models/dummy', 'ftp://localhost/v2/models/dummy']) {
        const res = await rawRequest(local.restPort, `OPTIONS ${target} HTTP/1.1\r\nHost: localhost\r\n\r\n`);
        assert.equal(res.status, 400);
        assert.equal(errorOf(res.body), `request target ${JSON.stringify(target)} is not forwarded: a path (/v2/...) or an http(s) URL without a #fragment is`);
      }
      assert.deepEqual(heads, []);
    });
  });
});

describe('HTTP/1.1 message boundaries behind a request that asks to switch protocols (served plainly, never switched) or to tunnel (405)', () => {
  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}: what the client sends after it is read as the client framed it: bytes of a body never reach the model server as a request of their own`, async () => {
      const local = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, restMode });
      const from = upstream.received.length;
      try {
        const socket = await openRaw(local.restPort, pki);
        // Node's parser reads nothing after such a request in the same read: the POST head was lost, and its body read as a request.
        const inBody = 'GET /v2/health/ready HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n';
        const body = `{"a"${inBody}`;
        socket.write('GET /v2/health/live HTTP/1.1\r\nhost: localhost\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n' +
          `POST /v2/models/dummy/infer HTTP/1.1\r\nhost: localhost\r\ncontent-length: ${body.length}\r\nconnection: close\r\n\r\n${body.slice(0, 4)}`);
        const first = await readUntil(socket, /^HTTP\/1\.1 200 [^]*?\r\n\r\n/);
        const rest = readToClose(socket);
        socket.write(body.slice(4));
        const answers = [...`${first}${await rest}`.matchAll(/HTTP\/1\.1 (\d{3}) /g)].map((m) => Number(m[1]));
        const paths = upstream.received.slice(from).filter((r) => r.protocol === 'rest').map((r) => r.path);
        assert.ok(!paths.includes('/v2/health/ready'), `the model server got a request made of body bytes: ${JSON.stringify(paths)}`);
        // The relay reads on and answers both; terminate mode ends the connection after the first answer, and the POST may be retried.
        assert.deepEqual(paths, ['/v2/health/live', '/v2/models/dummy/infer'].slice(0, answers.length));
        if (restMode === 'terminate') assert.match(first, /\r\nconnection: close\r\n/i);
      } finally {
        await local.proxy.shutdown(1000);
      }
    });

    test(`--mtls_rest_mode ${restMode}: a CONNECT pipelined behind a large response gets its 405 after that whole response, then the connection closes`, { timeout: 30_000 }, async () => {
      const local = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, restMode });
      try {
        const socket = await openRaw(local.restPort, pki);
        // Larger than the socket buffers: the response waits for the client to read, more than once.
        socket.write('GET /stream-bytes?n=3000000 HTTP/1.1\r\nhost: localhost\r\n\r\nCONNECT localhost:443 HTTP/1.1\r\nhost: localhost:443\r\n\r\n');
        const text = await readToClose(socket);
        const second = text.indexOf('HTTP/1.1 405 ');
        assert.match(text, /^HTTP\/1\.1 200 OK\r\n[^]*?\r\ncontent-length: 3000000\r\n/i);
        assert.equal(second - text.indexOf('\r\n\r\n') - 4, 3_000_000, 'the whole first body, then the 405');
        assert.match(text.slice(second), /CONNECT is not supported\n$/);
        await eventually(() => local.logs.lines.filter((l) => l.event === 'access').length === 2, 'both access lines');
        const lines = local.logs.lines.filter((l) => l.event === 'access').map((l) => [l.method, l.status, l.error]);
        assert.deepEqual(lines.sort(), [['CONNECT', 405, 'bad_request'], ['GET', 200, undefined]]);
      } finally {
        await local.proxy.shutdown(1000);
      }
    });
  }
});

describe('upstream answers (--mtls_rest_mode terminate)', () => {
  test('an interim 103 Early Hints is not passed on; the final answer is', () =>
    behindProxy({ pki, restMode: 'terminate', answer: (socket) => socket.write('HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok') }, async (local) => {
      const socket = await openRaw(local.restPort, pki);
      socket.write('GET /v2/health/ready HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n');
      const text = await readToClose(socket);
      assert.match(text, /^HTTP\/1\.1 200 OK\r\n[^]*\r\n\r\nok$/);
      assert.doesNotMatch(text, /103|rel=preload/);
    }));

  test('an HTTP/2 client gets the first value of a header the model server repeats but HTTP/2 carries once (date, etag, content-type)', () => {
    const head = 'HTTP/1.1 200 OK\r\ndate: Mon, 01 Jan 2024 00:00:00 GMT\r\ndate: Tue, 02 Jan 2024 00:00:00 GMT\r\netag: "a"\r\netag: "b"\r\n'
      + 'content-type: text/plain\r\ncontent-type: text/html\r\nx-many: 1\r\nx-many: 2\r\ncontent-length: 2\r\n\r\nok';
    return behindProxy({ pki, restMode: 'terminate', answer: (socket) => socket.write(head) }, async (local) => {
      const session = h2Session(local.restPort, pki);
      try {
        const res = await h2Request(session, { ':method': 'GET', ':path': '/v2/models/dummy' });
        assert.equal(res.headers[':status'], 200);
        assert.equal(res.headers['date'], 'Mon, 01 Jan 2024 00:00:00 GMT');
        assert.equal(res.headers['etag'], '"a"');
        assert.equal(res.headers['content-type'], 'text/plain');
        // Any other header may repeat: it is passed on whole.
        assert.equal(res.headers['x-many'], '1, 2');
        assert.equal(res.body.toString(), 'ok');
      } finally {
        session.destroy();
      }
    });
  });

  test('a head Node cannot send to an HTTP/2 client (status 600) gets a 502 carrying only our own headers, not a stream left open', () =>
    behindProxy({ pki, restMode: 'terminate', answer: (socket) => socket.write('HTTP/1.1 600 Odd\r\ndate: Mon, 01 Jan 2024 00:00:00 GMT\r\ncontent-length: 2\r\nx-upstream: 1\r\n\r\nok') }, async (local, upstream) => {
      const session = h2Session(local.restPort, pki);
      try {
        const res = await h2Request(session, { ':method': 'GET', ':path': '/v2/models/dummy' });
        assert.equal(res.headers[':status'], 502);
        assert.equal(res.headers['content-type'], 'application/json');
        assert.equal(res.headers['content-length'], undefined);
        assert.equal(res.headers['x-upstream'], undefined);
        assert.notEqual(res.headers['date'], 'Mon, 01 Jan 2024 00:00:00 GMT');
        assert.match(JSON.parse(res.body.toString()).error, new RegExp(`^upstream 127\\.0\\.0\\.1:${upstream.port} failed`));
        const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/models/dummy');
        assert.equal(line.status, 502);
      } finally {
        session.destroy();
      }
    }));

  test('a response undici refuses (a final 100 Continue nobody asked for) gets a 502 saying the response was not valid, not that the connection closed', () =>
    behindProxy({ pki, restMode: 'terminate', answer: (socket) => socket.write('HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok') }, async (local, upstream) => {
      const res = await https1(local.restPort, pki, { path: '/v2/health/ready' });
      assert.equal(res.status, 502);
      assert.equal(JSON.parse(res.body).error, `upstream 127.0.0.1:${upstream.port} sent a response that is not valid HTTP/1.1`);
      const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/health/ready');
      assert.equal(line.error, 'UPSTREAM_BAD_RESPONSE');
    }));

  /** Heads undici's parser refuses, by request path; they were a 502 "failed (UPSTREAM_ERROR)" or naming undici's own code. */
  const NOT_HTTP11: Record<string, string> = {
    '/no-colon': 'HTTP/1.1 200 OK\r\nbad header line\r\ncontent-length: 2\r\n\r\nok',
    '/bare-lf': 'HTTP/1.1 200 OK\ncontent-length: 2\n\nok',
    '/length-not-a-number': 'HTTP/1.1 200 OK\r\ncontent-length: 2x\r\n\r\nok',
    '/length-and-chunked': 'HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n',
  };
  const answerByPath = (answers: Record<string, string>) => (socket: Socket, first: Buffer): void => {
    const path = /^[A-Z]+ (\S+)/.exec(first.toString('latin1'))![1]!;
    socket.end(answers[path]);
  };

  test('a response that is not valid HTTP/1.1 (a header line without a colon, bare LF line ends, a Content-Length that is no number or next to Transfer-Encoding) gets a 502 saying so, logged UPSTREAM_BAD_RESPONSE', () =>
    behindProxy({ pki, restMode: 'terminate', answer: answerByPath(NOT_HTTP11) }, async (local, upstream) => {
      const expected = `upstream 127.0.0.1:${upstream.port} sent a response that is not valid HTTP/1.1`;
      const session = h2Session(local.restPort, pki);
      try {
        for (const path of Object.keys(NOT_HTTP11)) {
          const res = await https1(local.restPort, pki, { path });
          assert.equal(res.status, 502, path);
          assert.equal(JSON.parse(res.body).error, expected, path);
          const h2 = await h2Request(session, { ':method': 'GET', ':path': path });
          assert.equal(h2.headers[':status'], 502, path);
          assert.equal(JSON.parse(h2.body.toString()).error, expected, path);
          const lines = () => local.logs.lines.filter((l) => l.event === 'access' && l.path === path);
          await eventually(() => lines().length === 2, `two access lines for ${path}`);
          assert.deepEqual(lines().map((l) => l.error), ['UPSTREAM_BAD_RESPONSE', 'UPSTREAM_BAD_RESPONSE'], path);
        }
      } finally {
        session.destroy();
      }
    }));

  test('a body shorter than its Content-Length, ended by the model server\'s close after `connection: close`, cuts the answer short and is logged UPSTREAM_CLOSED, as without that field', () =>
    behindProxy({ pki, restMode: 'terminate', answer: answerByPath({ '/short': 'HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 100\r\n\r\nabc' }) }, async (local) => {
      const socket = await openRaw(local.restPort, pki);
      socket.write('GET /short HTTP/1.1\r\nhost: a\r\n\r\n');
      const text = await readToClose(socket);
      assert.match(text, /^HTTP\/1\.1 200 OK\r\n[^]*content-length: 100\r\n[^]*\r\n\r\nabc$/);
      const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/short');
      assert.equal(line.error, 'UPSTREAM_CLOSED');
    }));

  test('a model server on an IPv6 address ([::1]) is reached', async () => {
    const server = createHttpServer((req, res) => res.end(`seen ${req.url}`));
    server.listen(0, '::1');
    await once(server, 'listening');
    const { port } = server.address() as AddressInfo;
    const local = await startTestProxy({ pki, upstream: { restPort: port, host: '::1' }, restMode: 'terminate' });
    try {
      const res = await https1(local.restPort, pki, { path: '/v2/health/ready' });
      assert.equal(res.status, 200);
      assert.equal(res.body, 'seen /v2/health/ready');
    } finally {
      await local.proxy.shutdown(1000);
      server.close();
    }
  });
});

describe('answers without a body whatever their Content-Length says (RFC 9110 6.4.1)', () => {
  /** A model server answering every request head on a connection with `answer`, kept alive. */
  const answerEachHead = (answer: string) => (socket: Socket, first: Buffer): void => {
    let text = '';
    const read = (chunk: Buffer) => {
      text += chunk.toString('latin1');
      for (let end = text.indexOf('\r\n\r\n'); end >= 0; end = text.indexOf('\r\n\r\n')) {
        text = text.slice(end + 4);
        socket.write(answer);
      }
    };
    read(first);
    socket.on('data', read);
  };
  /** A 304 may carry the length of the representation the client already has (RFC 9110 8.6). */
  const NOT_MODIFIED = 'HTTP/1.1 304 Not Modified\r\netag: "v1"\r\ncontent-length: 123\r\n\r\n';

  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}: a 304 with a Content-Length reaches HTTP/1.1 and HTTP/2 clients as sent, on a connection that serves the next request`, () =>
      behindProxy({ pki, restMode, answer: answerEachHead(NOT_MODIFIED) }, async (local) => {
        const socket = await openRaw(local.restPort, pki);
        const session = h2Session(local.restPort, pki);
        try {
          for (const round of [1, 2]) {
            const heads = readUntil(socket, /\r\n\r\n/);
            socket.write('GET /v2/models/dummy HTTP/1.1\r\nhost: a\r\nif-none-match: "v1"\r\n\r\n');
            const head = await heads;
            assert.match(head, /^HTTP\/1\.1 304 Not Modified\r\n/, `round ${round}`);
            assert.match(head, /\r\ncontent-length: 123\r\n/i, `round ${round}`);
            assert.match(head, /\r\netag: "v1"\r\n/i, `round ${round}`);
          }
          const h2 = await h2Request(session, { ':method': 'GET', ':path': '/v2/models/dummy', 'if-none-match': '"v1"' });
          assert.equal(h2.headers[':status'], 304);
          assert.equal(h2.headers['etag'], '"v1"');
          const lines = () => local.logs.lines.filter((l) => l.event === 'access' && l.path === '/v2/models/dummy');
          await eventually(() => lines().length === 3, 'three access lines');
          assert.deepEqual(lines().map((l) => [l.status, l.error]), [[304, undefined], [304, undefined], [304, undefined]]);
          assert.equal(local.logs.lines.filter((l) => l.event === 'upstream_error').length, 0);
        } finally {
          socket.destroy();
          session.destroy();
        }
      }));
  }
});

describe('rest upstream failures', () => {
  test('--mtls_rest_mode terminate: an upstream that closes before answering gives the client a 502 naming it', () =>
    behindProxy({ pki, restMode: 'terminate', answer: (socket) => socket.end() }, async (local, upstream) => {
      const res = await https1(local.restPort, pki, { path: '/v2/health/ready' });
      assert.equal(res.status, 502);
      assert.match(JSON.parse(res.body).error, new RegExp(`upstream 127\\.0\\.0\\.1:${upstream.port} closed the connection before answering`));
      const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/health/ready');
      assert.equal(line.error, 'UPSTREAM_CLOSED');
    }));

  test('--mtls_rest_mode terminate: an upstream that closes in the middle of a response resets the HTTP/2 client\'s stream with INTERNAL_ERROR, not a clean end', () =>
    behindProxy({ pki, restMode: 'terminate', answer: (socket) => socket.end('HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n0123456789') }, async (local) => {
      const session = h2Session(local.restPort, pki);
      try {
        const stream = session.request({ ':method': 'GET', ':path': '/v2/models/dummy' }, { endStream: true });
        const errors: NodeJS.ErrnoException[] = [];
        stream.on('error', (err) => errors.push(err));
        const closed = new Promise((resolve) => stream.once('close', resolve));
        stream.resume();
        const [headers] = (await once(stream, 'response')) as [Record<string, unknown>];
        assert.equal(headers[':status'], 200);
        await closed;
        assert.equal(stream.rstCode, http2Constants.NGHTTP2_INTERNAL_ERROR);
        assert.equal(errors[0]?.code, 'ERR_HTTP2_STREAM_ERROR');
        const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/models/dummy');
        assert.equal(line.error, 'UPSTREAM_CLOSED');
      } finally {
        session.destroy();
      }
    }));

  /** An event stream whose body runs until close: no length, not chunked (an HTTP/1.0-style answer). */
  const untilClose = (socket: Socket) => socket.write('HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\ndata: 0\n\n');

  for (const [how, close] of [['reset', (s: Socket) => s.resetAndDestroy()], ['clean close', (s: Socket) => s.end()]] as const) {
    const cut = how === 'reset';
    test(`--mtls_rest_mode terminate: a body that runs until close, ended by a ${how}, ${cut ? 'is cut short for the client, as the relay reads it (RFC 9112 8): no last chunk over HTTP/1.1, RST_STREAM(INTERNAL_ERROR) over HTTP/2' : 'is complete for the client'}`, { timeout: 30_000 }, () =>
      behindProxy({ pki, restMode: 'terminate', answer: untilClose }, async (local, upstream) => {
        const http1 = await openRaw(local.restPort, pki);
        http1.write('GET /v3/sse HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n');
        // Both readers from the start: the first event may come in the same read as the head.
        const firstEvent = readUntil(http1, /data: 0/);
        const answer = readToClose(http1);
        await firstEvent;
        close(upstream.sockets[0]!);
        const text = await answer;
        assert.match(text, /transfer-encoding: chunked/i);
        assert.equal(text.endsWith('\r\n0\r\n\r\n'), !cut, text);
        const h1Line = await local.logs.waitFor((l) => l.event === 'access' && l.protocol === 'http/1.1');
        assert.equal(h1Line.error, cut ? 'ECONNRESET' : undefined);

        const session = h2Session(local.restPort, pki);
        try {
          const stream = session.request({ ':path': '/v3/sse' }, { endStream: true });
          stream.on('error', () => {});
          const closed = new Promise((resolve) => stream.once('close', resolve));
          await once(stream, 'data');
          close(upstream.sockets[1]!);
          await closed;
          assert.equal(stream.rstCode, cut ? http2Constants.NGHTTP2_INTERNAL_ERROR : http2Constants.NGHTTP2_NO_ERROR);
          const h2Line = await local.logs.waitFor((l) => l.event === 'access' && l.protocol === 'h2');
          assert.equal(h2Line.error, cut ? 'ECONNRESET' : undefined);
        } finally {
          session.destroy();
        }
      }));
  }

  test('an unreachable upstream answers 502 with a small JSON error body', async () => {
    const server = await startUpstream({ grpcPort: null });
    const port = server.restPort!;
    await server.close();
    const local = await startTestProxy({ pki, upstream: { restPort: port } });
    try {
      const res = await https1(local.restPort, pki, { path: '/v2/health/ready' });
      assert.equal(res.status, 502);
      assert.equal(res.headers['content-type'], 'application/json');
      assert.match(JSON.parse(res.body).error, new RegExp(`upstream 127\\.0\\.0\\.1:${port} refused the connection`));
    } finally {
      await local.proxy.shutdown(1000);
    }
  });
});

describe('the upstream_error line of a model server that refuses the connection', () => {
  // It said "upstream error" and the code alone: not which upstream, nor what to check.
  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}: says what the client's 502 says, naming the upstream`, async () => {
      const server = await startUpstream({ grpcPort: null });
      const port = server.restPort!;
      await server.close();
      const local = await startTestProxy({ pki, upstream: { restPort: port }, restMode });
      try {
        const res = await https1(local.restPort, pki, { path: '/v2/health/ready' });
        assert.equal(res.status, 502);
        const told = (JSON.parse(res.body) as { error: string }).error;
        assert.match(told, new RegExp(`^upstream 127\\.0\\.0\\.1:${port} refused the connection`));
        await local.logs.waitFor((l) => l.event === 'access');
        const lines = local.logs.lines.filter((l) => l.event === 'upstream_error');
        assert.ok(lines.length > 0);
        for (const line of lines) assert.deepEqual([line.level, line.reason, line.msg], ['warn', 'ECONNREFUSED', told]);
      } finally {
        await local.proxy.shutdown(1000);
      }
    });
  }
});

describe('clients that leave (--mtls_rest_mode terminate)', () => {
  test('an HTTP/2 body that does not add up to its content-length (reset by nghttp2, PROTOCOL_ERROR) is logged as bad_request_body, not as a client that left, and never reaches the model server', () =>
    behindProxy({ pki, restMode: 'terminate', answer: () => {} }, async (local, upstream) => {
      const session = h2Session(local.restPort, pki);
      try {
        // What Go's client sends when a caller sets ContentLength above the body's length; it then retries at once.
        const stream = session.request({ ':method': 'POST', ':path': '/echo-body', 'content-length': '20' });
        const closed = new Promise((resolve) => stream.once('close', resolve));
        stream.on('error', () => {});
        stream.end('0123456789');
        await closed;
        assert.equal(stream.rstCode, http2Constants.NGHTTP2_PROTOCOL_ERROR);
        const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/echo-body');
        assert.equal(line.error, 'bad_request_body');
        assert.equal(line.status, 0);
        assert.equal(upstream.sockets.length, 0);
      } finally {
        session.destroy();
      }
    }));

  test('an HTTP/2 client that cancels its stream mid-upload is logged as client_closed, as an HTTP/1.1 one is', () =>
    behindProxy({ pki, restMode: 'terminate', answer: () => {} }, async (local, upstream) => {
      const session = h2Session(local.restPort, pki);
      try {
        const stream = session.request({ ':method': 'POST', ':path': '/v2/models/dummy/infer' });
        stream.on('error', () => {});
        // Past 64 KiB: the request is at the model server while the body still comes.
        stream.write(Buffer.alloc(100_000, 0x61));
        await eventually(() => upstream.sockets.length > 0, 'the request at the model server');
        stream.close(http2Constants.NGHTTP2_CANCEL);
        const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/models/dummy/infer');
        assert.equal(line.protocol, 'h2');
        assert.equal(line.error, 'client_closed');
      } finally {
        session.destroy();
      }
    }));
});

describe('HTTP/2 clients that leave once the body has come, before its END_STREAM', () => {
  const BODY = Buffer.alloc(1000, 0x61);
  const CANCEL = Buffer.from([0, 0, 0, http2Constants.NGHTTP2_CANCEL]);
  const withLength = (socket: Socket) => socket.write(Buffer.concat([Buffer.from(`HTTP/1.1 200 OK\r\ncontent-length: ${BODY.length}\r\n\r\n`), BODY]));

  /**
   * A raw client's GET /download with a stream window of `window` bytes. Node sends the END_STREAM
   * after the last write in a DATA frame of its own, and nghttp2 holds even that empty frame while
   * the window is 0: here the END_STREAM is still owed, for sure, when the client has read `read`
   * body bytes and leaves (`leave`), as curl does when it has content-length bytes (a soak saw 28
   * of 590 complete downloads logged as client_closed). Resolves with the access line.
   */
  async function readThenLeave(local: StartedProxy, window: number, read: number, leave: 'reset' | 'close'): Promise<LogLine> {
    const client = await rawH2Client(local.restPort, pki);
    try {
      client.socket.write(h2Frame(H2.SETTINGS, 0, 0, setting(SETTINGS_INITIAL_WINDOW_SIZE, window)));
      client.socket.write(h2Frame(H2.HEADERS, END_HEADERS | END_STREAM, 1, headerBlock({ ':method': 'GET', ':scheme': 'https', ':path': '/download', ':authority': 'localhost' })));
      const bodyBytes = () => client.frames.filter((f) => f.type === H2.DATA && f.streamId === 1).reduce((n, f) => n + f.payload.length, 0);
      await eventually(() => bodyBytes() === read, `${read} body bytes`);
      assert.ok(!streamFrames(client.frames, 1).includes('end'), 'the END_STREAM is still owed when the client leaves');
      if (leave === 'reset') client.socket.write(h2Frame(H2.RST_STREAM, 0, 1, CANCEL));
      else client.socket.destroy();
      return await local.logs.waitFor((l) => l.event === 'access' && l.path === '/download');
    } finally {
      client.socket.destroy();
    }
  }

  // HTTP/2 clients of the REST port take the terminating path in both modes.
  for (const restMode of FORWARD_MODES) {
    for (const leave of ['reset', 'close'] as const) {
      test(`--mtls_rest_mode ${restMode}: a client that ${leave === 'reset' ? 'resets the stream (CANCEL)' : 'closes its connection'} having read every byte of a body of declared length got the whole answer: logged without client_closed`, () =>
        behindProxy({ pki, restMode, answer: withLength }, async (local) => {
          const line = await readThenLeave(local, BODY.length, BODY.length, leave);
          assert.deepEqual([line.status, line.bytesOut, line.error], [200, BODY.length, undefined]);
        }));
    }
  }

  const owed: [string, (socket: Socket) => void, number, number][] = [
    ['half of a body of declared length read, the rest held back by the window', withLength, BODY.length / 2, BODY.length / 2],
    ['half of a body of declared length read, the rest not yet sent by the model server', (socket) => socket.write(Buffer.concat([Buffer.from(`HTTP/1.1 200 OK\r\ncontent-length: ${BODY.length}\r\n\r\n`), BODY.subarray(0, BODY.length / 2)])), 65_535, BODY.length / 2],
    ['every byte of a body without declared length read (chunked: only END_STREAM says it ended)', (socket) => socket.write(`HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n${BODY.length.toString(16)}\r\n${BODY.toString()}\r\n0\r\n\r\n`), BODY.length, BODY.length],
  ];
  for (const [what, answer, window, read] of owed) {
    test(`a client that resets the stream with bytes or its END_STREAM still owed is logged as client_closed: ${what}`, () =>
      behindProxy({ pki, restMode: 'terminate', answer }, async (local) => {
        const line = await readThenLeave(local, window, read, 'reset');
        assert.deepEqual([line.status, line.error], [200, 'client_closed']);
      }));
  }
});

/** curl over the test PKI, ended by `timeout` if it hangs: its exit code (124 then) and output. */
function curl(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const tls = ['-sS', '--cert', pki.paths['client.pem']!, '--key', pki.paths['client.key']!, '--cacert', pki.paths['server_ca.pem']!];
  return new Promise((resolve) => {
    execFile('timeout', ['20', 'curl', ...tls, ...args.flatMap((a) => (a === '--next' ? ['--next', ...tls] : [a]))], { env: { PATH: process.env.PATH } }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : -1) : 0, stdout, stderr });
    });
  });
}

/**
 * A model server that answers each POST with `status` before reading its body: it stops
 * reading at once and answers a little later (by then the proxy holds back the client's body,
 * the buffer towards it being full), then closes. Other requests get 200 "ok".
 */
function answersUploadsEarly(status: string): (socket: Socket, first: Buffer) => void {
  return (socket, first) => {
    const onHead = (bytes: Buffer) => {
      if (bytes.toString('latin1').startsWith('POST ')) {
        socket.pause();
        setTimeout(() => {
          socket.write(`HTTP/1.1 ${status}\r\ncontent-length: 5\r\n\r\nearly`);
          setTimeout(() => socket.destroy(), 200);
        }, 300);
      } else if (bytes.toString('latin1').startsWith('GET ')) {
        socket.write('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok');
      }
    };
    onHead(first);
    socket.on('data', onHead);
  };
}

describe('an answer before the whole upload arrived, from the model server or the proxy (--mtls_rest_mode terminate)', () => {
  const UPLOAD_BYTES = 8_000_000;
  let upload: string;

  before(async () => {
    upload = join(pki.dir, 'early-upload.bin');
    await writeFile(upload, Buffer.alloc(UPLOAD_BYTES, 0x61));
  });

  for (const status of ['413 Payload Too Large', '200 OK']) {
    test(`curl --http1.1, ${status.slice(0, 3)} early: the rest of the body is read and dropped, and curl --next gets its second answer on the same connection (10 runs)`, () =>
      behindProxy({ pki, restMode: 'terminate', answer: answersUploadsEarly(status) }, async (local) => {
        const url = (path: string) => `https://localhost:${local.restPort}${path}`;
        for (let run = 0; run < 10; run++) {
          const result = await curl(['--http1.1', '-w', ' %{http_code} %{num_connects}\n', url('/upload'), '--data-binary', `@${upload}`,
            '--next', '--http1.1', '-w', ' %{http_code}\n', url('/second')]);
          assert.equal(result.code, 0, `run ${run}: curl exited ${result.code} (124: it hung) ${result.stderr}`);
          assert.deepEqual(result.stdout.split('\n'), [`early ${status.slice(0, 3)} 1`, 'ok 200', ''], `run ${run}`);
        }
        const access = () => local.logs.lines.filter((l) => l.event === 'access');
        await eventually(() => access().length >= 20, '20 access lines');
        assert.deepEqual(access().map((l) => [l.path, l.status, l.error]), Array(10).fill([['/upload', Number(status.slice(0, 3)), undefined], ['/second', 200, undefined]]).flat());
      }));
  }

  test('curl --http1.1 that gives its upload up after an early 413 and closes leaves one access line, not a second 400 with no method', () =>
    behindProxy({ pki, restMode: 'terminate', answer: (socket) => socket.write('HTTP/1.1 413 Payload Too Large\r\ncontent-length: 5\r\n\r\nlarge') }, async (local) => {
      const result = await curl(['--http1.1', '-w', ' %{http_code}', `https://localhost:${local.restPort}/upload`, '--data-binary', `@${upload}`]);
      assert.equal(result.code, 0, result.stderr);
      assert.equal(result.stdout, 'large 413');
      await local.logs.waitFor((l) => l.event === 'access' && l.path === '/upload');
      // curl closed its connection in the middle of the body: Node's parser reports that after the answer.
      const rest = local.proxy.listeners().find((l) => l.name === 'rest')!;
      await eventually(() => rest.connections.size === 0, 'the connection closed');
      assert.deepEqual(local.logs.lines.filter((l) => l.event === 'access').map((l) => [l.method, l.path, l.status, l.error]), [['POST', '/upload', 413, undefined]]);
    }));

  for (const status of [200, 413]) {
    test(`HTTP/2, ${status} early: the client gets the whole answer, END_STREAM and then RST_STREAM(NO_ERROR), so it stops sending (RFC 9113 8.1); the access line has the status and no error`, () =>
      behindProxy({ pki, restMode: 'terminate', answer: answersUploadsEarly(`${status} Early`) }, async (local) => {
        const client = await rawH2Client(local.restPort, pki);
        try {
          // Before its SETTINGS came, a stream's window is 65,535 bytes (RFC 9113 6.9.2): Node 24 (nghttp2 1.70) ends a
          // connection that sent more with GOAWAY(FLOW_CONTROL_ERROR), as a client may not; Node 20 and 22 let it pass.
          await client.waitForFrame(H2.SETTINGS);
          const head = headerBlock({ ':method': 'POST', ':scheme': 'https', ':path': '/upload', ':authority': 'localhost', 'content-length': String(UPLOAD_BYTES) });
          // 256 KiB of the 8 MB, within every window: the rest would come as the proxy reads.
          const part = Array.from({ length: 16 }, () => h2Frame(H2.DATA, 0, 1, Buffer.alloc(16 * 1024, 0x61)));
          client.socket.write(Buffer.concat([h2Frame(H2.HEADERS, END_HEADERS, 1, head), ...part]));
          await client.waitForFrame(H2.RST_STREAM);
          assert.deepEqual(streamFrames(client.frames, 1).filter((f) => f !== 'data'), ['headers', 'end', `reset ${http2Constants.NGHTTP2_NO_ERROR}`]);
          const body = Buffer.concat(client.frames.filter((f) => f.streamId === 1 && f.type === H2.DATA).map((f) => f.payload));
          assert.equal(body.toString(), 'early');
          const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/upload');
          assert.equal(line.status, status);
          assert.equal(line.error, undefined);
        } finally {
          client.socket.destroy();
        }
      }));
  }

  for (const [answer, path, notReady] of [['503 before the model server is ready', '/v2/models/dummy/infer', true], ['400 for a target with a #fragment', '/v2/models/dummy#x', false]] as const) {
    test(`HTTP/2, answered by the proxy itself while still uploading (${answer}): END_STREAM, then RST_STREAM(NO_ERROR)`, async () => {
      const local = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, ...(notReady ? { notReady: { rest: () => 'model server starting' } } : {}) });
      const client = await rawH2Client(local.restPort, pki);
      try {
        const head = headerBlock({ ':method': 'POST', ':scheme': 'https', ':path': path, ':authority': 'localhost', 'content-length': String(UPLOAD_BYTES) });
        const part = Array.from({ length: 4 }, () => h2Frame(H2.DATA, 0, 1, Buffer.alloc(16 * 1024, 0x61)));
        client.socket.write(Buffer.concat([h2Frame(H2.HEADERS, END_HEADERS, 1, head), ...part]));
        await client.waitForFrame(H2.RST_STREAM);
        assert.deepEqual(streamFrames(client.frames, 1).filter((f) => f !== 'data'), ['headers', 'end', `reset ${http2Constants.NGHTTP2_NO_ERROR}`]);
        const line = await local.logs.waitFor((l) => l.event === 'access');
        assert.equal(line.status, Number(answer.slice(0, 3)));
      } finally {
        client.socket.destroy();
        await local.proxy.shutdown(1000);
      }
    });
  }

  test('HTTP/2, Node\'s client answered early while it still writes its upload: its stream is reset with NO_ERROR after the whole answer, and the session serves the next request', { timeout: 30_000 }, () =>
    behindProxy({ pki, restMode: 'terminate', answer: answersUploadsEarly('413 Payload Too Large') }, async (local) => {
      const session = h2Session(local.restPort, pki);
      try {
        const stream = session.request({ ':method': 'POST', ':path': '/upload', 'content-length': String(UPLOAD_BYTES) });
        stream.on('error', () => {});
        // Node's client keeps its unsent writes and never emits 'close' for such a stream; 'aborted' is the reset.
        const aborted = once(stream, 'aborted');
        const chunk = Buffer.alloc(64 * 1024, 0x61);
        const pump = () => {
          while (!stream.destroyed && stream.write(chunk));
        };
        stream.on('drain', pump);
        pump();
        const chunks: Buffer[] = [];
        stream.on('data', (c: Buffer) => chunks.push(c));
        const [headers] = (await once(stream, 'response')) as [Record<string, unknown>];
        assert.equal(headers[':status'], 413);
        await aborted;
        assert.equal(stream.rstCode, http2Constants.NGHTTP2_NO_ERROR);
        assert.equal(Buffer.concat(chunks).toString(), 'early');
        const next = await h2Request(session, { ':method': 'GET', ':path': '/second' });
        assert.equal(next.headers[':status'], 200);
        assert.equal(next.body.toString(), 'ok');
        const lines = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/second').then(() => local.logs.lines.filter((l) => l.event === 'access'));
        assert.deepEqual(lines.map((l) => [l.path, l.status, l.error]), [['/upload', 413, undefined], ['/second', 200, undefined]]);
      } finally {
        session.destroy();
      }
    }));
});
