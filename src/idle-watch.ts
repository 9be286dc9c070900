/**
 * Tells when a multiplexed connection has had no stream open for `ms`
 * (nginx's keepalive_timeout for HTTP/2, Envoy's idle_timeout). Opening and
 * closing a stream costs a counter and a timestamp; the one timer per
 * connection is re-armed only when it fires.
 */
export class IdleWatch {
  readonly #ms: number;
  /** Called once idle; returns true to be called again after another idle spell. */
  readonly #onIdle: () => boolean;
  #open = 0;
  #idleSince = performance.now();
  #timer: NodeJS.Timeout;

  constructor(ms: number, onIdle: () => boolean) {
    this.#ms = ms;
    this.#onIdle = onIdle;
    this.#timer = this.#arm(ms);
  }

  opened(): void {
    this.#open++;
  }

  closed(): void {
    if (--this.#open === 0) this.#idleSince = performance.now();
  }

  stop(): void {
    clearTimeout(this.#timer);
  }

  #arm(ms: number): NodeJS.Timeout {
    return setTimeout(() => this.#check(), ms).unref();
  }

  #check(): void {
    if (this.#open > 0) {
      this.#timer.refresh();
      return;
    }
    const left = this.#idleSince + this.#ms - performance.now();
    if (left >= 1) {
      this.#timer = this.#arm(left);
    } else if (this.#onIdle()) {
      this.#idleSince = performance.now();
      this.#timer = this.#arm(this.#ms);
    }
  }
}
