/**
 * gRPC over raw node:http2 (a gRPC library would re-frame every message and
 * cost the driver more CPU than the proxy it measures). Every answer is
 * checked: HTTP 200, grpc-status 0 in the trailers, the expected reply size.
 */
import { constants, type ClientHttp2Stream, type OutgoingHttpHeaders } from 'node:http2';
import { PATHS, REPLY_BYTES_HEADER, type DriverSpec } from '../protocol.js';
import { H2Pool, grpcFrame, h2Exchange, judgeGrpc } from './h2-pool.js';
import { elapsedUs, timedLoop, type Recorder } from './phase.js';
import type { Load } from './load.js';

function grpcHeaders(path: string, spec: DriverSpec): OutgoingHttpHeaders {
  const headers: OutgoingHttpHeaders = {
    ':method': 'POST',
    ':path': path,
    ':authority': 'localhost',
    'content-type': 'application/grpc',
    te: 'trailers',
    'user-agent': 'ovms-mtls-bench',
  };
  if (spec.replyBytes >= 0) headers[REPLY_BYTES_HEADER] = String(spec.replyBytes);
  return headers;
}

/** One unary call per operation. */
export function grpcUnaryLoad(spec: DriverSpec): Load {
  const pool = new H2Pool(spec.endpoint, spec.connections);
  const headers = grpcHeaders(PATHS.grpcUnary, spec);
  const body = grpcFrame(spec.payloadBytes);
  const expect = 5 + (spec.replyBytes >= 0 ? spec.replyBytes : spec.payloadBytes);
  return {
    prepare: () => pool.ready(),
    slots: spec.connections * spec.streamsPerConnection,
    loop: timedLoop(async (slot) => judgeGrpc(await h2Exchange(pool.session(slot), headers, body), expect)),
    close: () => pool.close(),
  };
}

/**
 * Bidirectional streams: each slot keeps one stream open and plays
 * ping-pong, one message at a time; an operation is one message's round trip.
 * A stream ends after `messagesPerStream` messages and must end with grpc-status 0.
 */
export function grpcBidiLoad(spec: DriverSpec): Load {
  const pool = new H2Pool(spec.endpoint, spec.connections);
  const headers = grpcHeaders(PATHS.grpcBidi, { ...spec, replyBytes: -1 });
  const message = grpcFrame(spec.payloadBytes);
  return {
    prepare: () => pool.ready(),
    slots: spec.connections * spec.streamsPerConnection,
    async loop(slot, recorder) {
      while (recorder.more()) await bidiStream(pool, slot, headers, message, spec.messagesPerStream, recorder);
    },
    close: () => pool.close(),
  };
}

async function bidiStream(pool: H2Pool, slot: number, headers: OutgoingHttpHeaders, message: Buffer, messages: number, recorder: Recorder): Promise<void> {
  let stream: ClientHttp2Stream;
  try {
    stream = pool.session(slot).request(headers);
  } catch (err) {
    recorder.fail(`request refused: ${(err as NodeJS.ErrnoException).code}`);
    return;
  }
  let received = 0;
  let want = 0;
  let wake: (() => void) | undefined;
  let status = 0;
  let grpcStatus: string | undefined;
  let closed = false;
  stream.on('response', (h, flags) => {
    status = Number(h[':status']);
    if (flags & constants.NGHTTP2_FLAG_END_STREAM) grpcStatus = h['grpc-status'] as string | undefined;
  });
  stream.on('trailers', (t) => (grpcStatus = t['grpc-status'] as string | undefined));
  stream.on('data', (c: Buffer) => {
    received += c.length;
    if (wake && received >= want) wake();
  });
  stream.on('error', () => {});
  const done = new Promise<void>((resolve) =>
    stream.once('close', () => {
      closed = true;
      wake?.();
      resolve();
    }),
  );
  for (let i = 0; i < messages && recorder.more() && !closed; i++) {
    want += message.length;
    const started = process.hrtime.bigint();
    const echoed = new Promise<void>((resolve) => (wake = resolve));
    stream.write(message);
    await echoed;
    wake = undefined;
    if (received >= want) recorder.ok(elapsedUs(started));
  }
  if (!closed) stream.end();
  await done;
  const problem =
    stream.rstCode !== undefined && stream.rstCode !== constants.NGHTTP2_NO_ERROR ? `stream reset ${stream.rstCode}`
    : status !== 200 ? `http status ${status}`
    : grpcStatus !== '0' ? `grpc-status ${grpcStatus ?? 'missing'}`
    : received !== want ? `echoed ${received} bytes, expected ${want}`
    : undefined;
  if (problem) recorder.fail(problem);
}
