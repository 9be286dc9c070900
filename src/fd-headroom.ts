/**
 * Keeps spare file descriptors under the open-files limit (RLIMIT_NOFILE) by refusing new
 * connections before the limit is reached, as nginx does with worker_connections.
 *
 * At the limit itself Node gives no sign: libuv accepts and closes (resets) every new
 * connection without a callback, so nothing was logged. Worse, a cluster worker at its
 * limit cannot receive the connections the primary hands it (the descriptor is dropped in
 * transit); after a few retries the primary gives up on that worker for good, and once
 * every worker had been full, each new connection waited in the primary for ever, also
 * after the descriptors were freed: the port served nothing until a restart.
 */
import { readdirSync, readFileSync } from 'node:fs';
import type { Logger } from './log.js';

/** A connection may take two: its own and, relayed or forwarded, one to the model server. */
const DESCRIPTORS_PER_CONNECTION = 2;
/** At most one warning per this long while connections are refused; the others are counted in the next. */
const REFUSAL_LOG_INTERVAL_MS = 10_000;
/** While no connection fits, the descriptors are counted again at most this often (or 10 times as long as counting took). */
const MIN_RECOUNT_WHILE_FULL_MS = 100;

/** The soft open-files limit from /proc/self/limits; undefined where unknown (not Linux) or unlimited. */
export function openFilesLimit(limitsText?: string): number | undefined {
  let text = limitsText;
  if (text === undefined) {
    try {
      text = readFileSync('/proc/self/limits', 'utf8');
    } catch {
      return undefined;
    }
  }
  const soft = /^Max open files\s+(\d+)/m.exec(text)?.[1];
  return soft === undefined ? undefined : Number(soft);
}

/**
 * Descriptors kept free: for the connection the primary hands a worker next, the upstream
 * connections of handshakes under way, a certificate reload's files, the admin port.
 */
export function reservedDescriptors(limit: number): number {
  return Math.max(16, Math.ceil(limit / 64));
}

/** Open descriptors of this process; at the limit even the count cannot be taken, and that says enough. */
function openDescriptors(): number {
  try {
    // Less the one readdir opened to list them.
    return readdirSync('/proc/self/fd').length - 1;
  } catch {
    return Number.POSITIVE_INFINITY;
  }
}

/** What admit() needs of a connection: to hear when it closes. */
export interface Closable {
  on(event: 'close', listener: () => void): unknown;
}

export interface HeadroomProbes {
  /** Open descriptors now (default: listed in /proc/self/fd). */
  readonly count?: () => number;
  /** Milliseconds, monotonic (default: performance.now). */
  readonly now?: () => number;
}

export class DescriptorHeadroom {
  readonly limit: number;
  readonly #ceiling: number;
  readonly #logger: Logger;
  readonly #count: () => number;
  readonly #now: () => number;
  /**
   * Never below the descriptors open, so most admissions count nothing: the last count, plus
   * two per connection admitted since, less one per such connection closed (its own
   * descriptor; a pooled upstream one may stay).
   */
  #estimate: number;
  /** Listing /proc/self/fd takes ~0.8 µs per descriptor: never again before this, so that a flood at the limit cannot spin on it. */
  #nextCountAt = Number.NEGATIVE_INFINITY;
  #refusing = false;
  #refusedSinceLine = 0;
  #lastLineAt = Number.NEGATIVE_INFINITY;

  constructor(limit: number, logger: Logger, probes: HeadroomProbes = {}) {
    this.limit = limit;
    this.#ceiling = limit - reservedDescriptors(limit);
    this.#logger = logger;
    this.#count = probes.count ?? openDescriptors;
    this.#now = probes.now ?? (() => performance.now());
    this.#estimate = this.#count();
  }

  /** This process's, or none where the limit is unknown or unlimited. */
  static forThisProcess(logger: Logger): DescriptorHeadroom | undefined {
    const limit = openFilesLimit();
    return limit === undefined ? undefined : new DescriptorHeadroom(limit, logger);
  }

  /** Called for a connection just accepted (already holding its descriptor): false = close it now. */
  admit(connection: Closable): boolean {
    if (this.#estimate + DESCRIPTORS_PER_CONNECTION <= this.#ceiling) {
      this.#estimate += DESCRIPTORS_PER_CONNECTION;
    } else if (!this.#roomAfterCounting(1)) {
      this.#refused();
      return false;
    }
    // on(): 'close' comes once, and once() keeps a wrapper for the connection's life.
    connection.on('close', () => this.#estimate--);
    if (this.#refusing) this.#maybeRecovered();
    return true;
  }

  /**
   * Whether a connection accepted now would be taken: /readyz fails while none would, so that the
   * Service sends new clients to replicas that can take them. Counted again, when the estimate says
   * no, as admit() counts: a readiness answer must not stay "full" after the connections ended.
   */
  hasRoom(): boolean {
    return this.#estimate + DESCRIPTORS_PER_CONNECTION <= this.#ceiling || this.#roomAfterCounting(0);
  }

  /** Counts the descriptors unless it did so too recently; true when one more connection fits besides the `accepted` one already in the count. */
  #roomAfterCounting(accepted: 0 | 1): boolean {
    const started = this.#now();
    if (started < this.#nextCountAt) return false;
    const others = this.#count() - accepted;
    const took = this.#now() - started;
    // The accepted connection's upstream descriptor may not be open yet; refused, its own is freed at once.
    const room = others + DESCRIPTORS_PER_CONNECTION <= this.#ceiling;
    this.#estimate = room && accepted ? others + DESCRIPTORS_PER_CONNECTION : others;
    this.#nextCountAt = started + (room ? 10 * took : Math.max(MIN_RECOUNT_WHILE_FULL_MS, 10 * took));
    return room;
  }

  #refused(): void {
    this.#refusing = true;
    this.#refusedSinceLine++;
    const now = this.#now();
    if (now - this.#lastLineAt < REFUSAL_LOG_INTERVAL_MS) return;
    this.#lastLineAt = now;
    const open = Math.min(this.#estimate, this.limit);
    this.#logger.warn(
      { event: 'open_files_exhausted', limit: this.limit, open, refused: this.#refusedSinceLine },
      `open-files limit ${this.limit} nearly reached (about ${open} open, ${this.limit - this.#ceiling} kept spare): new connections are closed at once ` +
        `until connections end; raise the limit (ulimit -n, the container's nofile ulimit or systemd LimitNOFILE) or lower --mtls_max_connections`,
    );
    this.#refusedSinceLine = 0;
  }

  /** Said once the warning's interval has passed: at the limit, admissions and refusals alternate as connections end. */
  #maybeRecovered(): void {
    const now = this.#now();
    if (now - this.#lastLineAt < REFUSAL_LOG_INTERVAL_MS) return;
    this.#refusing = false;
    this.#lastLineAt = now;
    this.#logger.info(
      { event: 'open_files_available', limit: this.limit, refused: this.#refusedSinceLine },
      `accepting connections again (open-files limit ${this.limit}; ${this.#refusedSinceLine} more refused since the last warning)`,
    );
    this.#refusedSinceLine = 0;
  }
}
