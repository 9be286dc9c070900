import { connect, type Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import type { HostPort } from './config.js';
import type { ConnectionContext } from './listeners.js';
import type { Drainable } from './http-fronts.js';
import { elapsedMs, type ProxyObserver } from './observer.js';
import { CLIENT_PREFACE_BYTES, FrameCursor, GoAwayInserter, TYPE_HEADERS } from './h2-frames.js';

/** A blackholed upstream must not hold a client forever before it falls back. */
const UPSTREAM_CONNECT_TIMEOUT_MS = 10_000;

export interface GrpcRelayOptions {
  readonly upstream: HostPort;
  readonly observer: ProxyObserver;
  /** Why the upstream cannot take calls yet, or undefined when ready. */
  readonly notReady?: (() => string | undefined) | undefined;
  /** Where a connection goes when it cannot be relayed: the terminating HTTP/2 front, which answers UNAVAILABLE per call. */
  readonly fallback: (socket: TLSSocket, context: ConnectionContext) => void;
}

/**
 * `--mtls_grpc_mode relay`: after the client certificate has been judged, the
 * decrypted HTTP/2 bytes go to one upstream h2c connection per client
 * connection, as they are. No per-call HTTP/2 work, so a call costs a fraction
 * of what terminating costs; the price is no x-forwarded-client-cert and one
 * access line per connection instead of per call (README, "gRPC modes").
 */
export class GrpcRelay implements Drainable {
  readonly #options: GrpcRelayOptions;
  readonly #relayed = new Map<TLSSocket, RelayedConnection>();
  #draining = false;

  constructor(options: GrpcRelayOptions) {
    this.#options = options;
  }

  accept(socket: TLSSocket, context: ConnectionContext): void {
    if (this.#draining || this.#options.notReady?.() !== undefined) {
      this.#options.fallback(socket, context);
      return;
    }
    const upstream = connect({ host: this.#options.upstream.host, port: this.#options.upstream.port, noDelay: true });
    upstream.setTimeout(UPSTREAM_CONNECT_TIMEOUT_MS, () => upstream.destroy(Object.assign(new Error('connect timeout'), { code: 'ETIMEDOUT' })));
    const onConnectError = (err: NodeJS.ErrnoException) => {
      this.#options.observer.upstreamError('grpc', err.code ?? 'connect_error');
      // Not one byte has been read from the client yet: the HTTP/2 front gets the whole connection.
      if (!socket.destroyed) this.#options.fallback(socket, context);
    };
    upstream.once('error', onConnectError);
    upstream.once('connect', () => {
      upstream.off('error', onConnectError);
      upstream.setTimeout(0);
      if (socket.destroyed) {
        upstream.destroy();
        return;
      }
      const relayed = new RelayedConnection(socket, upstream, context, this.#options.observer);
      this.#relayed.set(socket, relayed);
      socket.once('close', () => this.#relayed.delete(socket));
      if (this.#draining) relayed.goAway();
    });
  }

  /** Tells every relayed client to open no new calls; each connection closes when its client is done. */
  drain(): void {
    this.#draining = true;
    for (const relayed of this.#relayed.values()) relayed.goAway();
  }

  /** False when the socket is not relayed (it went to the fallback front). */
  closeConnection(socket: TLSSocket): boolean {
    const relayed = this.#relayed.get(socket);
    relayed?.goAway();
    return relayed !== undefined;
  }
}

/** One client connection and its own upstream connection, with backpressure both ways. */
class RelayedConnection {
  readonly #client: TLSSocket;
  readonly #upstream: Socket;
  readonly #context: ConnectionContext;
  readonly #observer: ProxyObserver;
  readonly #started = performance.now();
  /** Upstream-to-client frames, so a GOAWAY of ours never lands inside one of the upstream's. */
  readonly #toClient = new GoAwayInserter();
  /** Client-to-upstream frames: a HEADERS frame on a new stream id is a new call. */
  readonly #fromClient = new FrameCursor({ skip: CLIENT_PREFACE_BYTES, onFrame: (type, id) => this.#onClientFrame(type, id) });
  #calls = 0;
  #lastStreamId = 0;
  #bytesIn = 0;
  #bytesOut = 0;
  #error: string | undefined;
  /** Toward the client, pausing the upstream while the client is slow. */
  readonly #write = (chunk: Buffer): void => {
    if (!this.#client.write(chunk)) this.#upstream.pause();
  };

  constructor(client: TLSSocket, upstream: Socket, context: ConnectionContext, observer: ProxyObserver) {
    this.#client = client;
    this.#upstream = upstream;
    this.#context = context;
    this.#observer = observer;
    client.on('data', (chunk: Buffer) => {
      this.#bytesIn += chunk.length;
      this.#fromClient.advance(chunk);
      if (!upstream.write(chunk)) client.pause();
    });
    upstream.on('drain', () => client.resume());
    upstream.on('data', (chunk: Buffer) => {
      this.#bytesOut += chunk.length;
      this.#toClient.pass(chunk, this.#write);
    });
    client.on('drain', () => upstream.resume());
    client.once('end', () => upstream.end());
    upstream.once('end', () => client.end());
    client.on('error', (err: NodeJS.ErrnoException) => this.#failed('client_' + (err.code ?? 'error')));
    upstream.on('error', (err: NodeJS.ErrnoException) => {
      this.#failed('upstream_' + (err.code ?? 'error'));
      observer.upstreamError('grpc', err.code ?? 'error');
    });
    // Whichever side goes first, the other follows; written bytes are flushed before the FIN.
    client.once('close', () => {
      upstream.destroy();
      this.#report();
    });
    upstream.once('close', () => {
      if (this.#error) client.destroy();
      else client.end();
    });
  }

  /** Graceful: at the next frame boundary toward the client. */
  goAway(): void {
    this.#toClient.request(this.#write);
  }

  #onClientFrame(type: number, streamId: number): void {
    // Client stream ids only grow; a later HEADERS on a known stream is trailers.
    if (type !== TYPE_HEADERS || streamId <= this.#lastStreamId) return;
    this.#lastStreamId = streamId;
    this.#calls++;
  }

  #failed(reason: string): void {
    this.#error ??= reason;
  }

  #report(): void {
    const { identity, listener, remoteAddress } = this.#context;
    this.#observer.relayed({
      listener,
      remote: remoteAddress,
      subject: identity.subject,
      serial: identity.serial,
      calls: this.#calls,
      bytesIn: this.#bytesIn,
      bytesOut: this.#bytesOut,
      durationMs: elapsedMs(this.#started),
      goAway: this.#toClient.sent,
      error: this.#error,
    });
  }
}
