/**
 * Generated REST exchanges for the fidelity properties (test/terminate-fidelity.test.ts): a
 * request as a client sends it, the answer a model server gives it, a model server that records
 * what reached it and answers as told, Node's HTTPS and HTTP/2 clients that record what came back,
 * and what the proxy is documented to change on the way (README: forwarding headers, repeated
 * REST fields, REST relay), so that what reached each end can be held to what left the other.
 */
import { once } from 'node:events';
import { createServer as createHttpServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { request as httpsRequest } from 'node:https';
import type { ClientHttp2Session } from 'node:http2';
import type { AddressInfo } from 'node:net';
import fc from 'fast-check';
import { tlsClientOptions } from './harness.js';
import { patternBytes } from './integrity-peers.js';
import { pick } from './http1-streams.js';
import type { TestPki } from './pki.js';

/** A header section as lines in order: [name as spelled, value]. */
export type Lines = readonly (readonly [string, string])[];

export interface ClientRequestSpec {
  readonly method: string;
  readonly target: string;
  /** HTTP/1.1: the Host line; HTTP/2: :authority. */
  readonly authority: string;
  readonly lines: Lines;
  readonly body: Buffer;
  /** How the body is framed: a Content-Length line, chunked (HTTP/1.1) or DATA frames alone (HTTP/2), or no body at all. */
  readonly framing: 'none' | 'length' | 'unframed';
  /** The body in the pieces it is written in. */
  readonly cuts: readonly number[];
  readonly expectContinue: boolean;
}

export interface AnswerSpec {
  readonly status: number;
  readonly lines: Lines;
  readonly body: Buffer;
  /** Content-Length, chunked, or a body that runs until the model server closes. */
  readonly framing: 'length' | 'chunked' | 'close';
  /** Trailer fields after a chunked body. */
  readonly trailers: Lines;
  /** A 103 Early Hints before the answer. */
  readonly earlyHints: boolean;
}

export interface Exchange {
  readonly request: ClientRequestSpec;
  readonly answer: AnswerSpec;
}

// ---------------------------------------------------------------------------------------------
// The grammar.
// ---------------------------------------------------------------------------------------------

const spelled = (name: string) => fc.oneof({ weight: 4, arbitrary: fc.constant(name) }, { weight: 1, arbitrary: pick(name.toUpperCase(), name.replace(/(^|-)./g, (s) => s.toUpperCase())) });
/** A field value as RFC 9110 5.5 has it (no white space at either end), empty now and then, obs-text (a byte above 0x7f) rarely. */
const valueArb = fc.oneof(
  { weight: 20, arbitrary: fc.stringMatching(/^[\x21-\x7e]([\x20-\x7e]{0,24}[\x21-\x7e])?$/) },
  { weight: 2, arbitrary: fc.constant('') },
  { weight: 1, arbitrary: pick('caf\xe9', '\xa0x\xff') },
);
const tokenArb = fc.stringMatching(/^[a-z0-9!#$%&'*+.^_`|~-]{1,12}$/);

/** Names a request may repeat (none that HTTP/2 carries once: Node's client refuses to send those twice). */
const REPEATABLE_REQUEST_NAMES = ['accept', 'x-a', 'x-b', 'cache-control', 'accept-language', 'cookie', 'warning', 'forwarded', 'x-forwarded-for'];
/** Names a request has once at most. */
const SINGLE_REQUEST_NAMES = ['user-agent', 'authorization', 'content-type', 'referer', 'if-none-match'];
/** Names the proxy sets or drops (README: forwarding headers; hop-by-hop fields). */
const OURS_OR_HOP = ['x-forwarded-client-cert', 'X_Forwarded_Client_Cert', 'x-forwarded-proto', 'x_forwarded_for', 'keep-alive', 'te', 'proxy-connection', 'trailer', 'http2-settings'];

const requestLineArb = fc.oneof(
  { weight: 12, arbitrary: fc.tuple(fc.oneof(pick(...REPEATABLE_REQUEST_NAMES), tokenArb.map((t) => `x-${t}`)).chain(spelled), valueArb) },
  { weight: 3, arbitrary: fc.tuple(pick(...OURS_OR_HOP).chain(spelled), valueArb) },
);
/** A Connection line naming a field, and that field: both stay with the hop. */
const connectionListedArb = fc.tuple(spelled('connection'), pick('x-hop', 'X-Hop, keep-alive', 'close', 'keep-alive')).map(([name, value]): Lines => [[name, value], ...(value.toLowerCase().includes('x-hop') ? [['x-hop', '1'] as const] : [])]);

/** Up to `count` short lines, or a few that fill many KiB: a header section near the limit. */
const requestLinesArb = fc.tuple(
  fc.array(requestLineArb, { maxLength: 12 }),
  fc.uniqueArray(fc.tuple(pick(...SINGLE_REQUEST_NAMES), valueArb), { maxLength: 3, selector: ([name]) => name }),
  fc.oneof({ weight: 5, arbitrary: fc.constant<Lines>([]) }, { weight: 1, arbitrary: connectionListedArb }),
  fc.oneof({ weight: 8, arbitrary: fc.constant<Lines>([]) }, { weight: 1, arbitrary: fc.integer({ min: 100, max: 600 }).map((n): Lines => Array.from({ length: n }, (_, i) => [`x-many-${i}`, `${i}`])) }, { weight: 1, arbitrary: fc.integer({ min: 1, max: 5 }).map((n): Lines => Array.from({ length: n }, (_, i) => [`x-big-${i}`, 'v'.repeat(8000)])) }),
).chain(([lines, singles, listed, bulk]) => fc.shuffledSubarray([...lines, ...singles, ...listed], { minLength: lines.length + singles.length + listed.length }).map((shuffled): Lines => [...shuffled, ...bulk]));

const pchar = /[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-F]{2}/.source;
const segmentArb = fc.stringMatching(new RegExp(`^(${pchar}){0,12}$`));
/** A path and query as RFC 3986 has them: percent-encoding, empty segments (`//`), odd sub-delims, and now and then one many KiB long. */
const targetArb = fc.oneof(
  { weight: 10, arbitrary: fc.tuple(fc.array(segmentArb, { minLength: 1, maxLength: 6 }), fc.option(fc.stringMatching(new RegExp(`^(${pchar}|[/?]){0,30}$`)))).map(([segments, query]) => `/${segments.join('/')}${query === null ? '' : `?${query}`}`) },
  { weight: 1, arbitrary: pick('/', '//', '//v2//models/', '/v2/models/m%2Fx/infer?q=%25&a=b=c', "/a?!$&'()*+,;=:@/?") },
  { weight: 1, arbitrary: fc.integer({ min: 2000, max: 20000 }).map((n) => `/long/${'a'.repeat(n)}?q=${'%41'.repeat(100)}`) },
);
const methodArb = pick('GET', 'POST', 'PUT', 'DELETE', 'HEAD', 'OPTIONS', 'PATCH');
const authorityArb = pick('localhost', 'model.example:8443', 'Upper.Example', '127.0.0.1:9', '[::1]:8000');

/** Sizes around the 64 KiB the proxy reads whole before forwarding, and small ones. */
const bodySizeArb = fc.oneof({ weight: 6, arbitrary: fc.nat(300) }, { weight: 1, arbitrary: pick(0, 65535, 65536, 65537, 150_000) });

/** Where a body is cut into writes: offsets, sorted and within it. */
const cutsOf = (size: number) => fc.array(fc.nat(Math.max(0, size - 1)), { maxLength: 4 }).map((cuts) => [...new Set(cuts)].sort((a, b) => a - b));

export const clientRequestArb: fc.Arbitrary<ClientRequestSpec> = fc
  .tuple(methodArb, targetArb, authorityArb, requestLinesArb, fc.oneof({ weight: 2, arbitrary: fc.constant('none' as const) }, { weight: 3, arbitrary: pick('length' as const, 'unframed' as const) }), bodySizeArb, fc.nat(), fc.boolean())
  .chain(([method, target, authority, lines, framing, size, tag, expectContinue]) => {
    const body = framing === 'none' ? Buffer.alloc(0) : patternBytes(tag, size);
    // Node's HTTPS client sends a head with Expect at once, as UTF-8 (where it sends others as latin1): obs-text would reach the proxy mangled.
    const obsText = lines.some(([, value]) => /[\x80-\xff]/.test(value));
    return cutsOf(body.length).map((cuts) => ({ method, target, authority, lines, body, framing, cuts, expectContinue: expectContinue && framing !== 'none' && !obsText }));
  });

/** Names an answer may carry; set-cookie and www-authenticate repeated as a model server behind a gateway may. */
const ANSWER_NAMES = ['x-r', 'cache-control', 'vary', 'set-cookie', 'www-authenticate', 'link', 'content-language', 'etag', 'X-Request-Id', 'content-encoding'];
const answerLineArb = fc.tuple(fc.oneof({ weight: 6, arbitrary: pick(...ANSWER_NAMES) }, { weight: 1, arbitrary: pick('keep-alive', 'proxy-connection', 'upgrade') }).chain(spelled), valueArb);
const answerLinesArb = fc.tuple(
  fc.array(answerLineArb, { maxLength: 10 }),
  fc.oneof({ weight: 5, arbitrary: fc.constant<Lines>([]) }, { weight: 1, arbitrary: pick<Lines>([['Connection', 'x-hop'], ['x-hop', 'gone']], [['connection', 'X-Hop, keep-alive'], ['X-Hop', 'gone']]) }),
  fc.oneof({ weight: 8, arbitrary: fc.constant<Lines>([]) }, { weight: 1, arbitrary: fc.integer({ min: 1, max: 4 }).map((n): Lines => Array.from({ length: n }, (_, i) => [`x-large-${i}`, 'w'.repeat(7000)])) }),
).map(([lines, listed, bulk]): Lines => [...lines, ...listed, ...bulk]);

/** Statuses with and without bodies (204 and 304 never have one). */
const statusArb = pick(200, 200, 201, 204, 206, 301, 304, 400, 404, 413, 418, 500, 503);

export const answerArb: fc.Arbitrary<AnswerSpec> = fc
  .tuple(statusArb, answerLinesArb, fc.oneof({ weight: 6, arbitrary: fc.nat(400) }, { weight: 1, arbitrary: pick(0, 70_000, 1_100_000) }), fc.nat(), pick('length' as const, 'chunked' as const, 'close' as const), fc.array(fc.tuple(pick('x-checksum', 'x-t', 'server-timing'), valueArb), { maxLength: 2 }), fc.boolean())
  .map(([status, lines, size, tag, framing, trailers, earlyHints]) => {
    const bodiless = status === 204 || status === 304;
    return { status, lines, body: bodiless ? Buffer.alloc(0) : patternBytes(tag ^ 0x5a5a, size), framing: bodiless ? 'length' : framing, trailers: framing === 'chunked' && !bodiless ? trailers : [], earlyHints: earlyHints && status !== 304 };
  });

export const exchangeArb: fc.Arbitrary<Exchange> = fc.record({ request: clientRequestArb, answer: answerArb });

// ---------------------------------------------------------------------------------------------
// The model server: records what reached it, answers as the exchange says.
// ---------------------------------------------------------------------------------------------

/** The field that ties a request to its planned answer; the proxy passes it on as any other. */
export const EXCHANGE_ID = 'x-exchange-id';
/** The Date every answer carries, so Node's own is not added. */
export const ANSWER_DATE = 'Tue, 01 Dec 2026 00:00:00 GMT';

export interface Received {
  readonly method: string;
  readonly url: string;
  readonly rawHeaders: string[];
  readonly body: Buffer;
  /** A chunked body's trailer fields, as they came. */
  readonly rawTrailers: string[];
}

export interface RecordingModelServer {
  readonly port: number;
  /** Plans the answer to the request carrying `id`; resolves with what that request was. */
  expect(id: string, answer: AnswerSpec): Promise<Received>;
  close(): Promise<void>;
}

export async function recordingModelServer(): Promise<RecordingModelServer> {
  const planned = new Map<string, { answer: AnswerSpec; received: (r: Received) => void }>();
  // Heads past what the proxy takes (64 KiB), so Node's 16 KiB default does not decide.
  const server = createHttpServer({ maxHeaderSize: 512 * 1024, keepAliveTimeout: 60_000 }, (req, res) => {
    const plan = planned.get(String(req.headers[EXCHANGE_ID]));
    if (!plan) {
      res.writeHead(599).end();
      return;
    }
    planned.delete(String(req.headers[EXCHANGE_ID]));
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      plan.received({ method: req.method ?? '', url: req.url ?? '', rawHeaders: req.rawHeaders, body: Buffer.concat(chunks), rawTrailers: req.rawTrailers });
      answer(req, res, plan.answer);
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: (server.address() as AddressInfo).port,
    expect: (id, answer) => new Promise((received) => planned.set(id, { answer, received })),
    close: () => {
      server.closeAllConnections();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}

/** The answer's own lines as the model server writes them: its fields, a Date, and a Content-Length when framed so. `http10`: to an HTTP/1.0 request, which no chunked answer can carry trailers to. */
export function answerLines(answer: AnswerSpec, method: string, http10 = false): Lines {
  const length: Lines = answer.framing === 'length' && answer.status !== 204 && answer.status !== 304 ? [['Content-Length', String(answer.body.length)]] : [];
  // Trailer names the trailer fields to come (RFC 9110 6.6.2); Node refuses it on an answer that cannot carry them.
  const trailer: Lines = answer.trailers.length > 0 && method !== 'HEAD' && !http10 ? [['Trailer', [...new Set(answer.trailers.map(([name]) => name))].join(', ')]] : [];
  return [...answer.lines, ['Date', ANSWER_DATE], ...length, ...trailer];
}

function answer(req: IncomingMessage, res: ServerResponse, spec: AnswerSpec): void {
  if (spec.earlyHints) res.writeEarlyHints({ link: '</style.css>; rel=preload; as=style' });
  // No Content-Length and no chunking: Node ends such a body by closing the connection.
  if (spec.framing === 'close') res.useChunkedEncodingByDefault = false;
  const http10 = req.httpVersion === '1.0';
  res.writeHead(spec.status, answerLines(spec, req.method ?? '', http10).flat());
  // A HEAD's answer has no body, so no chunked one to carry trailers (Node throws on them).
  if (spec.trailers.length > 0 && req.method !== 'HEAD' && !http10) res.addTrailers(spec.trailers.map(([n, v]): [string, string] => [n, v]));
  // Node 20 puts a head that waits for a body Buffer in front of what it holds back for a pipelined
  // response not yet on the connection, our 103 among it (OutgoingMessage _send's unshift): written
  // now with an empty latin1 string, it goes after the 103, as a model server must send them
  // (flushHeaders() would write it as UTF-8; an answer without a body sends it with end() alike).
  if (spec.earlyHints) res.write('', 'latin1');
  if (req.method === 'HEAD' || spec.body.length === 0) {
    res.end();
    return;
  }
  // Two writes: a single end(body) would have Node add a Content-Length of its own.
  const half = spec.body.length >> 1;
  res.write(spec.body.subarray(0, half));
  res.end(spec.body.subarray(half));
}

// ---------------------------------------------------------------------------------------------
// The clients: what a client sent and what came back.
// ---------------------------------------------------------------------------------------------

export interface Answered {
  readonly status: number;
  /** Interim statuses (100, 103) the client saw before the answer. */
  readonly interim: number[];
  readonly rawHeaders: string[];
  readonly body: Buffer;
  readonly rawTrailers: string[];
}

/** The request's lines as the client sends them, our exchange id among them. */
export function requestLines(request: ClientRequestSpec, id: string, http2: boolean): Lines {
  const framing: Lines = request.framing === 'length' ? [['Content-Length', String(request.body.length)]] : request.framing === 'unframed' && !http2 ? [['Transfer-Encoding', 'chunked']] : [];
  const expect: Lines = request.expectContinue ? [['Expect', '100-continue']] : [];
  // Node's clients refuse HTTP/2's connection-specific fields, and a Trailer line on a body that is not chunked.
  const chunked = request.framing === 'unframed' && !http2;
  const lines = request.lines.filter(([name]) => !(http2 && HTTP2_CONNECTION_SPECIFIC.has(name.toLowerCase())) && (chunked || name.toLowerCase() !== 'trailer'));
  return [[EXCHANGE_ID, id], ...(http2 ? [] : [['Host', request.authority] as const]), ...lines, ...framing, ...expect];
}

/** Fields Node's HTTP/2 client refuses to send (RFC 9113 8.2.2; `te` but for `trailers`, which the grammar does not make). */
const HTTP2_CONNECTION_SPECIFIC = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'upgrade', 'te', 'http2-settings']);

function pieces(body: Buffer, cuts: readonly number[]): Buffer[] {
  const out: Buffer[] = [];
  let from = 0;
  for (const cut of [...cuts, body.length]) {
    if (cut > from) out.push(body.subarray(from, cut));
    from = Math.max(from, cut);
  }
  return out;
}

/** The request over HTTPS/1.1 (a connection of its own), with the test's client certificate. */
export function sendHttp1(port: number, pki: TestPki, request: ClientRequestSpec, id: string): Promise<Answered> {
  return new Promise((resolve, reject) => {
    const interim: number[] = [];
    const req = httpsRequest({ host: '127.0.0.1', port, agent: false, maxHeaderSize: 512 * 1024, method: request.method, path: request.target, headers: requestLines(request, id, false).flat(), ...tlsClientOptions(pki) }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, interim, rawHeaders: res.rawHeaders, body: Buffer.concat(chunks), rawTrailers: res.rawTrailers }));
      res.on('error', reject);
    });
    req.on('information', (info) => interim.push(info.statusCode));
    req.on('error', reject);
    const send = () => {
      for (const piece of pieces(request.body, request.cuts)) req.write(piece);
      req.end();
    };
    if (request.expectContinue) req.once('continue', send);
    else send();
  });
}

