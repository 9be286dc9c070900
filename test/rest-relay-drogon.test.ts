/**
 * Both REST modes against what OVMS's REST server, Drogon v1.9.7 (HttpRequestParser),
 * takes: it answers an Expect other than exactly `100-continue` on HTTP/1.1 (and any
 * Expect on HTTP/1.0) with 417 and a close, and a request trailer with 400 and a close.
 * Terminate mode (Node's server, undici) never passes either on; relay mode must not either.
 */
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import type { TLSSocket } from 'node:tls';
import { restModeFronts } from './helpers/harness.js';
import { openRaw as openRawWith, readToClose, readUntil } from './helpers/raw-http1.js';
import { FORWARD_MODES, type ForwardMode } from '../src/config.js';

const both = restModeFronts();

const openRaw = (restMode: ForwardMode): Promise<TLSSocket> => openRawWith(both.front(restMode).restPort, both.pki);

const statuses = (text: string) => [...text.matchAll(/HTTP\/1\.[01] (\d{3}) /g)].map((m) => Number(m[1]));

/** The paths the model server was asked for since `from`, and whether any of them carried an Expect field. */
function seenSince(from: number): { paths: string[]; expect: boolean } {
  const seen = both.upstream.received.slice(from);
  return { paths: seen.map((r) => r.path), expect: seen.some((r) => r.headers['expect'] !== undefined) };
}

describe('REST Expect as Drogon 1.9.7 would have it, both modes', () => {
  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}: an expectation other than 100-continue gets 417 and never reaches the model server; the request before it is answered first`, { timeout: 20_000 }, async () => {
      const from = both.upstream.received.length;
      const socket = await openRaw(restMode);
      socket.write(
        'GET /v2/health/live HTTP/1.1\r\nhost: a\r\n\r\n' +
          'POST /echo-body HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\nexpect: x-fast-lane\r\n\r\nabc' +
          'GET /v2/models/dummy HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n',
      );
      const text = await readToClose(socket);
      // Node keeps the connection and answers the request behind the 417; the relay refuses as it
      // refuses any request it will not forward (and as Drogon does): the 417 closes the connection.
      assert.deepEqual(statuses(text), restMode === 'terminate' ? [200, 417, 200] : [200, 417]);
      if (restMode === 'relay') assert.match(text, /connection: close\r\n[^]*Expect: "x-fast-lane" cannot be met; the only expectation supported is 100-continue\n$/);
      const seen = seenSince(from);
      assert.deepEqual(seen.paths, restMode === 'terminate' ? ['/v2/health/live', '/v2/models/dummy'] : ['/v2/health/live']);
      assert.equal(seen.expect, false);
    });

    for (const value of ['100-Continue', '100-continue;x=1']) {
      test(`--mtls_rest_mode ${restMode}: Expect: ${value} is a 100-continue: the 100 comes before the body, then the answer, and the model server (Drogon answers 417 to anything but the exact '100-continue') never sees it`, { timeout: 20_000 }, async () => {
        const from = both.upstream.received.length;
        const socket = await openRaw(restMode);
        socket.write(`POST /echo-body HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\nexpect: ${value}\r\nconnection: close\r\n\r\n`);
        assert.match(await readUntil(socket, /\r\n\r\n/), /^HTTP\/1\.1 100 Continue\r\n/);
        const answer = readToClose(socket);
        socket.write('abc');
        assert.match(await answer, /^HTTP\/1\.1 200 OK\r\n[^]*"bytes":3/);
        assert.deepEqual(seenSince(from), { paths: ['/echo-body'], expect: false });
      });
    }

    for (const value of ['100-continue', 'x-fast-lane']) {
      test(`--mtls_rest_mode ${restMode}: an HTTP/1.0 request's Expect: ${value} is ignored (RFC 9110 10.1.1): no 100, no 417, the answer, and the model server, which as Drogon would answer 417, never sees it`, { timeout: 20_000 }, async () => {
        const from = both.upstream.received.length;
        const socket = await openRaw(restMode);
        socket.write(`POST /echo-body HTTP/1.0\r\nhost: a\r\ncontent-length: 3\r\nexpect: ${value}\r\n\r\nabc`);
        const text = await readToClose(socket);
        assert.deepEqual(statuses(text), [200]);
        assert.match(text, /"bytes":3/);
        assert.deepEqual(seenSince(from), { paths: ['/echo-body'], expect: false });
      });
    }
  }
});

describe('REST request trailers as Drogon 1.9.7 would have them, both modes', () => {
  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}: a chunked upload with trailers reaches the model server without them (the stand-in, as Drogon, answers a trailer with 400 and a close), its framing whole: the request pipelined behind is answered too`, { timeout: 20_000 }, async () => {
      const from = both.upstream.received.length;
      const socket = await openRaw(restMode);
      socket.write(
        'POST /echo-body HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n3\r\nabc\r\n0\r\nx-checksum: abc\r\nx-forwarded-client-cert: Hash=evil\r\n\r\n' +
          'GET /v2/models/dummy HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n',
      );
      const text = await readToClose(socket);
      assert.deepEqual(statuses(text), [200, 200]);
      assert.match(text, /"bytes":3,"sha256":"ba7816bf[^]*"name":"dummy"/);
      assert.deepEqual(seenSince(from).paths, ['/echo-body', '/v2/models/dummy']);
    });
  }
});
