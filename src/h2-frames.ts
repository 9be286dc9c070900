/**
 * Just enough HTTP/2 framing for the relay: where frames begin and end in one
 * direction of a connection, read from the 9-byte frame headers alone (RFC 9113
 * section 4.1: 24-bit payload length, type, flags, stream id). Payloads and
 * HPACK are never looked at.
 */
const FRAME_HEADER_BYTES = 9;
const TYPE_GOAWAY = 0x7;
const MAX_STREAM_ID = 0x7fffffff;

/** The client's connection preface (RFC 9113 section 3.4) comes before its first frame. */
export const CLIENT_PREFACE_BYTES = 24;
export const TYPE_HEADERS = 0x1;

export interface FrameCursorOptions {
  /** Bytes before the first frame (the client's preface). */
  readonly skip?: number;
  /** Called with each frame header as it is read. */
  readonly onFrame?: (type: number, streamId: number) => void;
}

export class FrameCursor {
  readonly #header = Buffer.alloc(FRAME_HEADER_BYTES);
  readonly #onFrame: ((type: number, streamId: number) => void) | undefined;
  #skip: number;
  #headerFill = 0;
  #payloadLeft = 0;
  #frames = 0;

  constructor(options: FrameCursorOptions = {}) {
    this.#skip = options.skip ?? 0;
    this.#onFrame = options.onFrame;
  }

  /** Between two frames, after at least one whole frame (a GOAWAY may not precede the peer's SETTINGS). */
  get atBoundary(): boolean {
    return this.#frames > 0 && this.#headerFill === 0 && this.#payloadLeft === 0;
  }

  /**
   * Follows the frames in `chunk`. With `stopAtBoundary`, stops at the first
   * frame boundary strictly inside the chunk and returns its offset; otherwise
   * (or when there is none) consumes it all and returns its length.
   */
  advance(chunk: Buffer, stopAtBoundary = false): number {
    const length = chunk.length;
    let i = 0;
    while (i < length) {
      if (this.#skip > 0) {
        const n = Math.min(this.#skip, length - i);
        this.#skip -= n;
        i += n;
        continue;
      }
      if (this.#payloadLeft > 0) {
        const n = Math.min(this.#payloadLeft, length - i);
        this.#payloadLeft -= n;
        i += n;
      } else if (this.#headerFill === 0 && length - i >= FRAME_HEADER_BYTES) {
        this.#payloadLeft = chunk.readUIntBE(i, 3);
        this.#onFrame?.(chunk[i + 3]!, chunk.readUInt32BE(i + 5) & MAX_STREAM_ID);
        i += FRAME_HEADER_BYTES;
      } else {
        const n = Math.min(FRAME_HEADER_BYTES - this.#headerFill, length - i);
        chunk.copy(this.#header, this.#headerFill, i, i + n);
        this.#headerFill += n;
        i += n;
        if (this.#headerFill < FRAME_HEADER_BYTES) continue;
        this.#headerFill = 0;
        this.#payloadLeft = this.#header.readUIntBE(0, 3);
        this.#onFrame?.(this.#header[3]!, this.#header.readUInt32BE(5) & MAX_STREAM_ID);
      }
      if (this.#payloadLeft === 0 && this.#headerFill === 0) {
        this.#frames++;
        if (stopAtBoundary && i < length) return i;
      }
    }
    return length;
  }
}

/**
 * One direction toward the client: passes the upstream's bytes on and, when
 * asked, slips a graceful GOAWAY in at the next frame boundary.
 */
export class GoAwayInserter {
  readonly #cursor = new FrameCursor();
  #pending = false;
  #sent = false;

  get sent(): boolean {
    return this.#sent;
  }

  /** Sends the GOAWAY now if between frames, else with the next boundary that `pass` crosses. */
  request(write: (chunk: Buffer) => void): void {
    if (this.#sent || this.#pending) return;
    this.#pending = true;
    if (this.#cursor.atBoundary) this.#send(write);
  }

  pass(chunk: Buffer, write: (chunk: Buffer) => void): void {
    if (!this.#pending) {
      this.#cursor.advance(chunk);
      write(chunk);
      return;
    }
    const cut = this.#cursor.advance(chunk, true);
    write(cut === chunk.length ? chunk : chunk.subarray(0, cut));
    if (this.#cursor.atBoundary) this.#send(write);
    if (cut < chunk.length) {
      const rest = chunk.subarray(cut);
      this.#cursor.advance(rest);
      write(rest);
    }
  }

  #send(write: (chunk: Buffer) => void): void {
    this.#pending = false;
    this.#sent = true;
    write(gracefulGoAway());
  }
}

/**
 * The first GOAWAY of a graceful shutdown (RFC 9113 section 6.8): last stream
 * id 2^31-1 and NO_ERROR, so the client opens no new streams and lets the
 * ones in flight finish.
 */
export function gracefulGoAway(): Buffer {
  const frame = Buffer.alloc(FRAME_HEADER_BYTES + 8);
  frame.writeUIntBE(8, 0, 3);
  frame[3] = TYPE_GOAWAY;
  frame.writeUInt32BE(MAX_STREAM_ID, FRAME_HEADER_BYTES);
  return frame;
}
