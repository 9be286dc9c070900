/**
 * Handlers for ovmsmtls.test.Echo, the test-only service that exercises every
 * gRPC call shape through the proxy. The metadata rules make forwarding
 * observable from the client side:
 *  - success: request keys `x-echo-*` come back as response headers, and the
 *    trailers carry `x-trailer-echo: ok`;
 *  - `fail_with_code`: the call fails with that code, a message holding a
 *    non-ASCII character and a percent sign (both need percent-encoding in
 *    `grpc-message`), and trailers echoing `x-echo-*` (text and -bin) plus
 *    `x-trailer-bin` = 00 01 02 ff.
 */
import { once } from 'node:events';
import * as grpc from '@grpc/grpc-js';
import type { EchoReply, EchoRequest } from './protocol.js';
import type { CancelRecorder } from './kserve-grpc.js';

export const FAILURE_TRAILER_BIN = Buffer.from([0, 1, 2, 255]);

export function failureMessage(code: number): string {
  return `requested failure: ${code} ü%`;
}

/** Copies every `x-echo-*` entry, all values of each key, binary ones included. */
function echoedMetadata(request: grpc.Metadata): grpc.Metadata {
  const out = new grpc.Metadata();
  for (const key of Object.keys(request.getMap())) {
    if (!key.startsWith('x-echo-')) continue;
    for (const value of request.get(key)) out.add(key, value);
  }
  return out;
}

function successTrailers(): grpc.Metadata {
  const md = new grpc.Metadata();
  md.set('x-trailer-echo', 'ok');
  return md;
}

function failureStatus(code: number, request: grpc.Metadata): grpc.ServerErrorResponse {
  const metadata = echoedMetadata(request);
  metadata.set('x-trailer-bin', FAILURE_TRAILER_BIN);
  return Object.assign(new Error(failureMessage(code)), { code, details: failureMessage(code), metadata });
}

function toBuffer(payload: Buffer | Uint8Array | undefined): Buffer {
  return payload ? Buffer.from(payload) : Buffer.alloc(0);
}

/** The part of every grpc-js server call we need (grpc-js does not export ServerSurfaceCall). */
interface CancellableCall {
  getPath(): string;
  once(event: 'cancelled', listener: () => void): unknown;
}

function trackCancel(call: CancellableCall, onCancel: CancelRecorder): void {
  call.once('cancelled', () => onCancel(call.getPath()));
}

const unary = (onCancel: CancelRecorder): grpc.handleUnaryCall<EchoRequest, EchoReply> => (call, callback) => {
  trackCancel(call, onCancel);
  const { payload, count = 0, fail_with_code: fail = 0 } = call.request;
  if (fail !== 0) return callback(failureStatus(fail, call.metadata));
  call.sendMetadata(echoedMetadata(call.metadata));
  callback(null, { payload: toBuffer(payload), count }, successTrailers());
};

const clientStream = (onCancel: CancelRecorder): grpc.handleClientStreamingCall<EchoRequest, EchoReply> => (call, callback) => {
  trackCancel(call, onCancel);
  const parts: Buffer[] = [];
  let failed = false;
  call.on('data', (req: EchoRequest) => {
    if (failed) return;
    if (req.fail_with_code) {
      failed = true;
      callback(failureStatus(req.fail_with_code, call.metadata));
      return;
    }
    parts.push(toBuffer(req.payload));
  });
  call.on('end', () => {
    if (failed) return;
    call.sendMetadata(echoedMetadata(call.metadata));
    callback(null, { payload: Buffer.concat(parts), count: parts.length }, successTrailers());
  });
};

/**
 * The call can take more, or is over. The waits that lost the race are taken off: left on, they
 * added three listeners per drain, and a long stream to a slow client piled up thousands of them
 * (MaxListenersExceededWarning on the model server's stderr). Race has handled their rejections.
 */
async function drained(call: grpc.ServerWritableStream<EchoRequest, EchoReply>): Promise<void> {
  const done = new AbortController();
  const { signal } = done;
  try {
    await Promise.race([once(call, 'drain', { signal }), once(call, 'cancelled', { signal }), once(call, 'close', { signal })]);
  } finally {
    done.abort();
  }
}

const serverStream = (onCancel: CancelRecorder): grpc.handleServerStreamingCall<EchoRequest, EchoReply> => async (call) => {
  trackCancel(call, onCancel);
  const { payload, count = 0, fail_with_code: fail = 0 } = call.request;
  if (fail !== 0) {
    call.emit('error', failureStatus(fail, call.metadata));
    return;
  }
  call.sendMetadata(echoedMetadata(call.metadata));
  const body = toBuffer(payload);
  for (let i = 0; i < count && !call.cancelled; i++) {
    if (!call.write({ payload: body, count: i })) await drained(call);
  }
  if (!call.cancelled) call.end(successTrailers());
};

const bidi = (onCancel: CancelRecorder): grpc.handleBidiStreamingCall<EchoRequest, EchoReply> => (call) => {
  trackCancel(call, onCancel);
  let failed = false;
  let headersSent = false;
  // Headers go out with the first reply, so a failure on the first message
  // still produces a Trailers-Only response like the unary case.
  const sendHeadersOnce = () => {
    if (!headersSent) call.sendMetadata(echoedMetadata(call.metadata));
    headersSent = true;
  };
  call.on('data', (req: EchoRequest) => {
    if (failed) return;
    if (req.fail_with_code) {
      failed = true;
      call.emit('error', failureStatus(req.fail_with_code, call.metadata));
      return;
    }
    sendHeadersOnce();
    call.write({ payload: toBuffer(req.payload), count: req.count ?? 0 });
  });
  call.on('end', () => {
    if (failed) return;
    sendHeadersOnce();
    call.end(successTrailers());
  });
};

/**
 * Never answers: lets tests check that a client's cancel or deadline reaches
 * the server. Headers go out at once, so the client knows (by its 'metadata'
 * event) that the call reached the server before it cancels.
 */
const hold = (onCancel: CancelRecorder): grpc.handleUnaryCall<EchoRequest, EchoReply> => (call) => {
  trackCancel(call, onCancel);
  call.sendMetadata(echoedMetadata(call.metadata));
};

export function echoHandlers(onCancel: CancelRecorder): grpc.UntypedServiceImplementation {
  return {
    Unary: unary(onCancel),
    ClientStream: clientStream(onCancel),
    ServerStream: serverStream(onCancel),
    Bidi: bidi(onCancel),
    Hold: hold(onCancel),
  };
}
