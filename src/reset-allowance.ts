import { constants, type Http2Stream } from 'node:http2';

/**
 * nghttp2 (1.57 on, inside Node) answers rapid reset (CVE-2023-44487) with a token bucket of the
 * RST_STREAM frames a client may send on one connection: 1,000 at first, 33 more each second
 * (whole seconds). Once it runs dry, nghttp2 ends the connection with GOAWAY(INTERNAL_ERROR),
 * failing the request in flight; Node 20 ignores the options later versions take for it
 * (`streamResetBurst`, `streamResetRate`: set, curl failed at the same requests).
 * curl 7.88 (Debian 12) sends RST_STREAM(STREAM_CLOSED) after every request it completes, even
 * one the answer's END_STREAM closed, so a URL list or `--parallel` run of more than ~1,000
 * requests on one connection failed one with "Error in the HTTP2 framing layer", then again
 * every ~1,000. Resets of streams already closed reach no JavaScript event, but each follows a
 * stream the client opened: opened streams, taken from a bucket of the same size and refill,
 * bound them. A graceful GOAWAY (NO_ERROR, the last stream taken) before it runs dry lets the
 * streams in flight finish, and curl goes on over a new connection. For curl alone (its
 * User-Agent, REST port): other clients send no such resets, and for them the GOAWAY only cost
 * reconnects and refused the requests they had sent past it.
 */
export const RESET_BURST = 1000;
export const RESETS_PER_SECOND = 33;

/** The code of the h2_session_error line and metric for a client cut for rapid reset: by the gRPC relay, or by nghttp2 in terminate mode. */
export const RAPID_RESET = 'RAPID_RESET';
/**
 * Streams kept in hand: nghttp2 refills at the seconds it sees a reset and this bucket at those
 * it sees a stream, so the two can differ by a second or two of refill, and our GOAWAY must be
 * submitted before the resets of the streams already opened arrive (nghttp2 stops counting then).
 */
const HEADROOM = 150;

/**
 * Per HTTP/2 connection: whether the client's streams so far leave room for as many resets. The gRPC
 * relay counts the client's resets themselves, with no headroom (`headroom` 0): nghttp2's own budget.
 * Terminate mode's fronts count them to its first reset past it (`headroom` -1), where nghttp2 sends its GOAWAY.
 */
export class ResetAllowance {
  readonly #headroom: number;
  #left = RESET_BURST;
  #second = wholeSecondsNow();

  constructor(headroom = HEADROOM) {
    this.#headroom = headroom;
  }

  /** What is left of the budget at the last take(): negative past it. */
  get left(): number {
    return this.#left;
  }

  /** Counts `streams` newly opened (or reset); false once they come within the headroom of what nghttp2 allows. */
  take(streams: number): boolean {
    const second = wholeSecondsNow();
    if (second > this.#second) {
      this.#left = Math.min(RESET_BURST, this.#left + (second - this.#second) * RESETS_PER_SECOND);
      this.#second = second;
    }
    this.#left -= streams;
    return this.#left > this.#headroom;
  }
}

/** Client streams the proxy reset itself: no RST_STREAM of the client's, none nghttp2 counts. */
const RESET_BY_PROXY = new WeakSet<Http2Stream>();

/** Resets a client's stream with `code`, as the proxy's own reset (see resetByClient()). */
export function resetClientStream(stream: Http2Stream, code: number): void {
  RESET_BY_PROXY.add(stream);
  stream.close(code);
}

/** Whether a closed client stream ended with a reset of the client's (an RST_STREAM with an error code, CANCEL included). */
export function resetByClient(stream: Http2Stream): boolean {
  const code = stream.rstCode;
  return code !== undefined && code !== constants.NGHTTP2_NO_ERROR && !RESET_BY_PROXY.has(stream);
}

function wholeSecondsNow(): number {
  return Math.floor(performance.now() / 1000);
}
