import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { https1, startTestProxy } from './helpers/harness.js';
import { behindProxy, closingWhenReused, scriptedUpstream } from './helpers/scripted-upstream.js';
import { UPSTREAM_IDLE_MS } from '../src/rest-forwarder.js';

let pki: TestPki;

before(async () => {
  pki = await createTestPki();
});

after(async () => {
  await pki.cleanup();
});

describe('kept-alive upstream connections (--mtls_rest_mode terminate)', () => {
  test('an idle one is closed by the proxy, so a server closing its own idle connections never races a new request', { timeout: 30_000 }, async (t) => {
    const upstream = await scriptedUpstream((s) => s.write('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok'));
    const local = await startTestProxy({ pki, upstream: { restPort: upstream.port }, restMode: 'terminate' });
    try {
      const res = await https1(local.restPort, pki, { path: '/v2/health/ready' });
      assert.equal(res.status, 200);
      assert.equal(upstream.sockets.length, 1);
      // The proxy's FIN: without an idle timeout of our own this never comes (the test's timeout aborts the wait, and the finally block still cleans up).
      await once(upstream.sockets[0]!, 'end', { signal: t.signal });
    } finally {
      await local.proxy.shutdown(1000);
      upstream.close();
    }
  });

  test('one carrying a response that is quiet for longer than that stays open to its end', { timeout: 30_000 }, async () => {
    const upstream = await scriptedUpstream((s) => {
      s.write('HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n');
      s.write(chunk('data: first\n\n'));
      void sleep(UPSTREAM_IDLE_MS + 1500).then(() => s.write(chunk('data: second\n\n') + '0\r\n\r\n'));
    });
    const local = await startTestProxy({ pki, upstream: { restPort: upstream.port }, restMode: 'terminate' });
    try {
      const res = await https1(local.restPort, pki, { path: '/v3/chat/completions', method: 'POST', body: '{}' });
      assert.equal(res.status, 200);
      assert.equal(res.body, 'data: first\n\ndata: second\n\n');
    } finally {
      await local.proxy.shutdown(1000);
      upstream.close();
    }
  });

  // A GET is idempotent (RFC 9110 9.2.2); a POST is not: the model server may have taken it.
  for (const [method, status, connections] of [['GET', 200, 2], ['POST', 502, 1]] as const) {
    test(`a ${method} whose pooled connection the model server closes as it arrives (its idle close shorter than ours) ${status === 200 ? 'goes again on a new connection and is answered' : 'gets the 502'}, as from nginx`, () =>
      behindProxy({ pki, restMode: 'terminate', answer: closingWhenReused((s) => s.end()) }, async (local, upstream) => {
        assert.equal((await https1(local.restPort, pki, { path: '/first' })).status, 200);
        const res = await https1(local.restPort, pki, { path: '/second', method, ...(method === 'POST' ? { body: '{}' } : {}) });
        assert.equal(res.status, status);
        assert.equal(upstream.sockets.length, connections);
        const line = await local.logs.waitFor((l) => l.event === 'access' && l.path === '/second');
        assert.deepEqual([line.status, line.error], [status, status === 200 ? undefined : 'UPSTREAM_CLOSED']);
      }));
  }
});

function chunk(text: string): string {
  return `${Buffer.byteLength(text).toString(16)}\r\n${text}\r\n`;
}
