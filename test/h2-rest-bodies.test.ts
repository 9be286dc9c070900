/**
 * HTTP/2 request bodies on the REST port: one that runs past its content-length never reaches the
 * model server whole. nghttp2 resets such a stream only at the frame that goes past the length, and
 * a body over 64 KiB streams upstream as it comes: every declared byte had been forwarded by then,
 * and the model server took the malformed request as complete and ran it.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import type { Socket } from 'node:net';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { startTestProxy } from './helpers/harness.js';
import { scriptedUpstream } from './helpers/scripted-upstream.js';
import { eventually } from './helpers/ops.js';
import { END_HEADERS, END_STREAM, H2, h2Frame, headerBlock, rawH2Client } from './helpers/raw-h2.js';
import { FORWARD_MODES } from '../src/config.js';

const DECLARED = 1024 * 1024;
const FRAME = 16_384;

let pki: TestPki;
before(async () => {
  pki = await createTestPki();
});
after(() => pki.cleanup());

/** A model server that counts the body bytes of each request it gets, and never answers. */
async function countingModelServer() {
  const bodyBytes: number[] = [];
  const closed: boolean[] = [];
  const server = await scriptedUpstream((socket: Socket, first: Buffer) => {
    const at = bodyBytes.push(0) - 1;
    closed.push(false);
    let inHead = true;
    const count = (chunk: Buffer) => {
      let body = chunk;
      if (inHead) {
        const end = body.indexOf('\r\n\r\n');
        if (end < 0) return;
        inHead = false;
        body = body.subarray(end + 4);
      }
      bodyBytes[at]! += body.length;
    };
    count(first);
    socket.on('data', count);
    socket.on('close', () => (closed[at] = true));
  });
  return { server, bodyBytes, closed };
}

for (const restMode of FORWARD_MODES) {
  describe(`REST over HTTP/2, --mtls_rest_mode ${restMode}`, () => {
    test('a body with more DATA than its content-length (over 64 KiB: it streams) reaches the model server one byte short, and that request is aborted', async () => {
      const model = await countingModelServer();
      const local = await startTestProxy({ pki, upstream: { restPort: model.server.port }, restMode });
      const client = await rawH2Client(local.restPort, pki);
      try {
        const head = headerBlock({ ':method': 'POST', ':scheme': 'https', ':path': '/v2/models/dummy/infer', ':authority': 'localhost', 'content-length': String(DECLARED) });
        const data: Buffer[] = [];
        for (let sent = 0; sent < 2 * DECLARED; sent += FRAME) data.push(h2Frame(H2.DATA, sent + FRAME >= 2 * DECLARED ? END_STREAM : 0, 1, Buffer.alloc(FRAME, 0x61)));
        // The raw client ignores flow control; nghttp2 resets the stream at the frame past the declared length.
        client.socket.write(Buffer.concat([h2Frame(H2.HEADERS, END_HEADERS, 1, head), ...data]));
        await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/models/dummy/infer');
        await eventually(() => model.closed.length === 1 && model.closed[0] === true, 'the upstream request aborted');
        assert.deepEqual(model.bodyBytes, [DECLARED - 1]);
      } finally {
        client.socket.destroy();
        await local.proxy.shutdown(1000);
        model.server.close();
      }
    });
  });
}
