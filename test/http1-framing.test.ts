import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { chunked } from './helpers/chunks.js';
import {
  FramingError, Http1Reader, parseHead, parseHeadByLine, requestFraming, responseFraming, type BodyFraming, type Http1Head,
} from '../src/http1-framing.js';
import { rebuiltRequestHead, relayedRequestHead } from '../src/rest-relay.js';
import type { ConnectionContext } from '../src/listeners.js';

/** One message as generated: its bytes, the payload length, and for responses the request method it answers. */
interface Message {
  bytes: Buffer;
  payload: number;
  method: string;
}

const tokenArb = fc.stringMatching(/^[a-z][a-z0-9-]{0,11}$/);
const valueArb = fc.stringMatching(/^[\x21-\x7e]([\x20-\x7e]{0,20}[\x21-\x7e])?$/);
const fieldsArb = fc.array(fc.tuple(tokenArb, valueArb), { maxLength: 4 }).map((fields) =>
  fields.filter(([name]) => !['content-length', 'transfer-encoding'].includes(name)).map(([n, v]) => `${n}: ${v}\r\n`).join(''));
const payloadArb = fc.uint8Array({ maxLength: 300 }).map((a) => Buffer.from(a));

/** A chunked body: the payload cut into chunks (with or without extensions), then trailers. */
const chunkedBodyArb = fc.tuple(payloadArb, fc.array(fc.nat(), { maxLength: 4 }), fc.boolean(), fieldsArb).map(([payload, cuts, ext, trailers]) => {
  const parts = chunked(payload, cuts).map((c) => Buffer.concat([Buffer.from(`${c.length.toString(16)}${ext ? ';name="v"' : ''}\r\n`), c, Buffer.from('\r\n')]));
  return { body: Buffer.concat([...parts, Buffer.from(`0\r\n${trailers}\r\n`)]), payload: payload.length };
});

const framedBodyArb = fc.oneof(
  payloadArb.map((p) => ({ header: `content-length: ${p.length}\r\n`, body: p, payload: p.length })),
  chunkedBodyArb.map((c) => ({ header: 'transfer-encoding: chunked\r\n', ...c })),
);
/** A request without either header has no body; a response without either would run until close (tested on its own). */
const bodyArb = fc.oneof(framedBodyArb, fc.constant({ header: '', body: Buffer.alloc(0), payload: 0 }));

const requestArb = fc.tuple(fc.constantFrom('GET', 'POST', 'PUT', 'DELETE'), fc.stringMatching(/^\/[a-z0-9/?=&%-]{0,20}$/), fieldsArb, bodyArb, fc.boolean()).map(
  ([method, target, fields, body, leadingCrlf]): Message => ({
    bytes: Buffer.concat([Buffer.from(`${leadingCrlf ? '\r\n' : ''}${method} ${target} HTTP/1.1\r\nhost: a\r\n${fields}${body.header}\r\n`), body.body]),
    payload: body.payload,
    method,
  }),
);

/** Responses, including those whose framing says nothing comes after the head: HEAD, 1xx, 204, 304. */
const responseArb = fc.oneof(
  fc.tuple(fc.constantFrom(200, 201, 404, 500), fieldsArb, framedBodyArb).map(([status, fields, body]): Message => ({
    bytes: Buffer.concat([Buffer.from(`HTTP/1.1 ${status} Whatever\r\n${fields}${body.header}\r\n`), body.body]),
    payload: body.payload,
    method: 'POST',
  })),
  fc.tuple(fc.constantFrom(204, 304), fieldsArb).map(([status, fields]): Message => ({ bytes: Buffer.from(`HTTP/1.1 ${status} \r\n${fields}\r\n`), payload: 0, method: 'GET' })),
  fc.tuple(fc.nat(5000), fieldsArb).map(([length, fields]): Message => ({ bytes: Buffer.from(`HTTP/1.1 200 OK\r\ncontent-length: ${length}\r\n${fields}\r\n`), payload: 0, method: 'HEAD' })),
  fieldsArb.map((fields): Message => ({ bytes: Buffer.from(`HTTP/1.1 100 Continue\r\n${fields}\r\n`), payload: 0, method: 'POST' })),
);

interface Observed {
  out: Buffer[];
  /** Output length at each end(): where each message ended. */
  ends: number[];
  payload: number;
}

