import { once } from 'node:events';
import type { Socket } from 'node:net';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import type { TestPki } from './pki.js';
import { tlsClientOptions } from './harness.js';
import { eventually } from './ops.js';
import { h2Frame } from './scripted-upstream.js';

export { h2Frame };

export const H2 = { DATA: 0x0, HEADERS: 0x1, RST_STREAM: 0x3, SETTINGS: 0x4, PING: 0x6, GOAWAY: 0x7, CONTINUATION: 0x9 } as const;
export const END_STREAM = 0x1;
export const END_HEADERS = 0x4;
export const ACK = 0x1;
const MAX_FRAME_PAYLOAD = 16_384;
export const SETTINGS_INITIAL_WINDOW_SIZE = 0x4;

/** One SETTINGS parameter (RFC 9113 6.5.1). */
export function setting(id: number, value: number): Buffer {
  const entry = Buffer.alloc(6);
  entry.writeUInt16BE(id, 0);
  entry.writeUInt32BE(value, 2);
  return entry;
}

/** An HPACK string length: an integer with a 7-bit prefix, Huffman bit clear (RFC 7541 5.1). */
function stringLength(length: number): Buffer {
  if (length < 127) return Buffer.from([length]);
  const octets = [127];
  let rest = length - 127;
  for (; rest >= 128; rest = Math.floor(rest / 128)) octets.push((rest % 128) + 128);
  octets.push(rest);
  return Buffer.from(octets);
}

/** HPACK literal field without indexing, new name (RFC 7541 6.2.2); `encoding`: latin1 for a value's bytes as Node reads them (obs-text). */
export function literalField(name: string, value: string, encoding: BufferEncoding = 'utf8'): Buffer {
  const bytes = Buffer.from(value, encoding);
  return Buffer.concat([Buffer.from([0x00]), stringLength(name.length), Buffer.from(name), stringLength(bytes.length), bytes]);
}

/** A header block as HEADERS and CONTINUATION frames of at most 16 KiB (the default SETTINGS_MAX_FRAME_SIZE). */
export function headerFrames(streamId: number, block: Buffer): Buffer {
  const frames: Buffer[] = [];
  for (let at = 0; at < block.length; at += MAX_FRAME_PAYLOAD) {
    const last = at + MAX_FRAME_PAYLOAD >= block.length;
    frames.push(h2Frame(at === 0 ? H2.HEADERS : H2.CONTINUATION, last ? END_HEADERS : 0, streamId, block.subarray(at, at + MAX_FRAME_PAYLOAD)));
  }
  return Buffer.concat(frames);
}

/** A header block of literal fields, as a hand-written client sends it. */
export function headerBlock(fields: Record<string, string>): Buffer {
  return Buffer.concat(Object.entries(fields).map(([name, value]) => literalField(name, value)));
}

/** The header block of a gRPC call to `path`, as a hostile client would write it by hand. */
export function grpcHeaderBlock(path: string): Buffer {
  const fields: [string, string][] = [[':method', 'POST'], [':scheme', 'https'], [':path', path], [':authority', 'localhost'], ['content-type', 'application/grpc'], ['te', 'trailers']];
  return Buffer.concat(fields.map(([name, value]) => literalField(name, value)));
}

/**
 * What a stream got, in order: `end` for a frame with END_STREAM, `reset <code>` for a
 * RST_STREAM, `data` and `headers` for the rest.
 */
export function streamFrames(frames: readonly H2Frame[], streamId: number): string[] {
  return frames.filter((f) => f.streamId === streamId).map((f) => {
    if (f.type === H2.RST_STREAM) return `reset ${f.payload.readUInt32BE(0)}`;
    if ((f.flags & END_STREAM) !== 0) return 'end';
    return f.type === H2.HEADERS ? 'headers' : 'data';
  });
}

export interface H2Frame {
  readonly type: number;
  readonly flags: number;
  readonly streamId: number;
  readonly payload: Buffer;
}

/** Splits a byte stream into whole frames, keeping what is left over. */
export class H2FrameReader {
  readonly frames: H2Frame[] = [];
  #buffered = Buffer.alloc(0);