/** The request as a stream of `session`. */
export function sendHttp2(session: ClientHttp2Session, request: ClientRequestSpec, id: string): Promise<Answered> {
  return new Promise((resolve, reject) => {
    const interim: number[] = [];
    const headers: Record<string, string | string[]> = { ':method': request.method, ':path': request.target, ':authority': request.authority };
    for (const [name, value] of requestLines(request, id, true)) {
      const key = name.toLowerCase();
      const had = headers[key];
      headers[key] = had === undefined ? value : [had, value].flat();
    }
    const stream = session.request(headers, { endStream: request.framing === 'none' });
    let status = 0;
    let rawHeaders: string[] = [];
    let rawTrailers: string[] = [];
    const chunks: Buffer[] = [];
    stream.on('headers', (h) => interim.push(Number(h[':status'])));
    stream.on('response', (h: Record<string, unknown>, _flags: number, raw: string[]) => {
      status = Number(h[':status']);
      rawHeaders = raw.slice(2);
    });
    stream.on('trailers', (_t: Record<string, unknown>, _flags: number, raw: string[]) => (rawTrailers = raw));
    stream.on('data', (c: Buffer) => chunks.push(c));
    stream.on('end', () => resolve({ status, interim, rawHeaders, body: Buffer.concat(chunks), rawTrailers }));
    stream.on('error', reject);
    if (request.framing === 'none') return;
    const send = () => {
      for (const piece of pieces(request.body, request.cuts)) stream.write(piece);
      stream.end();
    };
    if (request.expectContinue) stream.once('continue', send);
    else send();
  });
}