/** Reads `messages`, cut anywhere, with heads passed as they are. */
function readAll(kind: 'request' | 'response', messages: readonly Message[], cuts: number[]): Observed {
  const seen: Observed = { out: [], ends: [], payload: 0 };
  let written = 0;
  let index = 0;
  const reader = new Http1Reader(kind, 64 * 1024, {
    head: (head, raw) => {
      const body = kind === 'request' ? requestFraming(head) : responseFraming(head, messages[index]!.method);
      index++;
      return { bytes: raw, body };
    },
    body: (n) => (seen.payload += n),
    end: () => seen.ends.push(written),
  });
  for (const chunk of chunked(Buffer.concat(messages.map((m) => m.bytes)), cuts)) {
    reader.push(chunk, (bytes) => {
      seen.out.push(bytes);
      written += bytes.length;
    });
  }
  assert.ok(reader.atBoundary, 'reader ends between messages');
  return seen;
}

/** Where each message ends in the concatenated stream, minus the empty lines a reader drops before a request line. */
function expectedEnds(messages: readonly Message[]): number[] {
  let at = 0;
  return messages.map((m) => (at += m.bytes.length - (m.bytes.subarray(0, 2).toString() === '\r\n' ? 2 : 0)));
}

describe('HTTP/1.1 message framing', () => {
  test('requests: every byte passes in order, each message ends exactly at its last byte, payload counted, however the bytes are cut', () => {
    fc.assert(
      fc.property(fc.array(requestArb, { minLength: 1, maxLength: 5 }), fc.array(fc.nat(), { maxLength: 12 }), (messages, cuts) => {
        const seen = readAll('request', messages, cuts);
        const stripped = Buffer.concat(messages.map((m) => (m.bytes.subarray(0, 2).toString() === '\r\n' ? m.bytes.subarray(2) : m.bytes)));
        assert.deepEqual(Buffer.concat(seen.out), stripped);
        assert.deepEqual(seen.ends, expectedEnds(messages));
        assert.equal(seen.payload, messages.reduce((n, m) => n + m.payload, 0));
      }),
      { numRuns: 300, includeErrorInReport: true },
    );
  });

  test('responses: same, with HEAD, 1xx, 204 and 304 answers carrying no body', () => {
    fc.assert(
      fc.property(fc.array(responseArb, { minLength: 1, maxLength: 5 }), fc.array(fc.nat(), { maxLength: 12 }), (messages, cuts) => {
        const seen = readAll('response', messages, cuts);
        assert.deepEqual(Buffer.concat(seen.out), Buffer.concat(messages.map((m) => m.bytes)));
        assert.deepEqual(seen.ends, expectedEnds(messages));
        assert.equal(seen.payload, messages.reduce((n, m) => n + m.payload, 0));
      }),
      { numRuns: 300, includeErrorInReport: true },
    );
  });

  test('a byte per read: every message passes and ends exactly as when it all comes in one read', () => {
    const everyByte = (messages: readonly Message[]) => Array.from({ length: messages.reduce((n, m) => n + m.bytes.length, 0) }, (_c, i) => i);
    for (const [kind, arb] of [['request', requestArb], ['response', responseArb]] as const) {
      fc.assert(
        fc.property(fc.array(arb, { minLength: 1, maxLength: 3 }), (messages) => {
          const whole = readAll(kind, messages, []);
          const trickled = readAll(kind, messages, everyByte(messages));
          assert.deepEqual(Buffer.concat(trickled.out), Buffer.concat(whole.out));
          assert.deepEqual(trickled.ends, whole.ends);
          assert.equal(trickled.payload, whole.payload);
        }),
        { numRuns: 100, includeErrorInReport: true },
      );
    }
  });

  test('a head of exactly the size limit is read, one byte longer is refused, whole or a byte per read', () => {
    const head = (size: number) => Buffer.from(`GET / HTTP/1.1\r\nx: ${'a'.repeat(size - 23)}\r\n\r\n`);
    for (const step of [1, 7, 4096]) {
      const heads: string[] = [];
      const reader = new Http1Reader('request', 1024, { head: (h, raw) => { heads.push(h.startLine); return { bytes: raw, body: requestFraming(h) }; }, body: () => {}, end: () => {} });
      const exact = head(1024);
      assert.equal(exact.length, 1024);
      for (let i = 0; i < exact.length; i += step) reader.push(exact.subarray(i, i + step), () => {});
      assert.deepEqual(heads, ['GET / HTTP/1.1']);
      const over = head(1025);
      assert.throws(() => {
        for (let i = 0; i < over.length; i += step) reader.push(over.subarray(i, i + step), () => {});
      }, (err: unknown) => err instanceof FramingError && err.status === 431);
    }
  });

  test('a head the handler rewrites goes out rewritten; the body after it is unchanged', () => {
    const out: Buffer[] = [];
    const reader = new Http1Reader('request', 1024, {
      head: (head) => ({ bytes: Buffer.from(`${head.startLine}\r\nx: 1\r\n\r\n`), body: requestFraming(head) }),
      body: () => {},
      end: () => {},
    });
    reader.push(Buffer.from('POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc'), (b) => out.push(b));
    assert.equal(Buffer.concat(out).toString(), 'POST / HTTP/1.1\r\nx: 1\r\n\r\nabc');
  });

  test('a response without Content-Length or chunked runs until the connection closes', () => {
    let ended = 0;
    let payload = 0;
    const reader = new Http1Reader('response', 1024, { head: (head, raw) => ({ bytes: raw, body: responseFraming(head, 'GET') }), body: (n) => (payload += n), end: () => ended++ });
    reader.push(Buffer.from('HTTP/1.0 200 OK\r\n\r\nsome bytes'), () => {});
    assert.equal(ended, 0);
    assert.equal(reader.finish(), true);
    assert.equal(ended, 1);
    assert.equal(payload, 10);
  });

  test('a connection that closes inside a message says so', () => {
    const reader = new Http1Reader('request', 1024, { head: (head, raw) => ({ bytes: raw, body: requestFraming(head) }), body: () => {}, end: () => {} });
    reader.push(Buffer.from('POST / HTTP/1.1\r\ncontent-length: 9\r\n\r\nabc'), () => {});
    assert.equal(reader.finish(), false);
  });
});

