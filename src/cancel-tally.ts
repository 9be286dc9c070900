import type { ConnectionContext } from './listeners.js';

/**
 * Rapid reset (CVE-2023-44487): a client that opens HTTP/2 streams and resets them at once
 * had each one forwarded: on the gRPC port a stream opened and reset on the upstream
 * connection every client shares, on the REST port a new model server connection opened and
 * dropped, ~1,100 per connection before nghttp2's own limit answers GOAWAY. A connection that
 * has cancelled this many more requests than it completed gets its next ones forwarded one
 * event-loop turn later, once the rest of what it sent in the same read (its resets) has been
 * processed: a stream already reset by then never reaches the model server. Connections that
 * complete most of their requests (a deadline missed now and then) keep the direct path.
 */
export const CANCELS_BEFORE_DEFERRED_OPEN = 10;

/** Requests each client connection cancelled, less those it completed since; only connections that cancelled any are kept. */
export class CancelTally {
  readonly #counts = new WeakMap<ConnectionContext, number>();

  /** A request the client cancelled; one ended by a cut of ours (closedBy) is no cancel of the client's. */
  count(context: ConnectionContext): void {
    if (context.closedBy !== undefined) return;
    this.#counts.set(context, (this.#counts.get(context) ?? 0) + 1);
  }

  /** A request completed: one cancel fewer counts against the connection. */
  settle(context: ConnectionContext): void {
    const cancels = this.#counts.get(context);
    if (cancels) this.#counts.set(context, cancels - 1);
  }

  /** Whether this connection's new streams should wait a turn before going upstream. */
  defers(context: ConnectionContext): boolean {
    return (this.#counts.get(context) ?? 0) >= CANCELS_BEFORE_DEFERRED_OPEN;
  }
}
