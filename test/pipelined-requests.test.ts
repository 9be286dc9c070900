/**
 * An HTTP/1.1 client that pipelines many requests on one connection (terminate mode): the
 * model server gets at most --mtls_max_concurrent_streams of them at once, the proxy reads
 * the connection no further while that many wait, and every answer still comes, in order.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import type { Socket } from 'node:net';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { startTestProxy } from './helpers/harness.js';
import { openRaw, readToClose, readToCloseWithin } from './helpers/raw-http1.js';
import { scriptedUpstream } from './helpers/scripted-upstream.js';
import { eventually } from './helpers/ops.js';
import { NOOP_OBSERVER, type ProxyObserver } from '../src/observer.js';

const LIMIT = 4;

let pki: TestPki;

before(async () => {
  pki = await createTestPki();
});

after(async () => {
  await pki.cleanup();
});

/**
 * A model server that answers each request with its path and then its body (Content-Length
 * framing only), but only once `release()` is called, or at once when `released` from the start:
 * until then it holds them, as a model at work does. `peak`: the most it held unanswered at once.
 */
async function holdingUpstream(released = false) {
  const state = { received: 0, answered: 0, peak: 0, released };
  const held: (() => void)[] = [];
  const upstream = await scriptedUpstream((socket: Socket, first: Buffer) => {
    let pending = '';
    const read = (chunk: Buffer) => {
      pending += chunk.toString('latin1');
      for (let end = pending.indexOf('\r\n\r\n'); end >= 0; end = pending.indexOf('\r\n\r\n')) {
        const head = pending.slice(0, end);
        const length = Number(/content-length: (\d+)/i.exec(head)?.[1] ?? 0);
        if (pending.length < end + 4 + length) break;
        const reply = (head.split(' ')[1] ?? '') + pending.slice(end + 4, end + 4 + length);
        pending = pending.slice(end + 4 + length);
        state.received++;
        state.peak = Math.max(state.peak, state.received - state.answered);
        const answer = () => {
          state.answered++;
          socket.write(`HTTP/1.1 200 OK\r\ncontent-length: ${reply.length}\r\n\r\n${reply}`);
        };
        if (state.released) answer();
        else held.push(answer);
      }
    };
    read(first);
    socket.on('data', read);
  });
  const release = () => {
    state.released = true;
    for (const answer of held.splice(0)) answer();
  };
  return { upstream, state, release };
}

/** HTTP/1.1 requests in flight on the REST port, as the open-streams gauge counts them. */
function streamCounter(): { observer: ProxyObserver; open: () => number } {
  let open = 0;
  return {
    observer: { ...NOOP_OBSERVER, streamOpened: () => open++, streamClosed: () => open-- },
    open: () => open,
  };
}

const pipelined = (count: number) => Array.from({ length: count }, (_, i) => `GET /r/${i} HTTP/1.1\r\nhost: a\r\n\r\n`).join('');