/** Requests two parsers could split differently, or that we do not relay: each must be refused before a byte goes upstream. */
const REFUSED_REQUESTS: readonly [string, string, number, RegExp][] = [
  ['both Content-Length and Transfer-Encoding', 'POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n', 400, /both Content-Length and Transfer-Encoding/],
  ['a transfer coding other than chunked', 'POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n', 501, /only chunked/],
  ['one transfer coding, not chunked', 'POST / HTTP/1.1\r\ntransfer-encoding: foo\r\n\r\n', 501, /Transfer-Encoding "foo" is not supported \(only chunked\)/],
  ['identity alone', 'POST / HTTP/1.1\r\ntransfer-encoding: identity\r\n\r\n', 501, /Transfer-Encoding "identity" is not supported \(only chunked\)/],
  ['chunked named twice', 'POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n', 400, /chunked applied more than once/],
  ['Transfer-Encoding in HTTP/1.0', 'POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n', 400, /HTTP\/1\.0/],
  ['two different Content-Lengths', 'POST / HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n', 400, /invalid Content-Length/],
  // RFC 9110 8.6: a list of agreeing values must not be forwarded as it came.
  ['a list of agreeing Content-Lengths', 'POST / HTTP/1.1\r\ncontent-length: 3, 3\r\n\r\nabc', 400, /invalid Content-Length: "3, 3"/],
  ['two agreeing Content-Length fields', 'POST / HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc', 400, /invalid Content-Length/],
  ['a signed Content-Length', 'POST / HTTP/1.1\r\ncontent-length: +3\r\n\r\n', 400, /invalid Content-Length/],
  ['a hex Content-Length', 'POST / HTTP/1.1\r\ncontent-length: 0x3\r\n\r\n', 400, /invalid Content-Length/],
  // 0xA0 is not white space in HTTP (RFC 9110 5.6.3), though String.trim() says it is: an upstream may read these differently.
  ['a no-break space after a Content-Length', 'POST / HTTP/1.1\r\ncontent-length: 5\xa0\r\n\r\nhello', 400, /invalid Content-Length/],
  ['a no-break space after chunked', 'POST / HTTP/1.1\r\ntransfer-encoding: chunked\xa0\r\n\r\n0\r\n\r\n', 501, /only chunked/],
  ['a bare LF ending a header line', 'GET / HTTP/1.1\nhost: a\r\n\r\n', 400, /bare CR or LF/],
  ['a bare CR inside a header line', 'GET / HTTP/1.1\r\nhost: a\rb\r\n\r\n', 400, /bare CR or LF/],
  // No CRLF CRLF ever comes: refused as soon as the bare line end arrives, not waited for.
  ['a head whose lines all end with a bare LF', 'GET / HTTP/1.1\nhost: a\n\n', 400, /bare CR or LF/],
  ['a head whose lines all end with a bare CR', 'GET / HTTP/1.1\rhost: a\r\r', 400, /bare CR or LF/],
  ['a folded header line', 'GET / HTTP/1.1\r\nx-a: 1\r\n 2\r\n\r\n', 400, /obs-fold/],
  ['white space before the colon', 'GET / HTTP/1.1\r\nhost : a\r\n\r\n', 400, /malformed header line/],
  ['a NUL in a value', 'GET / HTTP/1.1\r\nx-a: a\0b\r\n\r\n', 400, /control character/],
  ['a space in the request target', 'GET /a b HTTP/1.1\r\n\r\n', 400, /malformed request line/],
  ['an HTTP/2 request line', 'GET / HTTP/2.0\r\n\r\n', 400, /malformed request line/],
  ['a head larger than the limit', `GET / HTTP/1.1\r\nx-a: ${'a'.repeat(300)}\r\n\r\n`, 431, /larger than 256 bytes/],
  ['a head that never ends and outgrows the limit', `GET / HTTP/1.1\r\nx-a: ${'a'.repeat(300)}`, 431, /larger than 256 bytes/],
  ['a chunk size that is not hex', 'POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n', 400, /malformed chunk-size/],
  ['a chunk size of 14 hex digits', 'POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n10000000000000\r\n', 400, /chunk size too large/],
  ['a chunk size line ended by a bare LF', 'POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\nabc\r\n', 400, /CRLF/],
  ['chunk data longer than its size', 'POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcd\r\n', 400, /not followed by CRLF/],
  ['a malformed trailer', 'POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n', 400, /malformed trailer/],
  ['a chunk-size line that never ends', `POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n1;${'x'.repeat(5000)}`, 400, /chunk-size line too long/],
];

