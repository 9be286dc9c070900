/**
 * Notices an OVMS run that stopped answering (deadlocked, or stopped with
 * SIGSTOP) for a whole timeout. It only watches and tells: the supervisor
 * decides what ending the run means. Like the supervisor it knows nothing
 * about HTTP: each check comes in as a callback.
 */

/** What one check found: OVMS gave an answer (any, "not ready" too), is stopped, or said nothing. */
export type Liveness = 'answers' | 'stopped' | 'silent';

export interface HangWatchOptions {
  /** No answer for this long (continuously) is a hang. */
  readonly timeoutMs: number;
  /** One check of OVMS's process; it should give up by itself after `hangCheckPeriodMs(timeoutMs)`. */
  readonly check: (pid: number) => Promise<Liveness>;
}

export interface Hang {
  readonly pid: number;
  /** Since the last answer (or since OVMS became ready). */
  readonly silentMs: number;
  /** The last check found the process stopped (SIGSTOP, SIGTSTP, a debugger), not merely silent. */
  readonly stopped: boolean;
}

const MIN_PERIOD_MS = 1000;
const MAX_PERIOD_MS = 10_000;

/**
 * Six checks per timeout, so one slow answer does not decide; at least a second apart
 * (a loopback answer must not be cut shorter than that), at most ten (a long timeout
 * still notices soon after it runs out).
 */
export function hangCheckPeriodMs(timeoutMs: number): number {
  return Math.min(MAX_PERIOD_MS, Math.max(MIN_PERIOD_MS, Math.round(timeoutMs / 6)));
}

/**
 * Watches one OVMS run from the moment it was ready: a check every period, one
 * at a time (a check still running when the next is due is waited for, not
 * doubled). A hang is called only after a check since the last answer found
 * nothing, so a timeout shorter than the period cannot fire before any check ran.
 */
export class HangWatch {
  readonly #pid: number;
  readonly #options: HangWatchOptions;
  readonly #onHang: (hang: Hang) => void;
  readonly #timer: NodeJS.Timeout;
  #lastAnswer = performance.now();
  #checking = false;
  #lastFound: Liveness = 'answers';
  #ended = false;

  constructor(pid: number, options: HangWatchOptions, onHang: (hang: Hang) => void) {
    this.#pid = pid;
    this.#options = options;
    this.#onHang = onHang;
    this.#timer = setInterval(() => this.#tick(), hangCheckPeriodMs(options.timeoutMs));
    // The watch never keeps the process alive by itself.
    this.#timer.unref();
  }

  /** No more checks, no hang reported after this (a check in flight is ignored). */
  end(): void {
    this.#ended = true;
    clearInterval(this.#timer);
  }

  #tick(): void {
    if (this.#ended) return;
    // A check slower than the period: it has not answered either.
    if (this.#checking) return this.#judge();
    this.#checking = true;
    void this.#options
      .check(this.#pid)
      .catch((): Liveness => 'silent')
      .then((found) => {
        this.#checking = false;
        if (this.#ended) return;
        this.#lastFound = found;
        if (found === 'answers') this.#lastAnswer = performance.now();
        else this.#judge();
      });
  }

  #judge(): void {
    const silentMs = performance.now() - this.#lastAnswer;
    if (silentMs < this.#options.timeoutMs) return;
    this.end();
    this.#onHang({ pid: this.#pid, silentMs: Math.round(silentMs), stopped: this.#lastFound === 'stopped' });
  }
}
