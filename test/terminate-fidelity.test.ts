/**
 * REST terminate mode (--mtls_rest_mode terminate, the default) on generated exchanges: what the
 * model server receives is what the client sent, and what the client receives is what the model
 * server answered, up to the changes the README documents (hop-by-hop fields, forwarding headers,
 * Host from the authority, names lower-cased, HTTP/2 cookies joined, a body's framing). Real mTLS,
 * Node's HTTPS and HTTP/2 clients, a model server that records what reached it.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import type { ClientHttp2Session } from 'node:http2';
import { once } from 'node:events';
import fc from 'fast-check';
import { h2Session, startTestProxy, type StartedProxy } from './helpers/harness.js';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { assertSameBytes, patternBytes } from './helpers/integrity-peers.js';
import { behindProxy } from './helpers/scripted-upstream.js';
import { eventually } from './helpers/ops.js';
import {
  answeredFields, exchangeArb, expectedAnswerBody, expectedAnswerFields, expectedTrailers, expectedUpstreamFields, receivedFields, recordingModelServer, sendHttp1, sendHttp2, shown,
  type Answered, type Exchange, type Received, type RecordingModelServer,
} from './helpers/exchange-fidelity.js';

let pki: TestPki;
let upstream: RecordingModelServer;
let front: StartedProxy;
/** The x-forwarded-client-cert the proxy sets for the test's client. */
let xfcc: string;
let nextId = 0;

before(async () => {
  pki = await createTestPki();
  upstream = await recordingModelServer();
  front = await startTestProxy({ pki, upstream: { restPort: upstream.port }, restMode: 'terminate' });
  const plain: Exchange = { request: { method: 'GET', target: '/', authority: 'a', lines: [], body: Buffer.alloc(0), framing: 'none', cuts: [], expectContinue: false }, answer: { status: 200, lines: [], body: Buffer.alloc(0), framing: 'length', trailers: [], earlyHints: false } };
  const { received } = await through(plain, 'http/1.1');
  xfcc = received.rawHeaders[received.rawHeaders.indexOf('x-forwarded-client-cert') + 1]!;
});

after(async () => {
  await front?.proxy.shutdown(1000);
  await upstream?.close();
  await pki?.cleanup();
});

/** One exchange through the proxy; `protocol`: HTTP/1.1, or the HTTP/2 connection to send it on. */
async function through(exchange: Exchange, protocol: 'http/1.1' | ClientHttp2Session): Promise<{ received: Received; answered: Answered }> {
  const id = String(nextId++);
  const received = upstream.expect(id, exchange.answer);
  const answered = protocol === 'http/1.1' ? await sendHttp1(front.restPort, pki, exchange.request, id) : await sendHttp2(protocol, exchange.request, id);
  return { received: await received, answered };
}

/** Every way the exchange through terminate mode departs from what the README documents, or none. */
function departures({ request, answer }: Exchange, received: Received, answered: Answered, http2: boolean): void {
  const id = received.rawHeaders[received.rawHeaders.findIndex((name) => name.toLowerCase() === 'x-exchange-id') + 1]!;
  assert.equal(`${received.method} ${received.url}`, `${request.method} ${request.target}`, 'the request line');
  assert.deepEqual(shown(receivedFields(received)), shown(expectedUpstreamFields(request, id, http2, xfcc, '127.0.0.1')), 'the fields the model server got');
  assertSameBytes(received.body, request.body, 'the body the model server got');
  assert.equal(answered.status, answer.status, 'the status');
  assert.deepEqual(answered.interim, request.expectContinue ? [100] : [], 'the interim answers');
  assert.deepEqual(shown(answeredFields(answered)), shown(expectedAnswerFields(answer, request.method, http2)), 'the fields the client got');
  assertSameBytes(answered.body, expectedAnswerBody(answer, request.method), 'the body the client got');
  assert.deepEqual(answered.rawTrailers, expectedTrailers(answer, request.method), 'the trailers the client got');
}

describe('REST terminate mode passes exchanges on as documented', () => {
  test('HTTP/1.1 clients', { timeout: 120_000 }, async () => {
    await fc.assert(
      fc.asyncProperty(exchangeArb, async (exchange) => {
        const { received, answered } = await through(exchange, 'http/1.1');
        departures(exchange, received, answered, false);
      }),
      { numRuns: 60, includeErrorInReport: true, timeout: 15_000 },
    );
  });

  test('HTTP/2 clients', { timeout: 120_000 }, async () => {
    const session = h2Session(front.restPort, pki);
    try {
      await fc.assert(
        fc.asyncProperty(exchangeArb, async (exchange) => {
          const { received, answered } = await through(exchange, session);
          departures(exchange, received, answered, true);
        }),
        { numRuns: 60, includeErrorInReport: true, timeout: 15_000 },
      );
    } finally {
      session.close();
    }
  });
});

/**
 * Found by the properties above, shrunk. A model server's answer whose body runs until it closes the
 * connection (no Content-Length, not chunked), to a client reading slower than it arrives: undici's
 * parser, paused by the proxy with the last bytes (its buffer towards the client full), met the
 * connection's end and threw from an assertion (`assert(!this.paused)`) out of the process, which stops
 * on an uncaught exception. Here the client reads nothing until the model server has sent everything.
 */
describe('answers whose body runs until the model server closes, to a slow HTTP/2 client', () => {
  for (const size of Array.from({ length: 6 }, (_, i) => 1024 * 1024 + 65535 + i * 1024)) {
    test(`${size} bytes: the whole body reaches the client, and the proxy lives on`, { timeout: 60_000 }, async () => {
      const uncaught: unknown[] = [];
      const note = (err: unknown) => uncaught.push(err);
      process.on('uncaughtException', note);
      const body = patternBytes(size, size);
      try {
        await behindProxy({ pki, restMode: 'terminate', answer: (socket) => socket.end(Buffer.concat([Buffer.from('HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n'), body])) }, async (local, scripted) => {
          const session = h2Session(local.restPort, pki);
          try {
            const stream = session.request({ ':method': 'GET', ':path': '/v2/models/m/infer' });
            stream.pause();
            await eventually(() => scripted.sockets[0]?.writableFinished === true, 'the model server to have sent its whole answer');
            const chunks: Buffer[] = [];
            stream.on('data', (c: Buffer) => chunks.push(c));
            stream.resume();
            await once(stream, 'end');
            assertSameBytes(Buffer.concat(chunks), body, 'the body the client got');
            assert.deepEqual(uncaught, []);
          } finally {
            session.close();
          }
        });
      } finally {
        process.off('uncaughtException', note);
      }
    });
  }
});
