/**
 * The grpc-js side of the gRPC fidelity property (test/grpc-fidelity.test.ts): a generated call made
 * with grpc-js, and what grpc-js reports of its answer (initial metadata, messages, status, details,
 * trailing metadata), so that the same call made directly to the model server and through the proxy
 * can be held to the same outcome: grpc-js sets and reads fields of its own, which are not modelled.
 */
import * as grpc from '@grpc/grpc-js';
import { CALL_ID, framed, type CallSpec } from './grpc-fidelity.js';

/** What grpc-js reported of a call (after an error status, the messages it had delivered before it dropped the rest). */
export interface GrpcJsOutcome {
  readonly metadata: Record<string, string[]>;
  readonly messages: string[];
  readonly code: number;
  readonly details: string;
  readonly trailers: Record<string, string[]>;
}

/** Metadata as grpc-js takes it from a user: legal keys, printable ASCII values, `-bin` values as bytes. */
export function grpcJsMetadata(call: CallSpec, id: string): grpc.Metadata {
  const metadata = new grpc.Metadata();
  metadata.add(CALL_ID, id);
  for (const [name, value] of call.metadata) {
    if (!/^[0-9a-z_.-]+$/.test(name)) continue;
    if (name.endsWith('-bin')) metadata.add(name, Buffer.from(value, 'base64'));
    else if (/^[ -~]*$/.test(value)) metadata.add(name, value);
  }
  return metadata;
}

/** Metadata as comparable text: `-bin` values in base64, the call id left out (it differs per call). */
function shownMetadata(metadata: grpc.Metadata | undefined): Record<string, string[]> {
  const out: Record<string, string[]> = {};
  for (const [key, values] of Object.entries(metadata?.toJSON() ?? {})) {
    if (key === CALL_ID) continue;
    out[key] = (values as (string | Buffer)[]).map((v) => (Buffer.isBuffer(v) ? v.toString('base64') : v));
  }
  return out;
}

/** Makes the call as a bidi stream of raw bytes (any shape, as the model server answers it) and reports its outcome. */
export function grpcJsCall(client: grpc.Client, call: CallSpec, id: string): Promise<GrpcJsOutcome> {
  return new Promise((resolve) => {
    const stream = client.makeBidiStreamRequest(call.path, (b: Buffer) => b, (b: Buffer) => b, grpcJsMetadata(call, id));
    let metadata: grpc.Metadata | undefined;
    const messages: string[] = [];
    stream.on('metadata', (m: grpc.Metadata) => (metadata = m));
    stream.on('data', (m: Buffer) => messages.push(`${m.length}:${m.subarray(0, 8).toString('hex')}`));
    stream.on('error', () => {});
    let status: grpc.StatusObject | undefined;
    let closed = false;
    // grpc-js reports the status as it comes, with messages still buffered in the stream: once both are in.
    const settle = () => {
      if (status && closed) resolve({ metadata: shownMetadata(metadata), messages, code: status.code, details: status.details, trailers: shownMetadata(status.metadata) });
    };
    stream.on('status', (s: grpc.StatusObject) => {
      status = s;
      settle();
    });
    stream.on('close', () => {
      closed = true;
      settle();
    });
    // Each message's bytes without gRPC's 5-byte prefix: grpc-js frames them itself.
    for (const message of call.messages) stream.write(framed([{ ...message, compressed: false }]).subarray(5));
    stream.end();
  });
}
