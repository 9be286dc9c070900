/**
 * Generated HTTP/1.1 request streams near the edges of RFC 9112 framing, and how two parsers split
 * them: the REST relay's reader (src/http1-framing.ts) and llhttp (Node's HTTP server), for the
 * differential tests in test/http1-differential.test.ts.
 */
import { once } from 'node:events';
import { createServer as createHttpServer, type IncomingMessage, type Server as HttpServer } from 'node:http';
import { connect as netConnect, type AddressInfo, type Socket } from 'node:net';
import fc from 'fast-check';
import { FramingError, Http1Reader } from '../../src/http1-framing.js';
import { forwardedHead, judgeRequest } from '../../src/rest-relay.js';
import type { ConnectionContext } from '../../src/listeners.js';
import type { AccessRecord } from '../../src/observer.js';
import { chunked } from './chunks.js';
import { eventually } from './ops.js';
import type { TestPki } from './pki.js';
import { openRaw, readToCloseWithin } from './raw-http1.js';

// ---------------------------------------------------------------------------------------------
// The grammar: request streams whose every part may sit on an edge of RFC 9112.
// ---------------------------------------------------------------------------------------------

export const pick = <T>(...values: T[]) => fc.constantFrom(...values);

const methodArb = fc.oneof({ weight: 20, arbitrary: pick('GET', 'POST', 'PUT', 'HEAD', 'DELETE', 'OPTIONS', 'PATCH') }, { weight: 1, arbitrary: pick('FOO', 'get', 'M-SEARCH', 'PRI', 'CONNECT') });
const targetArb = fc.oneof(
  { weight: 20, arbitrary: pick('/v2/models/m/infer', '/v2/health/live', '/a?b=c&d=%20', '/') },
  { weight: 1, arbitrary: pick('http://a/v2/x', '*', '/\x80\xff', '/a#f', '/a b', '//x', '/a\x7f', '/a"<>{}|\\^`') },
);
const versionArb = fc.oneof({ weight: 40, arbitrary: pick('HTTP/1.1') }, { weight: 6, arbitrary: pick('HTTP/1.0') }, { weight: 1, arbitrary: pick('HTTP/1.2', 'http/1.1', 'HTTP/2.0', 'HTTP/1.1 ', '') });
const lineEndArb = fc.oneof({ weight: 150, arbitrary: pick('\r\n') }, { weight: 1, arbitrary: pick('\n', '\r', '\r\r\n') });
const requestLineArb = fc.tuple(methodArb, fc.oneof({ weight: 40, arbitrary: pick(' ') }, { weight: 1, arbitrary: pick('  ', '\t') }), targetArb, versionArb, lineEndArb).map(([m, sp, t, v, end]) => `${m}${sp}${t}${v === '' ? '' : ' ' + v}${end}`);

/** How a field line is spelled: the colon, the white space around the value, its line end. */
const colonArb = fc.oneof({ weight: 80, arbitrary: pick(': ', ':') }, { weight: 4, arbitrary: pick(':\t', ':  ') }, { weight: 1, arbitrary: pick(' : ', '\t: ') });
const spellingArb = (name: string) => fc.oneof({ weight: 40, arbitrary: fc.constant(name) }, { weight: 8, arbitrary: pick(name.toUpperCase(), name.replace(/(^|-)./g, (s) => s.toUpperCase())) }, { weight: 1, arbitrary: pick(name.replaceAll('-', '_'), ` ${name}`, `${name}\x00`) });
const fieldArb = (name: fc.Arbitrary<string>, value: fc.Arbitrary<string>) =>
  fc.tuple(name, colonArb, value, fc.oneof({ weight: 12, arbitrary: pick('') }, { weight: 1, arbitrary: pick(' ', '\t') }), lineEndArb).map(([n, c, v, trail, end]) => `${n}${c}${v}${trail}${end}`);

