import { createServer as createHttp2Server, type Http2Server, type IncomingHttpHeaders, type ServerHttp2Session, type ServerHttp2Stream } from 'node:http2';
import type { TLSSocket } from 'node:tls';
import type { Refusal } from './client-identity.js';
import { GRPC_STATUS, grpcErrorHeaders } from './grpc-status.js';
import { closingAnswer } from './http-fronts.js';

/**
 * How long a refused connection stays open for its answer to be read. Nothing from
 * the client is used meanwhile: HTTP/1.1 bytes are discarded (the answer goes out at the
 * first of them), HTTP/2 requests get the same fixed answer.
 */
const REFUSAL_ANSWER_MS = 2000;

/**
 * Tells a client whose certificate was refused why, in the protocol it speaks, then closes.
 *
 * Node cannot send a TLS alert once the handshake is over (its verify callback accepts
 * every certificate; FINDINGS), so a bare close was all a client saw: "Socket closed",
 * "Empty reply from server", ECONNRESET. Here gRPC clients get UNAUTHENTICATED (or
 * PERMISSION_DENIED for the allow-list) and HTTP clients 403, each with the reason our
 * log names. A GOAWAY alone would not do: C-core retries on it until its deadline.
 */
export function answerRefusal(socket: TLSSocket, refused: Refusal): void {
  const timer = setTimeout(() => socket.destroy(), REFUSAL_ANSWER_MS);
  timer.unref();
  socket.once('close', () => clearTimeout(timer));
  socket.on('error', () => socket.destroy());
  if (socket.alpnProtocol === 'h2') {
    answerOverHttp2(socket, refused);
    return;
  }
  // Once the client's request has begun, not before: Go's net/http takes an answer that comes before its
  // request as "Unsolicited response received on idle HTTP channel", closes the connection and fails the
  // request with "readLoopPeekFailLocked: <nil>", the reason never read.
  socket.once('data', () => socket.end(closingAnswer(403, 'application/json', JSON.stringify({ error: refusalMessage(refused) })).wire));
  // Read and drop the request: closing with it unread would reset the connection and lose the answer.
  socket.resume();
}

/** How every refusal answer begins; `probe` looks for it. */
export const REFUSAL_PREFIX = 'client certificate refused';

/** What the client reads; `reason` is the word our `client_refused` log line carries. */
function refusalMessage(refused: Refusal): string {
  return `${REFUSAL_PREFIX} (${refused.reason}): ${refused.clientDetail ?? refused.detail}`;
}

/** One HTTP/2 server for every refused connection; it never listens, sockets are handed to it. */
let refusalServer: Http2Server | undefined;

function answerOverHttp2(socket: TLSSocket, refused: Refusal): void {
  const server = (refusalServer ??= createRefusalServer());
  // 'session' is emitted inside emit('connection'): this listener sees this socket's session only.
  const onSession = (session: ServerHttp2Session) => answerSession(session, refused);
  server.once('session', onSession);
  try {
    server.emit('connection', socket);
  } finally {
    server.off('session', onSession);
  }
}

function createRefusalServer(): Http2Server {
  // Small limits: the client is not trusted, and each request gets the same short answer.
  const server = createHttp2Server({ settings: { maxConcurrentStreams: 8, maxHeaderListSize: 16 * 1024 }, maxSessionMemory: 1 });
  server.on('sessionError', () => {});
  return server;
}

/**
 * How long a refused HTTP/2 connection stays without an open stream before its GOAWAY. Java's HttpClient
 * before JDK 24 (JDK-8335181) fails every request still under way when any GOAWAY arrives: an upload, whose
 * answer it reads only once the upload is out, failed with "IOException: ...: GOAWAY received" behind a GOAWAY
 * sent with the first answer, the reason never read. Within REFUSAL_ANSWER_MS, which ends a client that keeps asking.
 */
const REFUSAL_GOAWAY_QUIET_MS = 500;

function answerSession(session: ServerHttp2Session, refused: Refusal): void {
  session.on('error', () => session.destroy());
  let open = 0;
  let quiet: NodeJS.Timeout | undefined;
  // A client that keeps asking is never quiet: told to go away halfway, its later requests go to a new connection
  // (and are refused there, saying why) rather than one cut under them by REFUSAL_ANSWER_MS.
  const busy = setTimeout(() => {
    if (!session.closed) session.close();
  }, REFUSAL_ANSWER_MS / 2).unref();
  session.once('close', () => {
    clearTimeout(quiet);
    clearTimeout(busy);
  });
  session.on('stream', (stream, headers) => {
    open += 1;
    clearTimeout(quiet);
    // Every request of the connection is answered, those sent with the first as well as those after it.
    stream.once('close', () => {
      if (--open === 0 && !session.closed) quiet = setTimeout(() => session.close(), REFUSAL_GOAWAY_QUIET_MS).unref();
    });
    answerStream(stream, headers, refused);
  });
}

function answerStream(stream: ServerHttp2Stream, headers: IncomingHttpHeaders, refused: Refusal): void {
  stream.on('error', () => {});
  // Read and drop the request body, as over HTTP/1.1: Java's HttpClient reads no answer before its upload is out.
  stream.resume();
  const message = refusalMessage(refused);
  if (String(headers['content-type'] ?? '').startsWith('application/grpc')) {
    const code = refused.reason === 'not_allowed' ? GRPC_STATUS.PERMISSION_DENIED : GRPC_STATUS.UNAUTHENTICATED;
    stream.respond(grpcErrorHeaders(code, message), { endStream: true });
    return;
  }
  const head = headers[':method'] === 'HEAD';
  stream.respond({ ':status': 403, 'content-type': 'application/json' }, { endStream: head });
  if (!head) stream.end(JSON.stringify({ error: message }));
}
