/**
 * The bench upstream: a stand-in for OVMS that does as little as possible, so
 * it is never what limits a scenario. Runs in its own process (forked by
 * run.ts with the PKI directory as argv[2]) and reports its ports over IPC.
 *
 * - gRPC over h2c: unary calls echo the request, or answer `bench-reply-bytes`
 *   payload bytes; `...StreamInfer` echoes every byte as it arrives (bidi).
 *   A request whose gRPC length prefix disagrees with the bytes received gets
 *   INTERNAL, so a forwarder that truncates or corrupts framing shows up as errors.
 * - REST over HTTP/1.1 (and the same handlers over h2c): POST echoes the JSON
 *   body, GET /v2/health/ready answers 200, GET /v3/chat/completions streams
 *   Server-Sent Events stamped with the monotonic clock (shared by every
 *   process on the machine), so a client can tell how long each event took.
 * - mTLS (h2 + HTTP/1.1) serving the same REST handlers: the direct row of the
 *   handshake and idle-connection scenarios (TLS without any forwarding).
 */
import { createServer as createH2cServer, createSecureServer, type ServerHttp2Stream, type IncomingHttpHeaders, type Http2ServerRequest, type Http2ServerResponse } from 'node:http2';
import { createServer as createHttpServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { once } from 'node:events';
import type { AddressInfo, Server } from 'node:net';
import { PATHS, REPLY_BYTES_HEADER, type UpstreamMessage } from './protocol.js';

const GRPC_HEADERS = { ':status': 200, 'content-type': 'application/grpc' };
const GRPC_OK = { 'grpc-status': '0' };
const GRPC_BAD_FRAME = { ':status': 200, 'content-type': 'application/grpc', 'grpc-status': '13', 'grpc-message': 'bench upstream: length prefix disagrees with body' };

const replyFrames = new Map<number, Buffer>();
function replyFrame(bytes: number): Buffer {
  let frame = replyFrames.get(bytes);
  if (!frame) {
    frame = Buffer.alloc(5 + bytes, 7);
    frame[0] = 0;
    frame.writeUInt32BE(bytes, 1);
    replyFrames.set(bytes, frame);
  }
  return frame;
}

function onGrpcStream(stream: ServerHttp2Stream, headers: IncomingHttpHeaders): void {
  stream.on('error', () => {});
  if (String(headers[':path']).endsWith('StreamInfer')) {
    stream.respond(GRPC_HEADERS, { waitForTrailers: true });
    stream.on('wantTrailers', () => stream.sendTrailers(GRPC_OK));
    stream.on('data', (chunk: Buffer) => stream.write(chunk));
    stream.on('end', () => stream.end());
    return;
  }
  const replyBytes = Number(headers[REPLY_BYTES_HEADER] ?? -1);
  const chunks: Buffer[] = [];
  let received = 0;
  // The 5-byte message prefix may arrive split over several DATA frames.
  let prefix: Buffer | undefined = Buffer.alloc(0);
  let declared = -1;
  stream.on('data', (chunk: Buffer) => {
    if (prefix && prefix.length === 0 && chunk.length >= 5) {
      declared = chunk.readUInt32BE(1);
      prefix = undefined;
    } else if (prefix) {
      prefix = Buffer.concat([prefix, chunk.subarray(0, 5 - prefix.length)]);
      if (prefix.length === 5) {
        declared = prefix.readUInt32BE(1);
        prefix = undefined;
      }
    }
    received += chunk.length;
    if (replyBytes < 0) chunks.push(chunk);
  });
  stream.on('end', () => {
    if (declared + 5 !== received) {
      stream.respond(GRPC_BAD_FRAME, { endStream: true });
      return;
    }
    stream.respond(GRPC_HEADERS, { waitForTrailers: true });
    stream.on('wantTrailers', () => stream.sendTrailers(GRPC_OK));
    stream.end(replyBytes < 0 ? (chunks.length === 1 ? chunks[0] : Buffer.concat(chunks)) : replyFrame(replyBytes));
  });
}

type Req = IncomingMessage | Http2ServerRequest;
type Res = ServerResponse | Http2ServerResponse;

function onRestRequest(req: Req, res: Res): void {
  const url = req.url ?? '';
  if (req.method === 'POST') {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const body = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks);
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': body.length });
      res.end(body);
    });
    return;
  }
  if (url.startsWith(PATHS.sse)) {
    streamEvents(req, res, new URLSearchParams(url.slice(url.indexOf('?') + 1)));
    return;
  }
  req.resume();
  res.writeHead(url === PATHS.restReady ? 200 : 404, { 'content-length': 0 });
  res.end();
}

/** `?events=N&interval_ms=M`: N events M ms apart, then `[DONE]`. */
function streamEvents(req: Req, res: Res, query: URLSearchParams): void {
  const events = Math.min(10_000, Number(query.get('events') ?? 10));
  const intervalMs = Math.max(1, Number(query.get('interval_ms') ?? 10));
  req.resume();
  res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
  let sent = 0;
  const timer = setInterval(() => {
    if (sent === events) {
      clearInterval(timer);
      res.end('data: [DONE]\n\n');
      return;
    }
    // The stamp is taken right before the write: what we measure is everything after it.
    (res as ServerResponse).write(`data: {"i":${sent},"t":${process.hrtime.bigint()}}\n\n`);
    sent += 1;
  }, intervalMs);
  res.once('close', () => clearInterval(timer));
}

async function listen(server: Server): Promise<number> {
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return (server.address() as AddressInfo).port;
}

async function main(): Promise<void> {
  const pkiDir = process.argv[2];
  if (!pkiDir) throw new Error('usage: upstream.js PKI_DIR');
  const h2Settings = { initialWindowSize: 1024 * 1024, maxConcurrentStreams: 1000 };
  const grpc = createH2cServer({ settings: h2Settings });
  grpc.on('stream', onGrpcStream);
  grpc.on('session', (s) => s.once('connect', () => s.setLocalWindowSize(16 * 1024 * 1024)));
  const rest = createHttpServer({ keepAliveTimeout: 600_000, requestTimeout: 0 }, onRestRequest);
  const restH2c = createH2cServer({ settings: h2Settings }, onRestRequest);
  const tls = createSecureServer(
    {
      key: readFileSync(join(pkiDir, 'server.key')),
      cert: readFileSync(join(pkiDir, 'server.pem')),
      ca: readFileSync(join(pkiDir, 'client_cert_ca.pem')),
      requestCert: true,
      rejectUnauthorized: true,
      allowHTTP1: true,
      settings: h2Settings,
    },
    onRestRequest,
  );
  for (const s of [grpc, restH2c, tls]) s.on('sessionError', () => {});
  tls.on('tlsClientError', () => {});
  const ports = { grpc: await listen(grpc), rest: await listen(rest), restH2c: await listen(restH2c), tls: await listen(tls) };
  const message: UpstreamMessage = { type: 'listening', ports };
  process.send?.(message);
  // The orchestrator owns our lifetime: when it goes, so do we.
  process.on('disconnect', () => process.exit(0));
}

main().catch((err: unknown) => {
  process.stderr.write(`bench upstream: ${(err as Error).stack ?? String(err)}\n`);
  process.exit(1);
});
