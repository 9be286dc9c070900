/** How many streams a connection has open, and since when it has had none. */
export interface StreamActivity {
  readonly open: number;
  /** performance.now() when the last stream closed (or the connection opened). */
  readonly idleSince: number;
}

/** Counts a terminated HTTP/2 session's streams as they open and close. */
export class StreamCount implements StreamActivity {
  open = 0;
  idleSince = performance.now();

  opened(): void {
    this.open++;
  }

  closed(): void {
    if (--this.open === 0) this.idleSince = performance.now();
  }
}

export interface IdleConnection {
  readonly streams: StreamActivity;
  /** No stream open for the timeout. Returns true to be told again after another idle spell. */
  closeIdle(): boolean;
  /** At every sweep, streams open or not. */
  watch?(): void;
}

/** Sweeps in one idle timeout: a connection is told between 1 and 1 + 1/this of the timeout after its last stream closed. */
export const SWEEPS_PER_IDLE_TIMEOUT = 4;

/**
 * Closes multiplexed connections that have had no stream open for `ms`
 * (nginx's keepalive_timeout for HTTP/2, Envoy's idle_timeout). One timer for
 * all of them, sweeping every quarter of the timeout: a connection costs a
 * set entry, not a timer of its own, and is told between 1 and 1.25 times the
 * timeout after its last stream closed.
 */
export class IdleSweeper {
  readonly #ms: number;
  readonly #connections = new Set<IdleConnection>();
  /** Connections that asked to be told again: when their new idle spell began. */
  readonly #toldAt = new Map<IdleConnection, number>();
  #timer: NodeJS.Timeout | undefined;

  constructor(ms: number) {
    this.#ms = ms;
  }

  add(connection: IdleConnection): void {
    this.#connections.add(connection);
    this.#timer ??= setInterval(() => this.#sweep(), Math.max(10, this.#ms / SWEEPS_PER_IDLE_TIMEOUT)).unref();
  }

  delete(connection: IdleConnection): void {
    this.#connections.delete(connection);
    this.#toldAt.delete(connection);
    if (this.#connections.size === 0 && this.#timer) {
      clearInterval(this.#timer);
      this.#timer = undefined;
    }
  }

  #sweep(): void {
    const now = performance.now();
    for (const connection of this.#connections) {
      connection.watch?.();
      const { open, idleSince } = connection.streams;
      if (open > 0 || now - Math.max(idleSince, this.#toldAt.get(connection) ?? idleSince) < this.#ms) continue;
      if (connection.closeIdle()) this.#toldAt.set(connection, now);
      else this.delete(connection);
    }
  }
}