// ---------------------------------------------------------------------------------------------
// What the proxy is documented to change.
// ---------------------------------------------------------------------------------------------

/** RFC 9110 7.6.1's hop-by-hop fields, HTTP/2's HTTP2-Settings, Expect (met by the proxy) and Trailer (README: REST relay). */
export const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'http2-settings', 'expect']);
const OURS = new Set(['x-forwarded-client-cert', 'x-forwarded-for', 'x-forwarded-proto']);

/** Per lower-cased name, its values in the order sent. */
export type FieldMap = Map<string, string[]>;

export function fieldMap(lines: Lines | readonly string[]): FieldMap {
  const pairs: Lines = typeof lines[0] === 'string' ? pairsOf(lines as string[]) : (lines as Lines);
  const out: FieldMap = new Map();
  for (const [name, value] of pairs) {
    const key = name.toLowerCase();
    out.set(key, [...(out.get(key) ?? []), value]);
  }
  return out;
}

function pairsOf(raw: readonly string[]): Lines {
  const out: [string, string][] = [];
  for (let i = 0; i < raw.length; i += 2) out.push([raw[i]!, raw[i + 1]!]);
  return out;
}

/** Names listed in the section's Connection lines. */
function connectionListed(fields: FieldMap): Set<string> {
  return new Set((fields.get('connection') ?? []).flatMap((v) => v.split(',')).map((v) => v.trim().toLowerCase()).filter(Boolean));
}

