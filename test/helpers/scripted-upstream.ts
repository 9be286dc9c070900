import { once } from 'node:events';
import { constants, type Http2Session, type ServerHttp2Stream } from 'node:http2';
import { createServer as createTcpServer, type AddressInfo, type Socket } from 'node:net';
import { CLIENT_PREFACE_BYTES, FrameCursor, TYPE_HEADERS } from '../../src/h2-frames.js';
import type { ForwardMode } from '../../src/config.js';
import { grpcFrame, restModeFrontsOf, startTestProxy, type RestModeFrontsOf, type StartedProxy } from './harness.js';
import type { TestPki } from './pki.js';

export interface ScriptedUpstream {
  readonly port: number;
  /** Every connection the upstream accepted, oldest first. */
  readonly sockets: Socket[];
  close(): void;
}

/**
 * A raw TCP "model server" on loopback that answers the first bytes of each
 * connection by running `answer` on its socket (with those bytes): whatever bytes, timing or
 * closing a test needs, without an HTTP library smoothing them over.
 */
export async function scriptedUpstream(answer: (socket: Socket, first: Buffer) => void): Promise<ScriptedUpstream> {
  const sockets: Socket[] = [];
  const server = createTcpServer((socket) => {
    sockets.push(socket);
    socket.on('error', () => {});
    socket.once('data', (first: Buffer) => answer(socket, first));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return { port: (server.address() as AddressInfo).port, sockets, close: () => server.close() };
}

/**
 * A raw TCP "model server" that hands `onHead` each request head as the lines it came in
 * (request line first, up to the empty line): no HTTP library in front of it merges, drops
 * or counts fields. For requests without a body; answering is `onHead`'s.
 */
export function headReadingUpstream(onHead: (socket: Socket, lines: string[]) => void): Promise<ScriptedUpstream> {
  return scriptedUpstream((socket, first) => {
    let head = '';
    const read = (chunk: Buffer) => {
      head += chunk.toString('latin1');
      const end = head.indexOf('\r\n\r\n');
      if (end < 0) return;
      const lines = head.slice(0, end).split('\r\n');
      head = '';
      onHead(socket, lines);
    };
    read(first);
    socket.on('data', read);
  });
}

/**
 * The `answer` of a model server whose idle close meets the next request on a kept-alive connection (OVMS's Drogon
 * closes after 60 s idle): it answers the first request of each connection with 200 `ok` and, on the first bytes of
 * the next, closes (`close`: a FIN or a reset) without answering it.
 */
export const closingWhenReused = (close: (socket: Socket) => void) => (socket: Socket): void => {
  socket.write('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok');
  socket.once('data', () => close(socket));
};

/** One HTTP/2 frame (RFC 9113 4.1), for an upstream that must send exactly these frames. */
export function h2Frame(type: number, flags: number, streamId: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(9);
  header.writeUIntBE(payload.length, 0, 3);
  header[3] = type;
  header[4] = flags;
  header.writeUInt32BE(streamId, 5);
  return Buffer.concat([header, payload]);
}

/** HPACK of `:status: 200` (static entry 8) and `content-type: application/grpc` (name from static entry 31). */
export const GRPC_RESPONSE_HEADER_BLOCK = Buffer.concat([Buffer.from([0x88, 0x0f, 0x10, 16]), Buffer.from('application/grpc')]);

/**
 * An h2c "model server" written frame by frame: it sends its SETTINGS (and
 * acknowledges the proxy's), then answers each stream the proxy opens with the
 * frames `answer` returns for its id; what the proxy sends otherwise is ignored.
 * Node's http2 server cannot send some things a real server may, such as a
 * bare RST_STREAM(NO_ERROR) in the middle of a response.
 */
export function framedH2cUpstream(answer: (streamId: number) => Buffer): Promise<ScriptedUpstream> {
  return scriptedUpstream((socket, first) => {
    socket.write(Buffer.concat([h2Frame(0x4, 0, 0), h2Frame(0x4, 0x1, 0)]));
    const cursor = new FrameCursor({ skip: CLIENT_PREFACE_BYTES, onFrame: (type, streamId) => {
      if (type === TYPE_HEADERS) socket.write(answer(streamId));
    } });
    cursor.advance(first);
    socket.on('data', (chunk: Buffer) => cursor.advance(chunk));
  });
}

/**
 * What an h2c model server may send, after its SETTINGS, that nghttp2 refuses, ending the proxy's whole connection
 * (Node: ERR_HTTP2_ERROR, as for a port that answers in HTTP/1.1): per case, framedH2cUpstream()'s answer to a
 * stream and what the proxy says it sent. More than 8 CONTINUATION frames is nghttp2's guard against CONTINUATION
 * floods: response metadata over 9 MiB from C-core (OVMS), over 144 KiB from a server that frames it at 16 KiB.
 */
export const HTTP2_REFUSALS: readonly [string, (streamId: number) => Buffer, string][] = [
  [
    'response metadata in 9 CONTINUATION frames',
    (id) => Buffer.concat([h2Frame(0x1, 0, id, GRPC_RESPONSE_HEADER_BLOCK), ...Array.from({ length: 9 }, () => h2Frame(0x9, 0, id, Buffer.from('\x00\x01a\x01b', 'latin1')))]),
    'a header block in more than 8 CONTINUATION frames (response metadata too large), which the proxy\'s HTTP/2 client refuses (nghttp2: "Too many CONTINUATION frames following a HEADER frame")',
  ],
  [
    'a WINDOW_UPDATE of 0 for the connection',
    () => h2Frame(0x8, 0, 0, Buffer.alloc(4)),
    'what the proxy\'s HTTP/2 client refuses (nghttp2: "Protocol error")',
  ],
];

/** harness.ts restModeFronts() in front of the upstream `start` makes: a scripted one, or any other with a port. */
export function scriptedRestModeFronts<U extends { readonly port: number; close(): unknown }>(start: () => Promise<U>): RestModeFrontsOf<U> {
  return restModeFrontsOf(start, (upstream) => upstream.port);
}

/**
 * A proxy whose REST port, in `restMode`, forwards to a scripted upstream
 * answering with `answer`; both are closed after `run`, however it ends.
 */
export async function behindProxy(
  setup: { pki: TestPki; restMode: ForwardMode; answer: (socket: Socket, first: Buffer) => void },
  run: (local: StartedProxy, upstream: ScriptedUpstream) => Promise<void>,
): Promise<void> {
  const upstream = await scriptedUpstream(setup.answer);
  const local = await startTestProxy({ pki: setup.pki, upstream: { restPort: upstream.port }, restMode: setup.restMode });
  try {
    await run(local, upstream);
  } finally {
    await local.proxy.shutdown(1000);
    upstream.close();
  }
}

/** A successful gRPC answer with one empty message. */
export function answerOk(stream: ServerHttp2Stream): void {
  stream.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
  stream.on('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
  stream.end(grpcFrame(Buffer.alloc(0)));
}

/**
 * The 'stream' handler of an h2c model server that does to its first connection what a restart
 * or a connection age limit does: once stream `triggerId` has arrived, a GOAWAY that takes only
 * the first stream, which is answered, then the connection closes; the streams past it were
 * not processed. Every call on a later connection gets one empty message. `connections` lists
 * each connection as its first stream arrives.
 */
export function goAwayOnFirstConnection(triggerId: number): { onStream: (stream: ServerHttp2Stream) => void; connections: Http2Session[] } {
  const connections: Http2Session[] = [];
  let first: ServerHttp2Stream | undefined;
  const onStream = (stream: ServerHttp2Stream) => {
    stream.on('error', () => {});
    stream.resume();
    const session = stream.session!;
    if (!connections.includes(session)) connections.push(session);
    if (session !== connections[0]) return answerOk(stream);
    first ??= stream;
    if (stream.id !== triggerId) return;
    session.goaway(constants.NGHTTP2_NO_ERROR, first.id);
    answerOk(first);
    setTimeout(() => session.close(), 200);
  };
  return { onStream, connections };
}
