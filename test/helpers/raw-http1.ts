import { once } from 'node:events';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import type { TestPki } from './pki.js';
import { tlsClientOptions } from './harness.js';

/**
 * An mTLS connection that speaks HTTP/1.1 as the test writes it, byte for byte; a reset shows as 'close'.
 * `allowHalfOpen`: it does not close its side when the server closes its own.
 */
export async function openRaw(port: number, pki: TestPki, options: { allowHalfOpen?: boolean } = {}): Promise<TLSSocket> {
  const socket = tlsConnect({ host: '127.0.0.1', port, ALPNProtocols: ['http/1.1'], ...tlsClientOptions(pki), ...options });
  socket.on('error', () => {});
  await once(socket, 'secureConnect');
  return socket;
}

/** Everything the server sends until it closes the connection. */
export async function readToClose(socket: TLSSocket): Promise<string> {
  const chunks: Buffer[] = [];
  socket.on('data', (c: Buffer) => chunks.push(c));
  await once(socket, 'close');
  return Buffer.concat(chunks).toString('latin1');
}

/** As readToClose(), but a bounded wait: a server that has not closed by `ms` has the connection closed by us, and what came by then is returned. */
export async function readToCloseWithin(socket: TLSSocket, ms: number): Promise<string> {
  const bound = setTimeout(() => socket.destroy(), ms);
  try {
    return await readToClose(socket);
  } finally {
    clearTimeout(bound);
  }
}

/** Resolves with what arrived once `pattern` shows up in it. */
export function readUntil(socket: TLSSocket, pattern: RegExp): Promise<string> {
  return new Promise((resolve, reject) => {
    let text = '';
    const onData = (c: Buffer) => {
      text += c.toString('latin1');
      if (pattern.test(text)) {
        socket.off('data', onData);
        resolve(text);
      }
    };
    socket.on('data', onData);
    socket.once('close', () => reject(new Error(`closed before ${pattern}; got ${JSON.stringify(text)}`)));
  });
}

/** One response as a client read it off the wire. */
export interface ParsedResponse {
  readonly status: number;
  /** The 1xx statuses before it. */
  readonly interim: number[];
  /** Field names and values in turn, as Node's rawHeaders has them. */
  readonly rawHeaders: string[];
  readonly body: Buffer;
  readonly rawTrailers: string[];
}

/**
 * The responses in `bytes`, everything a server sent on a connection until it closed, to requests
 * of `methods` in turn (a HEAD's answer has no body), read as RFC 9112 6.3 frames them; `rest`: what
 * follows the last whole one (an answer cut short, or bytes no request asked for).
 */
export function parseResponses(bytes: Buffer, methods: readonly string[]): { responses: ParsedResponse[]; rest: Buffer } {
  const responses: ParsedResponse[] = [];
  let at = 0;
  let interim: number[] = [];
  while (responses.length < methods.length) {
    const head = readHead(bytes, at);
    if (!head) break;
    if (head.status >= 100 && head.status < 200) {
      interim.push(head.status);
      at = head.end;
      continue;
    }
    const body = readBody(bytes, head, methods[responses.length]!);
    if (!body) break;
    responses.push({ status: head.status, interim, rawHeaders: head.rawHeaders, body: body.body, rawTrailers: body.rawTrailers });
    interim = [];
    at = body.end;
  }
  return { responses, rest: bytes.subarray(at) };
}

interface ReadHead {
  readonly status: number;
  readonly rawHeaders: string[];
  /** Where the body begins. */
  readonly end: number;
}

function readHead(bytes: Buffer, at: number): ReadHead | undefined {
  const end = bytes.indexOf('\r\n\r\n', at, 'latin1');
  if (end < 0) return undefined;
  const [statusLine, ...lines] = bytes.toString('latin1', at, end).split('\r\n');
  const status = /^HTTP\/1\.[01] (\d{3})(?: |$)/.exec(statusLine!);
  if (!status) return undefined;
  return { status: Number(status[1]), rawHeaders: fieldPairs(lines), end: end + 4 };
}

/** `name: value` lines as [name, value, name, value, ...], the value without the white space around it. */
function fieldPairs(lines: readonly string[]): string[] {
  return lines.flatMap((line) => {
    const colon = line.indexOf(':');
    return [line.slice(0, colon), line.slice(colon + 1).replace(/^[ \t]+|[ \t]+$/g, '')];
  });
}

function fieldValues(rawHeaders: readonly string[], name: string): string[] {
  return rawHeaders.filter((_, i) => i % 2 === 1 && rawHeaders[i - 1]!.toLowerCase() === name);
}

function readBody(bytes: Buffer, head: ReadHead, method: string): { body: Buffer; rawTrailers: string[]; end: number } | undefined {
  if (method === 'HEAD' || head.status === 204 || head.status === 304) return { body: Buffer.alloc(0), rawTrailers: [], end: head.end };
  if (fieldValues(head.rawHeaders, 'transfer-encoding').join(',').toLowerCase().includes('chunked')) return readChunked(bytes, head.end);
  const length = fieldValues(head.rawHeaders, 'content-length')[0];
  if (length !== undefined) {
    const end = head.end + Number(length);
    return end > bytes.length ? undefined : { body: bytes.subarray(head.end, end), rawTrailers: [], end };
  }
  // Until the server closed: everything left.
  return { body: bytes.subarray(head.end), rawTrailers: [], end: bytes.length };
}

function readChunked(bytes: Buffer, from: number): { body: Buffer; rawTrailers: string[]; end: number } | undefined {
  const chunks: Buffer[] = [];
  let at = from;
  for (;;) {
    const lineEnd = bytes.indexOf('\r\n', at, 'latin1');
    if (lineEnd < 0) return undefined;
    const sizeLine = bytes.toString('latin1', at, lineEnd);
    if (!/^[0-9a-fA-F]+(;|$)/.test(sizeLine)) return undefined;
    const size = parseInt(sizeLine, 16);
    at = lineEnd + 2;
    if (size === 0) break;
    if (at + size + 2 > bytes.length) return undefined;
    chunks.push(bytes.subarray(at, at + size));
    at += size + 2;
  }
  const trailerEnd = bytes.indexOf('\r\n', at, 'latin1') === at ? at : bytes.indexOf('\r\n\r\n', at, 'latin1');
  if (trailerEnd < 0) return undefined;
  const rawTrailers = trailerEnd === at ? [] : fieldPairs(bytes.toString('latin1', at, trailerEnd).split('\r\n'));
  return { body: Buffer.concat(chunks), rawTrailers, end: trailerEnd + (trailerEnd === at ? 2 : 4) };
}