/** `fields` without what stays with the hop: hop-by-hop names and those the Connection lines name. */
export function endToEnd(fields: FieldMap): FieldMap {
  const listed = connectionListed(fields);
  return new Map([...fields].filter(([name]) => !HOP_BY_HOP.has(name) && !listed.has(name)));
}

/** A map as sorted text, for assertion messages that show the difference. */
export const shown = (fields: FieldMap): string[] => [...fields].map(([name, values]) => `${name}: ${JSON.stringify(values)}`).sort();

/**
 * What the model server should get, as the README documents terminate mode: the client's end-to-end
 * fields lower-cased, line by line in order (an HTTP/2 client's cookies joined with "; "), Host from the
 * authority, a client's forwarding fields replaced by ours (X-Forwarded-For appended to), and the body's
 * framing the proxy's own (compared apart: the body's bytes).
 */
export function expectedUpstreamFields(request: ClientRequestSpec, id: string, http2: boolean, xfcc: string, remote: string): FieldMap {
  const sent = endToEnd(fieldMap(requestLines(request, id, http2)));
  const out: FieldMap = new Map();
  for (const [name, values] of sent) {
    if (name === 'host' || name === 'content-length' || OURS.has(name) || OURS.has(name.replaceAll('_', '-'))) continue;
    out.set(name, http2 && name === 'cookie' ? [joinedCrumbs(values)] : values);
  }
  out.set('host', [request.authority]);
  const forwardedFor = sent.get('x-forwarded-for');
  out.set('x-forwarded-for', [[...(forwardedFor === undefined ? [] : [forwardedFor.join(', ')]), remote].join(', ')]);
  out.set('x-forwarded-proto', ['https']);
  out.set('x-forwarded-client-cert', [xfcc]);
  return out;
}

