/**
 * gRPC behaviours every forwarding mode must keep (terminate and relay): each
 * helper makes the calls and asserts what a client sees.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import * as grpc from '@grpc/grpc-js';
import { grpcFrame, h2Request, h2Session } from './harness.js';
import type { TestPki } from './pki.js';
import { unary, type EchoClient, type EchoReply, type KserveClient } from '../../src/demo/grpc-client.js';
import type { ModelServer } from '../../src/demo/model-server.js';

/** Request headers of a raw Echo/Unary call over node:http2. */
export const ECHO_UNARY_HEADERS = { ':method': 'POST', ':path': '/ovmsmtls.test.Echo/Unary', 'content-type': 'application/grpc', te: 'trailers' };

const INPUT = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];
export const inferRequest = (model = 'dummy') => ({ model_name: model, inputs: [{ name: 'b', datatype: 'FP32', shape: [1, 10], contents: { fp32_contents: INPUT } }] });

export async function checkModelInfer(kserve: KserveClient): Promise<void> {
  const { response } = await unary(kserve, 'ModelInfer', inferRequest());
  assert.deepEqual(response.outputs[0]?.contents?.fp32_contents, INPUT.map((x) => x + 1));
}

/** Text and -bin metadata come back in the headers, the upstream's trailer in the trailers. */
export async function checkMetadataRoundTrip(echo: EchoClient, options: grpc.CallOptions = {}): Promise<void> {
  const md = new grpc.Metadata();
  md.set('x-echo-id', 'abc');
  md.set('x-echo-blob-bin', Buffer.from([9, 8, 7]));
  const { metadata, status } = await unary(echo, 'Unary', { payload: Buffer.from('hi') }, md, options);
  assert.deepEqual(metadata.get('x-echo-id'), ['abc']);
  assert.deepEqual(metadata.get('x-echo-blob-bin'), [Buffer.from([9, 8, 7])]);
  assert.deepEqual(status.metadata.get('x-trailer-echo'), ['ok']);
}

/** An error status keeps its non-ASCII message and -bin metadata. */
export async function checkErrorStatus(echo: EchoClient): Promise<void> {
  const md = new grpc.Metadata();
  md.set('x-echo-blob-bin', Buffer.from([1, 2, 3]));
  const err = await unary(echo, 'Unary', { fail_with_code: grpc.status.PERMISSION_DENIED }, md).then(
    () => assert.fail('call should fail'), (e: grpc.ServiceError) => e);
  assert.equal(err.code, grpc.status.PERMISSION_DENIED);
  assert.equal(err.details, 'requested failure: 7 ü%');
  assert.deepEqual(err.metadata.get('x-echo-blob-bin'), [Buffer.from([1, 2, 3])]);
  assert.deepEqual(err.metadata.get('x-trailer-bin'), [Buffer.from([0, 1, 2, 255])]);
}

/** A Trailers-Only error response stays one HEADERS frame with END_STREAM. */
export async function checkTrailersOnly(port: number, pki: TestPki): Promise<void> {
  const session = h2Session(port, pki);
  try {
    const res = await h2Request(session, ECHO_UNARY_HEADERS, grpcFrame(Buffer.from([0x18, 0x05]))); // fail_with_code = 5
    assert.equal(res.endedWithHeaders, true);
    assert.equal(res.headers['grpc-status'], '5');
    assert.equal(res.trailers, undefined);
    assert.equal(res.body.length, 0);
  } finally {
    session.close();
  }
}

/** Client-streaming, server-streaming and bidi calls, message by message. */
export async function checkStreaming(echo: EchoClient): Promise<void> {
  const reply = await new Promise<EchoReply>((resolve, reject) => {
    const call = echo.ClientStream(new grpc.Metadata(), {}, (err, res) => (err ? reject(err) : resolve(res as EchoReply)));
    for (const part of ['ab', 'cd', 'ef']) call.write({ payload: Buffer.from(part) });
    call.end();
  });
  assert.deepEqual(reply, { payload: Buffer.from('abcdef'), count: 3 });

  const counts: number[] = [];
  for await (const r of echo.ServerStream({ payload: Buffer.from('x'), count: 4 })) counts.push((r as EchoReply).count);
  assert.deepEqual(counts, [0, 1, 2, 3]);

  await checkBidi(echo);
}

/** Each Bidi reply is awaited before the next message is written: nothing is batched. */
export async function checkBidi(echo: EchoClient): Promise<void> {
  const bidi = echo.Bidi();
  const replies = bidi[Symbol.asyncIterator]();
  for (const n of [1, 2, 3]) {
    bidi.write({ payload: Buffer.from(`m${n}`), count: n });
    assert.deepEqual((await replies.next()).value, { payload: Buffer.from(`m${n}`), count: n });
  }
  bidi.end();
  assert.equal((await replies.next()).done, true);
}

/** A client's cancellation reaches the upstream; the client sees CANCELLED. */
export async function checkCancellation(echo: EchoClient, upstream: ModelServer): Promise<void> {
  const call = echo.Hold({}, new grpc.Metadata(), {}, () => {});
  const status = once(call, 'status') as Promise<[grpc.StatusObject]>;
  await once(call, 'metadata');
  call.cancel();
  await upstream.waitFor('cancelled', '/ovmsmtls.test.Echo/Hold');
  assert.equal((await status)[0].code, grpc.status.CANCELLED);
}

/** A message of `bytes` both ways, compared byte for byte. */
export async function checkLargeMessage(echo: EchoClient, bytes: number): Promise<void> {
  const payload = Buffer.alloc(bytes, 7);
  payload[12345] = 1;
  const { response } = await unary(echo, 'Unary', { payload });
  assert.equal(response.payload.length, payload.length);
  assert.ok(response.payload.equals(payload));
}