const plainValueArb = fc.stringMatching(/^[\x21-\x7e]([\x20-\x7e]{0,12}[\x21-\x7e])?$/);
const oddValueArb = pick('\x80\xff', 'a\x00b', 'a\x01', 'a\x7f', 'a\tb', 'a\x0bb', '', '"q\\"x"', 'a\rb');
const otherFieldArb = fc.oneof(
  { weight: 30, arbitrary: fieldArb(pick('accept', 'user-agent', 'x-a', "x!#$%&'*+.^_`|~z", 'x-forwarded-client-cert', 'x_forwarded_client_cert', 'connection', 'expect', 'upgrade', 'keep-alive', 'x-forwarded-for'), fc.oneof({ weight: 30, arbitrary: plainValueArb }, { weight: 3, arbitrary: pick('close', 'keep-alive', 'Upgrade', 'h2c', '100-continue', '100-Continue', 'x-forwarded-client-cert') }, { weight: 2, arbitrary: oddValueArb })) },
  { weight: 1, arbitrary: pick(' folded\r\n', '\tfolded\r\n', 'x@y: 1\r\n', 'x y: 1\r\n', ': empty-name\r\n', 'no-colon\r\n', 'x(): 1\r\n') },
);
const hostFieldArb = fc.oneof({ weight: 30, arbitrary: fc.constant('host: a\r\n') }, { weight: 1, arbitrary: pick('', 'host: a\r\nhost: b\r\n', 'Host: a\r\n', 'host: a:1\r\n', 'host: u@a\r\n', 'host:\r\n') });

const contentLengthValueArb = (n: number) =>
  fc.oneof({ weight: 30, arbitrary: fc.constant(`${n}`) }, { weight: 1, arbitrary: pick(`0${n}`, `+${n}`, `-${n}`, `${n}, ${n}`, `${n},${n + 1}`, `${n}.0`, `0x${n.toString(16)}`, `${n}\xa0`, '', `${n} ${n}`, '1e1', '99999999999999999999') });
const transferEncodingValueArb = fc.oneof(
  { weight: 30, arbitrary: pick('chunked') },
  { weight: 2, arbitrary: pick('Chunked', 'CHUNKED', 'gzip, chunked', 'chunked, gzip', 'chunked, chunked', 'identity', 'chunked;q=1', 'chunked\x0b', ',chunked', 'chunked,', 'xchunked', 'chunked\xa0', '"chunked"', 'identity, chunked', 'chunk') },
);

/** A chunk-size line: the size spelled some way, maybe an extension, then its line end. */
const sizeSpellingArb = (size: number) =>
  fc.oneof({ weight: 20, arbitrary: fc.constant(size.toString(16)) }, { weight: 3, arbitrary: pick(size.toString(16).toUpperCase(), `000${size.toString(16)}`, `${'0'.repeat(40)}${size.toString(16)}`) }, { weight: 1, arbitrary: pick(`0x${size.toString(16)}`, `${size.toString(16)}g`, `-${size.toString(16)}`, `1${'0'.repeat(16)}`, 'fffffffffffffffff', ` ${size.toString(16)}`) });