/** An HTTP/2 client's cookie lines as one (RFC 9113 8.2.3), empty crumbs left out (README). */
function joinedCrumbs(values: readonly string[]): string {
  return values.length === 1 ? values[0]! : values.filter((v) => v !== '').join('; ');
}

/**
 * What the model server got, its framing fields left out (compared apart: the body's bytes), and the
 * Connection line of undici's own (`keep-alive`; `close` after a HEAD, whose connection it does not reuse).
 */
export function receivedFields(received: Received): FieldMap {
  const fields = fieldMap(received.rawHeaders);
  fields.delete('content-length');
  fields.delete('transfer-encoding');
  if (['keep-alive', 'close'].includes(String(fields.get('connection')))) fields.delete('connection');
  return fields;
}

/** What the client got, the hop's own fields left out. */
export function answeredFields(answered: Answered): FieldMap {
  return endToEnd(fieldMap(answered.rawHeaders));
}

/** Names the grammar's answers may repeat that HTTP/2 carries once (Node's kSingleValueHeaders): an HTTP/2 client gets the first (README). */
const HTTP2_ONCE = new Set(['content-language', 'etag', 'content-encoding', 'date', 'content-length']);

/** What the client should get of the answer's fields: its end-to-end ones; over HTTP/2 the first value of a field HTTP/2 carries once. */
export function expectedAnswerFields(answer: AnswerSpec, method: string, http2: boolean): FieldMap {
  const fields = endToEnd(fieldMap(answerLines(answer, method)));
  if (http2) for (const [name, values] of fields) if (HTTP2_ONCE.has(name)) fields.set(name, values.slice(0, 1));
  return fields;
}

