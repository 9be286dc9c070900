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

export class DescriptorHeadroom {
  readonly limit: number;
  readonly #ceiling: number;
  readonly #logger: Logger;
  readonly #count: () => number;
  /** Never below the descriptors open: the last count plus two per connection admitted since, so most admissions count nothing. */
  #estimate: number;
  #refusing = false;
  #refusedSinceLine = 0;
  #lastLineAt = Number.NEGATIVE_INFINITY;

  constructor(limit: number, logger: Logger, count: () => number = openDescriptors) {
    this.limit = limit;
    this.#ceiling = limit - reservedDescriptors(limit);
    this.#logger = logger;
    this.#count = count;
    this.#estimate = count();
  }

  /** This process's, or none where the limit is unknown or unlimited. */
  static forThisProcess(logger: Logger): DescriptorHeadroom | undefined {
    const limit = openFilesLimit();
    return limit === undefined ? undefined : new DescriptorHeadroom(limit, logger);
  }

  /** Called for a connection just accepted (already holding its descriptor): false = close it now. */
  admit(): boolean {
    if (this.#estimate + DESCRIPTORS_PER_CONNECTION > this.#ceiling) {
      const open = this.#count();
      // This connection is in the count; its upstream one may not be yet.
      this.#estimate = open + DESCRIPTORS_PER_CONNECTION - 1;
      if (this.#estimate > this.#ceiling) {
        this.#refused(open);
        return false;
      }
    } else {
      this.#estimate += DESCRIPTORS_PER_CONNECTION;
    }
    if (this.#refusing) this.#maybeRecovered();
    return true;
  }

  #refused(open: number): void {
    this.#refusing = true;
    this.#refusedSinceLine++;
    const now = performance.now();
    if (now - this.#lastLineAt < REFUSAL_LOG_INTERVAL_MS) return;
    this.#lastLineAt = now;
    const openText = Number.isFinite(open) ? `${open} open` : 'all in use';
    this.#logger.warn(
      { event: 'open_files_exhausted', limit: this.limit, open: Number.isFinite(open) ? open : this.limit, refused: this.#refusedSinceLine },
      `open-files limit ${this.limit} nearly reached (${openText}, ${this.limit - this.#ceiling} kept spare): new connections are closed at once ` +
        `until connections end; raise the limit (ulimit -n, the container's nofile ulimit or systemd LimitNOFILE) or lower --mtls_max_connections`,
    );
    this.#refusedSinceLine = 0;
  }

  /** Said once the warning's interval has passed: at the limit, admissions and refusals alternate as connections end. */
  #maybeRecovered(): void {
    const now = performance.now();
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