const chunkExtensionArb = fc.oneof(
  { weight: 20, arbitrary: fc.constant('') },
  { weight: 4, arbitrary: pick(';a', ';a=b', ';a="q;x"', ';a="\\""', ';a=b;c', '; a', ';a =b', ';a= b') },
  { weight: 2, arbitrary: pick(' ;a', '\t;a', ';', ';=', ';a=', ';a b', ';a="x', ';a=b c', ';a\x80', ';a="\x7f"', ';a,b', ' ', ';a="x\\\r\n"') },
);
const chunkArb = fc.tuple(fc.integer({ min: 1, max: 20 }), fc.oneof({ weight: 40, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: pick(-1, 1) }), chunkExtensionArb, lineEndArb, fc.oneof({ weight: 60, arbitrary: fc.constant('\r\n') }, { weight: 1, arbitrary: pick('\n', '', 'xx', '\r') })).chain(([size, off, ext, end, dataEnd]) =>
  sizeSpellingArb(size).map((spelled) => `${spelled}${ext}${end}${'d'.repeat(size + off)}${dataEnd}`),
);
const trailerArb = fc.oneof({ weight: 12, arbitrary: fc.constant('') }, { weight: 3, arbitrary: fieldArb(pick('x-sum', 'x-forwarded-client-cert', 'content-length', 'transfer-encoding'), plainValueArb) }, { weight: 1, arbitrary: pick(' folded\r\n', 'bad line\r\n', 'x: a\x00\r\n') });
const lastChunkArb = fc.tuple(pick('0', '0', '00', '000000', '0;a=b', '0 '), lineEndArb, fc.array(trailerArb, { maxLength: 2 }), lineEndArb).map(([zero, end, trailers, last]) => `${zero}${end}${trailers.join('')}${last}`);
const chunkedBodyArb = fc.tuple(fc.array(chunkArb, { maxLength: 3 }), lastChunkArb).map(([chunks, last]) => chunks.join('') + last);

/** A field line, now and then repeated (the copies generated each on its own). */
const oneOrTwo = (line: fc.Arbitrary<string>) => fc.oneof({ weight: 8, arbitrary: fc.tuple(line) }, { weight: 1, arbitrary: fc.tuple(line, line) });

/** Field lines that frame the body, and the body as sent (which may not be what they say). */
const framingArb: fc.Arbitrary<{ fields: string; body: string }> = fc.oneof(
  { weight: 3, arbitrary: fc.constant({ fields: '', body: '' }) },
  {
    weight: 5,
    arbitrary: fc.tuple(fc.nat(12), fc.oneof({ weight: 30, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: pick(-1, 1) })).chain(([n, off]) =>
      fc.tuple(oneOrTwo(fieldArb(spellingArb('content-length'), contentLengthValueArb(n))), fc.constant('b'.repeat(Math.max(0, n + off)))).map(([lines, body]) => ({ fields: lines.join(''), body })),
    ),
  },
  {
    weight: 5,
    arbitrary: fc.tuple(oneOrTwo(fieldArb(spellingArb('transfer-encoding'), transferEncodingValueArb)), chunkedBodyArb).map(([lines, body]) => ({ fields: lines.join(''), body })),
  },
  {
    weight: 1,
    arbitrary: fc.tuple(fieldArb(spellingArb('transfer-encoding'), transferEncodingValueArb), fieldArb(spellingArb('content-length'), contentLengthValueArb(5)), fc.boolean(), chunkedBodyArb).map(([te, cl, clFirst, body]) => ({ fields: clFirst ? cl + te : te + cl, body })),
  },
);

/** One request as generated: its bytes, and nothing else: the parsers say what it is. */
const requestArb = fc
  .tuple(pick('', '', '', '', '\r\n'), requestLineArb, hostFieldArb, fc.array(otherFieldArb, { maxLength: 3 }), framingArb, fc.nat(4), lineEndArb)
  .map(([lead, line, host, others, framing, at, end]) => {
    const fields = [host, ...others];
    fields.splice(at % (fields.length + 1), 0, framing.fields);
    return `${lead}${line}${fields.join('')}${end}${framing.body}`;
  });

/** A stream of pipelined requests, as latin1 text (one character per byte). */
export const streamArb = fc.array(requestArb, { minLength: 1, maxLength: 3 }).map((requests) => requests.join(''));

// ---------------------------------------------------------------------------------------------
// How each parser splits a stream.
// ---------------------------------------------------------------------------------------------

/** One request a parser read: what it names and the payload length of its body (chunk framing not counted). */
export interface ParsedRequest {
  method: string;
  target: string;
  body: number;
  /** Its body ended before the stream did. */
  complete: boolean;
}

export interface Split {
  requests: ParsedRequest[];
  /** Why the parser stopped reading, if it refused something: llhttp's HPE_ code, or the reader's message. */
  refused?: string;
}