describe('an HTTP/1.1 client pipelining many requests (--mtls_rest_mode terminate)', () => {
  test(`the model server gets at most --mtls_max_concurrent_streams (${LIMIT}) of them at once, not one connection each; every answer comes, in order`, { timeout: 60_000 }, async () => {
    const { upstream, state, release } = await holdingUpstream();
    const local = await startTestProxy({ pki, upstream: { restPort: upstream.port }, limits: { maxConcurrentStreams: LIMIT } });
    try {
      const socket = await openRaw(local.restPort, pki);
      let received = '';
      socket.on('data', (c: Buffer) => (received += c.toString('latin1')));
      socket.write(pipelined(50));
      await eventually(() => state.received >= LIMIT, 'the first requests to reach the model server');
      // Forwarded on arrival, all 50 reached it within this.
      await new Promise((resolve) => setTimeout(resolve, 300));
      assert.equal(state.received, LIMIT);
      assert.equal(upstream.sockets.length, LIMIT);
      release();
      await eventually(() => (received.match(/HTTP\/1\.1 200/g)?.length ?? 0) === 50, 'all 50 answers');
      const bodies = received.split(/HTTP\/1\.1 200 OK\r\n[^]*?\r\n\r\n/).filter(Boolean);
      assert.deepEqual(bodies, Array.from({ length: 50 }, (_, i) => `/r/${i}`));
      assert.ok(state.peak <= LIMIT, `the model server held ${state.peak} at once`);
      socket.destroy();
    } finally {
      await local.proxy.shutdown(1000);
      upstream.close();
    }
  });

  test('one that keeps writing while the model server holds its answers is read no further: the proxy holds few of its requests, and lets them go once it has left and an answer comes', { timeout: 60_000 }, async () => {
    const { upstream, state, release } = await holdingUpstream();
    const streams = streamCounter();
    const local = await startTestProxy({ pki, upstream: { restPort: upstream.port }, limits: { maxConcurrentStreams: LIMIT }, observer: streams.observer });
    try {
      const socket = await openRaw(local.restPort, pki);
      // 800,000 requests, 32 MB: more than the kernel buffers between the two hold.
      const flood = Buffer.from(pipelined(1000).replace(/\/r\/\d+/g, '/r/x'));
      for (let i = 0; i < 800; i++) socket.write(flood);
      await eventually(() => state.received >= LIMIT, 'the first requests to reach the model server');
      // Read on, the proxy parsed and held hundreds of thousands of them within this, and the client's writes all went out.
      await new Promise((resolve) => setTimeout(resolve, 1000));
      assert.ok(streams.open() < 20_000, `the proxy holds ${streams.open()} requests of the connection`);
      assert.ok(socket.writableLength > 0, 'the client was held back');
      assert.equal(state.received, LIMIT);
      // Not read, the connection tells of the client's leaving when the proxy next writes to it: an answer.
      socket.destroy();
      release();
      await eventually(() => streams.open() === 0, 'the requests it left to be let go');
      assert.ok(state.received < 100, `${state.received} requests reached the model server`);
    } finally {
      await local.proxy.shutdown(1000);
      upstream.close();
    }
  });

  // Paths only the pipeline limit takes: a request still waiting for its turn is neither forwarded nor lost from the log.
  test('at the shutdown timeout, requests waiting for their turn are never forwarded: the first owed answer is a 503 that closes, and each request has its access line', { timeout: 60_000 }, async () => {
    const { upstream, state } = await holdingUpstream();
    const local = await startTestProxy({ pki, upstream: { restPort: upstream.port }, limits: { maxConcurrentStreams: LIMIT } });
    try {
      const socket = await openRaw(local.restPort, pki);
      const answers = readToClose(socket);
      socket.write(pipelined(LIMIT + 2));
      await eventually(() => state.received === LIMIT, 'the first requests at the model server');
      await local.proxy.shutdown(200);
      // After an answer saying close an HTTP/1.1 client sends again what was not answered; none of it was forwarded after the first LIMIT.
      const received = await answers;
      assert.deepEqual([received.match(/(?<=HTTP\/1\.1 )\d{3}/g), /\r\nconnection: close\r\n/i.test(received)], [['503'], true]);
      assert.match(received, /--mtls_shutdown_timeout ran out/);
      assert.equal(state.received, LIMIT);
      const lines = local.logs.lines.filter((l) => l.event === 'access');
      assert.deepEqual(lines.map((l) => [l.path, l.status, l.error]), Array.from({ length: LIMIT + 2 }, (_, i) => [`/r/${i}`, i === 0 ? 503 : 0, 'shutdown_timeout']));
    } finally {
      upstream.close();
    }
  });

  test('a client that leaves while requests wait for their turn: those are never forwarded, and logged as never answered', { timeout: 60_000 }, async () => {
    const { upstream, state, release } = await holdingUpstream();
    const local = await startTestProxy({ pki, upstream: { restPort: upstream.port }, limits: { maxConcurrentStreams: LIMIT } });
    try {
      const socket = await openRaw(local.restPort, pki);
      socket.write(pipelined(LIMIT + 2));
      await eventually(() => state.received === LIMIT, 'the first requests at the model server');
      socket.destroy();
      // Held back, the connection is not read: its leaving shows when the first answer is written to it.
      release();
      await eventually(() => local.logs.lines.filter((l) => l.event === 'access').length === LIMIT + 2, 'an access line for each request');
      const waiting = local.logs.lines.filter((l) => l.event === 'access').filter((l) => l.path === `/r/${LIMIT}` || l.path === `/r/${LIMIT + 1}`);
      assert.deepEqual(waiting.map((l) => [l.path, l.status, l.bytesIn, l.bytesOut, l.error]), [[`/r/${LIMIT}`, 0, 0, 0, 'client_closed'], [`/r/${LIMIT + 1}`, 0, 0, 0, 'client_closed']]);
      assert.equal(state.received, LIMIT);
    } finally {
      await local.proxy.shutdown(1000);
      upstream.close();
    }
  });

  test('pipelined uploads whose answers are large all get their answers, in order: none is refused as malformed ("Paused") when the proxy stops reading', { timeout: 60_000 }, async () => {
    const { upstream } = await holdingUpstream(true);
    const local = await startTestProxy({ pki, upstream: { restPort: upstream.port } });
    try {
      const socket = await openRaw(local.restPort, pki);
      let received = '';
      socket.on('data', (c: Buffer) => (received += c.toString('latin1')));
      const body = (i: number) => `${'z'.repeat(300_000)}${i}`;
      for (let i = 0; i < 30; i++) socket.write(`POST /r/${i} HTTP/1.1\r\nhost: a\r\ncontent-length: ${body(i).length}\r\n\r\n${body(i)}`);
      await eventually(() => received.endsWith(`/r/29${body(29)}`) || /HTTP\/1\.1 4\d\d/.test(received), 'the last answer, or a refusal');
      const statuses = received.match(/(?<=HTTP\/1\.1 )\d{3}/g) ?? [];
      assert.deepEqual(statuses, Array.from({ length: 30 }, () => '200'), received.slice(received.search(/HTTP\/1\.1 4\d\d/), received.search(/HTTP\/1\.1 4\d\d/) + 300));
      const bodies = received.split(/HTTP\/1\.1 200 OK\r\n[^]*?\r\n\r\n/).filter(Boolean);
      assert.deepEqual([bodies.length, bodies.findIndex((b, i) => b !== `/r/${i}${body(i)}`)], [30, -1]);
      socket.destroy();
    } finally {
      await local.proxy.shutdown(1000);
      upstream.close();
    }
  });
  test('two pipelined answers, the second arriving while the first waits for the client to read over 1 MiB of it: both come whole (the first stalled for ever, the second failed as an upstream error ERR_ASSERTION)', { timeout: 60_000 }, async () => {
    // More than every buffer between the model server and a client that does not read (kernel and the proxy's 1 MiB) can hold.
    const FIRST = 48 * 1024 * 1024;
    const sockets = new Map<string, Socket>();
    const upstream = await scriptedUpstream((socket: Socket, first: Buffer) => {
      const path = first.toString('latin1').split(' ')[1]!;
      sockets.set(path, socket);
      if (path === '/first') socket.write(Buffer.concat([Buffer.from(`HTTP/1.1 200 OK\r\ncontent-length: ${FIRST}\r\n\r\n`), Buffer.alloc(FIRST, 0x61)]));
    });
    const local = await startTestProxy({ pki, upstream: { restPort: upstream.port } });
    try {
      const socket = await openRaw(local.restPort, pki);
      socket.write('GET /first HTTP/1.1\r\nhost: a\r\n\r\nGET /second HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n');
      // Not read by the client, the first answer fills what lies between and the proxy stops reading it: its unsent rest stays put.
      let unsent = -1;
      let still = 0;
      await eventually(() => {
        const now = sockets.get('/first')?.writableLength ?? -1;
        still = now > 0 && now === unsent ? still + 1 : 0;
        unsent = now;
        return still >= 3 && sockets.has('/second');
      }, 'the proxy to stop reading the first answer, and the second request at the model server');
      // Written by the proxy into the second answer, queued behind the first: Node tells the first answer 'drain' then and there.
      sockets.get('/second')!.write('HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond');
      const received = await readToCloseWithin(socket, 30_000);
      const heads = [...received.matchAll(/HTTP\/1\.1 (\d{3}) [^]*?\r\n\r\n/g)];
      assert.deepEqual(heads.map((m) => m[1]), ['200', '200'], `${received.length} bytes came; the proxy logged ${JSON.stringify(local.logs.lines.filter((l) => l.event !== 'listening'))}`);
      assert.equal(heads[1]!.index! - heads[0]![0].length, FIRST, 'the first answer whole');
      assert.ok(received.endsWith('\r\n\r\nsecond'), 'the second answer whole');
    } finally {
      await local.proxy.shutdown(1000);
      upstream.close();
    }
  });
});