/** The trailer fields the client should get: the answer's, as sent. */
export function expectedTrailers(answer: AnswerSpec, method: string): string[] {
  return method === 'HEAD' ? [] : answer.trailers.flat();
}

/** The body the client should get: none for a HEAD, a 204 or a 304. */
export function expectedAnswerBody(answer: AnswerSpec, method: string): Buffer {
  return method === 'HEAD' ? Buffer.alloc(0) : answer.body;
}

// ---------------------------------------------------------------------------------------------
// Requests as a raw-socket client writes them: what Node's client never sends.
// ---------------------------------------------------------------------------------------------

/** A request written byte by byte: its version, and for a chunked body its chunk extensions and trailer fields. */
export interface RawRequestSpec {
  readonly request: ClientRequestSpec;
  readonly version: '1.1' | '1.0';
  /** `;ext=v` after every chunk size. */
  readonly chunkExtension: boolean;
  /** Trailer fields after the last chunk (neither mode forwards them: README, REST relay). */
  readonly trailers: Lines;
}

/**
 * A request's bytes (latin1: obs-text goes as the single bytes it stands for). `last`: it says
 * `Connection: close` (HTTP/1.1; HTTP/1.0 closes by default), so the connection ends after its answer.
 */
export function rawRequestBytes(raw: RawRequestSpec, id: string, last: boolean): Buffer {
  const { request } = raw;
  const close: Lines = last && raw.version === '1.1' ? [['Connection', 'close']] : [];
  const head = [`${request.method} ${request.target} HTTP/${raw.version}`, ...[...requestLines(request, id, false), ...close].map(([name, value]) => `${name}: ${value}`), '', ''].join('\r\n');
  const body = request.framing === 'unframed' ? chunkedBytes(pieces(request.body, request.cuts), raw) : request.body;
  return Buffer.concat([Buffer.from(head, 'latin1'), body]);
}

