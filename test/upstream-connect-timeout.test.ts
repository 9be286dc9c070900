import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { once } from 'node:events';
import * as grpc from '@grpc/grpc-js';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { grpcClients, https1, startTestProxy } from './helpers/harness.js';
import { startBlackhole, startLateAcceptor, type Blackhole } from './helpers/blackhole.js';
import { openRaw, readUntil } from './helpers/raw-http1.js';
import { H2, h2Frame } from './helpers/raw-h2.js';
import { unary } from '../src/demo/grpc-client.js';
import { parseLimits, FORWARD_MODES } from '../src/config.js';

let pki: TestPki;
let blackhole: Blackhole;

before(async () => {
  pki = await createTestPki();
  blackhole = await startBlackhole();
});

after(async () => {
  blackhole.close();
  await pki.cleanup();
});

const CONNECT_TIMEOUT_MS = 300;
const NAMED = /upstream 127\.0\.0\.1:\d+ did not accept the connection in time \(--mtls_upstream_connect_timeout\)/;

describe('an upstream that never accepts the connection (SYNs dropped)', () => {
  test('the helper really hangs a connection, so the tests below test the timeout', async () => {
    const socket = connect({ port: blackhole.port, host: '127.0.0.1' });
    const connected = once(socket, 'connect').then(() => true);
    const still = await Promise.race([connected, new Promise((resolve) => setTimeout(() => resolve(false), 200))]);
    socket.destroy();
    assert.equal(still, false);
  });

  for (const mode of FORWARD_MODES) {
    test(`REST, --mtls_rest_mode ${mode}: the client gets 502 naming the timeout, not a two-minute wait`, async () => {
      const local = await startTestProxy({ pki, upstream: { restPort: blackhole.port }, restMode: mode, limits: { upstreamConnectTimeoutMs: CONNECT_TIMEOUT_MS } });
      try {
        const res = await https1(local.restPort, pki, { path: '/v2/health/ready' });
        assert.equal(res.status, 502);
        assert.match(JSON.parse(res.body).error, NAMED);
        await local.logs.waitFor((l) => l.event === 'upstream_error' && l.reason === 'UPSTREAM_CONNECT_TIMEOUT');
      } finally {
        await local.proxy.shutdown(1000);
      }
    });

    test(`gRPC, --mtls_grpc_mode ${mode}: the call ends UNAVAILABLE naming the timeout`, async () => {
      const local = await startTestProxy({ pki, upstream: { grpcPort: blackhole.port }, grpcMode: mode, limits: { upstreamConnectTimeoutMs: CONNECT_TIMEOUT_MS } });
      const c = grpcClients(local.grpcAddress, pki);
      try {
        const err = await unary(c.echo, 'Unary', { payload: Buffer.from('x') }).then(() => assert.fail('should fail'), (e: grpc.ServiceError) => e);
        assert.equal(err.code, grpc.status.UNAVAILABLE);
        assert.match(err.details, NAMED);
      } finally {
        c.close();
        await local.proxy.shutdown(1000);
      }
    });
  }
});