describe('HTTP/1.1 requests refused', () => {
  for (const [what, text, status, message] of REFUSED_REQUESTS) {
    test(`${what}: ${status}`, () => {
      // Byte by byte too: a rule must hold however the bytes arrive.
      for (const cuts of [[], Array.from(text, (_c, i) => i)]) {
        const out: Buffer[] = [];
        const reader = new Http1Reader('request', 256, { head: (head, raw) => ({ bytes: raw, body: requestFraming(head) }), body: () => {}, end: () => {} });
        assert.throws(() => {
          for (const chunk of chunked(Buffer.from(text, 'latin1'), cuts)) reader.push(chunk, (b) => out.push(b));
        }, (err: unknown) => err instanceof FramingError && err.status === status && message.test(err.message));
      }
    });
  }

  test('what stays accepted: chunk extensions, trailers, empty lines before the request line', () => {
    const bodies: BodyFraming[] = [];
    let ended = 0;
    const reader = new Http1Reader('request', 1024, { head: (head: Http1Head, raw) => { const body = requestFraming(head); bodies.push(body); return { bytes: raw, body }; }, body: () => {}, end: () => ended++ });
    reader.push(Buffer.from('\r\nPOST / HTTP/1.1\r\ncontent-length: 3\r\n\r\nabcPOST / HTTP/1.1\r\ntransfer-encoding: Chunked\r\n\r\n3;a=b\r\nabc\r\n0\r\nx-t: 1\r\n\r\n'), () => {});
    assert.deepEqual(bodies, [{ kind: 'length', length: 3 }, { kind: 'chunked' }]);
    assert.equal(ended, 2);
  });
});

