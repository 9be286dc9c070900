import { METHODS } from 'node:http';
import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import type { HostPort, Limits } from './config.js';
import { requestStart, type ConnectionContext } from './listeners.js';
import { Relay, type RelayedConnection, type RelayOptions } from './relay.js';
import { elapsedMs, type ProxyObserver } from './observer.js';
import { FORWARDING_FIELDS, XFCC, disguisesOurs, forwardedFor } from './forwarding-headers.js';
import { SECOND_HOST, bodyStalledMessage, requestAuthority, routingRefusal, type RoutingRefusal } from './rest-forwarder.js';
import { UPSTREAM_CLOSED_IDLE, describeUpstreamError } from './upstream-errors.js';
import { isServerPreface } from './h2-frames.js';
import { MISSING_HOST_MESSAGE, closingAnswer, expectationNames, headStalledMessage, unmetExpectationMessage, type ClosingAnswer } from './http-fronts.js';
import { FramingError, Http1Reader, commaList, requestFraming, responseFraming, type BodyFraming, type HeaderField, type Http1Head } from './http1-framing.js';

/** The fallback is the terminating HTTP/1.1 front, which answers 503/502 with the reason. */
export type RestRelayOptions = Omit<RelayOptions, 'listener' | 'join'> & { readonly limits: Pick<Limits, 'maxHeaderSize' | 'idleTimeoutMs'> };

/**
 * `--mtls_rest_mode relay` for HTTP/1.1 clients: one upstream connection per
 * client connection, request and response heads parsed (XFCC and
 * X-Forwarded-* set, one access line per request), bodies passed through as
 * they are. HTTP/2 clients of the REST port keep the terminating path.
 */
export function restRelay(options: RestRelayOptions): Relay {
  const { observer, limits, upstream: target } = options;
  return new Relay({
    ...options,
    listener: 'rest',
    join: (client, upstream, context) => new RelayedHttp1Connection({ client, upstream, target, context, observer, limits }),
  });
}

/**
 * The relay never switches protocols, and answers `Expect: 100-continue` itself
 * (awaitsContinue()); terminate mode drops these too.
 */
const DROPPED_REQUEST_FIELDS = new Set(['upgrade', 'http2-settings', 'expect']);
/** Ours (FORWARDING_FIELDS), which a client must not be able to set, and the dropped ones. */
const REWRITTEN_REQUEST_FIELDS = [...FORWARDING_FIELDS, ...DROPPED_REQUEST_FIELDS];
/** A client's field the upstream does not get: ours, in any spelling, are replaced; the others dropped. */
const isRewritten = (name: string): boolean => FORWARDING_FIELDS.has(name) || DROPPED_REQUEST_FIELDS.has(name) || disguisesOurs(name);
/** In the lower-cased head, a field line isRewritten() would take out: one search of the head for all of them. */
const REWRITTEN_FIELD_LINE = new RegExp(`\\r\\n(?:${[...[...FORWARDING_FIELDS].map((name) => name.replaceAll('-', '[-_]')), ...DROPPED_REQUEST_FIELDS].join('|')}):`);

/** The fields we add, and the empty line that ends the head. */
function forwardingFields(previousForwardedFor: readonly string[], context: ConnectionContext): string {
  return `x-forwarded-for: ${forwardedFor(previousForwardedFor, context)}\r\nx-forwarded-proto: https\r\n${XFCC}: ${context.identity.xfcc}\r\n\r\n`;
}

/**
 * The request head as the upstream gets it: the client's fields in order,
 * then ours. When the client sent none of the fields we replace or drop, that
 * is its head as it came plus `ours` (forwardingFields() for a client without
 * X-Forwarded-For, the same for every request of a connection).
 */
export function relayedRequestHead(head: Http1Head, raw: Buffer, context: ConnectionContext, ours?: Buffer): Buffer {
  if (head.matches(REWRITTEN_FIELD_LINE) || namesOurFields(head)) return rebuiltRequestHead(head, context);
  const fields = ours ?? Buffer.from(forwardingFields([], context), 'latin1');
  // raw ends with the empty line; ours brings its own.
  return Buffer.concat([raw.subarray(0, raw.length - 2), fields], raw.length - 2 + fields.length);
}

/** The head the model server gets for a request judgeRequest() passed. */
export function forwardedHead(head: Http1Head, raw: Buffer, judged: Pick<JudgedRequest, 'host' | 'authority'>, context: ConnectionContext, ours?: Buffer): Buffer {
  // An absolute-form target names its own authority: the model server gets it as Host too, so the two cannot disagree.
  return judged.authority === judged.host ? relayedRequestHead(head, raw, context, ours) : rebuiltRequestHead(head, context, judged.authority);
}

/**
 * A Connection field naming one of the fields we set: an HTTP hop after the
 * model server would drop ours (RFC 9110 7.6.1), so those options are left out.
 */
function namesOurFields(head: Http1Head): boolean {
  return head.has('connection') && head.values('connection').some(isOurField);
}

const isOurField = (option: string): boolean => REWRITTEN_REQUEST_FIELDS.includes(option.toLowerCase());

/** A Connection field line as it came, or without the options naming our fields (gone if none is left). */
function withoutOurOptions(field: HeaderField): string {
  const options = commaList(field.value);
  if (!options.some(isOurField)) return field.line + '\r\n';
  const kept = options.filter((option) => option !== '' && !isOurField(option));
  return kept.length === 0 ? '' : `${field.line.slice(0, field.line.indexOf(':'))}: ${kept.join(', ')}\r\n`;
}