/** A client as the relay's head rewriting sees it. */
const CONTEXT = { remoteAddress: '127.0.0.1', identity: { xfcc: 'Hash=ab;Subject="CN=c"' } } as unknown as ConnectionContext;

/**
 * How the REST relay splits `bytes`, arriving in reads cut at `cuts` (its reader, with every check of judgeRequest()), and the
 * bytes it forwards: heads as rewritten, bodies as they came, trailers left out; nothing after a
 * refusal, nor after a request that ends the connection.
 */
export function relaySplit(bytes: Buffer, cuts: number[] = []): Split & { forwarded: Buffer } {
  const requests: ParsedRequest[] = [];
  const out: Buffer[] = [];
  const reader = new Http1Reader('request', 64 * 1024, {
    head: (head, raw) => {
      const judged = judgeRequest(head);
      requests.push({ method: head.method, target: head.target, body: 0, complete: false });
      if (judged.last) reader.stop();
      return { bytes: forwardedHead(head, raw, judged, CONTEXT), body: judged.body };
    },
    body: (n) => {
      requests.at(-1)!.body += n;
    },
    end: () => {
      requests.at(-1)!.complete = true;
    },
    dropTrailers: true,
  });
  try {
    // As reads cut it: a head, chunk line or CRLF split across two reads is read as one.
    for (const read of chunked(bytes, cuts)) reader.push(read, (b) => out.push(Buffer.from(b)));
  } catch (err) {
    if (!(err instanceof FramingError)) throw err;
    return { requests, refused: err.message, forwarded: Buffer.concat(out) };
  }
  return { requests, forwarded: Buffer.concat(out) };
}

/** A Node HTTP server on loopback (llhttp, its strict defaults) that records, per connection, every request it parsed. */
export interface RecordingServer {
  readonly server: HttpServer;
  readonly port: number;
  /** Connections in the order they came, each with what was read on it. */
  readonly connections: RecordedConnection[];
  /** Every request parsed, in the order their heads were, whatever the connection. */
  readonly requests: RecordedRequest[];
  close(): Promise<void>;
}

export type RecordedRequest = ParsedRequest & { readonly rawHeaders: string[] };

export interface RecordedConnection {
  readonly requests: RecordedRequest[];
  /** llhttp's error code when it refused what it read. */
  parseError?: string;
  closed: boolean;
  readonly whenClosed: Promise<void>;
}

