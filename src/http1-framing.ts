import { PendingBytes } from './pending-bytes.js';

/**
 * Where HTTP/1.1 messages begin and end in a byte stream (RFC 9112), for the
 * REST relay: heads are parsed (and may be replaced), bodies pass through
 * untouched while their framing is followed. Parsing is strict on purpose:
 * whatever we accept, the server behind us must split at the same place, so
 * anything two parsers could read differently (both Content-Length and
 * Transfer-Encoding, bare LF, folded headers, odd chunk lines) is refused.
 */

/** A message the reader refuses; `status` is the answer a client gets for it. */
export class FramingError extends Error {
  readonly status: number;
  constructor(status: number, message: string) {
    super(message);
    this.status = status;
  }
}

export interface HeaderField {
  /** Lower-cased. */
  readonly name: string;
  readonly value: string;
  /** The line as received, without its CRLF. */
  readonly line: string;
}

/** What a head says before its fields: the request line or the status line. */
interface StartLine {
  readonly startLine: string;
  /** Requests only. */
  readonly method: string;
  readonly target: string;
  /** Responses only; 0 for requests. */
  readonly status: number;
  readonly minorVersion: 0 | 1;
}

/**
 * A parsed head. Its field lines are split into objects only when someone
 * asks for all of them; `values()` and `has()`, all a request or response on
 * the hot path needs, read the text directly. That is sound because a head is
 * built only once its grammar holds: every CRLF but the last starts a field
 * line, and no value holds a CR.
 */
export class Http1Head implements StartLine {
  readonly startLine: string;
  readonly method: string;
  readonly target: string;
  readonly status: number;
  readonly minorVersion: 0 | 1;
  /** The head as received, CRLF CRLF included. */
  readonly #text: string;
  #lower: string | undefined;
  #fields: readonly HeaderField[] | undefined;

  constructor(text: string, start: StartLine, fields?: readonly HeaderField[]) {
    this.#text = text;
    this.startLine = start.startLine;
    this.method = start.method;
    this.target = start.target;
    this.status = start.status;
    this.minorVersion = start.minorVersion;
    this.#fields = fields;
  }