/**
 * Field by field: what relayedRequestHead() must always equal. With `host`,
 * the Host line is that instead of the client's (an absolute-form target's
 * authority, RFC 9112 3.2.2).
 */
export function rebuiltRequestHead(head: Http1Head, context: ConnectionContext, host?: string): Buffer {
  let text = head.startLine + '\r\n';
  if (host !== undefined) text += `host: ${host}\r\n`;
  const previous: string[] = [];
  for (const field of head.fields) {
    if (field.name === 'x-forwarded-for') previous.push(field.value);
    if (isRewritten(field.name) || (host !== undefined && field.name === 'host')) continue;
    text += field.name === 'connection' ? withoutOurOptions(field) : field.line + '\r\n';
  }
  return Buffer.from(text + forwardingFields(previous, context), 'latin1');
}

/** RFC 9112 9.3, 9.6: the connection closes after this response, or after the response to this request. */
function closesAfter(head: Http1Head): boolean {
  const options = head.values('connection');
  if (head.minorVersion !== 0) return hasOption(options, 'close');
  // Node 20's llhttp (9.3) reads `keep-alive` with a tab after it as another option, so closes after
  // this one: a model server or client that reads it so must get nothing more on this connection.
  return !hasOption(options, 'keep-alive') || head.fieldValues('connection').some((value) => KEEP_ALIVE_THEN_TAB.test(value));
}

const KEEP_ALIVE_THEN_TAB = /keep-alive *\t/i;

const hasOption = (options: readonly string[], name: string): boolean => options.some((option) => option.toLowerCase() === name);

/**
 * The Host field's value. RFC 9112 3.2: an HTTP/1.1 request without a Host
 * field, or with more than one, gets 400; so does an HTTP/1.0 one with more
 * than one, from which the model server would have to pick. Terminate mode
 * answers both the same: Node's server refuses a missing Host, RestForwarder
 * a second one.
 */
function hostOf(head: Http1Head): string | undefined {
  const hosts = head.values('host');
  if (hosts.length > 1) throw new RoutingRefused(SECOND_HOST);
  if (head.minorVersion === 1 && hosts.length === 0) throw new FramingError(400, MISSING_HOST_MESSAGE);
  return hosts[0];
}

/** A request whose target or authority terminate mode refuses too: answered and logged as there. */
class RoutingRefused extends FramingError {
  readonly refusal: RoutingRefusal;
  constructor(refusal: RoutingRefusal) {
    super(400, refusal.message);
    this.refusal = refusal;
  }
}

/**
 * RFC 9110 15.2: no 1xx goes to an HTTP/1.0 client, which would take it for the final answer; a model server should not send one.
 * Nor a second 100 (Continue) to a client that had ours.
 */
function interimFor(exchange: Exchange, head: Http1Head, raw: Buffer): Buffer {
  return exchange.http10 || (head.status === 100 && exchange.ownContinue !== undefined) ? NOTHING : raw;
}

/**
 * The client waits for a 100 (Continue) before it sends its body (RFC 9110 10.1.1).
 * The relay sends it and the model server never sees the Expect field: OVMS's
 * Drogon (v1.9.7, HttpRequestParser) answers one on a chunked body (curl's
 * `-T -`, or `-H 'Transfer-Encoding: chunked'` above 1 MiB) with 400, and
 * newer Drogon sends no 100 for it (curl then waits a second). Not for HTTP/1.0
 * (RFC 9110 10.1.1: ignored there) nor a request without a body.
 */
function awaitsContinue(head: Http1Head, body: BodyFraming): boolean {
  if (head.minorVersion === 0 || body.kind === 'none' || (body.kind === 'length' && body.length === 0)) return false;
  return expectations(head).includes('100-continue');
}

/**
 * The expectation names of an HTTP/1.1 request's Expect field, lower-cased, parameters and
 * empty members left out. HTTP/1.0 has none: RFC 9110 10.1.1 has the server ignore a
 * 100-continue there, and Node (terminate mode) ignores every Expect of an HTTP/1.0 request.
 */
function expectations(head: Http1Head): string[] {
  if (head.minorVersion === 0 || !head.has('expect')) return [];
  return expectationNames(head.values('expect').join(','));
}

/**
 * An expectation the relay cannot meet gets 417 (RFC 9110 10.1.1), as from Node in terminate
 * mode. 100-continue is the only one defined; another must not reach the model server either
 * (Drogon 1.9.7 answers it with 417 and a close), and dropped unanswered it would look met.
 */
function checkExpectations(head: Http1Head): void {
  const names = expectations(head);
  if (names.length === 0 || names.includes('100-continue')) return;
  throw new FramingError(417, unmetExpectationMessage(head.values('expect').join(', ')));
}

/**
 * The methods llhttp knows (Node's http.METHODS), which terminate mode's server takes; any other it
 * refuses, and so may the model server, after the relay had passed it on. PRI begins the HTTP/2 preface only.
 */
const KNOWN_METHODS = new Set(METHODS.filter((method) => method !== 'PRI'));

/** What the relay makes of a request head it may forward: its Host, the authority it names, its body framing, and whether it is the connection's last. */
export interface JudgedRequest {
  readonly host: string | undefined;
  readonly authority: string | undefined;
  readonly body: BodyFraming;
  readonly last: boolean;
}