export async function recordingServer(): Promise<RecordingServer> {
  const connections: RecordedConnection[] = [];
  const requests: RecordedRequest[] = [];
  const bySocket = new WeakMap<Socket, RecordedConnection>();
  // Heads the size the relay takes (64 KiB by default) plus its own fields, so Node's 16 KiB default does not decide.
  const server = createHttpServer({ maxHeaderSize: 128 * 1024, keepAliveTimeout: 60_000 }, (req: IncomingMessage, res) => {
    const record = { method: req.method ?? '', target: req.url ?? '', body: 0, complete: false, rawHeaders: req.rawHeaders };
    bySocket.get(req.socket)!.requests.push(record);
    requests.push(record);
    req.on('data', (c: Buffer) => (record.body += c.length));
    req.on('end', () => {
      record.complete = true;
      res.end('ok');
    });
  });
  server.on('connection', (socket: Socket) => {
    const connection: RecordedConnection = { requests: [], closed: false, whenClosed: once(socket, 'close').then(() => undefined) };
    connections.push(connection);
    bySocket.set(socket, connection);
    socket.on('close', () => (connection.closed = true));
  });
  server.on('clientError', (err: NodeJS.ErrnoException, socket: Socket) => {
    const connection = bySocket.get(socket);
    if (connection && err.code?.startsWith('HPE_')) connection.parseError ??= err.code;
    socket.destroy();
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    server,
    port: (server.address() as AddressInfo).port,
    connections,
    requests,
    close: () => {
      server.closeAllConnections();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}

/** How llhttp splits `bytes`: written on a connection of its own, which then half-closes. */
export async function llhttpSplit(server: RecordingServer, bytes: Buffer): Promise<Split> {
  const from = server.connections.length;
  const socket = netConnect(server.port, '127.0.0.1');
  socket.on('error', () => {});
  socket.on('data', () => {});
  await once(socket, 'connect');
  socket.end(bytes);
  await once(socket, 'close');
  await eventually(() => server.connections.length > from, 'the recording server to take the connection');
  const connection = server.connections[from]!;
  await connection.whenClosed;
  const requests = connection.requests.map(({ method, target, body, complete }) => ({ method, target, body, complete }));
  // The stream ended inside a message: not a refusal of what came before.
  const refused = connection.parseError === 'HPE_INVALID_EOF_STATE' ? undefined : connection.parseError;
  return refused === undefined ? { requests } : { requests, refused };
}

/**
 * Where the two splits disagree in a way a client could use: a request the relay's reader took
 * whole that llhttp read otherwise (another method, target or body length, or refused it or
 * something before it), or a request llhttp read that the reader never did while it still read on.
 */
export function splitDisagreement(reader: Split, llhttp: Split): string | undefined {
  for (let i = 0; i < reader.requests.length; i++) {
    const ours = reader.requests[i]!;
    const theirs = llhttp.requests[i];
    if (!ours.complete) {
      // Its head went on; where the reader refused its body, the relay cuts the upstream connection.
      if (theirs && (theirs.method !== ours.method || theirs.target !== ours.target)) return `request ${i}: the reader read ${ours.method} ${ours.target}, llhttp ${theirs.method} ${theirs.target}`;
      if (!theirs) return `request ${i} (${ours.method} ${ours.target}): its head went on, llhttp never read it (${llhttp.refused ?? 'no error'})`;
      return undefined;
    }
    if (!theirs) return `request ${i} (${ours.method} ${ours.target}, body ${ours.body}): the reader took it whole, llhttp ${llhttp.refused ? `refused (${llhttp.refused})` : 'never read it'}`;
    if (theirs.method !== ours.method || theirs.target !== ours.target || theirs.body !== ours.body || !theirs.complete) {
      return `request ${i}: the reader read ${ours.method} ${ours.target} with ${ours.body} body bytes, llhttp ${theirs.method} ${theirs.target} with ${theirs.body}${theirs.complete ? '' : ' (incomplete)'}`;
    }
  }
  if (reader.refused === undefined && llhttp.requests.length > reader.requests.length) return `llhttp read ${llhttp.requests.length} requests, the reader ${reader.requests.length}`;
  return undefined;
}


/** Ends every generated stream: reached only when everything before it was read as requests, and it closes the connection. */
export const LAST_REQUEST = 'GET /v2/health/ready HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n';

/**
 * Access-line errors of a request the relay refused (answered itself, nothing of it forwarded). A body
 * refused is among them: its head, in the same read as the bad line (a stream written at once), never went on.
 */
const REFUSAL_ERRORS = new Set(['bad_request', 'bad_request_body', 'bad_request_target', 'bad_request_authority', 'client_header_timeout']);

/** What one client connection through a proxy came to: what the client read, what the model server parsed, the access lines. */
export interface Exchanged {
  /** Everything the client read until the proxy closed. */
  readonly answer: string;
  /** The model server's connections opened for this one (the relay's; terminate mode may reuse older ones). */
  readonly upstream: RecordedConnection[];
  /** The requests the model server parsed meanwhile, on whatever connection. */
  readonly parsed: RecordedRequest[];
  readonly records: AccessRecord[];
}

/** Writes `bytes` and then LAST_REQUEST on a new mTLS connection to `restPort`; resolves once the proxy and the model server are done with it. */
export async function exchange(setup: { restPort: number; pki: TestPki; upstream: RecordingServer; records: AccessRecord[]; relay: boolean }, bytes: Buffer): Promise<Exchanged> {
  const fromConnection = setup.upstream.connections.length;
  const fromRequest = setup.upstream.requests.length;
  const fromRecord = setup.records.length;
  const socket = await openRaw(setup.restPort, setup.pki);
  socket.write(Buffer.concat([bytes, Buffer.from(LAST_REQUEST)]));
  const answer = await readToCloseWithin(socket, 30_000);
  const upstream = () => setup.upstream.connections.slice(fromConnection);
  // The relay's own upstream connection closes with the client's; terminate mode's are pooled, its requests all answered by now.
  if (setup.relay) {
    await Promise.all(upstream().map((c) => c.whenClosed));
    await eventually(() => upstream().every((c) => c.closed), 'the model server to see its connections close');
  }
  return { answer, upstream: upstream(), parsed: setup.upstream.requests.slice(fromRequest), records: setup.records.slice(fromRecord) };
}

/**
 * The statuses of the responses in what a client read, in order (100 Continue included), wherever
 * one begins: right after a body too, as after our own plain-text answers, which end with a bare LF.
 */
export const answerStatuses = (answer: string): number[] => [...answer.matchAll(/HTTP\/1\.[01] (\d{3}) /g)].map((m) => Number(m[1]));

const isXfccName = (name: string) => name.toLowerCase().replaceAll('_', '-') === 'x-forwarded-client-cert';

/**
 * What is wrong with an exchange through the relay, if anything: the model server must have parsed
 * exactly the requests the relay logged as forwarded (same order, method, target, body length),
 * each with one x-forwarded-client-cert, the proxy's (`xfcc`), without refusing any of it; a request
 * the relay refused must have got its answer naming the cause, and nothing of it went upstream.
 */
export function relayDefect(result: Exchanged, xfcc: string): string | undefined {
  const parsed = result.parsed;
  const refused = result.records.filter((r) => r.error !== undefined && REFUSAL_ERRORS.has(r.error));
  const forwarded = result.records.filter((r) => !refused.includes(r));
  const parseError = result.upstream.map((c) => c.parseError).find((code) => code !== undefined && code !== 'HPE_INVALID_EOF_STATE');
  if (parseError) return `the model server refused what the relay forwarded: ${parseError}`;
  const seen = (list: { method: string; target?: string; path?: string }[]) => list.map((r) => `${r.method} ${r.target ?? r.path}`);
  if (JSON.stringify(seen(parsed)) !== JSON.stringify(seen(forwarded))) return `the model server parsed ${JSON.stringify(seen(parsed))}, the relay logged as forwarded ${JSON.stringify(seen(forwarded))}`;
  for (const [i, request] of parsed.entries()) {
    const ours = forwarded[i]!;
    if (request.complete && request.body !== ours.bytesIn) return `request ${i}: the model server read ${request.body} body bytes, the relay forwarded ${ours.bytesIn}`;
    const xfccs = request.rawHeaders.filter((_, at) => at % 2 === 0 && isXfccName(request.rawHeaders[at]!)).length;
    const value = request.rawHeaders[request.rawHeaders.findIndex((name, at) => at % 2 === 0 && isXfccName(name)) + 1];
    if (xfccs !== 1 || value !== xfcc) return `request ${i}: ${xfccs} x-forwarded-client-cert fields, the first ${JSON.stringify(value)}`;
  }
  if (refused.length > 1) return `${refused.length} refusals on one connection`;
  const refusal = refused[0];
  if (refusal && refusal.status !== 0) {
    const answer = new RegExp(`HTTP/1\\.1 ${refusal.status} [^\\r]*\\r\\n[^]*?\\r\\n\\r\\n${refusal.method === 'HEAD' ? '' : '.+'}$`, 's').exec(result.answer);
    if (!answer) return `refused with ${refusal.status} (${refusal.error}), but the client's last answer is not that: ${JSON.stringify(result.answer.slice(-300))}`;
  }
  return undefined;
}
