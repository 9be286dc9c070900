/**
 * Both ends of the data-integrity properties: echo model servers (h2c for gRPC, HTTP/1.1 for
 * REST and SSE) whose answers a client can compute in advance, and clients that send
 * generated bodies in generated pieces and read what comes back, optionally slowly or
 * cancelling partway. Every body is made of bytes that depend on a tag, so a piece of one
 * stream put in another's place, shifted, dropped or repeated no longer matches.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer as createHttp1Server, type IncomingMessage, type ServerResponse } from 'node:http';
import { constants, createServer as createH2cServer, type ClientHttp2Session, type ClientHttp2Stream, type Http2Session, type IncomingHttpHeaders, type ServerHttp2Stream } from 'node:http2';
import type { AddressInfo } from 'node:net';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import type { Writable } from 'node:stream';
import { chunked } from './chunks.js';
import { grpcFrame } from './harness.js';

const { NGHTTP2_CANCEL } = constants;

/** `size` bytes determined by `tag` (xorshift32): different tags, different bytes. */
export function patternBytes(tag: number, size: number): Buffer {
  const words = new Uint32Array(Math.ceil(size / 4));
  let x = (Math.imul(tag + 1, 0x9e3779b1) >>> 0) || 1;
  for (let i = 0; i < words.length; i++) {
    x = (x ^ (x << 13)) >>> 0;
    x = (x ^ (x >>> 17)) >>> 0;
    x = (x ^ (x << 5)) >>> 0;
    words[i] = x;
  }
  return Buffer.from(words.buffer, 0, size);
}

/** Printable ASCII (no space, no newline) determined by `tag`: an SSE data line's text. */
export function patternText(tag: number, size: number): string {
  const bytes = patternBytes(tag, size);
  for (let i = 0; i < bytes.length; i++) bytes[i] = 0x21 + (bytes[i]! % 94);
  return bytes.toString('latin1');
}

/** Messages of the given sizes, message i made from tag `seed + i`, one after another. */
export function grpcMessages(seed: number, sizes: readonly number[]): Buffer {
  return Buffer.concat(sizes.map((size, i) => grpcFrame(patternBytes(seed + i, size))));
}

/** Where `actual` first differs from `expected` (a length difference counts at the shorter end); -1 when equal. */
export function firstDifference(actual: Buffer, expected: Buffer): number {
  const common = Math.min(actual.length, expected.length);
  if (actual.subarray(0, common).equals(expected.subarray(0, common))) return actual.length === expected.length ? -1 : common;
  let low = 0;
  let high = common;
  // Halving, as comparing byte by byte in JavaScript takes long for megabytes.
  while (high - low > 1) {
    const mid = (low + high) >>> 1;
    if (actual.subarray(low, mid).equals(expected.subarray(low, mid))) low = mid;
    else high = mid;
  }
  return actual[low] === expected[low] ? high : low;
}

/** Fails naming the sizes and the first differing offset, never dumping megabytes. */
export function assertSameBytes(actual: Buffer, expected: Buffer, what: string): void {
  const at = firstDifference(actual, expected);
  assert.ok(at < 0, `${what}: got ${actual.length} bytes, expected ${expected.length}; first difference at offset ${at}`);
}

/** `actual` is where `expected` starts: what a cancelled call got so far. */
export function assertPrefix(actual: Buffer, expected: Buffer, what: string): void {
  assert.ok(actual.length <= expected.length, `${what}: got ${actual.length} bytes, more than the ${expected.length} sent`);
  assertSameBytes(actual, expected.subarray(0, actual.length), `${what} (cancelled, compared as a prefix)`);
}

/** The call shapes of the gRPC echo, each a path of its own. */
export const GRPC_SHAPES = ['unary', 'client', 'server', 'bidi'] as const;
export type GrpcShape = (typeof GRPC_SHAPES)[number];
export const GRPC_PATHS: Record<GrpcShape, string> = {
  unary: '/integrity.Echo/Unary',
  client: '/integrity.Echo/ClientStream',
  server: '/integrity.Echo/ServerStream',
  bidi: '/integrity.Echo/Bidi',
};

/** Request metadata the echo returns in its response headers, and what it returns in its trailers. */
export const ECHOED_PREFIX = 'x-echo-';
export const TRAILED_PREFIX = 'x-t-';
/** ServerStream: the reply messages' sizes (comma-separated) and the tag of the first. */
export const REPLY_SIZES = 'x-reply-sizes';
export const REPLY_SEED = 'x-reply-seed';

