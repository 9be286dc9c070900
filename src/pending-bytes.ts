/**
 * Bytes of a head, chunk line or trailer line split across reads. A part
 * that arrives in one read is kept as the slice it is, never copied; one that
 * trickles in is copied into a buffer that doubles when full, so a head sent
 * a byte per read (each TLS record can carry one) costs linear time, where
 * concatenating at every read cost quadratic.
 */
export class PendingBytes {
  #buffer: Buffer | undefined;
  #length = 0;
  /** False while #buffer is a slice of a read, which must not be written into. */
  #owned = false;

  get length(): number {
    return this.#length;
  }

  /** What has been collected, without copying; valid until the next append() or take(). */
  get bytes(): Buffer {
    return this.#buffer?.subarray(0, this.#length) ?? Buffer.alloc(0);
  }

  append(bytes: Buffer): void {
    if (this.#length === 0) {
      this.#buffer = bytes;
      this.#length = bytes.length;
      this.#owned = false;
      return;
    }
    const length = this.#length + bytes.length;
    if (!this.#owned || this.#buffer!.length < length) this.#grow(length);
    bytes.copy(this.#buffer!, this.#length);
    this.#length = length;
  }

  /** What has been collected, handed over: it may be written out later, so the next bytes go to a new buffer. */
  take(): Buffer {
    const bytes = this.bytes;
    this.#buffer = undefined;
    this.#length = 0;
    return bytes;
  }

  #grow(atLeast: number): void {
    const grown = Buffer.allocUnsafe(Math.max(atLeast, 2 * this.#length, 256));
    this.#buffer!.copy(grown, 0, 0, this.#length);
    this.#buffer = grown;
    this.#owned = true;
  }
}
