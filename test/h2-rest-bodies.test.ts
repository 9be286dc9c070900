/**
 * HTTP/2 request bodies on the REST port: one that runs past its content-length never reaches the
 * model server whole. nghttp2 resets such a stream only at the frame that goes past the length, and
 * a body over 64 KiB streams upstream as it comes: every declared byte had been forwarded by then,
 * and the model server took the malformed request as complete and ran it.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import type { Socket } from 'node:net';
import { constants as h2Constants } from 'node:http2';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { startTestProxy } from './helpers/harness.js';
import { scriptedUpstream } from './helpers/scripted-upstream.js';
import { eventually } from './helpers/ops.js';
import { END_HEADERS, END_STREAM, H2, h2Frame, headerBlock, rawH2Client } from './helpers/raw-h2.js';
import { FORWARD_MODES } from '../src/config.js';

/** Half the stream window the proxy's SETTINGS give (1 MiB): a little more runs past the length, not past the window. */
const DECLARED = 512 * 1024;
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
    test('a body with more DATA than its content-length (over 64 KiB: it streams) reaches the model server one byte short, and that request is aborted; the client is refused with PROTOCOL_ERROR', async () => {
      const model = await countingModelServer();
      const local = await startTestProxy({ pki, upstream: { restPort: model.server.port }, restMode });
      const client = await rawH2Client(local.restPort, pki);
      try {
        // Sent before the proxy's SETTINGS came, past the 65,535 bytes of the initial window, the body was a flow-control
        // violation too, which Node 24 (nghttp2 1.70) answers first, ending the whole connection (FLOW_CONTROL_ERROR).
        await client.waitForFrame(H2.SETTINGS);
        const head = headerBlock({ ':method': 'POST', ':scheme': 'https', ':path': '/v2/models/dummy/infer', ':authority': 'localhost', 'content-length': String(DECLARED) });
        const frames = (count: number, last = 0) => Array.from({ length: count }, (_, i) => h2Frame(H2.DATA, i === count - 1 ? last : 0, 1, Buffer.alloc(FRAME, 0x61)));
        client.socket.write(Buffer.concat([h2Frame(H2.HEADERS, END_HEADERS, 1, head), ...frames(DECLARED / FRAME)]));
        // Every declared byte came, and all but the last went on: the last waits for the END_STREAM that says the body is whole.
        await eventually(() => model.bodyBytes[0] === DECLARED - 1, 'the declared bytes but the last at the model server');
        // Within the window, past the declared length: at the frame that goes past it, nghttp2 resets the stream (Node 20)
        // or ends the connection (Node 22 and 24, GOAWAY), both with PROTOCOL_ERROR.
        client.socket.write(Buffer.concat(frames(2, END_STREAM)));
        await local.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/models/dummy/infer');
        const refusal = () => client.frames.find((f) => (f.type === H2.RST_STREAM && f.streamId === 1) || f.type === H2.GOAWAY);
        await eventually(() => refusal() !== undefined, 'RST_STREAM or GOAWAY');
        const { type, payload } = refusal()!;
        assert.equal(payload.readUInt32BE(type === H2.GOAWAY ? 4 : 0), h2Constants.NGHTTP2_PROTOCOL_ERROR);
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