/** Responses whose framing the client might read otherwise than we do: each is refused before a byte goes to the client. */
const REFUSED_RESPONSES: readonly [string, string, RegExp, string?][] = [
  ['both Content-Length and Transfer-Encoding', 'HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n', /both Content-Length and Transfer-Encoding/],
  ['Transfer-Encoding in HTTP/1.0', 'HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n', /HTTP\/1\.0/],
  ['a list of agreeing Content-Lengths', 'HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\nok', /invalid Content-Length/],
  ['a head whose lines all end with a bare LF', 'HTTP/1.1 200 OK\ncontent-length: 2\n\nok', /bare CR or LF/],
  // llhttp, in Node's HTTP client (and undici), refuses these.
  ['a tab after the Content-Length value', 'HTTP/1.1 200 OK\r\ncontent-length: 2\t\r\n\r\nok', /tab within or after a Content-Length or Transfer-Encoding value/],
  ['a tab after the Transfer-Encoding value', 'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\t\r\n\r\n2\r\nok\r\n0\r\n\r\n', /tab within or after a Content-Length or Transfer-Encoding value/],
  // Without a body too: llhttp refuses the field whatever follows.
  ['a 204 with a tab after the Content-Length value', 'HTTP/1.1 204 No Content\r\ncontent-length: 2\t\r\n\r\n', /tab within or after a Content-Length/],
  ['a 304 with a Content-Length that is no number', 'HTTP/1.1 304 Not Modified\r\ncontent-length: x\r\n\r\n', /invalid Content-Length: "x"/],
  ['an answer to HEAD with a list of agreeing Content-Lengths', 'HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\n', /invalid Content-Length/, 'HEAD'],
  ['an answer to HEAD with both Content-Length and Transfer-Encoding', 'HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n', /both Content-Length and Transfer-Encoding/, 'HEAD'],
  ['a 304 with both Transfer-Encoding and Content-Length', 'HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n', /both Content-Length and Transfer-Encoding/],
];

describe('HTTP/1.1 responses refused', () => {
  for (const [what, text, message, method = 'GET'] of REFUSED_RESPONSES) {
    test(`${what}: 502`, () => {
      const out: Buffer[] = [];
      const reader = new Http1Reader('response', 1024, { head: (head, raw) => ({ bytes: raw, body: responseFraming(head, method) }), body: () => {}, end: () => {} });
      assert.throws(() => reader.push(Buffer.from(text), (b) => out.push(b)), (err: unknown) => err instanceof FramingError && err.status === 502 && message.test(err.message));
      assert.deepEqual(out, []);
    });
  }
});

describe('an HTTP/1.0 answer with Transfer-Encoding, to an HTTP/1.0 request (OVMS\'s Drogon streams so)', () => {
  const framing = (head: string, http10Request: boolean) => responseFraming(parseHead(Buffer.from(`${head}\r\n\r\n`, 'latin1'), 'response'), 'GET', http10Request);
  test('chunked alone is read as chunked (the relay passes the data on and closes); to an HTTP/1.1 request it stays a 502', () => {
    assert.deepEqual(framing('HTTP/1.0 200 OK\r\ntransfer-encoding: chunked', true), { kind: 'chunked' });
    assert.throws(() => framing('HTTP/1.0 200 OK\r\ntransfer-encoding: chunked', false), /Transfer-Encoding in an HTTP\/1\.0 response/);
  });
  test('with another coding, or beside a Content-Length, it is a 502 still', () => {
    assert.throws(() => framing('HTTP/1.0 200 OK\r\ntransfer-encoding: gzip, chunked', true), /Transfer-Encoding in an HTTP\/1\.0 response/);
    assert.throws(() => framing('HTTP/1.0 200 OK\r\ntransfer-encoding: chunked, chunked', true), /Transfer-Encoding in an HTTP\/1\.0 response/);
    assert.throws(() => framing('HTTP/1.0 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked', true), /both Content-Length and Transfer-Encoding/);
  });
});

/** Names the relay looks up, in any case, with values that are lists, empty, padded or odd. */
const NAMES = ['content-length', 'transfer-encoding', 'x-forwarded-for', 'x-forwarded-client-cert', 'x-forwarded-proto', 'upgrade', 'connection', 'host'];
const headFieldArb = fc.tuple(
  fc.oneof(fc.constantFrom(...NAMES), tokenArb).chain((name) => fc.constantFrom(name, name.toUpperCase(), name[0]!.toUpperCase() + name.slice(1), name.replaceAll('-', '_'))),
  fc.constantFrom('', ' ', '\t', '  '),
  fc.oneof(valueArb, fc.constantFrom('', '1, 2', ' a ,b,, c ', 'chunked', '\xe9t\xe9', 'x\ty', '\xa0chunked\xa0, 5\xa0')),
  fc.constantFrom('', ' ', '\t'),
).map(([name, before, value, after]) => `${name}:${before}${value}${after}\r\n`);
const headArb = fc.tuple(
  fc.oneof(
    fc.tuple(fc.constantFrom('GET', 'POST', 'M-SEARCH'), fc.stringMatching(/^\/[a-z0-9/?=&%-]{0,12}$/), fc.constantFrom('0', '1')).map(([m, t, v]) => `${m} ${t} HTTP/1.${v}\r\n`),
    fc.tuple(fc.constantFrom('0', '1'), fc.constantFrom('200', '404', '101'), fc.constantFrom('', ' ', ' OK', ' Not \xe9')).map(([v, st, r]) => `HTTP/1.${v} ${st}${r}\r\n`),
  ),
  fc.array(headFieldArb, { maxLength: 6 }),
).map(([start, fields]) => `${start}${fields.join('')}\r\n`);

