import { connect, type Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import type { HostPort } from './config.js';
import type { ConnectionContext } from './listeners.js';
import type { Drainable } from './http-fronts.js';
import type { ListenerName, ProxyObserver } from './observer.js';
import { failIfNotConnectedWithin } from './upstream-connect.js';
import { describeUpstreamError } from './upstream-errors.js';

/** One client connection joined to its own upstream connection. */
export interface RelayedConnection {
  /**
   * Let what is in flight finish, start nothing new, then close (drain, revocation). `keepAliveGraceMs`
   * (a drain, HTTP/1.1): how long a connection whose last answer said keep-alive waits for the request its
   * client may be sending already (Drainable.drain()).
   */
  closeGracefully(keepAliveGraceMs?: number): void;
  /** The shutdown timeout is running out: end what is in flight now, saying why where the protocol can. */
  endNow?(message: string): void;
}

export interface RelayOptions {
  readonly listener: ListenerName;
  readonly upstream: HostPort;
  /** A blackholed upstream must not hold a client for long before it falls back. */
  readonly connectTimeoutMs: number;
  readonly observer: ProxyObserver;
  /** Why the upstream cannot take requests yet, or undefined when ready. */
  readonly notReady?: (() => string | undefined) | undefined;
  /** Where a connection goes when it cannot be relayed: the terminating front, which answers with the reason. */
  readonly fallback: (socket: TLSSocket, context: ConnectionContext) => void;
  /**
   * Joins an authorized client socket and a connected upstream socket. `handBack`: the joined
   * connection gives the client up before relaying anything to it (the upstream turned out not to
   * be what it relays to), all it read from the client back in the socket: the fallback takes it.
   */
  readonly join: (client: TLSSocket, upstream: Socket, context: ConnectionContext, handBack: () => void) => RelayedConnection;
}

/**
 * A client that sent its first bytes while the relay was connecting upstream waited from when
 * the relay took it: the access lines of its first requests count from there (requestStart).
 * One that has sent nothing yet (a connection opened ahead of its use) was not kept waiting.
 */
function noteHold(socket: TLSSocket, context: ConnectionContext, heldSince: number): void {
  if (socket.readableLength > 0) context.heldSince = heldSince;
}

/**
 * The relay modes (ghostunnel's model): after the client certificate has been
 * judged, each client connection gets one upstream connection of its own and
 * the decrypted bytes flow between them. What is relayed per protocol is in
 * grpc-relay.ts (HTTP/2 frames) and rest-relay.ts (HTTP/1.1 messages).
 */
export class Relay implements Drainable {
  readonly #options: RelayOptions;
  readonly #relayed = new Map<TLSSocket, RelayedConnection>();
  /** Set by drain(), its keep-alive grace: also for a connection whose upstream connection was still being made when it began. */
  #drainGraceMs: number | undefined;

  constructor(options: RelayOptions) {
    this.#options = options;
  }

  accept(socket: TLSSocket, context: ConnectionContext): void {
    const { upstream: target, observer, listener, fallback } = this.#options;
    if (this.#drainGraceMs !== undefined || this.#options.notReady?.() !== undefined) {
      fallback(socket, context);
      return;
    }
    const heldSince = performance.now();
    const upstream = connect({ host: target.host, port: target.port, noDelay: true });
    failIfNotConnectedWithin(upstream, this.#options.connectTimeoutMs);
    const onConnectError = (err: NodeJS.ErrnoException) => {
      observer.upstreamError(listener, err.code ?? 'connect_error', describeUpstreamError(target, err).message);
      // Not one byte has been read from the client yet: the terminating front gets the whole connection.
      if (socket.destroyed) return;
      noteHold(socket, context, heldSince);
      fallback(socket, context);
    };
    upstream.once('error', onConnectError);
    upstream.once('connect', () => {
      upstream.off('error', onConnectError);
      if (socket.destroyed) {
        upstream.destroy();
        return;
      }
      noteHold(socket, context, heldSince);
      const handBack = () => {
        this.#relayed.delete(socket);
        if (!socket.destroyed) fallback(socket, context);
      };
      const relayed = this.#options.join(socket, upstream, context, handBack);
      this.#relayed.set(socket, relayed);
      socket.on('close', () => this.#relayed.delete(socket));
      // Taken before the drain, its client may have written its first request already, as on a kept-alive connection.
      if (this.#drainGraceMs !== undefined) relayed.closeGracefully(this.#drainGraceMs);
    });
  }

  drain(keepAliveGraceMs: number): void {
    this.#drainGraceMs = keepAliveGraceMs;
    for (const relayed of this.#relayed.values()) relayed.closeGracefully(keepAliveGraceMs);
  }

  /** Ends what each relayed connection has in flight (RelayedConnection.endNow). */
  endAll(message: string): void {
    for (const relayed of this.#relayed.values()) relayed.endNow?.(message);
  }

  /** False when the socket is not relayed (it went to the fallback front). */
  closeConnection(socket: TLSSocket): boolean {
    const relayed = this.#relayed.get(socket);
    relayed?.closeGracefully();
    return relayed !== undefined;
  }
}