/** Every check a request head passes before it goes upstream; a FramingError (RoutingRefused among them) names what is refused. */
export function judgeRequest(head: Http1Head): JudgedRequest {
  if (head.method === 'CONNECT') throw new FramingError(405, 'CONNECT is not supported');
  if (!KNOWN_METHODS.has(head.method)) throw new FramingError(400, `unknown method ${JSON.stringify(head.method.slice(0, 32))}`);
  const host = hostOf(head);
  const authority = requestAuthority(head.target, { host });
  const refusal = routingRefusal(head.target, authority);
  if (refusal) throw new RoutingRefused(refusal);
  const body = requestFraming(head);
  checkExpectations(head);
  return { host, authority, body, last: closesAfter(head) };
}

const CONTINUE = Buffer.from('HTTP/1.1 100 Continue\r\n\r\n', 'latin1');

const NOTHING = Buffer.alloc(0);

/**
 * A response head that tells the client this connection ends after it. The fields the model server's
 * Connection named go with that line (RFC 9110 7.6.1): without it they would pass as end-to-end. Not
 * the ones that frame the answer, which the relay reads and the client must; but a `dechunked` body
 * (dechunkedFor()) has no framing left, it ends at our close: its Transfer-Encoding goes, and the
 * Trailer field announcing trailers that are left out with the chunk framing.
 */
function withConnectionClose(head: Http1Head, dechunked = false): Buffer {
  const hopByHop = new Set(['connection', 'keep-alive', ...head.values('connection').map((option) => option.toLowerCase())]);
  hopByHop.delete('content-length');
  if (dechunked) hopByHop.add('transfer-encoding').add('trailer');
  else hopByHop.delete('transfer-encoding');
  let text = head.startLine + '\r\n';
  for (const field of head.fields) if (!hopByHop.has(field.name)) text += field.line + '\r\n';
  return Buffer.from(text + 'connection: close\r\n\r\n', 'latin1');
}

/**
 * RFC 9112 7.1: an HTTP/1.0 client knows no chunked coding (a server must not send it one), and would read
 * the chunk framing as part of the body. A model server that chunks its answer anyway (the relay passes the
 * request's version on) has the client get the chunks' data alone, ended by our close, as nginx and terminate
 * mode send it.
 */
function dechunkedFor(exchange: Exchange, body: BodyFraming): boolean {
  return exchange.http10 === true && body.kind === 'chunked';
}

const KEEP_ALIVE_END = Buffer.from('connection: keep-alive\r\n\r\n', 'latin1');

/**
 * RFC 9112 9.3: an HTTP/1.0 client keeps its connection only after an answer that says `keep-alive`; without
 * it, it takes the answer for the connection's last (ApacheBench waits for the close). An HTTP/1.1 answer kept
 * alive by default (a model server that reads the request's version as its own) gets the option said.
 */
function saysKeepAlive(head: Http1Head, raw: Buffer): Buffer {
  if (hasOption(head.values('connection'), 'keep-alive')) return raw;
  return Buffer.concat([raw.subarray(0, raw.length - 2), KEEP_ALIVE_END], raw.length - 2 + KEEP_ALIVE_END.length);
}

function jsonAnswer(status: number, message: string): ClosingAnswer {
  return closingAnswer(status, 'application/json', JSON.stringify({ error: message }));
}

/** What our own answer to a request the client framed wrongly looks like. */
function refusalAnswer(err: FramingError): ClosingAnswer {
  if (err instanceof RoutingRefused) return jsonAnswer(err.status, err.message);
  return closingAnswer(err.status, 'text/plain; charset=utf-8', `${err.message}\n`);
}

/**
 * Our own answer as a request of `method` may get it: to a HEAD, the head alone (RFC 9110 9.3.2:
 * no content; its Content-Length says what a GET would get), as Node's server sends it in terminate
 * mode. The body had gone out too, bytes a client reads as the start of the next response.
 */
function answerTo(method: string, answer: ClosingAnswer): ClosingAnswer {
  if (method !== 'HEAD') return answer;
  return { wire: answer.wire.subarray(0, answer.wire.length - answer.bodyBytes), bodyBytes: 0 };
}

/** Small enough to copy into one buffer; larger reads go out as they are. */
const COALESCE_BYTES = 64 * 1024;

/**
 * What one read turned into (a rewritten head, body slices), written as one
 * buffer: each write to a TLS socket is a record and a syscall of its own, and
 * those, not the parsing, are what a small request costs.
 */
class WriteBatch {
  #parts: Buffer[] = [];
  #bytes = 0;
  /** Where the message begun last starts in the batch, if it begins after the last flush. */
  #messageAt: number | undefined;

  readonly add = (bytes: Buffer): void => {
    const last = this.#parts.at(-1);
    // Slices that follow each other in the same read merge without a copy.
    if (last && last.buffer === bytes.buffer && last.byteOffset + last.length === bytes.byteOffset) {
      this.#parts[this.#parts.length - 1] = Buffer.from(last.buffer, last.byteOffset, last.length + bytes.length);
    } else {
      this.#parts.push(bytes);
    }
    this.#bytes += bytes.length;
  };

  /** What is added next begins a message: dropMessage() can take it back until it is flushed. */
  startMessage(): void {
    this.#messageAt = this.#bytes;
  }