function fieldsStartingWith(headers: IncomingHttpHeaders, prefix: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, value] of Object.entries(headers)) {
    if (name.startsWith(prefix) && typeof value === 'string') out[name] = value;
  }
  return out;
}

/** Resolves when `w` takes more or is gone: a writer that waited for 'drain' alone would wait for ever on a cancelled stream. */
async function writable(w: Writable): Promise<void> {
  if (w.destroyed || w.writableEnded) return;
  const done = new AbortController();
  try {
    await Promise.race([once(w, 'drain', { signal: done.signal }), once(w, 'close', { signal: done.signal })]);
  } catch {
    // 'close' of an errored stream, or the wait that lost the race: either way, no more waiting.
  } finally {
    done.abort();
  }
}

async function writeAll(w: Writable, pieces: readonly Buffer[], between?: () => Promise<void>): Promise<void> {
  for (const piece of pieces) {
    if (w.destroyed || w.writableEnded) return;
    if (!w.write(piece)) await writable(w);
    flights.moved();
    await between?.();
  }
}

function readAll(stream: ServerHttp2Stream): Promise<Buffer> {
  const chunks: Buffer[] = [];
  stream.on('data', (c: Buffer) => chunks.push(c));
  return new Promise((resolve) => stream.once('end', () => resolve(Buffer.concat(chunks))));
}

/**
 * Answers a gRPC call as the echo does: Bidi streams each request byte back as it comes,
 * Unary and ClientStream send the whole request back once it has ended, ServerStream sends
 * the messages REPLY_SIZES names. Response headers carry the x-echo-* metadata, trailers
 * the x-t-* metadata and grpc-status 0, sent right behind the last DATA.
 */
function serveGrpc(stream: ServerHttp2Stream, headers: IncomingHttpHeaders): void {
  stream.on('error', () => {});
  const head = { ':status': 200, 'content-type': 'application/grpc', ...fieldsStartingWith(headers, ECHOED_PREFIX) };
  const trailers = { ...fieldsStartingWith(headers, TRAILED_PREFIX), 'grpc-status': '0' };
  const respond = () => {
    stream.respond(head, { waitForTrailers: true });
    stream.once('wantTrailers', () => stream.sendTrailers(trailers));
  };
  const path = headers[':path'];
  if (path === GRPC_PATHS.bidi) {
    respond();
    stream.pipe(stream);
    return;
  }
  void readAll(stream).then(async (request) => {
    if (stream.closed || stream.destroyed) return;
    respond();
    if (path !== GRPC_PATHS.server) {
      stream.end(request);
      return;
    }
    const sizes = String(headers[REPLY_SIZES] ?? '').split(',').filter(Boolean).map(Number);
    const seed = Number(headers[REPLY_SEED] ?? 0);
    await writeAll(stream, sizes.map((size, i) => grpcFrame(patternBytes(seed + i, size))));
    if (!stream.destroyed) stream.end();
  });
}

export interface Peer {
  readonly port: number;
  close(): Promise<void>;
}

