/**
 * The serials a CRL revokes, looked up where they lie in its DER. A Set of hex strings took a
 * string, a hash-table entry and their garbage per serial: seconds for a million-entry CRL, with
 * every connection of the process waiting (reloads are synchronous). Here the table is two typed
 * arrays of offsets and one of hashes, filled in one pass.
 */
export class RevokedSerials {
  readonly #der: Buffer;
  readonly #starts: Int32Array;
  readonly #ends: Int32Array;
  /** Open addressing: entry number + 1 in each slot, 0 for an empty one. */
  readonly #slots: Int32Array;
  readonly #hashes: Int32Array;
  readonly size: number;

  /** `starts`/`ends` delimit each serial's contents octets in `der`, leading zero octets left out (as normaliseSerial writes them). */
  constructor(der: Buffer, starts: readonly number[], ends: readonly number[]) {
    this.#der = der;
    this.#starts = Int32Array.from(starts);
    this.#ends = Int32Array.from(ends);
    this.#hashes = new Int32Array(starts.length);
    this.#slots = new Int32Array(tableSize(starts.length));
    let unique = 0;
    for (let entry = 0; entry < starts.length; entry++) {
      const hash = hashBytes(der, this.#starts[entry]!, this.#ends[entry]!);
      this.#hashes[entry] = hash;
      const slot = this.#find(der, this.#starts[entry]!, this.#ends[entry]!, hash);
      if (this.#slots[slot] !== 0) continue;
      this.#slots[slot] = entry + 1;
      unique += 1;
    }
    this.size = unique;
  }

  /** `serialHex` as normaliseSerial writes it: lower-case hex in whole bytes, no leading zero byte. */
  has(serialHex: string): boolean {
    const bytes = Buffer.from(serialHex, 'hex');
    if (bytes.length === 0 || bytes.toString('hex') !== serialHex) return false;
    return this.#slots[this.#find(bytes, 0, bytes.length, hashBytes(bytes, 0, bytes.length))] !== 0;
  }

  /** The slot holding these bytes, else the empty slot where they would go. */
  #find(bytes: Buffer, start: number, end: number, hash: number): number {
    const mask = this.#slots.length - 1;
    for (let slot = hash & mask; ; slot = (slot + 1) & mask) {
      const held = this.#slots[slot]!;
      if (held === 0) return slot;
      const entry = held - 1;
      if (this.#hashes[entry] === hash && this.#der.compare(bytes, start, end, this.#starts[entry]!, this.#ends[entry]!) === 0) return slot;
    }
  }
}

/** A power of two at least twice the count, so that probes stay short. */
function tableSize(count: number): number {
  let size = 16;
  while (size < count * 2) size *= 2;
  return size;
}

/** FNV-1a over the bytes. */
function hashBytes(bytes: Buffer, start: number, end: number): number {
  let hash = 0x811c9dc5;
  for (let i = start; i < end; i++) hash = Math.imul(hash ^ bytes[i]!, 0x01000193);
  return hash | 0;
}
