/**
 * Generated gRPC calls for the gRPC fidelity property (test/grpc-fidelity.test.ts): the metadata,
 * path and messages a client sends, the answer a model server gives (response metadata alone or
 * with messages, Trailers-Only, statuses known and unknown, percent-encoded messages, `-bin`
 * trailers), an h2c model server that records what reached it and answers as told, a raw Node
 * HTTP/2 client that records what came back, and what the proxy is documented to change.
 */
import { once } from 'node:events';
import { constants, createServer as createH2cServer, type ClientHttp2Session, type IncomingHttpHeaders, type OutgoingHttpHeaders, type ServerHttp2Session, type ServerHttp2Stream, type ServerStreamResponseOptions } from 'node:http2';
import type { AddressInfo } from 'node:net';
import fc from 'fast-check';
import { patternBytes } from './integrity-peers.js';
import { pick } from './http1-streams.js';
import { encodeGrpcMessage } from '../../src/grpc-status.js';
import { h2Frame, literalField } from './raw-h2.js';
import { disguisesOurs, XFCC } from '../../src/forwarding-headers.js';

/** A header section as fields in order: [name, value]. */
export type Fields = readonly (readonly [string, string])[];

export interface GrpcMessage {
  readonly compressed: boolean;
  readonly size: number;
  readonly tag: number;
}

export interface CallSpec {
  readonly path: string;
  readonly metadata: Fields;
  readonly messages: readonly GrpcMessage[];
}

/**
 * When the model server answers: once the whole request is in; its response headers at once and
 * the rest once the request is in (a bidi call's server); or all of it before reading the request
 * (an early status).
 */
export type AnswerTiming = 'after-request' | 'headers-first' | 'early';

export interface GrpcAnswerSpec {
  /** The HTTP status: 200, or one a gateway or a server in trouble answers a gRPC call with. */
  readonly status: number;
  readonly contentType: string;
  readonly metadata: Fields;
  /** Trailers-Only: the status and trailers in the response HEADERS, with END_STREAM. */
  readonly trailersOnly: boolean;
  readonly messages: readonly GrpcMessage[];
  readonly trailers: Fields;
  readonly timing: AnswerTiming;
}

export interface GrpcExchange {
  readonly call: CallSpec;
  readonly answer: GrpcAnswerSpec;
}

// ---------------------------------------------------------------------------------------------
// The grammar.
// ---------------------------------------------------------------------------------------------

/** Inside a value: printable ASCII, space and tab, and obs-text (HTTP/2 allows bytes 0x80-0xff; Node sends strings as latin1). */
const innerChar = fc.oneof({ weight: 30, arbitrary: fc.integer({ min: 0x20, max: 0x7e }) }, { weight: 2, arbitrary: fc.constant(0x09) }, { weight: 2, arbitrary: fc.integer({ min: 0x80, max: 0xff }) }).map((c) => String.fromCharCode(c));
/** RFC 9113 8.2.1: no white space at either end. */
const edgeChar = fc.oneof({ weight: 30, arbitrary: fc.integer({ min: 0x21, max: 0x7e }) }, { weight: 2, arbitrary: fc.integer({ min: 0x80, max: 0xff }) }).map((c) => String.fromCharCode(c));
const shortValue = fc.oneof(
  { weight: 2, arbitrary: fc.constant('') },
  { weight: 20, arbitrary: fc.tuple(edgeChar, fc.array(innerChar, { maxLength: 30 }), edgeChar).map(([a, inner, b]) => a + inner.join('') + b) },
  { weight: 4, arbitrary: edgeChar },
);
/** A value of several KiB, now and then. */
const longValue = fc.tuple(fc.integer({ min: 1000, max: 12_000 }), fc.nat()).map(([n, tag]) => Buffer.from(patternBytes(tag, n).map((b) => 0x21 + (b % 94))).toString('latin1'));
/** One value of tens of KB, near the limits the README documents (requests: --mtls_max_header_size, 64 KiB by default; answers: twice that). */
const hugeValue = fc.tuple(fc.integer({ min: 20_000, max: 50_000 }), fc.nat()).map(([n, tag]) => Buffer.from(patternBytes(tag, n).map((b) => 0x21 + (b % 94))).toString('latin1'));
const valueArb = fc.oneof({ weight: 60, arbitrary: shortValue }, { weight: 2, arbitrary: longValue }, { weight: 1, arbitrary: hugeValue });

