/**
 * A stand-in for OpenVINO Model Server: speaks OVMS's gRPC (KServe v2) and
 * REST surfaces for one tiny model, plaintext only, like OVMS itself. Used by
 * the test suite (as the upstream behind the proxy) and by `ovms-mtls demo`.
 * It records what reached it (paths, headers, cancellations, aborts) so tests
 * can check what the proxy forwarded.
 */
import { EventEmitter } from 'node:events';
import type http from 'node:http';
import type { IncomingHttpHeaders } from 'node:http2';
import type { AddressInfo } from 'node:net';
import * as grpc from '@grpc/grpc-js';
import { echoHandlers } from './echo-grpc.js';
import { kserveHandlers } from './kserve-grpc.js';
import type { SseGate } from './openai-chat.js';
import { ECHO_SERVICE, KSERVE_SERVICE, serviceConstructor } from './protocol.js';
import { createRestServer } from './rest-server.js';
import { hostAndPort } from '../addresses.js';

export interface ModelServerOptions {
  /** Default '127.0.0.1'. */
  host?: string;
  /** 0 = random free port; null/undefined = gRPC off. */
  grpcPort?: number | null;
  /** 0 = random free port; null/undefined = REST off. */
  restPort?: number | null;
  /** Also serve ovmsmtls.test.Echo on the gRPC port (tests only). */
  testService?: boolean;
  /** Awaited before writing SSE event #index ([DONE] is the last index); lets tests release events one by one. */
  sseGate?: SseGate;
  /** The gRPC port's SETTINGS_MAX_CONCURRENT_STREAMS (grpc.max_concurrent_streams); unset: none sent, unlimited. */
  grpcMaxConcurrentStreams?: number;
}

export interface ReceivedRequest {
  protocol: 'grpc' | 'rest';
  /** gRPC: the `:path` (/package.Service/Method); REST: the request target incl. query. */
  path: string;
  /** Raw headers as received: for gRPC the HTTP/2 headers incl. pseudo-headers, te and grpc-timeout. */
  headers: Record<string, string | string[]>;
}

export type RecordKind = 'cancelled' | 'restAborted';

export interface ModelServer {
  readonly grpcPort: number | undefined;
  readonly restPort: number | undefined;
  readonly received: ReceivedRequest[];
  /** gRPC method paths whose calls the client cancelled (or whose deadline passed) while still open. */
  readonly cancelled: string[];
  /** REST paths (without query) whose client went away before the response finished. */
  readonly restAborted: string[];
  /** The most gRPC streams (HTTP/2, all connections) open at once so far, from the request's HEADERS to the stream's close. */
  readonly mostGrpcStreamsOpen: number;
  /** Resolves once `path` appears in `cancelled` or `restAborted` (at once if already there): await it instead of sleeping. */
  waitFor(kind: RecordKind, path: string): Promise<void>;
  /** Closes listeners and destroys open connections and streams. */
  close(): Promise<void>;
}

/** OVMS accepts messages up to 1 GiB in both directions. */
const ONE_GIB = 1024 * 1024 * 1024;

const GRPC_SERVER_OPTIONS: grpc.ServerOptions = {
  'grpc.max_receive_message_length': ONE_GIB,
  'grpc.max_send_message_length': ONE_GIB,
};

class Recorder {
  readonly received: ReceivedRequest[] = [];
  grpcStreamsOpen = 0;
  mostGrpcStreamsOpen = 0;
  readonly cancelled: string[] = [];
  readonly restAborted: string[] = [];
  private readonly events = new EventEmitter();

  record(kind: RecordKind, path: string): void {
    this[kind].push(path);
    this.events.emit(kind, path);
  }

  waitFor(kind: RecordKind, path: string): Promise<void> {
    if (this[kind].includes(path)) return Promise.resolve();
    return new Promise((resolve) => {
      const check = (seen: string) => {
        if (seen !== path) return;
        this.events.off(kind, check);
        resolve();
      };
      this.events.on(kind, check);
    });
  }
}

function copyHeaders(headers: IncomingHttpHeaders): Record<string, string | string[]> {
  const out: Record<string, string | string[]> = {};
  for (const [key, value] of Object.entries(headers)) {
    if (value !== undefined) out[key] = value;
  }
  return out;
}

