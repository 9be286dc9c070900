/** Just enough DER to take a signed structure apart and put it back together. */
export interface Tlv {
  tag: number;
  /** Contents octets, without tag and length. */
  value: Buffer;
}

export const TAG_SEQUENCE = 0x30;
export const TAG_BIT_STRING = 0x03;
export const TAG_BOOLEAN = 0x01;
export const TAG_INTEGER = 0x02;
export const TAG_OID = 0x06;

/** Splits consecutive TLVs (single-byte tags only, which is all X.509 uses at the levels we touch). */
export function readTlvs(der: Buffer): Tlv[] {
  const items: Tlv[] = [];
  let offset = 0;
  while (offset < der.length) {
    const tag = der[offset]!;
    const { length, headerLength } = readLength(der, offset + 1);
    const start = offset + 1 + headerLength;
    if (start + length > der.length) throw new Error('DER value runs past its container');
    items.push({ tag, value: der.subarray(start, start + length) });
    offset = start + length;
  }
  return items;
}

/** Where the contents of the TLV at `offset` begin. */
export function contentsStart(der: Buffer, offset: number): number {
  return offset + 1 + readLength(der, offset + 1).headerLength;
}

/** Where the TLV at `offset` ends, checked as readTlvs checks it against its container's end `limit`. */
export function tlvEnd(der: Buffer, offset: number, limit: number): number {
  const { length, headerLength } = readLength(der, offset + 1);
  const end = offset + 1 + headerLength + length;
  if (end > limit) throw new Error('DER value runs past its container');
  return end;
}

export function readSingleTlv(der: Buffer): Tlv {
  const items = readTlvs(der);
  if (items.length !== 1) throw new Error(`expected one DER value, found ${items.length}`);
  return items[0]!;
}

export function encodeTlv(tag: number, value: Buffer): Buffer {
  return Buffer.concat([Buffer.from([tag]), encodeLength(value.length), value]);
}

export function encodeSequence(items: Tlv[]): Buffer {
  return encodeTlv(TAG_SEQUENCE, Buffer.concat(items.map((item) => encodeTlv(item.tag, item.value))));
}

function readLength(der: Buffer, offset: number): { length: number; headerLength: number } {
  const first = der[offset];
  if (first === undefined) throw new Error('DER length missing');
  if (first < 0x80) return { length: first, headerLength: 1 };
  const count = first & 0x7f;
  if (count === 0 || count > 4) throw new Error('unsupported DER length');
  let length = 0;
  for (let i = 1; i <= count; i++) length = length * 256 + der[offset + i]!;
  return { length, headerLength: 1 + count };
}

function encodeLength(length: number): Buffer {
  if (length < 0x80) return Buffer.from([length]);
  const bytes: number[] = [];
  for (let rest = length; rest > 0; rest = Math.floor(rest / 256)) bytes.unshift(rest % 256);
  return Buffer.from([0x80 | bytes.length, ...bytes]);
}

/** An OBJECT IDENTIFIER's contents octets in dotted form (X.690 8.19). */
export function dottedOid(value: Buffer): string {
  const arcs: number[] = [];
  let arc = 0;
  for (const byte of value) {
    arc = arc * 128 + (byte & 0x7f);
    if (byte & 0x80) continue;
    if (arcs.length === 0) {
      const first = Math.min(2, Math.floor(arc / 40));
      arcs.push(first, arc - first * 40);
    } else arcs.push(arc);
    arc = 0;
  }
  return arcs.join('.');
}