  /** Takes back what was added of the message begun last, if none of it was flushed yet. */
  dropMessage(): void {
    if (this.#messageAt === undefined) return;
    let excess = this.#bytes - this.#messageAt;
    this.#bytes = this.#messageAt;
    this.#messageAt = undefined;
    while (excess > 0) {
      const last = this.#parts.pop()!;
      if (last.length > excess) this.#parts.push(last.subarray(0, last.length - excess));
      excess -= last.length;
    }
  }

  /** Writes what was collected; false when the socket asked us to wait. */
  flush(socket: Socket): boolean {
    this.#messageAt = undefined;
    const parts = this.#parts;
    if (parts.length === 0) return true;
    const bytes = this.#bytes;
    this.#parts = [];
    this.#bytes = 0;
    if (parts.length === 1) return socket.write(parts[0]!);
    if (bytes <= COALESCE_BYTES) return socket.write(Buffer.concat(parts, bytes));
    let ok = true;
    for (const part of parts) ok = socket.write(part) && ok;
    return ok;
  }
}

/** One request from its head to the end of its response. */
interface Exchange {
  readonly method: string;
  readonly path: string;
  /** An HTTP/1.0 request, whose client knows no interim (1xx) response. */
  readonly http10?: boolean;
  /** The 100 (Continue) the relay answers `Expect: 100-continue` with: owed until the responses before this one are done. */
  ownContinue?: 'owed' | 'sent';
  readonly started: number;
  bytesIn: number;
  bytesOut: number;
  status: number;
  /** A final response head went to the client: an upstream failure can no longer become a 502. */
  answered: boolean;
  /** An interim response (ours or the model server's) went to the client: it has heard back, so a silent close would not read as an idle close. */
  heardInterim?: boolean;
  /** Its response has ended; if its body is still arriving (an early 413, say), it is logged once that is done. */
  responded?: boolean;
  error?: string | undefined;
  /** A request we refused: why, as our answer told the client. */
  detail?: string | undefined;
}

interface Http1ConnectionParts {
  readonly client: TLSSocket;
  readonly upstream: Socket;
  /** The configured upstream, for what a client is told when it fails. */
  readonly target: HostPort;
  readonly context: ConnectionContext;
  readonly observer: ProxyObserver;
  readonly limits: Pick<Limits, 'maxHeaderSize' | 'idleTimeoutMs'>;
}

/**
 * Requests go upstream in order (pipelining too) and each response comes
 * back in the same order, so a queue pairs them. Backpressure both ways.
 */
class RelayedHttp1Connection implements RelayedConnection {
  readonly #parts: Http1ConnectionParts;
  /** Requests sent upstream whose responses have not ended, oldest first. */
  readonly #exchanges: Exchange[] = [];
  /** The request whose body is arriving from the client. */
  #receiving: Exchange | undefined;
  /** Set when the response now arriving is interim (1xx): its request waits for another. */
  #interim = false;
  /**
   * The response arriving is the upstream's last (`connection: close`, or a body that ends at
   * close): once it is done the connection closes, requests after it unanswered, which a client
   * may retry (RFC 9112 9.3.2); nothing written after it could be read as an answer to them.
   */
  #upstreamLast = false;
  /** The response arriving goes to an HTTP/1.0 client without its chunk framing (dechunkedFor()): the connection closes after it. */
  #dechunking = false;
  /**
   * Drain, revocation, or the client's last request (`connection: close`, HTTP/1.0 without keep-alive):
   * the last response says `connection: close`, and the connection ends when it is done.
   */
  #closing = false;
  /** A drain waits for the request the client may be sending after an answer that said keep-alive: the next one read is the last (closeGracefully()). */
  #lingering: { graceMs: number; timer?: NodeJS.Timeout } | undefined;
  /** When the connection last had nothing in flight: joined, or its last response done. */
  #quietSince = performance.now();
  /** A request we refused (bad framing): answered once the responses before it are done. */
  #refusal: FramingError | undefined;
  /** The refused request's access line: logged when its answer goes out, or with status 0 when the connection ends first. */
  #refusalLine: Exchange | undefined;
  #finished = false;
  /**
   * A response has ended on this connection: a request after it went out on a kept-alive connection, which the
   * model server may close as idle just as that request arrives.
   */
  #reused = false;
  /** A parsed head whose framing is being checked: a refusal's access line names its method and path. */
  #judging: Http1Head | undefined;
  readonly #fromClient: Http1Reader;
  readonly #fromUpstream: Http1Reader;
  readonly #toUpstream = new WriteBatch();
  readonly #toClient = new WriteBatch();
  /** forwardingFields() for a client that sent no X-Forwarded-For: the same for every request of the connection. */
  #ourFields: Buffer | undefined;
  /** Runs while part of a request head is buffered: a head trickled in byte by byte must still end in time. */
  #headDeadline: NodeJS.Timeout | undefined;

