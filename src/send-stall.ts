import type { TLSSocket } from 'node:tls';
import { SWEEPS_PER_IDLE_TIMEOUT } from './idle-sweep.js';
import { parentOf } from './listeners.js';

/**
 * Bytes moved on the TCP connection under a TLS socket so far, both ways: what the client sent,
 * and what the kernel took from ours. The TCP socket's count of written bytes grows only as Node
 * hands it the next write, once the kernel has taken the one before whole; the kernel wakes a
 * writer only when about a third of its send buffer has drained (Linux: free space at least half
 * of what is queued), so a slow reader moves it in steps (README, slow readers). Under HTTP/2 the
 * TLS socket's own counts stand still, hence the TCP socket's.
 */
export function tcpBytesMoved(socket: TLSSocket): number {
  const tcp = parentOf(socket) ?? socket;
  return tcp.bytesRead + tcp.bytesWritten;
}

/** Bytes the client has sent on the TCP connection under a TLS socket so far (TLS records, handshake included). */
export function tcpBytesRead(socket: TLSSocket): number {
  return (parentOf(socket) ?? socket).bytesRead;
}

/** A connection seen with bytes waiting for its client: how far it had moved then, and since when it has not moved. */
interface Waiting {
  readonly moved: number;
  readonly since: number;
}

/**
 * nginx's send_timeout for the connections whose answers go through the TLS socket's own writes:
 * HTTP/1.1 in both REST modes and the gRPC relay (HTTP/2 terminated by Node writes below it, and
 * has its PING rule in http-fronts.ts). A connection whose socket holds bytes it could not hand to
 * the kernel, with no byte moving either way on its TCP connection for the idle timeout, has a
 * client that takes nothing: stopped (SIGSTOP, a debugger), wedged, or gone without a FIN or reset
 * reaching us. Backpressure had held its model-server request, and the connection, for as long as
 * that lasted (a stopped client's kernel keeps answering with a zero window, so TCP never gives up).
 * A quiet response (an SSE stream between events) has nothing waiting and is never told; a slow
 * reader is told only when the kernel took nothing of ours for the whole timeout.
 *
 * One timer for all of a listener's connections, as the idle sweep: every quarter of the timeout,
 * so a client is told between 1 and 1.5 times the timeout after its last byte moved.
 */
export class SendStallSweeper<T> {
  readonly #ms: number;
  readonly #connections: ReadonlyMap<TLSSocket, T>;
  readonly #onStall: (socket: TLSSocket, connection: T, waitingBytes: number) => void;
  readonly #waiting = new WeakMap<TLSSocket, Waiting>();
  #timer: NodeJS.Timeout | undefined;

  constructor(ms: number, connections: ReadonlyMap<TLSSocket, T>, onStall: (socket: TLSSocket, connection: T, waitingBytes: number) => void) {
    this.#ms = ms;
    this.#connections = connections;
    this.#onStall = onStall;
  }

  /** A connection was added: sweeps run while there are any. */
  start(): void {
    this.#timer ??= setInterval(() => this.#sweep(), Math.max(10, this.#ms / SWEEPS_PER_IDLE_TIMEOUT)).unref();
  }

  /** Stops the sweeps once no connection is left. */
  stopIfEmpty(): void {
    if (this.#connections.size > 0 || !this.#timer) return;
    clearInterval(this.#timer);
    this.#timer = undefined;
  }

  #sweep(): void {
    const now = performance.now();
    for (const [socket, connection] of this.#connections) {
      const waitingBytes = socket.writableLength;
      if (waitingBytes === 0 || socket.destroyed) {
        this.#waiting.delete(socket);
        continue;
      }
      const moved = tcpBytesMoved(socket);
      const seen = this.#waiting.get(socket);
      if (seen === undefined || seen.moved !== moved) this.#waiting.set(socket, { moved, since: now });
      else if (now - seen.since >= this.#ms) {
        this.#waiting.delete(socket);
        this.#onStall(socket, connection, waitingBytes);
      }
    }
  }
}