describe('relay mode: the access line counts the time the relay held the request', () => {
  // The relay holds a client's connection while it connects upstream: up to the connect timeout, after
  // which the terminating path takes it, or until the model server accepts, after which it relays.
  const HOLD_MS = 1000;
  /**
   * The logged duration may miss the client's own connect and handshake and the answer's way back, not the hold. Judged
   * against the hold itself, not the client's clock: on a loaded machine grpc-js alone can spend half a second before it sends.
   */
  function assertCountsTheHold(durationMs: unknown, waitedMs: number): void {
    assert.ok((durationMs as number) >= HOLD_MS * 0.9, `logged ${String(durationMs)} ms for a ${HOLD_MS} ms hold; the client waited ${waitedMs.toFixed(1)} ms from its send`);
  }

  /** A raw GET through a REST relay in front of `restPort`, answered with `answer`: its access line counts the client's wait. */
  async function assertRestWaitCounted(restPort: number, connectTimeoutMs: number, answer: RegExp): Promise<void> {
    const local = await startTestProxy({ pki, upstream: { restPort }, restMode: 'relay', limits: { upstreamConnectTimeoutMs: connectTimeoutMs } });
    const socket = await openRaw(local.restPort, pki);
    try {
      const sent = performance.now();
      socket.write('GET /v2/health/ready HTTP/1.1\r\nHost: localhost\r\n\r\n');
      assert.match(await readUntil(socket, answer), answer);
      const waited = performance.now() - sent;
      const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/health/ready');
      assertCountsTheHold(line.durationMs, waited);
    } finally {
      socket.destroy();
      await local.proxy.shutdown(1000);
    }
  }

  test(`REST: the 502's duration counts from when the relay took the request`, async () => {
    await assertRestWaitCounted(blackhole.port, HOLD_MS, /^HTTP\/1\.1 502 [^]*\r\n\r\n/);
  });

  test(`gRPC: the UNAVAILABLE call's duration counts from when the relay took the call`, async () => {
    const local = await startTestProxy({ pki, upstream: { grpcPort: blackhole.port }, grpcMode: 'relay', limits: { upstreamConnectTimeoutMs: HOLD_MS } });
    const c = grpcClients(local.grpcAddress, pki);
    try {
      const sent = performance.now();
      const err = await unary(c.echo, 'Unary', { payload: Buffer.from('x') }).then(() => assert.fail('should fail'), (e: grpc.ServiceError) => e);
      const waited = performance.now() - sent;
      assert.equal(err.code, grpc.status.UNAVAILABLE);
      const line = await local.logs.waitFor((l) => l.event === 'access' && l.listener === 'grpc');
      assertCountsTheHold(line.durationMs, waited);
    } finally {
      c.close();
      await local.proxy.shutdown(1000);
    }
  });

  test(`REST: a request the relay held until the model server accepted counts from when the relay took it`, async () => {
    // Accepting after half a second, the model server gets the relay's connection at the kernel's
    // first SYN retransmission, a second after the first SYN.
    const late = await startLateAcceptor(HOLD_MS / 2);
    try {
      await assertRestWaitCounted(late.port, 10 * HOLD_MS, /^HTTP\/1\.1 200 [^]*\r\n\r\nok/);
    } finally {
      late.close();
    }
  });

  test(`gRPC: the relay_access line of a connection held until the model server accepted counts from when the relay took it`, async () => {
    // An HTTP/2 server's preface (an empty SETTINGS frame), then a close: the relay relays it (an HTTP/1.1
    // answer would send the client to the terminating path), the call ends and the connection with it.
    const late = await startLateAcceptor(HOLD_MS / 2, { bytes: h2Frame(H2.SETTINGS, 0, 0), close: true });
    const local = await startTestProxy({ pki, upstream: { grpcPort: late.port }, grpcMode: 'relay', limits: { upstreamConnectTimeoutMs: 10 * HOLD_MS } });
    const c = grpcClients(local.grpcAddress, pki);
    try {
      const sent = performance.now();
      await unary(c.echo, 'Unary', { payload: Buffer.from('x') }).then(() => assert.fail('should fail'), (e: grpc.ServiceError) => e);
      const waited = performance.now() - sent;
      const line = await local.logs.waitFor((l) => l.event === 'relay_access');
      assertCountsTheHold(line.durationMs, waited);
    } finally {
      c.close();
      await local.proxy.shutdown(1000);
      late.close();
    }
  });
});

test('--mtls_upstream_connect_timeout is seconds (10 by default); a bad value names the option', () => {
  assert.equal(parseLimits({}).upstreamConnectTimeoutMs, 10_000);
  assert.equal(parseLimits({ mtls_upstream_connect_timeout: '0.5' }).upstreamConnectTimeoutMs, 500);
  assert.throws(() => parseLimits({ mtls_upstream_connect_timeout: 'soon' }), /--mtls_upstream_connect_timeout/);
});
