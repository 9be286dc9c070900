/**
 * Lines anyone who can reach a public port causes at will, with no certificate: a failed
 * handshake (a TCP connect that hangs up, a plaintext request), a refused one (no
 * certificate, a self-made one, a connection over --mtls_max_connections). Each was a line
 * of ~300 bytes: a scanner's 10,000 connections a minute wrote 3 MB a minute, 4 GB a day,
 * to a log nobody rotates by default (docker's json-file), while the counters in
 * ovms_mtls_handshakes_total already said as much. So each kind of line (its key, e.g.
 * event, listener and reason) is written in full a few times per window; the rest are
 * counted and said in one line per kind when the window ends. Keys come from bounded
 * sets, and the counts are dropped at each window's end.
 */

export interface RepeatLimit {
  /** Lines of one key written in full per window. */
  readonly perWindow: number;
  readonly windowMs: number;
}

export const DEFAULT_REPEAT_LIMIT: RepeatLimit = { perWindow: 10, windowMs: 10_000 };

/** Writes the summary of `count` lines of one key held back in a window. */
export type WriteSummary = (count: number, limit: RepeatLimit) => void;

export class RepeatBudget {
  readonly #limit: RepeatLimit;
  readonly #now: () => number;
  #windowStart = -Infinity;
  readonly #written = new Map<string, number>();
  readonly #held = new Map<string, { count: number; summarize: WriteSummary }>();
  #timer: NodeJS.Timeout | undefined;

  constructor(limit: RepeatLimit = DEFAULT_REPEAT_LIMIT, now: () => number = () => performance.now()) {
    this.#limit = limit;
    this.#now = now;
  }

  /** Calls `write` for a line within the budget of `key`; else counts it for `summarize`, called at the end of the window. */
  offer(key: string, write: () => void, summarize: WriteSummary): void {
    const now = this.#now();
    if (now - this.#windowStart >= this.#limit.windowMs) {
      this.flush();
      this.#windowStart = now;
    }
    const written = this.#written.get(key) ?? 0;
    if (written < this.#limit.perWindow) {
      this.#written.set(key, written + 1);
      write();
      return;
    }
    const held = this.#held.get(key);
    if (held) held.count++;
    else this.#held.set(key, { count: 1, summarize });
    // Unref'd: a quiet process exits without waiting for it; flush() at shutdown says what was held.
    this.#timer ??= setTimeout(() => this.flush(), this.#windowStart + this.#limit.windowMs - now).unref();
  }

  /** Writes the summaries of what the window held back, and ends it. */
  flush(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    const held = [...this.#held.values()];
    this.#held.clear();
    this.#written.clear();
    this.#windowStart = -Infinity;
    for (const { count, summarize } of held) summarize(count, this.#limit);
  }
}
