import type { OutgoingHttpHeaders } from 'node:http2';

/**
 * The largest header block the client-facing HTTP/2 sessions send (their maxSendHeaderBlockLength):
 * as large as the model server's answers the gRPC forwarder takes (upstream-h2.ts: twice the limit).
 */
export function clientHeaderBlockLimit(maxHeaderSize: number): number {
  return maxHeaderSize * 2;
}

/** Each field of `headers` as a name and value length: an array value is one field per element. */
function eachField(headers: OutgoingHttpHeaders, visit: (nameLength: number, valueLength: number) => void): void {
  for (const name in headers) {
    const value = headers[name];
    if (value === undefined) continue;
    if (Array.isArray(value)) for (const one of value) visit(name.length, one.length);
    else visit(name.length, String(value).length);
  }
}

/**
 * RFC 9113 section 6.5.2: each field's name and value octets plus 32. Node reads and writes
 * HTTP/2 fields as Latin-1, one octet per character, so a string's length is its size on the wire.
 */
export function headerListSize(headers: OutgoingHttpHeaders): number {
  let size = 0;
  eachField(headers, (name, value) => (size += name + value + 32));
  return size;
}

/** nghttp2's bound: a table size update (12) and a priority (5), then each field as a new-name literal, lengths included. */
const BLOCK_FIXED = 17;
const BLOCK_PER_FIELD = 12;

/** The `date` field Node's respond() and writeHead() add to an answer that has none: `date` and 29 characters. */
const NODE_DATE_FIELD = 4 + 29;

/**
 * What nghttp2 holds a header block to send against maxSendHeaderBlockLength (its
 * nghttp2_hd_deflate_bound, not the encoded size): over it the stream is reset with
 * FRAME_SIZE_ERROR and Node closes the whole session. Measured against Node 20's nghttp2:
 * a block of 4 fields goes out up to 65 bytes over their names and values. `addsDate`: an
 * answer's head (respond(), writeHead()), to which Node adds a date unless it has one.
 */
export function headerBlockBound(headers: OutgoingHttpHeaders, addsDate: boolean): number {
  let bound = BLOCK_FIXED;
  eachField(headers, (name, value) => (bound += name + value + BLOCK_PER_FIELD));
  if (addsDate && headers['date'] === undefined) bound += NODE_DATE_FIELD + BLOCK_PER_FIELD;
  return bound;
}