  push(chunk: Buffer): H2Frame[] {
    this.#buffered = Buffer.concat([this.#buffered, chunk]);
    const found: H2Frame[] = [];
    while (this.#buffered.length >= 9 && this.#buffered.length >= 9 + this.#buffered.readUIntBE(0, 3)) {
      const length = this.#buffered.readUIntBE(0, 3);
      const b = this.#buffered;
      found.push({ type: b[3]!, flags: b[4]!, streamId: b.readUInt32BE(5) & 0x7fffffff, payload: b.subarray(9, 9 + length) });
      this.#buffered = b.subarray(9 + length);
    }
    this.frames.push(...found);
    return found;
  }
}

export interface RawH2Client {
  readonly socket: TLSSocket;
  /** Every frame received so far. */
  readonly frames: H2Frame[];
  readonly closed: Promise<unknown>;
  waitForFrame(type: number): Promise<H2Frame>;
}

/** What every HTTP/2 client sends first: the connection preface and an empty SETTINGS frame. */
export const CLIENT_PREFACE = Buffer.concat([Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'), h2Frame(H2.SETTINGS, 0, 0)]);

/** A gRPC call on stream 1 and 1,200 empty DATA frames without END_STREAM: past Node's 1,000 such invalid frames, it ends the session. */
export function invalidFrameFlood(): Buffer {
  return Buffer.concat([h2Frame(H2.HEADERS, END_HEADERS, 1, grpcHeaderBlock('/ovmsmtls.test.Echo/Unary')), ...Array.from({ length: 1200 }, () => h2Frame(H2.DATA, 0, 1))]);
}

/**
 * A client that speaks just enough HTTP/2 to be connected (preface, SETTINGS
 * and their ACK) and otherwise sends only what a test writes: it ignores
 * flow control and GOAWAY, as a broken or hostile client would.
 */
export async function rawH2Client(port: number, pki: TestPki, over?: Socket, send: (socket: TLSSocket, bytes: Buffer) => unknown = (sock, bytes) => sock.write(bytes)): Promise<RawH2Client> {
  // `over`: a TCP connection of the test's own, for what a TLSSocket cannot do itself (a TCP reset).
  // `send`: how the preface and SETTINGS go (byteByByte: one TLS record per byte).
  const socket: TLSSocket = tlsConnect({ ...(over ? { socket: over } : { port, host: '127.0.0.1' }), ...tlsClientOptions(pki), ALPNProtocols: ['h2'] });
  socket.on('error', () => {});
  const closed = once(socket, 'close');
  await once(socket, 'secureConnect');
  await send(socket, CLIENT_PREFACE);
  const reader = new H2FrameReader();
  socket.on('data', (chunk: Buffer) => {
    for (const frame of reader.push(chunk)) if (frame.type === H2.SETTINGS && (frame.flags & ACK) === 0) socket.write(h2Frame(H2.SETTINGS, ACK, 0));
  });
  const waitForFrame = async (type: number): Promise<H2Frame> => {
    await eventually(() => reader.frames.some((f) => f.type === type), `an HTTP/2 frame of type ${type}`);
    return reader.frames.find((f) => f.type === type)!;
  };
  return { socket, frames: reader.frames, closed, waitForFrame };
}

/** Writes `bytes` one TLS record per byte: the reader gets each byte in a read of its own, every frame split at every offset. */
export async function byteByByte(socket: TLSSocket, bytes: Buffer): Promise<void> {
  for (let i = 0; i < bytes.length; i++) {
    socket.write(bytes.subarray(i, i + 1));
    await new Promise((resolve) => setImmediate(resolve));
  }
}

/** Answers the server's PINGs from now on, as every HTTP/2 client library does (rawH2Client answers none). */
export function answerPings(client: RawH2Client): void {
  let answered = 0;
  client.socket.on('data', () => {
    const pings = client.frames.filter((f) => f.type === H2.PING && (f.flags & ACK) === 0);
    for (const ping of pings.slice(answered)) client.socket.write(h2Frame(H2.PING, ACK, 0, ping.payload));
    answered = pings.length;
  });
}