/** The gRPC echo on h2c, Node's default (64 KiB) windows: flow control bites on the upstream hop too. */
export async function startGrpcEcho(): Promise<Peer> {
  const server = createH2cServer();
  const sessions = new Set<Http2Session>();
  server.on('session', (s: Http2Session) => {
    sessions.add(s);
    s.once('close', () => sessions.delete(s));
  });
  server.on('stream', serveGrpc);
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: (server.address() as AddressInfo).port,
    close: async () => {
      for (const s of sessions) s.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

/** An SSE answer: events of data lines of the given sizes, written in pieces cut at `cuts` (and at each event's end). */
export interface SseSpec {
  seed: number;
  events: number[][];
  cuts: number[];
}

export function sseBody(spec: SseSpec): Buffer {
  const lines = (sizes: number[], e: number) => sizes.map((size, l) => `data: ${patternText(spec.seed + e * 64 + l, size)}\n`).join('');
  return Buffer.from(spec.events.map((sizes, e) => `${lines(sizes, e)}\n`).join(''), 'latin1');
}

/** Cuts at every event's end and at the spec's own cuts: each piece goes out in a write of its own. */
function ssePieces(spec: SseSpec): Buffer[] {
  const ends: number[] = [];
  let at = 0;
  for (const sizes of spec.events) {
    at += sseBody({ ...spec, events: [sizes] }).length;
    ends.push(at);
  }
  return chunked(sseBody(spec), [...ends, ...spec.cuts]);
}

/** The header a client sends the SSE spec in. */
export const SSE_SPEC_HEADER = 'x-sse';
/** POST /echo: `chunked` streams the body back as it comes, `length` sends it back whole with a Content-Length. */
export const REPLY_FRAMING_HEADER = 'x-reply';

async function serveSse(req: IncomingMessage, res: ServerResponse): Promise<void> {
  const spec = JSON.parse(String(req.headers[SSE_SPEC_HEADER])) as SseSpec;
  req.resume();
  res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
  res.flushHeaders();
  // A turn of the event loop between pieces, so they leave as separate writes, as a model's tokens do.
  await writeAll(res, ssePieces(spec), () => new Promise((resolve) => setImmediate(resolve)));
  res.end();
}

async function serveEcho(req: IncomingMessage, res: ServerResponse): Promise<void> {
  if (req.headers[REPLY_FRAMING_HEADER] === 'chunked') {
    res.writeHead(200, { 'content-type': 'application/octet-stream' });
    req.pipe(res);
    return;
  }
  const chunks: Buffer[] = [];
  for await (const chunk of req as AsyncIterable<Buffer>) chunks.push(chunk);
  const body = Buffer.concat(chunks);
  res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': body.length });
  res.end(body);
}

/** The REST echo on HTTP/1.1 keep-alive: POST /echo and GET /sse. */
export async function startRestEcho(): Promise<Peer> {
  const server = createHttp1Server({ keepAlive: true }, (req, res) => {
    req.on('error', () => {});
    res.on('error', () => {});
    const serve = req.url === '/sse' ? serveSse : serveEcho;
    serve(req, res).catch(() => res.destroy());
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: (server.address() as AddressInfo).port,
    close: async () => {
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

/** When a client cancels: once it has sent, or received, `bytes` (taken modulo what there is, plus one). */
export interface CancelPoint {
  after: 'sent' | 'received';
  bytes: number;
}

export interface ReadPace {
  /** Pauses reading for a few milliseconds at the start and after every 32 KiB, so windows fill up. */
  slow: boolean;
}

/**
 * What is under way in a run and when a byte last moved. A dropped byte usually shows as a
 * hang (a Content-Length never reached, a frame never completed): a run in which nothing has
 * moved for a long while fails naming how far each exchange got, rather than waiting for the
 * test's own timeout.
 */
export class Flights {
  #last = performance.now();
  #next = 0;
  readonly #open = new Map<number, { describe: () => string; abort: () => void }>();

  moved(): void {
    this.#last = performance.now();
  }

  /**
   * Registers an exchange, described by `describe` when a run stalls and then ended by `abort`
   * (so a hung run leaves nothing open behind); returns its removal.
   */
  open(describe: () => string, abort: () => void): () => void {
    const id = ++this.#next;
    this.#open.set(id, { describe, abort });
    this.moved();
    return () => this.#open.delete(id);
  }

  /** `work`, or a failure once nothing has moved for `stallMs`. */
  async guard<T>(work: Promise<T>, stallMs: number): Promise<T> {
    let timer: NodeJS.Timeout | undefined;
    const stalled = new Promise<never>((_, reject) => {
      timer = setInterval(() => {
        const idle = performance.now() - this.#last;
        if (idle < stallMs) return;
        const open = [...this.#open.values()];
        reject(new Error(`nothing moved for ${Math.round(idle)} ms; still under way: ${open.map((o) => o.describe()).join('; ')}`));
        for (const o of open) o.abort();
      }, 500);
    });
    try {
      return await Promise.race([work, stalled]);
    } finally {
      clearInterval(timer);
    }
  }
}

/** One per process: the properties run one at a time. */
export const flights = new Flights();

export interface H2Outcome {
  headers: IncomingHttpHeaders;
  body: Buffer;
  trailers: IncomingHttpHeaders | undefined;
  /** This client reset the stream (CANCEL) before it closed. */
  cancelled: boolean;
  rstCode: number;
  error: Error | undefined;
}

const SLOW_EVERY_BYTES = 32 * 1024;
const SLOW_PAUSE_MS = 3;

/** Reads `stream` slowly: a pause at the start and after every SLOW_EVERY_BYTES. */
function readSlowly(stream: ClientHttp2Stream): void {
  let sincePause = 0;
  const pauseFor = (ms: number) => {
    stream.pause();
    setTimeout(() => stream.resume(), ms);
  };
  stream.on('data', (c: Buffer) => {
    sincePause += c.length;
    if (sincePause < SLOW_EVERY_BYTES) return;
    sincePause = 0;
    pauseFor(SLOW_PAUSE_MS);
  });
  pauseFor(SLOW_PAUSE_MS * 5);
}

/**
 * One HTTP/2 request: `pieces` written one by one (waiting for 'drain'), the answer read,
 * maybe slowly, maybe cancelled at `cancel`. Resolves when the stream has closed.
 */
export async function h2Exchange(session: ClientHttp2Session, headers: Record<string, string>, pieces: readonly Buffer[], expectedLength: number, options: { cancel?: CancelPoint | undefined; label: string } & ReadPace): Promise<H2Outcome> {
  const stream = session.request(headers, { endStream: pieces.length === 0 });
  const outcome: H2Outcome = { headers: {}, body: Buffer.alloc(0), trailers: undefined, cancelled: false, rstCode: 0, error: undefined };
  const chunks: Buffer[] = [];
  const cancel = options.cancel;
  const sentTotal = pieces.reduce((n, p) => n + p.length, 0);
  const cancelAt = cancel ? cancel.bytes % ((cancel.after === 'sent' ? sentTotal : expectedLength) + 1) : -1;
  const cancelNow = () => {
    if (outcome.cancelled || stream.closed || stream.destroyed) return;
    outcome.cancelled = true;
    stream.close(NGHTTP2_CANCEL);
  };
  let received = 0;
  const done = flights.open(() => `${options.label}: ${received} of ${expectedLength} bytes received`, () => stream.destroy());
  stream.on('response', (h) => (outcome.headers = h));
  stream.on('trailers', (t) => (outcome.trailers = t));
  stream.on('error', (err: Error) => (outcome.error ??= err));
  stream.on('data', (c: Buffer) => {
    chunks.push(c);
    received += c.length;
    flights.moved();
    if (cancel?.after === 'received' && received >= cancelAt) cancelNow();
  });
  if (options.slow) readSlowly(stream);
  const closed = once(stream, 'close');
  if (cancel?.after === 'received' && cancelAt === 0) stream.once('response', cancelNow);
  await sendUnlessCancelled(stream, pieces, cancel?.after === 'sent' ? cancelAt : -1, cancelNow);
  if (!stream.closed && !stream.destroyed && !stream.writableEnded) stream.end();
  await closed;
  done();
  outcome.body = Buffer.concat(chunks);
  outcome.rstCode = stream.rstCode ?? 0;
  return outcome;
}

/** Writes `pieces` in turn; with `cancelAt` >= 0, cancels instead once that many bytes are written. */
async function sendUnlessCancelled(stream: ClientHttp2Stream, pieces: readonly Buffer[], cancelAt: number, cancelNow: () => void): Promise<void> {
  let sent = 0;
  for (const piece of pieces) {
    if (sent >= cancelAt && cancelAt >= 0) break;
    if (stream.destroyed || stream.closed) return;
    // An empty piece is left to end(), which sends the empty DATA frame with END_STREAM itself: on Node 22, a client
    // stream whose empty write still waits behind flow control when the server's answer closes the stream never
    // finishes that write, and never emits 'close' (a POST with content-length: 0 beside a 1 MB upload, smallest windows).
    if (piece.length > 0 && !stream.write(piece)) await writable(stream);
    sent += piece.length;
    flights.moved();
  }
  if (cancelAt >= 0) cancelNow();
}

export interface Http1Answer {
  status: number;
  headers: Record<string, string>;
  body: Buffer;
}

/**
 * Reads HTTP/1.1 responses (Content-Length or chunked bodies, no 1xx) off a byte stream as
 * they complete; written for this test's peers, whose answers always carry a body.
 */
export class ResponseReader {
  #pending: Buffer = Buffer.alloc(0);
  #answer: Http1Answer | undefined;
  #bodyChunks: Buffer[] = [];
  /** Body bytes still due: of the Content-Length, or of the current chunk (then its CRLF after). */
  #due = 0;
  #state: 'head' | 'length' | 'chunk-size' | 'chunk-data' | 'chunk-end' | 'trailers' = 'head';
  readonly #complete: Http1Answer[] = [];
  readonly #waiters: { resolve: (a: Http1Answer) => void; reject: (e: Error) => void }[] = [];
  #failure: Error | undefined;

  feed(chunk: Buffer): void {
    this.#pending = this.#pending.length === 0 ? chunk : Buffer.concat([this.#pending, chunk]);
    try {
      while (this.#step());
    } catch (err) {
      this.fail(err as Error);
    }
  }

  /** The connection is over: whoever waits for an answer gets `err`. */
  fail(err: Error): void {
    this.#failure ??= err;
    for (const w of this.#waiters.splice(0)) w.reject(this.#failure);
  }

  next(): Promise<Http1Answer> {
    const ready = this.#complete.shift();
    if (ready) return Promise.resolve(ready);
    if (this.#failure) return Promise.reject(this.#failure);
    return new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }));
  }

  #line(): string | undefined {
    const end = this.#pending.indexOf('\r\n');
    if (end < 0) return undefined;
    const line = this.#pending.subarray(0, end).toString('latin1');
    this.#pending = this.#pending.subarray(end + 2);
    return line;
  }

  #takeBody(): boolean {
    const take = Math.min(this.#due, this.#pending.length);
    if (take === 0 && this.#due > 0) return false;
    this.#bodyChunks.push(this.#pending.subarray(0, take));
    this.#pending = this.#pending.subarray(take);
    this.#due -= take;
    return this.#due === 0;
  }

  #step(): boolean {
    switch (this.#state) {
      case 'head': return this.#readHead();
      case 'length':
        if (!this.#takeBody()) return false;
        this.#finish();
        return true;
      case 'chunk-size': {
        const line = this.#line();
        if (line === undefined) return false;
        this.#due = parseInt(line, 16);
        assert.ok(Number.isSafeInteger(this.#due), `bad chunk size line ${JSON.stringify(line)}`);
        this.#state = this.#due === 0 ? 'trailers' : 'chunk-data';
        return true;
      }
      case 'chunk-data':
        if (!this.#takeBody()) return false;
        this.#state = 'chunk-end';
        return true;
      case 'chunk-end': {
        const line = this.#line();
        if (line === undefined) return false;
        assert.equal(line, '', 'chunk data not followed by CRLF');
        this.#state = 'chunk-size';
        return true;
      }
      case 'trailers': {
        const line = this.#line();
        if (line === undefined) return false;
        if (line === '') this.#finish();
        return true;
      }
    }
  }

  #readHead(): boolean {
    const end = this.#pending.indexOf('\r\n\r\n');
    if (end < 0) return false;
    const [statusLine = '', ...fields] = this.#pending.subarray(0, end).toString('latin1').split('\r\n');
    this.#pending = this.#pending.subarray(end + 4);
    const headers: Record<string, string> = {};
    for (const field of fields) {
      const colon = field.indexOf(':');
      headers[field.slice(0, colon).toLowerCase()] = field.slice(colon + 1).trim();
    }
    this.#answer = { status: Number(statusLine.split(' ')[1]), headers, body: Buffer.alloc(0) };
    if (/chunked/i.test(headers['transfer-encoding'] ?? '')) {
      this.#state = 'chunk-size';
    } else {
      assert.ok(headers['content-length'] !== undefined, `an answer with neither Content-Length nor chunked: ${statusLine}`);
      this.#due = Number(headers['content-length']);
      this.#state = 'length';
    }
    return true;
  }

  #finish(): void {
    const answer = { ...this.#answer!, body: Buffer.concat(this.#bodyChunks) };
    this.#bodyChunks = [];
    this.#state = 'head';
    const waiter = this.#waiters.shift();
    if (waiter) waiter.resolve(answer);
    else this.#complete.push(answer);
  }
}

/** One HTTP/1.1 connection over TLS: write bytes in pieces, read answers in order. */
export class Http1Connection {
  readonly reader = new ResponseReader();
  #bytesRead = 0;
  #done: () => void = () => {};
  private constructor(readonly socket: TLSSocket) {}

  static async open(port: number, tls: object, pace: ReadPace & { label: string }): Promise<Http1Connection> {
    const socket = tlsConnect({ host: '127.0.0.1', port, ...tls, ALPNProtocols: ['http/1.1'] });
    socket.on('error', () => {});
    await once(socket, 'secureConnect');
    const connection = new Http1Connection(socket);
    connection.#read(pace);
    connection.#done = flights.open(() => `${pace.label}: ${connection.#bytesRead} bytes read`, () => connection.close());
    return connection;
  }

  #read(pace: ReadPace): void {
    let sincePause = 0;
    this.socket.on('data', (c: Buffer) => {
      this.#bytesRead += c.length;
      flights.moved();
      this.reader.feed(c);
      if (!pace.slow || (sincePause += c.length) < SLOW_EVERY_BYTES) return;
      sincePause = 0;
      this.socket.pause();
      setTimeout(() => this.socket.resume(), SLOW_PAUSE_MS);
    });
    this.socket.once('close', () => this.reader.fail(new Error('the connection closed before the answer was whole')));
  }

  write(pieces: readonly Buffer[]): Promise<void> {
    return writeAll(this.socket, pieces);
  }

  close(): void {
    this.#done();
    this.socket.destroy();
  }
}


