/**
 * HTTP/2 sessions for a driver: TLS with the client certificate towards a
 * proxy, h2c towards the upstream (the direct row). Windows as large as the
 * proxy's, so the driver is never what throttles large messages. A session
 * that dies (GOAWAY, reset) is replaced on next use.
 */
import { connect, constants, type ClientHttp2Session, type ClientHttp2Stream, type OutgoingHttpHeaders } from 'node:http2';
import { readFileSync } from 'node:fs';
import { once } from 'node:events';
import type { ClientTls, Endpoint } from '../protocol.js';

const STREAM_WINDOW = 1024 * 1024;
const SESSION_WINDOW = 16 * 1024 * 1024;

export interface TlsFiles {
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
}

const cache = new Map<string, TlsFiles>();
export function readClientTls(tls: ClientTls): TlsFiles {
  let files = cache.get(tls.cert);
  if (!files) {
    files = { ca: readFileSync(tls.ca), cert: readFileSync(tls.cert), key: readFileSync(tls.key) };
    cache.set(tls.cert, files);
  }
  return files;
}

/** The client certificate and CA for a TLS endpoint (servername localhost); undefined for plain ones. */
export function clientTlsOptions(endpoint: Endpoint): (TlsFiles & { servername: string }) | undefined {
  return endpoint.tls ? { ...readClientTls(endpoint.tls), servername: 'localhost' } : undefined;
}

export function connectH2(endpoint: Endpoint): ClientHttp2Session {
  const tls = clientTlsOptions(endpoint);
  const scheme = endpoint.tls ? 'https' : 'http';
  const session = connect(`${scheme}://${endpoint.host}:${endpoint.port}`, {
    ...tls,
    settings: { enablePush: false, initialWindowSize: STREAM_WINDOW },
    maxSessionMemory: 64,
  });
  session.on('error', () => {});
  session.once('connect', () => session.setLocalWindowSize(SESSION_WINDOW));
  return session;
}

export class H2Pool {
  readonly #endpoint: Endpoint;
  readonly #sessions: ClientHttp2Session[] = [];

  constructor(endpoint: Endpoint, size: number) {
    this.#endpoint = endpoint;
    for (let i = 0; i < size; i++) this.#sessions.push(connectH2(endpoint));
  }

  /** Resolves once every session has the server's SETTINGS (the server accepted it). */
  async ready(): Promise<void> {
    await Promise.all(this.#sessions.map((s) => once(s, 'remoteSettings')));
  }

  session(index: number): ClientHttp2Session {
    const i = index % this.#sessions.length;
    const current = this.#sessions[i]!;
    if (!current.closed && !current.destroyed) return current;
    const fresh = connectH2(this.#endpoint);
    this.#sessions[i] = fresh;
    return fresh;
  }

  close(): void {
    for (const s of this.#sessions) s.destroy();
  }
}

export interface H2Outcome {
  status: number;
  grpcStatus: string | undefined;
  grpcMessage: string | undefined;
  bytes: number;
  /** The reply's bytes, when asked for (`keepBody`). */
  chunks: Buffer[] | undefined;
  rstCode: number | undefined;
}

/** Sends `headers` + `body` on a new stream and collects what comes back (the reply's bytes too with `keepBody`). */
export function h2Exchange(session: ClientHttp2Session, headers: OutgoingHttpHeaders, body: Buffer | undefined, keepBody = false): Promise<H2Outcome> {
  return new Promise((resolve) => {
    const outcome: H2Outcome = { status: 0, grpcStatus: undefined, grpcMessage: undefined, bytes: 0, chunks: keepBody ? [] : undefined, rstCode: undefined };
    let stream: ClientHttp2Stream;
    try {
      stream = session.request(headers, { endStream: body === undefined });
    } catch (err) {
      outcome.rstCode = -1;
      outcome.grpcMessage = (err as NodeJS.ErrnoException).code ?? 'request failed';
      resolve(outcome);
      return;
    }
    stream.on('response', (h, flags) => {
      outcome.status = Number(h[':status']);
      if (flags & constants.NGHTTP2_FLAG_END_STREAM) {
        outcome.grpcStatus = h['grpc-status'] as string | undefined;
        outcome.grpcMessage = h['grpc-message'] as string | undefined;
      }
    });
    stream.on('trailers', (t) => {
      outcome.grpcStatus = t['grpc-status'] as string | undefined;
      outcome.grpcMessage = t['grpc-message'] as string | undefined;
    });
    stream.on('data', (c: Buffer) => {
      outcome.bytes += c.length;
      outcome.chunks?.push(c);
    });
    stream.on('error', () => {});
    stream.on('close', () => {
      if (stream.rstCode !== undefined && stream.rstCode !== constants.NGHTTP2_NO_ERROR) outcome.rstCode = stream.rstCode;
      resolve(outcome);
    });
    if (body !== undefined) stream.end(body);
  });
}

/** Why a gRPC outcome is wrong, or undefined when it is right. */
export function judgeGrpc(o: H2Outcome, expectBytes: number): string | undefined {
  if (o.rstCode !== undefined) return o.rstCode === -1 ? `request refused: ${o.grpcMessage}` : `stream reset ${o.rstCode}`;
  if (o.status !== 200) return `http status ${o.status}`;
  if (o.grpcStatus !== '0') return `grpc-status ${o.grpcStatus ?? 'missing'}${o.grpcMessage ? `: ${decodeURIComponent(o.grpcMessage)}` : ''}`;
  if (o.bytes !== expectBytes) return `reply ${o.bytes} bytes, expected ${expectBytes}`;
  return undefined;
}

/** A gRPC length-prefixed message of `bytes` payload bytes. */
export function grpcFrame(bytes: number, fill = 1): Buffer {
  const frame = Buffer.alloc(5 + bytes, fill);
  frame[0] = 0;
  frame.writeUInt32BE(bytes, 1);
  return frame;
}
