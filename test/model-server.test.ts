/**
 * The stand-in model server, called directly (plaintext h2c and HTTP/1.1):
 * if these fail, proxy tests built on it mean nothing.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { GateBoard, sseEvents } from './helpers/sse.js';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import http from 'node:http';
import { connect as connectTcp } from 'node:net';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import * as grpc from '@grpc/grpc-js';
import { startModelServer, type ModelServer } from '../src/demo/model-server.js';
import {
  echoClient, kserveClient, unary, type EchoClient, type EchoReply, type KserveClient, type ModelStreamInferResponse,
} from '../src/demo/grpc-client.js';
import { CHAT_REPLY_WORDS } from '../src/demo/openai-chat.js';
import { checkBidi } from './helpers/grpc-calls.js';

const INPUT = [0, 1, 2, 3, 4, 5, 6, 7, 8.5, -9.25];
const EXPECTED = INPUT.map((v) => v + 1);

function rawFloats(values: number[]): Buffer {
  const buf = Buffer.alloc(values.length * 4);
  values.forEach((v, i) => buf.writeFloatLE(v, i * 4));
  return buf;
}

function inferRequest(model = 'dummy') {
  return { model_name: model, inputs: [{ name: 'b', datatype: 'FP32', shape: [1, 10], contents: { fp32_contents: INPUT } }] };
}

interface HttpReply { status: number; headers: http.IncomingHttpHeaders; body: Buffer }

let server: ModelServer;
let kserve: KserveClient;
let echo: EchoClient;
let agent: http.Agent;
let board = new GateBoard();

function send(method: string, path: string, body?: string | Buffer, headers: http.OutgoingHttpHeaders = {}): Promise<HttpReply> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port: server.restPort, method, path, agent, headers }, async (res) => {
      const chunks: Buffer[] = [];
      for await (const c of res) chunks.push(c as Buffer);
      resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) });
    });
    req.on('error', reject);
    req.end(body);
  });
}

function openStream(method: string, path: string, body: string): Promise<{ req: http.ClientRequest; res: http.IncomingMessage }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port: server.restPort, method, path, agent,
      headers: { 'content-type': 'application/json' } }, (res) => resolve({ req, res }));
    req.on('error', reject);
    req.end(body);
  });
}

before(async () => {
  server = await startModelServer({ grpcPort: 0, restPort: 0, testService: true, sseGate: (i) => board.wait(i) });
  const address = `127.0.0.1:${server.grpcPort}`;
  kserve = kserveClient(address, grpc.credentials.createInsecure());
  echo = echoClient(address, grpc.credentials.createInsecure());
  agent = new http.Agent({ keepAlive: true });
});

after(async () => {
  kserve.close();
  echo.close();
  agent.destroy();
  await server.close();
});

describe('KServe gRPC', () => {
  test('ModelInfer on dummy returns b + 1 as fp32_contents when the input came as fp32_contents', async () => {
    const { response } = await unary(kserve, 'ModelInfer', { ...inferRequest(), id: 'req-7' });
    assert.equal(response.model_name, 'dummy');
    assert.equal(response.model_version, '1');
    assert.equal(response.id, 'req-7');
    assert.deepEqual(response.outputs.map((o) => [o.name, o.datatype, o.shape]), [['a', 'FP32', ['1', '10']]]);
    assert.deepEqual(response.outputs[0].contents?.fp32_contents, EXPECTED);
    assert.deepEqual(response.raw_output_contents, []);
  });

  test('ModelInfer answers raw_output_contents when the input came as raw_input_contents', async () => {
    const request = { model_name: 'dummy', inputs: [{ name: 'b', datatype: 'FP32', shape: [1, 10] }], raw_input_contents: [rawFloats(INPUT)] };
    const { response } = await unary(kserve, 'ModelInfer', request);
    assert.deepEqual(response.raw_output_contents, [rawFloats(EXPECTED)]);
    assert.deepEqual(response.outputs[0].contents?.fp32_contents ?? [], []);
  });

  test('ModelInfer and ModelMetadata answer NOT_FOUND for an unknown model', async () => {
    await assert.rejects(unary(kserve, 'ModelInfer', inferRequest('nope')),
      { code: grpc.status.NOT_FOUND, details: 'Model with requested name is not found' });
    await assert.rejects(unary(kserve, 'ModelMetadata', { name: 'nope' }), { code: grpc.status.NOT_FOUND });
    await assert.rejects(unary(kserve, 'ModelReady', { name: 'dummy', version: '2' }), { code: grpc.status.NOT_FOUND });
  });

  test('ModelInfer rejects a tensor of the wrong shape with INVALID_ARGUMENT', async () => {
    const request = inferRequest();
    request.inputs[0].shape = [1, 11];
    await assert.rejects(unary(kserve, 'ModelInfer', request), { code: grpc.status.INVALID_ARGUMENT });
  });

  test('health and metadata methods describe a live server with the dummy model', async () => {
    assert.equal((await unary(kserve, 'ServerLive', {})).response.live, true);
    assert.equal((await unary(kserve, 'ServerReady', {})).response.ready, true);
    assert.equal((await unary(kserve, 'ModelReady', { name: 'dummy' })).response.ready, true);
    assert.equal((await unary(kserve, 'ServerMetadata', {})).response.name, 'OpenVINO Model Server');
    const { response } = await unary(kserve, 'ModelMetadata', { name: 'dummy', version: '1' });
    assert.deepEqual(response, {
      name: 'dummy', versions: ['1'], platform: 'OpenVINO',
      inputs: [{ name: 'b', datatype: 'FP32', shape: ['1', '10'] }],
      outputs: [{ name: 'a', datatype: 'FP32', shape: ['1', '10'] }],
    });
  });

  test('ModelStreamInfer answers each request on the open stream and reports errors per message', async () => {
    const call = kserve.ModelStreamInfer();
    const replies = call[Symbol.asyncIterator]();
    call.write(inferRequest());
    const first = (await replies.next()).value as ModelStreamInferResponse;
    assert.deepEqual(first.infer_response?.outputs[0].contents?.fp32_contents, EXPECTED);
    call.write(inferRequest('nope'));
    const second = (await replies.next()).value as ModelStreamInferResponse;
    assert.equal(second.error_message, 'Model with requested name is not found');
    call.end();
    assert.equal((await replies.next()).done, true);
  });

  test('a 12 MiB message passes in both directions (above the 4 MiB grpc-js default)', async () => {
    const payload = Buffer.alloc(12 * 1024 * 1024, 7);
    const { response } = await unary(echo, 'Unary', { payload });
    assert.equal(response.payload.length, payload.length);
    assert.ok(response.payload.equals(payload));
  });
});

describe('Echo gRPC service', () => {
  test('Unary echoes payload, returns x-echo-* keys as headers and x-trailer-echo as trailer', async () => {
    const md = new grpc.Metadata();
    md.set('x-echo-text', 'hello');
    md.set('x-echo-data-bin', Buffer.from([9, 0, 255]));
    md.set('x-other', 'not echoed');
    const { response, metadata, status } = await unary(echo, 'Unary', { payload: Buffer.from('hi'), count: 3 }, md);
    assert.deepEqual(response, { payload: Buffer.from('hi'), count: 3 });
    assert.deepEqual(metadata.get('x-echo-text'), ['hello']);
    assert.deepEqual(metadata.get('x-echo-data-bin'), [Buffer.from([9, 0, 255])]);
    assert.deepEqual(metadata.get('x-other'), []);
    assert.deepEqual(status.metadata.get('x-trailer-echo'), ['ok']);
  });

  test('Unary with fail_with_code fails with that code, a non-ASCII message and echoed -bin trailers', async () => {
    const md = new grpc.Metadata();
    md.set('x-echo-id', 'abc');
    md.set('x-echo-blob-bin', Buffer.from([1, 2, 3]));
    const err = await unary(echo, 'Unary', { fail_with_code: grpc.status.PERMISSION_DENIED }, md).then(
      () => assert.fail('call should fail'), (e: grpc.ServiceError) => e);
    assert.equal(err.code, grpc.status.PERMISSION_DENIED);
    assert.equal(err.details, 'requested failure: 7 ü%');
    assert.deepEqual(err.metadata.get('x-echo-id'), ['abc']);
    assert.deepEqual(err.metadata.get('x-echo-blob-bin'), [Buffer.from([1, 2, 3])]);
    assert.deepEqual(err.metadata.get('x-trailer-bin'), [Buffer.from([0, 1, 2, 255])]);
  });

  test('ClientStream answers the concatenated payloads and the number of messages', async () => {
    const reply = await new Promise<EchoReply>((resolve, reject) => {
      const call = echo.ClientStream(new grpc.Metadata(), {}, (err, res) => (err ? reject(err) : resolve(res as EchoReply)));
      for (const part of ['ab', 'cd', 'ef']) call.write({ payload: Buffer.from(part) });
      call.end();
    });
    assert.deepEqual(reply, { payload: Buffer.from('abcdef'), count: 3 });
  });

  test('ServerStream sends count replies numbered from zero, then the success trailer', async () => {
    const call = echo.ServerStream({ payload: Buffer.from('x'), count: 4 });
    const status = once(call, 'status');
    const counts: number[] = [];
    for await (const reply of call) counts.push((reply as EchoReply).count);
    assert.deepEqual(counts, [0, 1, 2, 3]);
    const [final] = (await status) as [grpc.StatusObject];
    assert.deepEqual(final.metadata.get('x-trailer-echo'), ['ok']);
  });

  test('a long ServerStream that waits for the client again and again leaves no listeners behind (no MaxListenersExceededWarning)', async () => {
    const warnings: string[] = [];
    const onWarning = (warning: Error) => warnings.push(warning.name);
    process.on('warning', onWarning);
    try {
      // Every 16 replies the server waits for the stream to drain: over a thousand waits.
      const call = echo.ServerStream({ payload: Buffer.from('x'), count: 20_000 });
      let replies = 0;
      for await (const _ of call) replies += 1;
      assert.equal(replies, 20_000);
      // Node emits 'warning' on the next tick.
      await new Promise((resolve) => setImmediate(resolve));
      assert.deepEqual(warnings.filter((name) => name === 'MaxListenersExceededWarning'), []);
    } finally {
      process.off('warning', onWarning);
    }
  });

  test('Bidi echoes each message before the next one is sent', () => checkBidi(echo));

  test('streaming calls with fail_with_code end with that status and the -bin trailer', async () => {
    const serverStream = echo.ServerStream({ count: 5, fail_with_code: grpc.status.RESOURCE_EXHAUSTED });
    serverStream.on('data', () => assert.fail('no reply expected before the failure'));
    const [err] = (await once(serverStream, 'error').catch((e: unknown) => [e])) as [grpc.ServiceError];
    assert.equal(err.code, grpc.status.RESOURCE_EXHAUSTED);
    assert.deepEqual(err.metadata.get('x-trailer-bin'), [Buffer.from([0, 1, 2, 255])]);

    const bidi = echo.Bidi();
    const replies = bidi[Symbol.asyncIterator]();
    bidi.write({ payload: Buffer.from('ok') });
    assert.equal(((await replies.next()).value as EchoReply).payload.toString(), 'ok');
    bidi.write({ fail_with_code: grpc.status.ABORTED });
    await assert.rejects(replies.next(), { code: grpc.status.ABORTED, details: 'requested failure: 10 ü%' });
  });

  test('Hold sends headers, never answers, and the server records the client cancelling it', async () => {
    const call = echo.Hold({}, new grpc.Metadata(), {}, () => {});
    const status = once(call, 'status') as Promise<[grpc.StatusObject]>;
    // Headers arriving prove the server holds the call; only then cancel.
    await once(call, 'metadata');
    call.cancel();
    await server.waitFor('cancelled', '/ovmsmtls.test.Echo/Hold');
    const [final] = await status;
    assert.equal(final.code, grpc.status.CANCELLED);
  });

  test('the server records the raw HTTP/2 headers of each call, te and grpc-timeout included', async () => {
    await unary(echo, 'Unary', {}, new grpc.Metadata(), { deadline: Date.now() + 60_000 });
    const seen = server.received.filter((r) => r.protocol === 'grpc' && r.path === '/ovmsmtls.test.Echo/Unary').at(-1);
    assert.equal(seen?.headers.te, 'trailers');
    assert.equal(seen?.headers['content-type'], 'application/grpc');
    assert.match(String(seen?.headers['grpc-timeout']), /^\d+[HMSmun]$/);
    assert.equal(seen?.headers[':authority'], `127.0.0.1:${server.grpcPort}`);
  });
});

describe('REST', () => {
  test('health endpoints answer 200 with an empty body', async () => {
    for (const path of ['/v2/health/live', '/v2/health/ready', '/v2/models/dummy/ready', '/v2/models/dummy/versions/1/ready']) {
      const reply = await send('GET', path);
      assert.equal(reply.status, 200, path);
      assert.equal(reply.body.length, 0, path);
    }
  });

  test('server and model metadata are JSON describing the dummy model', async () => {
    const serverMeta = JSON.parse((await send('GET', '/v2')).body.toString());
    assert.equal(serverMeta.name, 'OpenVINO Model Server');
    for (const path of ['/v2/models/dummy', '/v2/models/dummy/versions/1']) {
      const meta = JSON.parse((await send('GET', path)).body.toString());
      assert.deepEqual(meta.inputs, [{ name: 'b', datatype: 'FP32', shape: [1, 10] }]);
      assert.deepEqual(meta.versions, ['1']);
    }
  });

  test('an unknown model answers 404 with the OVMS error body', async () => {
    for (const [method, path] of [['GET', '/v2/models/nope'], ['GET', '/v2/models/nope/ready'], ['POST', '/v2/models/nope/infer']]) {
      const reply = await send(method, path, method === 'POST' ? JSON.stringify({ inputs: [] }) : undefined);
      assert.equal(reply.status, 404, path);
      assert.deepEqual(JSON.parse(reply.body.toString()), { error: 'Model with requested name is not found' });
    }
  });

  test('JSON infer returns a = b + 1', async () => {
    const body = JSON.stringify({ inputs: [{ name: 'b', shape: [1, 10], datatype: 'FP32', data: INPUT }] });
    const reply = await send('POST', '/v2/models/dummy/infer', body, { 'content-type': 'application/json' });
    assert.equal(reply.status, 200);
    assert.deepEqual(JSON.parse(reply.body.toString()), {
      model_name: 'dummy', model_version: '1', outputs: [{ name: 'a', shape: [1, 10], datatype: 'FP32', data: EXPECTED }],
    });
  });

  test('binary-extension infer (Inference-Header-Content-Length) reads the raw tensor after the JSON header', async () => {
    const header = Buffer.from(JSON.stringify({ inputs: [{ name: 'b', shape: [1, 10], datatype: 'FP32', parameters: { binary_data_size: 40 } }] }));
    const reply = await send('POST', '/v2/models/dummy/versions/1/infer', Buffer.concat([header, rawFloats(INPUT)]),
      { 'inference-header-content-length': header.length, 'content-type': 'application/octet-stream' });
    assert.equal(reply.status, 200);
    assert.deepEqual(JSON.parse(reply.body.toString()).outputs[0].data, EXPECTED);
  });

  test('/v1/config and /metrics answer in the OVMS formats', async () => {
    const config = JSON.parse((await send('GET', '/v1/config')).body.toString());
    assert.equal(config.dummy.model_version_status[0].state, 'AVAILABLE');
    const metrics = await send('GET', '/metrics');
    assert.match(String(metrics.headers['content-type']), /^text\/plain/);
    assert.match(metrics.body.toString(), /^ovms_requests_success\{.*\} \d+$/m);
  });

  test('the server records each REST request with its headers', async () => {
    await send('GET', '/v2/health/live?probe=1', undefined, { 'x-forwarded-for': '192.0.2.1' });
    const seen = server.received.filter((r) => r.protocol === 'rest').at(-1);
    assert.equal(seen?.path, '/v2/health/live?probe=1');
    assert.equal(seen?.headers['x-forwarded-for'], '192.0.2.1');
    assert.equal(seen?.headers.host, `127.0.0.1:${server.restPort}`);
  });

  test('non-streaming chat completion answers one JSON completion', async () => {
    const reply = await send('POST', '/v3/chat/completions', JSON.stringify({ model: 'm', messages: [] }));
    const body = JSON.parse(reply.body.toString());
    assert.equal(body.object, 'chat.completion');
    assert.equal(body.choices[0].message.content, CHAT_REPLY_WORDS.join(''));
  });

  test('SSE events are released one by one by sseGate and each is read before the next is released', async () => {
    board = new GateBoard();
    const { res } = await openStream('POST', '/v3/chat/completions', JSON.stringify({ model: 'm', stream: true }));
    assert.equal(res.headers['content-type'], 'text/event-stream');
    const events = sseEvents(res);
    const words: string[] = [];
    for (let i = 0; i < CHAT_REPLY_WORDS.length; i++) {
      board.open(i);
      const { value } = await events.next();
      const chunk = JSON.parse(String(value).replace(/^data: /, ''));
      assert.equal(chunk.object, 'chat.completion.chunk');
      words.push(chunk.choices[0].delta.content);
    }
    assert.deepEqual(words, CHAT_REPLY_WORDS);
    board.open(CHAT_REPLY_WORDS.length);
    assert.equal((await events.next()).value, 'data: [DONE]');
    assert.equal((await events.next()).done, true);
  });

  test('a client dropping an SSE stream mid-response is recorded in restAborted', async () => {
    board = new GateBoard();
    const { req, res } = await openStream('POST', '/v3/chat/completions', JSON.stringify({ stream: true }));
    board.open(0);
    await sseEvents(res).next();
    req.destroy();
    await server.waitFor('restAborted', '/v3/chat/completions');
    // Only the dropped stream counts: finished responses earlier in this file must not.
    assert.deepEqual(server.restAborted, ['/v3/chat/completions']);
    board.openAll(); // let the handler run to its end and notice the client is gone
  });

  test('/echo-body streams a 64 MiB upload and answers its size and sha256', async () => {
    const chunk = createHash('sha256').update('seed').digest();
    const total = 64 * 1024 * 1024;
    const expected = createHash('sha256');
    function* body() {
      for (let sent = 0; sent < total; sent += 32 * 1024) {
        const piece = Buffer.alloc(32 * 1024, chunk[(sent / 32768) % chunk.length]);
        expected.update(piece);
        yield piece;
      }
    }
    const replied = new Promise<HttpReply>((resolve, reject) => {
      const req = http.request({ host: '127.0.0.1', port: server.restPort, method: 'POST', path: '/echo-body', agent }, async (res) => {
        const parts: Buffer[] = [];
        for await (const c of res) parts.push(c as Buffer);
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(parts) });
      });
      req.on('error', reject);
      pipeline(Readable.from(body()), req).catch(reject);
    });
    const reply = await replied;
    assert.deepEqual(JSON.parse(reply.body.toString()), { bytes: total, sha256: expected.digest('hex') });
  });

  test('Expect is answered as OVMS\'s Drogon 1.9.7 does: 100-continue gets 100 then the answer with a Content-Length, 400 and a close for a chunked body; any other value, 100-Continue, or an HTTP/1.0 request\'s gets 417 and a close', async () => {
    const exchange = async (head: string, body: string): Promise<string> => {
      const socket = connectTcp(server.restPort!, '127.0.0.1');
      await once(socket, 'connect');
      let text = '';
      let sent = false;
      socket.on('data', (c: Buffer) => {
        text += c.toString('latin1');
        // The body goes once the 100 came, as from a client waiting for it.
        if (!sent && text.startsWith('HTTP/1.1 100 ')) {
          sent = true;
          socket.write(body);
        }
      });
      socket.write(head);
      await once(socket, 'close');
      return text;
    };
    const withLength = await exchange('POST /echo-body HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n', 'abc');
    assert.match(withLength, /^HTTP\/1\.1 100 Continue\r\n\r\nHTTP\/1\.1 200 OK\r\n[\s\S]*"bytes":3/);
    const chunked = await exchange('POST /echo-body HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\nexpect: 100-continue\r\n\r\n', '3\r\nabc\r\n0\r\n\r\n');
    assert.match(chunked, /^HTTP\/1\.1 400 Bad Request\r\n/);
    assert.match(chunked, /^connection: close\r$/im);
    for (const [version, value] of [['1.1', '100-Continue'], ['1.1', 'x-fast-lane'], ['1.0', '100-continue']]) {
      const refused = await exchange(`POST /echo-body HTTP/${version}\r\nhost: a\r\ncontent-length: 3\r\nexpect: ${value}\r\n\r\n`, 'abc');
      assert.match(refused, /^HTTP\/1\.1 417 Expectation Failed\r\n/, `${version} ${value}`);
      assert.match(refused, /^connection: close\r$/im);
    }
  });

  test('a chunked request with a trailer is answered as OVMS\'s Drogon 1.9.7 does: 400 and a close; without one, the answer', async () => {
    const exchange = async (bytes: string): Promise<string> => {
      const socket = connectTcp(server.restPort!, '127.0.0.1');
      await once(socket, 'connect');
      let text = '';
      socket.on('data', (c: Buffer) => (text += c.toString('latin1')));
      socket.write(bytes);
      await once(socket, 'close');
      return text;
    };
    const head = 'POST /echo-body HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n3\r\nabc\r\n0\r\n';
    assert.match(await exchange(`${head}\r\n`), /^HTTP\/1\.1 200 OK\r\n[\s\S]*"bytes":3/);
    const trailed = await exchange(`${head}x-checksum: abc\r\n\r\n`);
    assert.match(trailed, /^HTTP\/1\.1 400 Bad Request\r\n/);
    assert.match(trailed, /^connection: close\r$/im);
  });

  test('/stream-bytes sends exactly n bytes of the i & 0xff pattern', async () => {
    const n = 3 * 64 * 1024 + 123;
    const reply = await send('GET', `/stream-bytes?n=${n}`);
    assert.equal(reply.body.length, n);
    assert.ok(reply.body.every((b, i) => b === (i & 0xff)));
  });
});

test('close() ends open gRPC calls and SSE streams instead of waiting for them', async () => {
  const own = await startModelServer({ grpcPort: 0, restPort: 0, testService: true, sseGate: () => new Promise(() => {}) });
  const client = echoClient(`127.0.0.1:${own.grpcPort}`, grpc.credentials.createInsecure());
  const held = client.Hold({}, new grpc.Metadata(), {}, () => {});
  const heldStatus = once(held, 'status') as Promise<[grpc.StatusObject]>;
  await once(held, 'metadata');
  const res = await new Promise<http.IncomingMessage>((resolve) => {
    http.request({ host: '127.0.0.1', port: own.restPort, method: 'POST', path: '/v3/chat/completions' }, resolve)
      .end(JSON.stringify({ stream: true }));
  });
  // The response ends with an 'aborted' error; we only need to see it close.
  const sseClosed = new Promise((resolve) => res.on('error', () => {}).on('close', resolve));
  await own.close();
  const [status] = await heldStatus;
  assert.notEqual(status.code, grpc.status.OK);
  await sseClosed;
  client.close();
});