/** A head with up to three bytes inserted, replaced or deleted anywhere before its last CRLF CRLF. */
const nastyHeadArb = fc.tuple(headArb, fc.array(fc.tuple(fc.nat(), fc.constantFrom('\r', '\n', '\0', '\t', ' ', ':', ',', '\x7f', '\x80', '\x0b', 'A', '/'), fc.constantFrom('insert', 'replace', 'delete')), { maxLength: 3 }))
  .map(([head, edits]) => {
    let text = head.slice(0, -4);
    for (const [at, byte, how] of edits) {
      const i = at % (text.length + 1);
      text = text.slice(0, i) + (how === 'delete' ? '' : byte) + text.slice(how === 'insert' ? i : i + 1);
    }
    const full = text + '\r\n\r\n';
    // The reader hands a parser everything up to the first empty line.
    return full.slice(0, full.indexOf('\r\n\r\n') + 4);
  });

/** Everything a head tells its reader; values and has before fields, so the text lookups are what is checked. */
function reading(parse: () => Http1Head): unknown {
  let head: Http1Head;
  try {
    head = parse();
  } catch (err) {
    if (!(err instanceof FramingError)) throw err;
    return { refused: err.status, message: err.message };
  }
  const { startLine, method, target, status, minorVersion } = head;
  const lookups = NAMES.map((name) => [head.has(name), head.values(name)]);
  // The text lookups against the split fields, the reference.
  const fromFields = NAMES.map((name) => {
    const named = head.fields.filter((f) => f.name === name);
    return [named.length > 0, named.flatMap((f) => f.value.split(',').map((v) => v.replace(/^[ \t]+|[ \t]+$/g, '')))];
  });
  assert.deepEqual(lookups, fromFields);
  return { startLine, method, target, status, minorVersion, lookups, fields: head.fields.map((f) => ({ ...f })) };
}

describe('HTTP/1.1 heads: the one-pass grammar and the line-by-line parser', () => {
  test('read every head alike: the same refusal, or the same start line, fields and lookups', () => {
    fc.assert(
      fc.property(nastyHeadArb, (text) => {
        const raw = Buffer.from(text, 'latin1');
        const kind = text.startsWith('HTTP/') ? 'response' : 'request';
        assert.deepEqual(reading(() => parseHead(raw, kind)), reading(() => parseHeadByLine(text, kind)));
      }),
      { numRuns: 3000, includeErrorInReport: true },
    );
  });

  test('the relayed head is the client head field by field minus what we replace (in any spelling), then ours, whichever way it is built', () => {
    const context = { remoteAddress: '127.0.0.1', identity: { xfcc: 'Hash=ab;Subject="CN=c"' } } as unknown as ConnectionContext;
    fc.assert(
      fc.property(headArb.filter((t) => !t.startsWith('HTTP/')), (text) => {
        const raw = Buffer.from(text, 'latin1');
        const expected = rebuiltRequestHead(parseHeadByLine(text, 'request'), context).toString('latin1');
        assert.equal(relayedRequestHead(parseHead(raw, 'request'), raw, context).toString('latin1'), expected);
        assert.doesNotMatch(expected, /\r\nupgrade:/i);
        assert.deepEqual(expected.match(/\r\nx[-_]forwarded[-_]client[-_]cert:[^\r]*/gi), ['\r\nx-forwarded-client-cert: Hash=ab;Subject="CN=c"']);
      }),
      { numRuns: 1000, includeErrorInReport: true },
    );
  });
});
