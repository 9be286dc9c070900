import type { OutgoingHttpHeaders } from 'node:http2';

/**
 * Twice --mtls_max_header_size: the largest header block the proxy forwards over HTTP/2. It sends
 * blocks up to this to HTTP/2 clients (http-fronts.ts, rest-forwarder.ts), and to the gRPC model server,
 * whose answers it takes up to this too (upstream-h2.ts). A client's own request is held to the limit
 * itself: the room over it is for what the proxy adds (x-forwarded-client-cert) and what the model server says.
 */
export function forwardedHeaderBlockLimit(maxHeaderSize: number): number {
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