function chunkedBytes(chunks: readonly Buffer[], raw: RawRequestSpec): Buffer {
  const extension = raw.chunkExtension ? ';ext=v' : '';
  const trailers = raw.trailers.map(([name, value]) => `${name}: ${value}\r\n`).join('');
  return Buffer.concat([
    ...chunks.flatMap((chunk) => [Buffer.from(`${chunk.length.toString(16)}${extension}\r\n`), chunk, Buffer.from('\r\n')]),
    Buffer.from(`0${extension}\r\n${trailers}\r\n`, 'latin1'),
  ]);
}

/** Requests any raw client may send: Node's client's, with chunk extensions and trailer fields now and then; HTTP/1.0 when `http10` (no chunked body there). */
export const rawRequestArb = (http10: boolean): fc.Arbitrary<RawRequestSpec> =>
  fc.record({
    request: clientRequestArb.map((request): ClientRequestSpec => (http10 && request.framing === 'unframed' ? { ...request, framing: 'length' } : request)),
    version: fc.constant(http10 ? ('1.0' as const) : ('1.1' as const)),
    chunkExtension: fc.boolean(),
    trailers: fc.oneof({ weight: 4, arbitrary: fc.constant<Lines>([]) }, { weight: 1, arbitrary: fc.array(fc.tuple(pick('x-sum', 'X-Checksum', 'server-timing'), valueArb), { minLength: 1, maxLength: 2 }) }),
  });