  get fields(): readonly HeaderField[] {
    return (this.#fields ??= parseFields(splitHead(this.#text)));
  }

  /** True when a field of that (lower-case) name is present. */
  has(name: string): boolean {
    return this.#lowerText().includes(`\r\n${name}:`);
  }

  /** Whether the head, lower-cased, matches: a search over field lines, for names in several spellings. */
  matches(pattern: RegExp): boolean {
    return pattern.test(this.#lowerText());
  }

  /** Every value of the fields of that (lower-case) name, split at commas and trimmed of SP and HTAB. */
  values(name: string): string[] {
    const out: string[] = [];
    for (const value of this.fieldValues(name)) out.push(...commaList(value));
    return out;
  }

  /** The value of each field of that (lower-case) name as it came: all after the colon, white space included. */
  fieldValues(name: string): string[] {
    const out: string[] = [];
    const lower = this.#lowerText();
    const needle = `\r\n${name}:`;
    for (let at = lower.indexOf(needle); at >= 0; at = lower.indexOf(needle, at + needle.length)) {
      const start = at + needle.length;
      out.push(this.#text.slice(start, this.#text.indexOf('\r\n', start)));
    }
    return out;
  }

  #lowerText(): string {
    return (this.#lower ??= this.#text.toLowerCase());
  }
}

export type BodyFraming =
  | { readonly kind: 'none' }
  | { readonly kind: 'length'; readonly length: number }
  /** `dechunked`: only the chunks' data is passed on, the chunk lines, their CRLFs and the trailer section left out. */
  | { readonly kind: 'chunked'; readonly dechunked?: boolean }
  /** Response body that ends when the server closes the connection. */
  | { readonly kind: 'until-close' };

export const NO_BODY: BodyFraming = { kind: 'none' };

export interface MessageHandler {
  /** A whole head arrived: the bytes to send in its place and how its body is framed (throw FramingError to refuse it). */
  head(head: Http1Head, raw: Buffer): { bytes: Buffer; body: BodyFraming };
  /** Payload bytes of the body (chunk framing not counted). */
  body(bytes: number): void;
  /** The message is complete, all of its bytes already passed on. */
  end(): void;
  /** Trailer fields are checked and left out (the empty line that ends the message still goes on); by default passed on. */
  readonly dropTrailers?: boolean;
}

const CR = 0x0d;
const LF = 0x0a;
const HEAD_END = Buffer.from('\r\n\r\n');
const CRLF = Buffer.from('\r\n');
/** Chunk-size lines carry extensions nobody uses; a long one is an attack, not a request. */
const MAX_CHUNK_LINE = 4096;
/** 13 hex digits stay below 2^53. */
const MAX_CHUNK_SIZE_DIGITS = 13;

const TOKEN = "[!#$%&'*+\\-.^_`|~0-9A-Za-z]+";
/** Control characters other than HTAB: never allowed in a field value, reason phrase or chunk extension. */
const CTL = '\\x00-\\x08\\x0a-\\x1f\\x7f';
/** The target is printable ASCII: llhttp (Node, terminate mode) refuses a byte above 0x7e in it, so a model server may too. */
const REQUEST_START = `(${TOKEN}) ([\\x21-\\x7e]+) HTTP/1\\.([01])`;
/** A request line whose target holds bytes above 0x7e (obs-text): refused with its own message. */
const NON_ASCII_TARGET = new RegExp(`^${TOKEN} [^\\x00-\\x20\\x7f]*[\\x80-\\xff]`);
const NON_ASCII_TARGET_MESSAGE = 'request target must be printable ASCII (percent-encode other bytes)';
const STATUS_START = `HTTP/1\\.([01]) ([1-9][0-9]{2})(?: [^${CTL}]*)?`;
const FIELD_LINE = new RegExp(`^(${TOKEN}):[ \\t]*(.*?)[ \\t]*$`);
const BAD_VALUE_CHAR = new RegExp(`[${CTL}]`);
/** RFC 9110 5.6.4: between double quotes, any visible or obs-text byte, space or tab; a backslash quotes the next one. */
const QUOTED_STRING = '"(?:[\\t \\x21\\x23-\\x5b\\x5d-\\x7e\\x80-\\xff]|\\\\[\\t \\x21-\\x7e\\x80-\\xff])*"';
/**
 * A chunk size and its extensions (RFC 9112 7.1.1), without the optional white space around `;` and `=`:
 * llhttp refuses that, and a token value with obs-text, so whatever we forward a model server behind us reads too.
 */
const CHUNK_LINE = new RegExp(`^([0-9A-Fa-f]+)(?:;${TOKEN}(?:=(?:${TOKEN}|${QUOTED_STRING}))?)*$`);
/** A chunk size, then an extension (however malformed): that is what a refusal names. */
const CHUNK_SIZE_FIRST = /^[0-9A-Fa-f]+[ \t]*;/;
const DIGITS = /^[0-9]{1,15}$/;
/** Field lines and the empty line after them; a whole head is its start line, CRLF, then these. */
const FIELD_LINES = `(?:${TOKEN}:[^${CTL}]*\\r\\n)*\\r\\n$`;

export type MessageKind = 'request' | 'response';

/** The first line of the HTTP/2 connection preface (RFC 9113 3.4). */
const H2_PREFACE_LINE = 'PRI * HTTP/2.0';
/**
 * For a TLS client that speaks HTTP/2 without offering it by ALPN (HAProxy's `proto h2` without
 * `alpn h2`): the connection is HTTP/1.1, and "malformed request" did not say why.
 */
export const H2_WITHOUT_ALPN = 'HTTP/2 without ALPN: this connection negotiated HTTP/1.1; offer h2 by ALPN (RFC 9113 3.3 requires it over TLS), or send HTTP/1.1';

/**
 * Per kind: the start line alone (for the line-by-line reader) and the whole
 * head (one pass), with the same capture groups, so one function reads both.
 */
const GRAMMAR: Record<MessageKind, { line: RegExp; head: RegExp; malformed: (line: string) => FramingError; start: (line: string, m: RegExpExecArray) => StartLine }> = {
  request: {
    line: new RegExp(`^${REQUEST_START}$`),
    head: new RegExp(`^${REQUEST_START}\\r\\n${FIELD_LINES}`),
    malformed: (line) => new FramingError(400, malformedRequestLineMessage(line)),
    start: (line, m) => ({ startLine: line, method: m[1]!, target: m[2]!, status: 0, minorVersion: m[3] === '0' ? 0 : 1 }),
  },
  response: {
    line: new RegExp(`^${STATUS_START}$`),
    head: new RegExp(`^${STATUS_START}\\r\\n${FIELD_LINES}`),
    malformed: () => new FramingError(502, 'malformed status line from the upstream'),
    start: (line, m) => ({ startLine: line, method: '', target: '', status: Number(m[2]), minorVersion: m[1] === '0' ? 0 : 1 }),
  },
};

function malformedRequestLineMessage(line: string): string {
  if (line === H2_PREFACE_LINE) return H2_WITHOUT_ALPN;
  if (NON_ASCII_TARGET.test(line)) return NON_ASCII_TARGET_MESSAGE;
  return 'malformed request line (expected "METHOD target HTTP/1.1")';
}

type State = 'head' | 'length' | 'until-close' | 'chunk-size' | 'chunk-data' | 'chunk-crlf' | 'trailers';

/**
 * Follows one direction of an HTTP/1.1 connection, message after message
 * (pipelining included). `push` hands every byte to `out`, in order: each head
 * as the handler rewrote it, body and chunk framing as received.
 */
export class Http1Reader {
  readonly #kind: MessageKind;
  readonly #maxHeadSize: number;
  readonly #handler: MessageHandler;
  #state: State = 'head';
  /** A head (or chunk line, or trailer line) split across reads. */
  readonly #pending = new PendingBytes();
  #remaining = 0;
  /** Bytes of the current chunk line or trailer section seen so far. */
  #lineBytes = 0;
  /** Of the CRLF after chunk data, how many bytes have been checked. */
  #crlfSeen = 0;
  /** The chunked body under way goes on as its data alone (BodyFraming `dechunked`). */
  #dechunked = false;
  #stopped = false;

  constructor(kind: MessageKind, maxHeadSize: number, handler: MessageHandler) {
    this.#kind = kind;
    this.#maxHeadSize = maxHeadSize;
    this.#handler = handler;
  }

  /** The bytes of a head not yet whole (empty between messages and in a body). */
  get heldHead(): Buffer {
    return this.#state === 'head' ? this.#pending.bytes : Buffer.alloc(0);
  }

  /** True between messages: nothing of a next message has arrived. */
  get atBoundary(): boolean {
    return this.#state === 'head' && this.#pending.length === 0;
  }

  /** No message after the one under way is read: push() ignores whatever follows it. */
  stop(): void {
    this.#stopped = true;
  }

  /** Throws FramingError; after that the connection cannot be trusted and must close. */
  push(chunk: Buffer, out: (bytes: Buffer) => void): void {
    let pos = 0;
    while (pos < chunk.length) {
      switch (this.#state) {
        case 'head':
          if (this.#stopped) return;
          pos = this.#readHead(chunk, pos, out);
          break;
        // Chunk framing goes on once judged (a line split across reads is held): no message ends in it.
        case 'chunk-size':
          pos = this.#readChunkLine(chunk, pos, out);
          break;
        case 'chunk-crlf':
          pos = this.#readChunkCrlf(chunk, pos, out);
          break;
        case 'trailers':
          pos = this.#readTrailers(chunk, pos, out);
          // A cast: TypeScript would keep `#state` narrowed across the call above.
          if ((this.#state as State) === 'head') this.#handler.end();
          break;
        default: {
          const from = pos;
          pos = this.#readPayload(chunk, pos);
          out(chunk.subarray(from, pos));
          if ((this.#state as State) === 'head') this.#handler.end();
        }
      }
    }
  }

  /** The connection closed: ends a body that runs until close; false when a message was cut short. */
  finish(): boolean {
    if (this.#state === 'until-close') {
      this.#state = 'head';
      this.#handler.end();
      return true;
    }
    return this.atBoundary;
  }

  #readHead(chunk: Buffer, pos: number, out: (bytes: Buffer) => void): number {
    if (this.#kind === 'request') pos = this.#skipEmptyLines(chunk, pos);
    if (pos === chunk.length) return pos;
    if (this.#pending.length === 0) {
      // The usual case, a whole head in one read: found in place, nothing collected.
      const end = chunk.indexOf(HEAD_END, pos);
      if (end >= 0 && end + 4 - pos <= this.#maxHeadSize) return this.#head(chunk.subarray(pos, end + 4), out, end + 4);
    }
    const carried = this.#pending.length;
    // Bytes past the limit cannot belong to a head we accept: they are not collected.
    this.#pending.append(chunk.subarray(pos, pos + this.#maxHeadSize + 1 - carried));
    const data = this.#pending.bytes;
    // Only what this read added is searched, with the three bytes before it: CRLF CRLF may straddle two reads.
    const end = data.indexOf(HEAD_END, Math.max(0, carried - 3));
    if (end < 0) {
      if (data.length > this.#maxHeadSize) throw this.#tooLarge();
      // A peer that ends its lines with LF alone never sends CRLF CRLF: its head, refused once whole, would be waited
      // for until the head timeout (a client's, answered 408) or for ever (the model server's, no timeout on an answer).
      if (hasBareLineEnd(data, Math.max(0, carried - 1))) throw this.#bareLineEnd();
      return chunk.length;
    }
    if (end + 4 > this.#maxHeadSize) throw this.#tooLarge();
    return this.#head(this.#pending.take().subarray(0, end + 4), out, pos + (end + 4 - carried));
  }

  /** A whole head: parsed, handed over, its body framing set; returns `next`, where the read goes on. */
  #head(raw: Buffer, out: (bytes: Buffer) => void, next: number): number {
    const result = this.#handler.head(parseHead(raw, this.#kind), raw);
    out(result.bytes);
    this.#startBody(result.body);
    return next;
  }

  /** RFC 9112 2.2: empty lines before a request line are ignored, one split across two reads too. */
  #skipEmptyLines(chunk: Buffer, pos: number): number {
    if (this.#pending.length === 1 && this.#pending.bytes[0] === CR && chunk[pos] === LF) {
      this.#pending.take();
      pos++;
    }
    if (this.#pending.length > 0) return pos;
    while (chunk[pos] === CR && chunk[pos + 1] === LF) pos += 2;
    return pos;
  }

  #startBody(body: BodyFraming): void {
    switch (body.kind) {
      case 'none':
        this.#handler.end();
        return;
      case 'length':
        if (body.length === 0) {
          this.#handler.end();
          return;
        }
        this.#remaining = body.length;
        this.#state = 'length';
        return;
      case 'chunked':
        this.#state = 'chunk-size';
        this.#lineBytes = 0;
        this.#dechunked = body.dechunked === true;
        return;
      case 'until-close':
        this.#state = 'until-close';
    }
  }

  /** Consumes payload bytes (at least one) from `pos`; returns where it stopped (the state says why). */
  #readPayload(chunk: Buffer, pos: number): number {
    switch (this.#state) {
      case 'length': {
        const take = Math.min(this.#remaining, chunk.length - pos);
        this.#remaining -= take;
        this.#handler.body(take);
        if (this.#remaining === 0) this.#state = 'head';
        return pos + take;
      }
      case 'until-close':
        this.#handler.body(chunk.length - pos);
        return chunk.length;
      case 'chunk-data': {
        const take = Math.min(this.#remaining, chunk.length - pos);
        this.#remaining -= take;
        this.#handler.body(take);
        if (this.#remaining === 0) {
          this.#state = 'chunk-crlf';
          this.#crlfSeen = 0;
        }
        return pos + take;
      }
      default:
        return chunk.length;
    }
  }

  /**
   * A chunk-size line goes on whole and judged: one split across reads is held (at most MAX_CHUNK_LINE
   * bytes) until its LF, so a model server never gets the first bytes of a line then refused. A line
   * within one read goes on as the slice it is.
   */
  #readChunkLine(chunk: Buffer, pos: number, out: (bytes: Buffer) => void): number {
    const lf = chunk.indexOf(LF, pos);
    const stop = lf < 0 ? chunk.length : lf + 1;
    this.#lineBytes += stop - pos;
    if (this.#lineBytes > MAX_CHUNK_LINE) throw new FramingError(400, 'chunk-size line too long');
    this.#pending.append(chunk.subarray(pos, stop));
    if (lf < 0) return stop;
    const bytes = this.#pending.take();
    const line = lineOf(bytes);
    const match = CHUNK_LINE.exec(line);
    if (!match) throw new FramingError(400, CHUNK_SIZE_FIRST.test(line) ? MALFORMED_CHUNK_EXTENSION : 'malformed chunk-size line');
    const digits = match[1]!.replace(/^0+(?=.)/, '');
    if (digits.length > MAX_CHUNK_SIZE_DIGITS) throw new FramingError(400, 'chunk size too large');
    if (!this.#dechunked) out(bytes);
    this.#remaining = parseInt(digits, 16);
    this.#lineBytes = 0;
    this.#state = this.#remaining === 0 ? 'trailers' : 'chunk-data';
    return stop;
  }

  /** The CRLF after chunk data, passed on once both bytes are checked: a CR that ended a read waits for its LF. */
  #readChunkCrlf(chunk: Buffer, pos: number, out: (bytes: Buffer) => void): number {
    const from = pos;
    while (this.#crlfSeen < 2 && pos < chunk.length) {
      if (chunk[pos] !== (this.#crlfSeen === 0 ? CR : LF)) throw new FramingError(400, 'chunk data not followed by CRLF');
      this.#crlfSeen++;
      pos++;
    }
    if (this.#crlfSeen === 2) {
      if (!this.#dechunked) out(pos - from === 2 ? chunk.subarray(from, pos) : CRLF);
      this.#state = 'chunk-size';
      this.#lineBytes = 0;
    }
    return pos;
  }

  /**
   * Trailer fields pass on line by line, those the handler does not keep
   * left out; the section (and the message) ends at the first empty line.
   */
  #readTrailers(chunk: Buffer, pos: number, out: (bytes: Buffer) => void): number {
    while (pos < chunk.length) {
      const lf = chunk.indexOf(LF, pos);
      const stop = lf < 0 ? chunk.length : lf + 1;
      this.#lineBytes += stop - pos;
      if (this.#lineBytes > this.#maxHeadSize) throw this.#tooLarge();
      this.#pending.append(chunk.subarray(pos, stop));
      pos = stop;
      if (lf < 0) return pos;
      const bytes = this.#pending.take();
      const line = lineOf(bytes);
      if (line === '') {
        if (!this.#dechunked) out(bytes);
        this.#state = 'head';
        return pos;
      }
      if (!FIELD_LINE.test(line) || BAD_VALUE_CHAR.test(line)) throw new FramingError(400, 'malformed trailer field');
      if (!this.#handler.dropTrailers && !this.#dechunked) out(bytes);
    }
    return pos;
  }

  #bareLineEnd(): FramingError {
    return new FramingError(this.#kind === 'request' ? 400 : 502, BARE_LINE_END);
  }

  #tooLarge(): FramingError {
    return this.#kind === 'request'
      ? new FramingError(431, requestHeadTooLargeMessage(this.#maxHeadSize))
      : new FramingError(502, responseHeadTooLargeMessage(this.#maxHeadSize));
  }
}

/** What a client whose request head is over the limit is told (a 431), in both REST modes. */
export function requestHeadTooLargeMessage(maxHeadSize: number): string {
  return `request header section larger than ${maxHeadSize} bytes (--mtls_max_header_size)`;
}

/** What the client of a model server whose response head is over the limit is told (a 502), in both REST modes. */
export function responseHeadTooLargeMessage(maxHeadSize: number): string {
  return `the model server's response header section is larger than ${maxHeadSize} bytes (--mtls_max_header_size)`;
}

/** A line's text without its CRLF; a lone LF or a stray CR is refused. */
function lineOf(bytes: Buffer): string {
  if (bytes.length < 2 || bytes[bytes.length - 2] !== CR) throw new FramingError(400, 'line not ended by CRLF');
  const line = bytes.toString('latin1', 0, bytes.length - 2);
  if (line.includes('\r')) throw new FramingError(400, 'stray CR in a line');
  return line;
}

const MALFORMED_CHUNK_EXTENSION = 'malformed chunk extension (expected ";name" or ";name=value" after the chunk size, without white space)';

const BARE_LINE_END = 'header lines must end with CRLF (bare CR or LF found)';

/**
 * A line end other than CRLF in `data` from `from` on: an LF without its CR, or a CR followed by
 * anything but LF (a CR last in `data` may still get its LF in the next read).
 */
function hasBareLineEnd(data: Buffer, from: number): boolean {
  for (let i = from; i < data.length; i++) {
    const byte = data[i];
    if (byte === LF && (i === 0 || data[i - 1] !== CR)) return true;
    if (byte === CR && i + 1 < data.length && data[i + 1] !== LF) return true;
  }
  return false;
}

/** The lines of a head's text (CRLF CRLF included), without their CRLFs. */
function splitHead(text: string): string[] {
  const lines = text.slice(0, -4).split('\r\n');
  for (const line of lines) {
    if (line.includes('\n') || line.includes('\r')) throw new FramingError(400, BARE_LINE_END);
  }
  return lines;
}

function parseFields(lines: readonly string[]): HeaderField[] {
  const fields: HeaderField[] = [];
  for (let i = 1; i < lines.length; i++) {
    const line = lines[i]!;
    if (line[0] === ' ' || line[0] === '\t') throw new FramingError(400, 'folded header lines (obs-fold) are not accepted');
    const match = FIELD_LINE.exec(line);
    if (!match) throw new FramingError(400, `malformed header line: ${JSON.stringify(line.slice(0, 64))}`);
    const value = match[2]!;
    if (BAD_VALUE_CHAR.test(value)) throw new FramingError(400, `control character in header ${match[1]}`);
    fields.push({ name: match[1]!.toLowerCase(), value, line });
  }
  return fields;
}

/**
 * A whole head (CRLF CRLF included), checked in one pass; one the grammar
 * refuses is read again line by line, which throws the FramingError naming
 * what is wrong.
 */
export function parseHead(raw: Buffer, kind: MessageKind): Http1Head {
  const text = raw.toString('latin1');
  const grammar = GRAMMAR[kind];
  const match = grammar.head.exec(text);
  if (!match) return parseHeadByLine(text, kind);
  return new Http1Head(text, grammar.start(text.slice(0, text.indexOf('\r\n')), match));
}

/** The reference reader: slower, and it says which line is wrong. Exported for the test that holds both to the same grammar. */
export function parseHeadByLine(text: string, kind: MessageKind): Http1Head {
  const lines = splitHead(text);
  const grammar = GRAMMAR[kind];
  const match = grammar.line.exec(lines[0]!);
  if (!match) throw grammar.malformed(lines[0]!);
  return new Http1Head(text, grammar.start(lines[0]!, match), parseFields(lines));
}

const SP = 0x20;
const HTAB = 0x09;
const isOws = (code: number): boolean => code === SP || code === HTAB;

/** Optional white space is SP and HTAB only (RFC 9110 5.6.3); String.trim() would also take 0xA0 and read "5\xa0" as 5. */
function trimOws(value: string): string {
  let start = 0;
  let end = value.length;
  while (start < end && isOws(value.charCodeAt(start))) start++;
  while (end > start && isOws(value.charCodeAt(end - 1))) end--;
  // Most values have none: no new string.
  return start === 0 && end === value.length ? value : value.slice(start, end);
}

/** RFC 9110 5.6.1: a comma-separated list, each element trimmed of optional white space. */
export function commaList(value: string): string[] {
  // Nearly every value is a single element: no array to split into and map over.
  if (!value.includes(',')) return [trimOws(value)];
  return value.split(',').map(trimOws);
}

/**
 * The values of a Content-Length or Transfer-Encoding field, as values() reads them. A tab within or after
 * one is refused (`status`: 400 for a request, 502 for an answer): RFC 9110 allows it as optional white
 * space, but llhttp refuses it (Node's server in terminate mode, Node's client and undici), so the peer
 * behind the relay may read that framing otherwise. A tab before the value llhttp takes.
 */
function framingValues(head: Http1Head, name: 'content-length' | 'transfer-encoding', status: number): string[] {
  const out: string[] = [];
  for (const value of head.fieldValues(name)) {
    if (hasTabAfterStart(value)) throw new FramingError(status, FRAMING_TAB_MESSAGE);
    out.push(...commaList(value));
  }
  return out;
}

const FRAMING_TAB_MESSAGE = 'tab within or after a Content-Length or Transfer-Encoding value (only spaces may follow it)';

/** A tab after the first character that is not optional white space. */
function hasTabAfterStart(value: string): boolean {
  let start = 0;
  while (start < value.length && isOws(value.charCodeAt(start))) start++;
  return value.indexOf('\t', start) >= 0;
}

/**
 * Exactly one Content-Length; undefined when absent. Several that agree are
 * refused too (as Node's parser does): passed on as they came they would break
 * RFC 9110 8.6, which forbids forwarding such a list.
 */
function contentLength(head: Http1Head, status: number): number | undefined {
  const lengths = framingValues(head, 'content-length', status);
  if (lengths.length === 0) return undefined;
  if (lengths.length > 1 || !DIGITS.test(lengths[0]!)) throw new FramingError(status, `invalid Content-Length: ${JSON.stringify(lengths.join(', '))}`);
  return Number(lengths[0]);
}

/** A request's transfer codings (commaList() of its Transfer-Encoding values) are `chunked` alone, the one coding served. */
export function onlyChunked(codings: readonly string[]): boolean {
  return codings.length === 1 && isChunked(codings[0]!);
}

const isChunked = (coding: string): boolean => coding.toLowerCase() === 'chunked';

/** Why a request with other transfer codings is refused 501 (RFC 9112 6.1), in both REST modes. */
export function unsupportedCodingMessage(codings: readonly string[]): string {
  return `Transfer-Encoding ${JSON.stringify(codings.join(', '))} is not supported (only chunked)`;
}

/** RFC 9112 6.3 for requests, refusing everything a second parser might read differently. */
export function requestFraming(head: Http1Head): BodyFraming {
  const codings = framingValues(head, 'transfer-encoding', 400);
  if (codings.length > 0) {
    if (head.minorVersion === 0) throw new FramingError(400, 'Transfer-Encoding is not allowed in an HTTP/1.0 request');
    if (head.has('content-length')) throw new FramingError(400, 'request has both Content-Length and Transfer-Encoding');
    // RFC 9112 6.1 forbids it: faulty framing (terminate mode's parser answers 400 too), not a coding we lack (501).
    if (codings.length > 1 && codings.every(isChunked)) throw new FramingError(400, `chunked applied more than once (Transfer-Encoding ${JSON.stringify(codings.join(', '))})`);
    if (!onlyChunked(codings)) throw new FramingError(501, unsupportedCodingMessage(codings));
    return { kind: 'chunked' };
  }
  const length = contentLength(head, 400);
  return length === undefined ? NO_BODY : { kind: 'length', length };
}

function refuseLengthBesideCoding(head: Http1Head): void {
  if (head.has('content-length')) throw new FramingError(502, 'the upstream sent both Content-Length and Transfer-Encoding');
}

/**
 * RFC 9112 6.3 for a response to a request made with `method`; `http10Request`: that request was HTTP/1.0,
 * which an HTTP/1.0 answer may then stream chunked (see below).
 */
export function responseFraming(head: Http1Head, method: string, http10Request = false): BodyFraming {
  if (method === 'HEAD' || head.status < 200 || head.status === 204 || head.status === 304) {
    // No body follows, but llhttp (the client's, undici's) refuses a malformed Content-Length, or one
    // beside a Transfer-Encoding, on any answer.
    contentLength(head, 502);
    if (head.has('transfer-encoding')) refuseLengthBesideCoding(head);
    return NO_BODY;
  }
  const codings = framingValues(head, 'transfer-encoding', 502);
  if (codings.length > 0) {
    // Faulty framing (RFC 9112 6.1, 6.3), which the client might read otherwise; nginx answers 502 too.
    refuseLengthBesideCoding(head);
    // Drogon (OVMS) streams its answer to an HTTP/1.0 request that way. RFC 9112 6.1: framing to read and
    // then close on; its client knows no chunked coding, so it gets the data alone, ended by the close.
    if (head.minorVersion === 0 && !(http10Request && codings.length === 1 && isChunked(codings[0]!))) {
      throw new FramingError(502, 'the upstream sent Transfer-Encoding in an HTTP/1.0 response');
    }
    return codings.at(-1)!.toLowerCase() === 'chunked' ? { kind: 'chunked' } : { kind: 'until-close' };
  }
  const length = contentLength(head, 502);
  return length === undefined ? { kind: 'until-close' } : { kind: 'length', length };
}