/** Fields as HTTP/2 counts them (RFC 9113 6.5.2: name, value and 32 bytes each). */
export function listSize(fields: Fields): number {
  return fields.reduce((size, [name, value]) => size + name.length + value.length + 32, 0);
}

/** The request metadata a client may send within --mtls_max_header_size (64 KiB), the pseudo-headers, a long path and our call id left room. */
const REQUEST_METADATA_MAX = 56_000;
/** The response metadata (or trailers) the proxy takes: twice --mtls_max_header_size, with room. */
const ANSWER_METADATA_MAX = 120_000;

/** A `-bin` value: arbitrary bytes in base64, padded or not (the gRPC spec has receivers take both). */
const binValueArb = fc.tuple(fc.uint8Array({ maxLength: 64 }), fc.boolean()).map(([bytes, padded]) => {
  const b64 = Buffer.from(bytes).toString('base64');
  return padded ? b64 : b64.replace(/=+$/, '');
});

/** Metadata keys as gRPC has them (0-9 a-z _ - .), and now and then another token character HTTP/2 allows in a name. */
const keyArb = fc.oneof(
  { weight: 10, arbitrary: fc.stringMatching(/^[a-z][a-z0-9_.-]{0,15}$/) },
  { weight: 1, arbitrary: fc.stringMatching(/^x[a-z0-9!#$%&'*+^`|~]{1,8}$/) },
).filter((k) => !k.endsWith('-bin') && !k.startsWith('grpc-') && !disguisesOurs(k) && !['te', 'host', 'connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'upgrade', 'http2-settings', 'cookie'].includes(k));
const plainField = fc.tuple(keyArb, valueArb);
const binField = fc.tuple(keyArb.map((k) => `${k}-bin`), binValueArb);

/** Fields a gRPC stack reads or sets (README: te, forwarding fields), with values clients send. */
const reservedRequestField: fc.Arbitrary<readonly [string, string]> = fc.oneof(
  fc.tuple(fc.constant('grpc-timeout'), pick('1S', '100m', '99999999n', '5M', '1H', '30u')),
  fc.tuple(pick('grpc-encoding', 'grpc-message-type'), pick('identity', 'gzip', 'deflate', 'snappy')),
  fc.tuple(fc.constant('grpc-accept-encoding'), pick('identity,deflate,gzip', 'gzip', 'identity')),
  fc.tuple(pick('grpc-previous-rpc-attempts', 'grpc-retry-pushback-ms'), pick('1', '0')),
  fc.tuple(pick('grpc-trace-bin', 'grpc-tags-bin'), binValueArb),
  fc.tuple(pick(XFCC, 'x_forwarded_client_cert', 'x-forwarded-for', 'x_forwarded_for', 'x-forwarded-proto', 'X_FORWARDED_PROTO'.toLowerCase()), pick('Hash=forged;Subject="CN=admin"', '10.0.0.1', 'http', 'a, b')),
  fc.tuple(fc.constant('user-agent'), pick('grpc-python/1.51.0 grpc-c/29.0.0 (linux; chttp2)', 'grpc-go/1.33', 'x/1 (tab\there)')),
  fc.tuple(fc.constant('authorization'), pick('Bearer abc.def', 'Basic dTpw')),
  fc.tuple(fc.constant('cookie'), pick('a=1', 'b=2; c=3', 'd')),
);

/** Request metadata: a few fields, some repeated, or many, or a few of many KiB. */
export const requestMetadataArb: fc.Arbitrary<Fields> = fc
  .tuple(
    fc.array(fc.oneof({ weight: 6, arbitrary: plainField }, { weight: 2, arbitrary: binField }, { weight: 2, arbitrary: reservedRequestField }), { maxLength: 12 }),
    fc.uniqueArray(reservedRequestField, { maxLength: 4, selector: ([name]) => name }),
    fc.oneof({ weight: 6, arbitrary: fc.constant<Fields>([]) }, { weight: 1, arbitrary: fc.integer({ min: 50, max: 400 }).map((n): Fields => Array.from({ length: n }, (_, i) => [`x-many-${i % 37}`, `${i}`])) }),
    pick('application/grpc', 'application/grpc', 'application/grpc+proto', 'application/grpc+json', 'application/grpc;charset=utf-8'),
    fc.boolean(),
  )
  .map(([fields, reserved, many, contentType, te]): Fields => {
    // Node's HTTP/2 client refuses to send a field it takes for single-valued twice (README: gRPC terminate mode drops a second one).
    const seen = new Set<string>();
    const once = [...reserved, ...fields].filter(([name]) => !SINGLE_VALUED.has(name) || (!seen.has(name) && seen.add(name)));
    return [['content-type', contentType], ...(te ? [['te', 'trailers'] as const] : []), ...once, ...many];
  })
  .filter((fields) => listSize(fields) <= REQUEST_METADATA_MAX);

/** Names Node's HTTP/2 stack carries once (its kSingleValueHeaders among those the grammar makes). */
const SINGLE_VALUED = new Set(['user-agent', 'authorization', 'content-type']);

/** Method names with characters a path may hold (RFC 3986 pchar), now and then thousands of them. */
const pathArb = fc.oneof(
  { weight: 8, arbitrary: fc.tuple(fc.stringMatching(/^[A-Za-z0-9_.]{1,20}$/), fc.stringMatching(/^[A-Za-z0-9_]{1,20}$/), fc.stringMatching(/^[A-Za-z0-9\-._~!$&'()*+,;=:@]{1,30}$/)).map(([pkg, service, method]) => `/${pkg}.${service}/${method}`) },
  { weight: 1, arbitrary: pick('/inference.GRPCInferenceService/ModelInfer', '/a/b%20c', '/x.Y/%E2%82%AC', '/a.B/c:d@e') },
  { weight: 1, arbitrary: fc.integer({ min: 500, max: 6000 }).map((n) => `/long.Service/${'M'.repeat(n)}`) },
);

/** Message sizes from empty to about 100 KB, at the 16 KiB frame edge now and then. */
const messageArb: fc.Arbitrary<GrpcMessage> = fc.record({
  compressed: fc.oneof({ weight: 4, arbitrary: fc.constant(false) }, { weight: 1, arbitrary: fc.constant(true) }),
  size: fc.oneof({ weight: 8, arbitrary: fc.nat(2000) }, { weight: 2, arbitrary: pick(0, 16_379, 16_384, 65_535) }, { weight: 1, arbitrary: fc.integer({ min: 20_000, max: 100_000 }) }),
  tag: fc.nat(),
});
/** Unary (one message), client/server streaming (several) and none at all. */
const messagesArb = fc.oneof({ weight: 3, arbitrary: fc.array(messageArb, { minLength: 1, maxLength: 1 }) }, { weight: 2, arbitrary: fc.array(messageArb, { maxLength: 5 }) });

export const callArb: fc.Arbitrary<CallSpec> = fc.record({ path: pathArb, metadata: requestMetadataArb, messages: messagesArb });

/** Statuses 0-16 and numbers no gRPC code has. */
const grpcStatusArb = fc.oneof({ weight: 10, arbitrary: fc.integer({ min: 0, max: 16 }).map(String) }, { weight: 1, arbitrary: pick('17', '99', '1000', '4294967296') });
/**
 * A message as a status carries it: percent-encoded UTF-8 (unicode, `%`, controls), without white space
 * at either end, which HTTP/2 does not carry (RFC 9113 8.2.1: nghttp2 drops such a field, whoever sends it).
 */
const grpcMessageArb = fc.oneof(fc.string({ maxLength: 40 }), fc.string({ unit: 'grapheme', maxLength: 20 }), pick('100% done', 'line\nbreak', 'caf\u00e9 \u20ac \u{1f600}')).map((m) => encodeGrpcMessage(m.trim()));

const answerField = fc.oneof(
  { weight: 6, arbitrary: plainField },
  { weight: 2, arbitrary: binField },
  { weight: 1, arbitrary: fc.tuple(pick('grpc-encoding', 'grpc-accept-encoding'), pick('identity', 'gzip', 'identity,deflate,gzip')) },
  { weight: 1, arbitrary: fc.tuple(pick('set-cookie', 'cookie', 'www-authenticate'), shortValue) },
);
/** Metadata keys that Node's HTTP/2 stack carries once (its kSingleValueHeaders), each once. */
const singleValuedFieldsArb = fc.uniqueArray(fc.tuple(pick('etag', 'location', 'age', 'from', 'expires', 'range', 'retry-after', 'content-language', 'content-encoding'), shortValue), { maxLength: 3, selector: ([name]) => name });
const metadataFieldsArb = fc.tuple(
  fc.array(answerField, { maxLength: 10 }),
  fc.oneof({ weight: 8, arbitrary: fc.constant<Fields>([]) }, { weight: 1, arbitrary: fc.integer({ min: 30, max: 300 }).map((n): Fields => Array.from({ length: n }, (_, i) => [`x-r-${i % 29}`, `v${i}`])) }),
).map(([fields, many]): Fields => [...fields, ...many]).filter((fields) => listSize(fields) <= ANSWER_METADATA_MAX / 2);
/** Response metadata, with a Date of the model server's own now and then. */
const answerMetadataArb = fc
  .tuple(metadataFieldsArb, singleValuedFieldsArb, fc.oneof({ weight: 5, arbitrary: fc.constant<Fields>([]) }, { weight: 1, arbitrary: fc.constant<Fields>([['date', 'Tue, 01 Dec 2026 00:00:00 GMT']]) }))
  .map(([fields, singles, date]): Fields => [...date, ...singles, ...fields]);

/** Trailers: a status, its message now and then, details, `-bin` and plain fields. */
const trailersArb = fc
  .tuple(grpcStatusArb, fc.option(grpcMessageArb), fc.option(binValueArb), metadataFieldsArb)
  .map(([status, message, details, fields]): Fields => [['grpc-status', status], ...(message === null ? [] : [['grpc-message', message] as const]), ...(details === null ? [] : [['grpc-status-details-bin', details] as const]), ...fields]);

export const answerArb: fc.Arbitrary<GrpcAnswerSpec> = fc.record({
  status: fc.oneof({ weight: 12, arbitrary: fc.constant(200) }, { weight: 1, arbitrary: pick(400, 401, 404, 429, 500, 502, 503, 504) }),
  contentType: pick('application/grpc', 'application/grpc+proto'),
  metadata: answerMetadataArb,
  trailersOnly: fc.oneof({ weight: 3, arbitrary: fc.constant(false) }, { weight: 1, arbitrary: fc.constant(true) }),
  messages: messagesArb,
  trailers: trailersArb,
  timing: pick<AnswerTiming>('after-request', 'after-request', 'headers-first', 'early'),
});

export const exchangeArb: fc.Arbitrary<GrpcExchange> = fc.record({ call: callArb, answer: answerArb });

// ---------------------------------------------------------------------------------------------
// Bytes on the wire.
// ---------------------------------------------------------------------------------------------

/** The messages as gRPC frames: flag byte, length, bytes made from the tag. */
export function framed(messages: readonly GrpcMessage[]): Buffer {
  return Buffer.concat(messages.map(({ compressed, size, tag }) => {
    const header = Buffer.alloc(5);
    header[0] = compressed ? 1 : 0;
    header.writeUInt32BE(size, 1);
    return Buffer.concat([header, patternBytes(tag, size)]);
  }));
}

/** Fields as a Node headers object: a repeated name as an array of its values in order. */
export function headersObject(fields: Fields, into: OutgoingHttpHeaders = Object.create(null) as OutgoingHttpHeaders): OutgoingHttpHeaders {
  for (const [name, value] of fields) {
    const had = into[name];
    into[name] = had === undefined ? value : [had, value].flat().map(String);
  }
  return into;
}

// ---------------------------------------------------------------------------------------------
// The model server: records what reached it, answers as planned.
// ---------------------------------------------------------------------------------------------

/** The metadata key that ties a call to its planned answer; the proxy passes it on as any other. */
export const CALL_ID = 'x-call-id';

export interface ReceivedCall {
  /** The fields as they came, pseudo-headers first: a flat name, value list. */
  readonly raw: readonly string[];
  /** The request's bytes, read to the end (early answers: up to where the stream closed). */
  readonly body: Buffer;
  /** The request's end came (not a reset before it). */
  readonly complete: boolean;
  /** Why the model server could not send the planned answer, if it could not. */
  readonly answerError: string | undefined;
}

export interface RecordingGrpcServer {
  readonly port: number;
  /** Plans the answer to the call carrying `id`; resolves with what that call was. */
  expect(id: string, answer: GrpcAnswerSpec): Promise<ReceivedCall>;
  /** Whether the call carrying `id` reached this server (a client may fail a call before sending it); its plan is dropped if not. */
  reached(id: string): boolean;
  close(): Promise<void>;
}

/** Limits far above the proxy's, so that the proxy's, not this server's, decide. */
const GENEROUS = { maxHeaderListSize: 4 * 1024 * 1024 };

export async function recordingGrpcServer(): Promise<RecordingGrpcServer> {
  const planned = new Map<string, { answer: GrpcAnswerSpec; received: (r: ReceivedCall) => void }>();
  const server = createH2cServer({ settings: GENEROUS, maxHeaderListPairs: 100_000, maxSendHeaderBlockLength: 4 * 1024 * 1024, maxSessionMemory: 1000 });
  server.on('stream', (stream: ServerHttp2Stream, headers: IncomingHttpHeaders, _flags: number, raw: string[]) => {
    stream.on('error', () => {});
    const plan = planned.get(String(headers[CALL_ID]));
    if (!plan) {
      stream.respond({ ':status': 200, 'content-type': 'application/grpc', 'grpc-status': '12', 'grpc-message': 'no plan' }, { endStream: true });
      return;
    }
    planned.delete(String(headers[CALL_ID]));
    const chunks: Buffer[] = [];
    let answerError: string | undefined;
    stream.on('data', (c: Buffer) => chunks.push(c));
    const record = () => plan.received({ raw, body: Buffer.concat(chunks), answerError, complete: stream.readableEnded });
    // An answer Node refuses to send (the grammar's mistake) fails its run, and does not end the test process.
    const safely = (send: () => void) => {
      try {
        send();
      } catch (err) {
        answerError = String(err);
        stream.close(constants.NGHTTP2_INTERNAL_ERROR);
      }
    };
    if (plan.answer.timing === 'early') {
      safely(() => answerEarly(stream, plan.answer));
      stream.once('close', record);
      return;
    }
    if (plan.answer.timing === 'headers-first' && !plan.answer.trailersOnly) safely(() => stream.respond(responseHeaders(plan.answer), AS_SENT_TRAILED));
    const whenRequestEnds = () => {
      safely(() => finishAnswer(stream, plan.answer));
      record();
    };
    if (stream.readableEnded) whenRequestEnds();
    else stream.once('end', whenRequestEnds);
    // A client that resets its call before the request ends (grpc-js past its own metadata limit) gets no answer; what came is recorded.
    stream.once('close', () => {
      if (!stream.readableEnded) record();
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const sessions = new Set<ServerHttp2Session>();
  server.on('session', (s) => {
    sessions.add(s);
    s.once('close', () => sessions.delete(s));
  });
  return {
    port: (server.address() as AddressInfo).port,
    expect: (id, answer) => new Promise((received) => planned.set(id, { answer, received })),
    reached: (id) => !planned.delete(id),
    close: () => {
      for (const s of sessions) s.destroy();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}

/**
 * The model server adds no Date of its own (Node's respond() does unless told, as its types do not say),
 * as C-core (OVMS) adds none: what it answers is the fields generated.
 */
const AS_SENT_TRAILED = { waitForTrailers: true, sendDate: false } as ServerStreamResponseOptions;
const AS_SENT_ENDED = { endStream: true, sendDate: false } as ServerStreamResponseOptions;

/** The response HEADERS' fields (a Trailers-Only answer's status and trailers among them). */
export function responseFields(answer: GrpcAnswerSpec): Fields {
  return [[':status', String(answer.status)], ['content-type', answer.contentType], ...answer.metadata, ...(answer.trailersOnly ? answer.trailers : [])];
}

function responseHeaders(answer: GrpcAnswerSpec): OutgoingHttpHeaders {
  return headersObject(responseFields(answer));
}

/** The answer whole, before the request is read: its headers, messages and trailers. */
function answerEarly(stream: ServerHttp2Stream, answer: GrpcAnswerSpec): void {
  if (!answer.trailersOnly) stream.respond(responseHeaders(answer), AS_SENT_TRAILED);
  finishAnswer(stream, answer);
}

/** The rest of the answer: its headers if not sent yet, its messages, its trailers. */
function finishAnswer(stream: ServerHttp2Stream, answer: GrpcAnswerSpec): void {
  if (answer.trailersOnly) {
    stream.respond(responseHeaders(answer), AS_SENT_ENDED);
    return;
  }
  if (!stream.headersSent) stream.respond(responseHeaders(answer), AS_SENT_TRAILED);
  stream.once('wantTrailers', () => {
    try {
      stream.sendTrailers(headersObject(answer.trailers));
    } catch {
      stream.close(constants.NGHTTP2_INTERNAL_ERROR);
    }
  });
  stream.end(framed(answer.messages));
}

// ---------------------------------------------------------------------------------------------
// The raw client: sends the call as generated, records what came back.
// ---------------------------------------------------------------------------------------------

export interface AnsweredCall {
  /** The response HEADERS' fields as a flat list (`:status` first). */
  readonly raw: readonly string[];
  /** The response ended with its HEADERS (Trailers-Only). */
  readonly endedWithHeaders: boolean;
  readonly body: Buffer;
  readonly rawTrailers: readonly string[];
  /** An RST_STREAM's code, if the stream was reset (an early answer's NO_ERROR included). */
  readonly rstCode: number | undefined;
}

/** The call's request fields as the client sends them, our call id among them. */
export function requestFields(call: CallSpec, id: string): Fields {
  return [[CALL_ID, id], ...call.metadata];
}

/** The call as a stream of `session` (Node's HTTP/2 client): the metadata and messages as generated. */
export function sendCall(session: ClientHttp2Session, call: CallSpec, id: string): Promise<AnsweredCall> {
  return new Promise((resolve, reject) => {
    const headers = headersObject(requestFields(call, id), { ':method': 'POST', ':path': call.path });
    const body = framed(call.messages);
    const stream = session.request(headers, { endStream: body.length === 0 && call.messages.length === 0 });
    let raw: string[] = [];
    let rawTrailers: string[] = [];
    let endedWithHeaders = false;
    const chunks: Buffer[] = [];
    stream.on('response', (_h: IncomingHttpHeaders, flags: number, r: string[]) => {
      raw = r;
      endedWithHeaders = (flags & constants.NGHTTP2_FLAG_END_STREAM) !== 0;
    });
    stream.on('trailers', (_t: IncomingHttpHeaders, _flags: number, r: string[]) => (rawTrailers = r));
    stream.on('data', (c: Buffer) => chunks.push(c));
    stream.on('close', () => resolve({ raw, endedWithHeaders, body: Buffer.concat(chunks), rawTrailers, rstCode: stream.rstCode }));
    stream.on('error', (err: Error) => {
      // A reset with an error code: 'close' still comes and reports it.
      if (stream.rstCode === undefined) reject(err);
    });
    if (call.messages.length === 0) return;
    stream.end(body);
  });
}

// ---------------------------------------------------------------------------------------------
// What the proxy is documented to change.
// ---------------------------------------------------------------------------------------------

/** Per name, its values in the order they came. */
export type FieldMap = Map<string, string[]>;

export function fieldMap(fields: Fields | readonly string[]): FieldMap {
  const out: FieldMap = new Map();
  const pairs: Fields = typeof fields[0] === 'string' ? pairsOf(fields as readonly string[]) : (fields as Fields);
  for (const [name, value] of pairs) out.set(name, [...(out.get(name) ?? []), value]);
  return out;
}

function pairsOf(raw: readonly string[]): Fields {
  const out: [string, string][] = [];
  for (let i = 0; i < raw.length; i += 2) out.push([raw[i]!, raw[i + 1]!]);
  return out;
}

/** A map as sorted lines, for assertion messages that show the difference. */
export const shown = (fields: FieldMap): string[] => [...fields].map(([name, values]) => `${name}: ${JSON.stringify(values)}`).sort();

/** The request's pseudo-headers as Node's client sends them to the proxy. */
function pseudoFields(call: CallSpec, authority: string): Fields {
  return [[':method', 'POST'], [':path', call.path], [':scheme', 'https'], [':authority', authority]];
}

/** What the client sent, pseudo-headers included: what the relay must pass on exactly. */
export function sentFields(call: CallSpec, id: string, authority: string): FieldMap {
  return fieldMap([...pseudoFields(call, authority), ...requestFields(call, id)]);
}

/**
 * What the model server should get through terminate mode (README: forwarding headers, gRPC
 * without decoding): the client's fields, `:scheme` http, a client's forwarding fields (and their
 * underscore spellings) replaced by ours (X-Forwarded-For appended to), `te: trailers` on a call
 * whose content-type is gRPC's.
 */
export function expectedTerminated(call: CallSpec, id: string, authority: string, xfcc: string, remote: string): FieldMap {
  return terminated(sentFields(call, id, authority), xfcc, remote);
}

/** `sent` as terminate mode passes it on (see expectedTerminated). */
export function terminated(sent: FieldMap, xfcc: string, remote: string): FieldMap {
  const out: FieldMap = new Map();
  for (const [name, values] of sent) {
    if (name === XFCC || name === 'x-forwarded-for' || name === 'x-forwarded-proto' || disguisesOurs(name)) continue;
    out.set(name, values);
  }
  out.set(':scheme', ['http']);
  if (!out.has('te') && (sent.get('content-type')?.[0] ?? '').startsWith('application/grpc')) out.set('te', ['trailers']);
  out.set('x-forwarded-for', [[...(sent.get('x-forwarded-for') ?? []), remote].join(', ')]);
  out.set('x-forwarded-proto', ['https']);
  out.set(XFCC, [xfcc]);
  return out;
}

/**
 * What the client should get of the response HEADERS: what the model server sent; from terminate mode
 * with a Date where the model server sent none (README: gRPC without decoding).
 */
export function expectedResponse(mode: 'terminate' | 'relay', answer: GrpcAnswerSpec, received: FieldMap): FieldMap {
  const expected = fieldMap(responseFields(answer));
  const date = received.get('date');
  if (mode === 'terminate' && !expected.has('date') && date?.length === 1 && HTTP_DATE.test(date[0]!)) expected.set('date', date);
  return expected;
}

/** An IMF-fixdate (RFC 9110 5.6.7). */
const HTTP_DATE = /^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT$/;

// ---------------------------------------------------------------------------------------------
// A model server written frame by frame, for answers Node's HTTP/2 server cannot give.
// ---------------------------------------------------------------------------------------------

/** Keys Node's HTTP/2 stack carries once (kSingleValueHeaders) that the frame-level answers repeat. */
export const CARRIED_ONCE = ['etag', 'location', 'age', 'content-language'];

/** How a frame-level answer ends after its trailers: there, or with an RST_STREAM as servers that stop reading a request send. */
export type AnswerEnd = 'trailers' | 'reset-no-error' | 'reset-cancel';

export interface FramedAnswerSpec extends GrpcAnswerSpec {
  /** Where the answer's messages are cut into DATA frames (offsets into them). */
  readonly cuts: readonly number[];
  readonly end: AnswerEnd;
}

/** Answers with repeated single-valued keys, messages cut anywhere into DATA frames (within one 64 KiB window), trailers without a status, and resets after the trailers. */
export const framedAnswerArb: fc.Arbitrary<FramedAnswerSpec> = fc
  .tuple(
    answerArb,
    fc.array(fc.tuple(pick(...CARRIED_ONCE), shortValue), { maxLength: 4 }),
    fc.array(fc.tuple(pick(...CARRIED_ONCE), shortValue), { maxLength: 3 }),
    fc.array(fc.record({ compressed: fc.boolean(), size: fc.nat(12_000), tag: fc.nat() }), { maxLength: 4 }),
    fc.array(fc.nat(60_000), { maxLength: 5 }),
    pick<AnswerEnd>('trailers', 'trailers', 'reset-no-error', 'reset-cancel'),
    fc.oneof({ weight: 8, arbitrary: fc.constant(false) }, { weight: 1, arbitrary: fc.constant(true) }),
  )
  .map(([answer, repeated, repeatedInTrailers, messages, cuts, end, noStatus]) => ({
    ...answer,
    metadata: [...answer.metadata.filter(([name]) => !CARRIED_ONCE.includes(name)), ...repeated],
    // Now and then trailers without a grpc-status, empty ones too: passed on as they are, for the client to judge.
    trailers: [...answer.trailers.filter(([name]) => !noStatus || name !== 'grpc-status'), ...repeatedInTrailers],
    messages,
    cuts: [...new Set(cuts)].sort((a, b) => a - b),
    end,
  }));

const FRAME = { DATA: 0x0, HEADERS: 0x1, RST_STREAM: 0x3, WINDOW_UPDATE: 0x8, CONTINUATION: 0x9 } as const;

/** A header block as HEADERS and CONTINUATION frames of 16 KiB at most; END_STREAM on the HEADERS when `ends`. */
function headerBlockFrames(streamId: number, fields: Fields, ends: boolean): Buffer {
  const block = Buffer.concat(fields.map(([name, value]) => literalField(name, value, 'latin1')));
  const frames: Buffer[] = [];
  for (let at = 0; at === 0 || at < block.length; at += 16_384) {
    const last = at + 16_384 >= block.length;
    const flags = (last ? 0x4 : 0) | (at === 0 && ends ? 0x1 : 0);
    frames.push(h2Frame(at === 0 ? FRAME.HEADERS : FRAME.CONTINUATION, flags, streamId, block.subarray(at, at + 16_384)));
  }
  return Buffer.concat(frames);
}

/** The whole answer to stream `streamId` as frames, and `grant` bytes more of the connection's window for the request. */
export function answerFrames(streamId: number, answer: FramedAnswerSpec, grant: number): Buffer {
  const window = Buffer.alloc(4);
  window.writeUInt32BE(grant);
  // A WINDOW_UPDATE of 0 is a connection error (RFC 9113 6.9).
  const frames = grant > 0 ? [h2Frame(FRAME.WINDOW_UPDATE, 0, 0, window)] : [];
  if (answer.trailersOnly) return Buffer.concat([...frames, headerBlockFrames(streamId, responseFields(answer), true)]);
  frames.push(headerBlockFrames(streamId, responseFields(answer), false));
  const body = framed(answer.messages);
  let from = 0;
  for (const cut of [...answer.cuts.filter((c) => c < body.length), body.length]) {
    if (cut <= from && !(cut === 0 && body.length === 0)) continue;
    for (let at = from; at < cut; at += 16_384) frames.push(h2Frame(FRAME.DATA, 0, streamId, body.subarray(at, Math.min(cut, at + 16_384))));
    from = cut;
  }
  frames.push(headerBlockFrames(streamId, answer.trailers, true));
  const code = { trailers: undefined, 'reset-no-error': 0, 'reset-cancel': 8 }[answer.end];
  if (code !== undefined) frames.push(h2Frame(FRAME.RST_STREAM, 0, streamId, Buffer.from([0, 0, 0, code])));
  return Buffer.concat(frames);
}

/** What a client of terminate mode gets of fields that repeat a key Node carries once: its first value (README). */
export function firstOfCarriedOnce(fields: FieldMap): FieldMap {
  for (const name of CARRIED_ONCE) {
    const values = fields.get(name);
    if (values && values.length > 1) fields.set(name, values.slice(0, 1));
  }
  return fields;
}