  constructor(parts: Http1ConnectionParts) {
    this.#parts = parts;
    const { client, upstream } = parts;
    this.#fromClient = new Http1Reader('request', parts.limits.maxHeaderSize, {
      head: (head, raw) => this.#requestHead(head, raw),
      body: (n) => {
        this.#receiving!.bytesIn += n;
      },
      end: () => {
        const received = this.#receiving!;
        this.#receiving = undefined;
        this.#settle(received);
        // A body that came after its early answer (a 413) held a drain's wait for the next request: it starts now.
        this.#endOnceQuiet();
        this.#closeIfDone();
      },
      // Trailer fields all left out, the chunked framing kept, as terminate mode does in effect (undici
      // sends the body alone). OVMS's Drogon (v1.9.7, HttpRequestParser) takes nothing but the empty
      // line after the last chunk: a trailer field gets 400 and a close, after the whole request went
      // upstream. A recipient may discard trailers (RFC 9110 6.5.1), and one passed on could be taken
      // for the header field of that name (X-Forwarded-Client-Cert) by a server that merges them.
      dropTrailers: true,
    });
    this.#fromUpstream = new Http1Reader('response', parts.limits.maxHeaderSize, {
      head: (head, raw) => this.#responseHead(head, raw),
      body: (n) => {
        this.#exchanges[0]!.bytesOut += n;
      },
      end: () => this.#responseEnded(),
    });
    client.on('data', (chunk: Buffer) => this.#fromClientData(chunk));
    // Fires after that long without a byte either way, again after each new quiet spell (a listener
    // of its own: setTimeout's callback would be a once() listener, gone after a first quiet SSE stream).
    client.setTimeout(parts.limits.idleTimeoutMs);
    client.on('timeout', () => this.#quiet());
    upstream.on('data', (chunk: Buffer) => this.#fromUpstreamData(chunk));
    upstream.on('drain', () => {
      if (!this.#refusal) client.resume();
    });
    client.on('drain', () => upstream.resume());
    client.on('end', () => upstream.end());
    upstream.on('end', () => this.#upstreamClosed(undefined));
    client.on('error', () => this.#clientGone());
    upstream.on('error', (err) => this.#upstreamClosed(err));
    client.on('close', () => this.#clientGone());
    upstream.on('close', () => this.#upstreamClosed(undefined));
  }

  /** Nothing moved for --mtls_idle_timeout: an idle connection closes; a quiet response (SSE) stays. */
  #quiet(): void {
    // Ended by us, and the client neither sends nor closes its end: nothing more can happen on it.
    if (this.#finished) {
      this.#parts.client.destroy();
      return;
    }
    if (this.#receiving === undefined) {
      // The socket's timer and the head deadline expire together, and this one fires first: a head that stopped arriving gets its 408, not an idle close.
      if (this.#headDeadline !== undefined) {
        this.#stopHeadDeadline();
        this.#headStalled();
      } else if (this.#exchanges.length === 0) this.#end();
      return;
    }
    const { client, limits } = this.#parts;
    // Paused by us: the upstream is not taking the body, so the client is not the one stalling. Watch again.
    if (client.isPaused()) client.setTimeout(limits.idleTimeoutMs);
    else this.#bodyStalled(this.#receiving);
  }

  /**
   * Requests already forwarded are answered, the last with `connection: close`; none after them is read.
   * In a drain, one whose last answer went out saying keep-alive (or that has none in flight) first waits
   * for the client's next request, as H1Front.drain() does: that one is read, answered with `connection: close`.
   */
  closeGracefully(keepAliveGraceMs = 0): void {
    const last = this.#exchanges.at(-1);
    if (keepAliveGraceMs > 0 && !this.#closing && (last === undefined || last.answered)) {
      this.#lingering = { graceMs: keepAliveGraceMs };
      this.#endOnceQuiet();
      return;
    }
    this.#readNoMore();
    this.#stopHeadDeadline();
    this.#closeIfDone();
  }

  /**
   * Lingering: ends the connection once it has had nothing in flight for the grace; a head that arrives whole
   * within it is read (#requestHead). One still arriving when the grace is over is not waited for: a client
   * stalled mid-head held the drain to its timeout.
   */
  #endOnceQuiet(): void {
    const lingering = this.#lingering;
    if (lingering === undefined || this.#finished) return;
    clearTimeout(lingering.timer);
    if (this.#exchanges.length > 0 || this.#receiving !== undefined) return;
    const graceLeft = lingering.graceMs - (performance.now() - this.#quietSince);
    if (graceLeft > 0) lingering.timer = setTimeout(() => this.#endOnceQuiet(), graceLeft);
    else this.closeGracefully();
  }

  /** Requests read so far are answered; none after them is read. */
  #readNoMore(): void {
    this.#closing = true;
    clearTimeout(this.#lingering?.timer);
    this.#lingering = undefined;
    this.#fromClient.stop();
  }

  #fromClientData(chunk: Buffer): void {
    if (this.#finished || this.#refusal) return;
    try {
      this.#fromClient.push(chunk, this.#toUpstream.add);
    } catch (err) {
      this.#clientFramingError(err as FramingError);
    }
    if (this.#finished) return;
    if (!this.#toUpstream.flush(this.#parts.upstream)) this.#parts.client.pause();
    this.#watchHead();
  }

  /** Starts the head deadline when a read ended inside a request head (rarely: a head usually comes in one read). */
  #watchHead(): void {
    const inHead = this.#receiving === undefined && !this.#fromClient.atBoundary;
    // Closing: the rest of that head will not be read.
    if (inHead && !this.#refusal && !this.#closing) this.#headDeadline ??= setTimeout(() => this.#headStalled(), this.#parts.limits.idleTimeoutMs);
  }

  #stopHeadDeadline(): void {
    clearTimeout(this.#headDeadline);
    this.#headDeadline = undefined;
  }

  /** nginx's client_header_timeout: 408 once the responses before it are done, then the connection closes. */
  #headStalled(): void {
    this.#headDeadline = undefined;
    if (this.#finished || this.#refusal) return;
    // Paused by us (the upstream is not reading): the rest of the head cannot come yet.
    if (this.#parts.client.isPaused()) {
      this.#watchHead();
      return;
    }
    this.#refuse(new FramingError(408, headStalledMessage(this.#parts.limits.idleTimeoutMs)), this.#headLine('client_header_timeout'));
  }

  /** Before anything that ends the connection: what the client should get is still in the batch. */
  #flushToClient(): void {
    if (!this.#toClient.flush(this.#parts.client)) this.#parts.upstream.pause();
  }

  #fromUpstreamData(chunk: Buffer): void {
    if (this.#finished) return;
    try {
      this.#fromUpstream.push(chunk, this.#toClient.add);
    } catch (err) {
      this.#upstreamFailed('bad_response', (err as FramingError).message);
    }
    if (!this.#finished) this.#flushToClient();
  }

  #requestHead(head: Http1Head, raw: Buffer): { bytes: Buffer; body: BodyFraming } {
    this.#stopHeadDeadline();
    this.#toUpstream.startMessage();
    this.#judging = head;
    const judged = judgeRequest(head);
    const { body, last } = judged;
    const exchange: Exchange = { method: head.method, path: head.target, http10: head.minorVersion === 0, started: requestStart(this.#parts.context), bytesIn: 0, bytesOut: 0, status: 0, answered: false };
    this.#exchanges.push(exchange);
    this.#receiving = exchange;
    this.#parts.observer.streamOpened('rest');
    this.#judging = undefined;
    this.#ourFields ??= Buffer.from(forwardingFields([], this.#parts.context), 'latin1');
    const bytes = forwardedHead(head, raw, judged, this.#parts.context, this.#ourFields);
    if (awaitsContinue(head, body)) this.#continueWhenFirst(exchange);
    // RFC 9112 9.6: the client sends nothing after it and waits for our close. A model server that ignores
    // the option and keeps its connection open left the client waiting until --mtls_idle_timeout.
    // Lingering in a drain, this is the request the client was sending: its answer says close.
    if (last || this.#lingering) this.#readNoMore();
    return { bytes, body };
  }

  #responseHead(head: Http1Head, raw: Buffer): { bytes: Buffer; body: BodyFraming } {
    const exchange = this.#exchanges[0];
    if (!exchange) throw new FramingError(502, 'the upstream answered a request nobody sent');
    if (head.status === 101) throw new FramingError(502, 'the upstream switched protocols, which the relay never asks for');
    this.#interim = head.status < 200;
    if (!this.#interim) exchange.status = head.status;
    // Once closing, no request after those in the queue is read: the only one left is the last.
    const last = this.#exchanges.length === 1;
    const body = responseFraming(head, exchange.method, exchange.http10);
    if (this.#interim) {
      const bytes = interimFor(exchange, head, raw);
      if (bytes.length > 0) exchange.heardInterim = true;
      // An interim response (100 Continue) does not answer the request: a 502 can still follow it.
      return { bytes, body };
    }
    exchange.answered = true;
    this.#upstreamLast = body.kind === 'until-close' || closesAfter(head);
    if (dechunkedFor(exchange, body)) {
      // Its body ends at our close: the connection ends with it, whatever the model server's does.
      this.#dechunking = true;
      return { bytes: withConnectionClose(head, true), body: { kind: 'chunked', dechunked: true } };
    }
    if (this.#closing && last) return { bytes: withConnectionClose(head), body };
    return { bytes: exchange.http10 && !this.#upstreamLast ? saysKeepAlive(head, raw) : raw, body };
  }

  #responseEnded(): void {
    if (this.#interim) return;
    const exchange = this.#exchanges.shift()!;
    exchange.responded = true;
    this.#reused = true;
    this.#quietSince = performance.now();
    this.#settle(exchange);
    if (this.#upstreamLast || this.#dechunking) {
      this.#fromUpstream.stop();
      this.#end(undefined, this.#upstreamLast ? 'UPSTREAM_CLOSED' : 'closed');
      return;
    }
    const next = this.#exchanges[0];
    if (next?.ownContinue === 'owed') this.#sendContinue(next, this.#toClient.add);
    this.#endOnceQuiet();
    this.#closeIfDone();
  }

  /**
   * Our 100 (Continue) goes out at once when no response before it is still
   * coming (the usual case: nothing is pipelined ahead of a request that waits),
   * else right after the last of them, never inside one.
   */
  #continueWhenFirst(exchange: Exchange): void {
    // Outside an upstream read nothing waits in #toClient: a direct write keeps the order.
    if (this.#exchanges[0] === exchange) this.#sendContinue(exchange, (bytes) => this.#parts.client.write(bytes));
    else exchange.ownContinue = 'owed';
  }

  #sendContinue(exchange: Exchange, write: (bytes: Buffer) => void): void {
    exchange.ownContinue = 'sent';
    exchange.heardInterim = true;
    write(CONTINUE);
  }

  /** Logs an exchange once both its response and its request body are done; an early answer (a 413) comes before the body's end. */
  #settle(exchange: Exchange): void {
    if (exchange.responded && exchange !== this.#receiving) this.#report(exchange);
  }

  /** Ends the connection once nothing is in flight and a drain, revocation or refusal asked for it. */
  #closeIfDone(): void {
    if (this.#finished || this.#exchanges.length > 0 || this.#receiving !== undefined) return;
    if (this.#refusal) {
      const line = this.#takeRefusalLine();
      const answer = answerTo(line?.method ?? '', refusalAnswer(this.#refusal));
      this.#end(answer.wire);
      if (line) this.#log({ ...line, bytesOut: answer.bodyBytes });
      return;
    }
    // A head begun before the drain is never finished: nothing of it went upstream.
    if (this.#closing) this.#end();
  }

  #clientFramingError(err: FramingError): void {
    if (!(err instanceof FramingError)) throw err;
    if (this.#receiving) {
      this.#badBody(this.#receiving, err);
      return;
    }
    this.#refuse(err, this.#headLine(err instanceof RoutingRefused ? err.refusal.error : 'bad_request'));
  }

  /** The access line of a request refused at its head: the method and path of the head judged, if one was read whole. */
  #headLine(error: string): Exchange {
    const head = this.#judging;
    return { method: head?.method ?? '', path: head?.target ?? '', started: requestStart(this.#parts.context), bytesIn: 0, bytesOut: 0, status: 0, answered: false, error };
  }

  /**
   * A body framed wrongly (README: a malformed chunk line or trailer is answered 400) is refused as a
   * head is, after the answers owed before it. What of it is still in the write batch (its head, when
   * it came in the same read) never goes upstream; the model server's connection, which may have its
   * head, is cut with the refusal, so it never gets a whole request. Once an answer to it went out (an
   * early 413), the client's connection is cut instead.
   */
  #badBody(exchange: Exchange, err: FramingError): void {
    const why = (exchange.error = 'bad_request_body');
    if (exchange.answered) {
      // No answer of ours can go out now: the log still says why the request was cut.
      exchange.detail = err.message;
      this.#fail(why);
      return;
    }
    // Not answered, it is still in the queue, and last: nothing after a request is read before its body ends.
    this.#exchanges.pop();
    this.#receiving = undefined;
    this.#parts.observer.streamClosed('rest');
    this.#toUpstream.dropMessage();
    this.#refuse(err, exchange);
  }

  /** Our own answer can take the place of the model server's: nothing of it went out, and no response before it is owed. */
  #mayAnswerInstead(exchange: Exchange): boolean {
    return this.#exchanges.length === 1 && this.#exchanges[0] === exchange && !exchange.answered;
  }

  /** Nothing more is read; the refusal is answered once the responses owed before it are done. `line`: the refused request's access line. */
  #refuse(err: FramingError, line: Exchange): void {
    this.#refusal = err;
    this.#parts.client.pause();
    this.#refusalLine = { ...line, status: err.status, answered: true, detail: err.message };
    this.#closeIfDone();
  }

  /**
   * The shutdown timeout is running out (Relay.endAll): the request waiting for its answer
   * gets 503 with `message` if nothing of that answer went out yet, else the connection is cut.
   * Requests pipelined behind it are left unanswered, which a client may retry.
   */
  endNow(message: string): void {
    const waiting = this.#exchanges[0];
    if (this.#finished || !waiting) return;
    const why = (waiting.error = 'shutdown_timeout');
    if (waiting.answered) {
      this.#fail(why);
      return;
    }
    waiting.status = 503;
    this.#answerInstead(waiting, jsonAnswer(503, message), why);
  }

  /**
   * A request body that stopped arriving (nginx's client_body_timeout): it
   * would hold the upstream connection for as long as the client likes. 408
   * if nothing of an answer went out yet, else the connection is cut.
   */
  #bodyStalled(exchange: Exchange): void {
    const why = (exchange.error = 'client_body_timeout');
    if (this.#mayAnswerInstead(exchange)) {
      exchange.status = 408;
      this.#answerInstead(exchange, jsonAnswer(408, bodyStalledMessage(this.#parts.limits.idleTimeoutMs)), why);
      return;
    }
    this.#fail(why);
  }

  /** The upstream closed or failed: a request still waiting gets a 502 if nothing of its answer was sent. */
  #upstreamClosed(err: Error | undefined): void {
    if (this.#finished) return;
    // Only a clean close ends a body that runs until close (RFC 9112 6.3); a reset cut it short.
    const complete = err === undefined ? this.#fromUpstream.finish() : this.#fromUpstream.atBoundary;
    if (!complete) {
      // An HTTP/2 server's SETTINGS and GOAWAY (the gRPC port given as the REST upstream) are no response: say so.
      const held = this.#fromUpstream.heldHead;
      if (isServerPreface(held)) {
        const { code, message } = describeUpstreamError(this.#parts.target, { code: 'UPSTREAM_BAD_RESPONSE', data: held });
        this.#upstreamFailed(code, message);
        return;
      }
      // Part of a response (maybe only part of its head) came: to the client this is a reset.
      this.#upstreamFailed('upstream_closed_mid_response', describeUpstreamError(this.#parts.target, { code: 'ECONNRESET' }).message);
      return;
    }
    const waiting = this.#exchanges[0];
    if (!waiting) {
      this.#end();
      return;
    }
    if (this.#closedAsIdle(waiting)) {
      this.#parts.observer.upstreamError('rest', UPSTREAM_CLOSED_IDLE, `${describeUpstreamError(this.#parts.target, { code: UPSTREAM_CLOSED_IDLE }).message}: the client's connection is closed unanswered, as the model server closed it, for the client to retry`);
      this.#end(undefined, UPSTREAM_CLOSED_IDLE);
      return;
    }
    const { code, message } = describeUpstreamError(this.#parts.target, err ?? { code: 'UPSTREAM_CLOSED' });
    this.#upstreamFailed(code, message);
  }

  /**
   * The model server closed its kept-alive connection (FIN or reset) without a byte of an answer to `waiting`,
   * sent after another request's response: its idle timeout (OVMS's Drogon: 60 s) met the request on the way.
   * The client, whose connection to us was as idle, gets the same silent close it would get from the model
   * server directly, so its own retry on a fresh connection works as there (curl and Go's net/http resend such
   * a request; RFC 9112 9.3.1 leaves that to it); a 502 is an answer they do not retry. A first request on a
   * connection keeps its 502: a client retries only a request on a connection it reused, and one that had a
   * 100 (Continue) has heard back.
   */
  #closedAsIdle(waiting: Exchange): boolean {
    return this.#reused && !waiting.answered && !waiting.heardInterim;
  }

  #upstreamFailed(code: string, message: string): void {
    const waiting = this.#exchanges[0];
    this.#parts.observer.upstreamError('rest', code, message);
    if (!waiting) {
      // Every response owed is complete (what failed came after them, unasked): they still go to the client.
      this.#end();
      return;
    }
    if (!waiting.answered) {
      waiting.status = 502;
      waiting.error = code;
      this.#answerInstead(waiting, jsonAnswer(502, message), code);
      return;
    }
    waiting.error = code;
    this.#fail(code);
  }

  /**
   * Our own answer in place of the model server's to `exchange`, whose error is `why`; the connection
   * then closes, and the requests pipelined behind it, never answered, are logged with that why too.
   */
  #answerInstead(exchange: Exchange, answer: ClosingAnswer, why: string): void {
    const sent = answerTo(exchange.method, answer);
    exchange.bytesOut += sent.bodyBytes;
    this.#end(sent.wire, why);
  }

  /** Closes both sides after `last` (our own answer) and what was written before it; `unfinished` is logged for requests left unanswered. */
  #end(last?: Buffer, unfinished = 'closed'): void {
    if (this.#finished) return;
    this.#finished = true;
    const { client, upstream } = this.#parts;
    this.#flushToClient();
    // The rest of the read under way is not the client's: not an answer "nobody asked for" (a refused request's own, say).
    this.#fromUpstream.stop();
    upstream.destroy();
    if (last) client.end(last);
    else client.end();
    // What the client still sends (the rest of a body refused or answered early) is read and dropped, as
    // nginx's lingering close does: left paused, a client that writes its whole body before reading (Python's
    // requests) could never finish that write nor see our close.
    client.resume();
    this.#reportUnfinished(unfinished);
  }

  /** Cuts both sides: a half-relayed message cannot be finished. `why`: the cut request's error, which the others in flight get too. */
  #fail(why: string): void {
    if (this.#finished) return;
    this.#finished = true;
    // Whole responses that came in the same read as the failure are owed to the client still.
    this.#flushToClient();
    this.#parts.upstream.destroy();
    this.#parts.client.destroy();
    this.#reportUnfinished(why);
  }

  #clientGone(): void {
    if (this.#finished) return;
    this.#finished = true;
    this.#parts.upstream.destroy();
    this.#reportUnfinished(this.#parts.context.closedBy ?? 'client_closed');
  }

  /** Every exchange still open is logged once, with why it did not finish. */
  #reportUnfinished(error: string): void {
    this.#stopHeadDeadline();
    // Also when the client left first: the drain's wait would otherwise outlive the connection, and a library's shutdown with it.
    clearTimeout(this.#lingering?.timer);
    const open = this.#exchanges.splice(0);
    // Answered already, its body still arriving: not in the queue any more, still not logged.
    if (this.#receiving?.responded) open.push(this.#receiving);
    for (const exchange of open) {
      exchange.error ??= error;
      this.#report(exchange);
    }
    this.#receiving = undefined;
    // Refused behind responses that never all came (the model server's last, a cut, a shutdown): its answer never went out.
    const refused = this.#takeRefusalLine();
    if (refused) this.#log({ ...refused, status: 0, answered: false });
  }

  #report(exchange: Exchange): void {
    this.#parts.observer.streamClosed('rest');
    this.#log(exchange);
  }

  #takeRefusalLine(): Exchange | undefined {
    const line = this.#refusalLine;
    this.#refusalLine = undefined;
    return line;
  }

  #log(exchange: Exchange): void {
    const { context, observer } = this.#parts;
    observer.request({
      listener: 'rest',
      protocol: 'http/1.1',
      remote: context.remoteAddress,
      subject: context.identity.subject,
      serial: context.identity.serial,
      method: exchange.method,
      path: exchange.path,
      status: exchange.status,
      bytesIn: exchange.bytesIn,
      bytesOut: exchange.bytesOut,
      durationMs: elapsedMs(exchange.started),
      error: exchange.error,
      detail: exchange.detail,
    });
  }
}