/**
 * grpc-js strips te, grpc-timeout, content-type and pseudo-headers from the
 * metadata it hands to handlers, yet those are exactly what a proxy can get
 * wrong. So we listen on grpc-js's own HTTP/2 servers for the raw headers.
 * This reads a private field (pinned grpc-js 1.14.x); fail loudly if it moves.
 */
function tapRawHeaders(server: grpc.Server, onStream: (stream: EventEmitter, headers: IncomingHttpHeaders) => void): void {
  const servers = (server as unknown as { http2Servers?: unknown }).http2Servers;
  if (!(servers instanceof Map) || servers.size === 0) {
    throw new Error('cannot observe raw gRPC headers: grpc-js internals changed (Server.http2Servers)');
  }
  for (const h2 of servers.keys() as Iterable<EventEmitter>) {
    h2.prependListener('stream', (stream: EventEmitter, headers: IncomingHttpHeaders) => onStream(stream, headers));
  }
}

function bindGrpc(server: grpc.Server, host: string, port: number): Promise<number> {
  const address = hostAndPort(host, port);
  return new Promise((resolve, reject) => {
    server.bindAsync(address, grpc.ServerCredentials.createInsecure(), (err, bound) => {
      if (err) reject(new Error(`stand-in gRPC cannot listen on ${address}: ${err.message}`, { cause: err }));
      else resolve(bound);
    });
  });
}

async function startGrpc(options: ModelServerOptions, host: string, port: number, rec: Recorder) {
  const limit = options.grpcMaxConcurrentStreams;
  const server = new grpc.Server(limit === undefined ? GRPC_SERVER_OPTIONS : { ...GRPC_SERVER_OPTIONS, 'grpc.max_concurrent_streams': limit });
  const onCancel = (path: string) => rec.record('cancelled', path);
  server.addService(serviceConstructor(KSERVE_SERVICE).service, kserveHandlers(onCancel));
  if (options.testService) server.addService(serviceConstructor(ECHO_SERVICE).service, echoHandlers(onCancel));
  const bound = await bindGrpc(server, host, port);
  tapRawHeaders(server, (stream, headers) => {
    rec.received.push({ protocol: 'grpc', path: String(headers[':path'] ?? ''), headers: copyHeaders(headers) });
    rec.mostGrpcStreamsOpen = Math.max(rec.mostGrpcStreamsOpen, ++rec.grpcStreamsOpen);
    stream.once('close', () => rec.grpcStreamsOpen--);
  });
  return { server, port: bound };
}

async function startRest(options: ModelServerOptions, host: string, port: number, rec: Recorder) {
  const server = createRestServer({
    sseGate: options.sseGate,
    onRequest: (path, headers) => rec.received.push({ protocol: 'rest', path, headers }),
    onAborted: (path) => rec.record('restAborted', path),
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err) => reject(new Error(`stand-in REST cannot listen on ${hostAndPort(host, port)}: ${err.message}`, { cause: err })));
    server.listen(port, host, resolve);
  });
  return { server, port: (server.address() as AddressInfo).port };
}

function closeRest(server: http.Server): Promise<void> {
  return new Promise((resolve) => {
    server.close(() => resolve());
    // close() alone waits for keep-alive sockets and open SSE streams.
    server.closeAllConnections();
  });
}

export async function startModelServer(options: ModelServerOptions = {}): Promise<ModelServer> {
  const host = options.host ?? '127.0.0.1';
  const rec = new Recorder();
  const grpcSide = options.grpcPort == null ? undefined : await startGrpc(options, host, options.grpcPort, rec);
  let restSide: Awaited<ReturnType<typeof startRest>> | undefined;
  try {
    restSide = options.restPort == null ? undefined : await startRest(options, host, options.restPort, rec);
  } catch (err) {
    grpcSide?.server.forceShutdown();
    throw err;
  }
  return {
    grpcPort: grpcSide?.port,
    restPort: restSide?.port,
    received: rec.received,
    cancelled: rec.cancelled,
    restAborted: rec.restAborted,
    get mostGrpcStreamsOpen() {
      return rec.mostGrpcStreamsOpen;
    },
    waitFor: (kind, path) => rec.waitFor(kind, path),
    async close() {
      // forceShutdown cancels live calls and destroys sessions at once,
      // unlike tryShutdown which waits for Hold calls that never end.
      grpcSide?.server.forceShutdown();
      if (restSide) await closeRest(restSide.server);
    },
  };
}
