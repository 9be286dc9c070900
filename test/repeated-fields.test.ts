/**
 * A field sent more than once reaches the other side once per line, as sent, in both REST
 * modes and from both fronts: requests to the model server, answers to the client. The model
 * server here is raw TCP, so no HTTP library in front of it merges or drops lines: it records
 * each request head's field lines and answers with repeated fields of its own.
 */
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import type { ClientHttp2Stream } from 'node:http2';
import { h2Session } from './helpers/harness.js';
import { openRaw, readToClose } from './helpers/raw-http1.js';
import { H2, END_HEADERS, END_STREAM, h2Frame, literalField, rawH2Client } from './helpers/raw-h2.js';
import { eventually } from './helpers/ops.js';
import { headReadingUpstream, scriptedRestModeFronts, type ScriptedUpstream } from './helpers/scripted-upstream.js';
import { FORWARD_MODES, type ForwardMode } from '../src/config.js';

/** A field line as [name lower-cased, value]: names are case-insensitive, and terminate mode sends them lower-cased. */
type Field = readonly [string, string];

/** What the model server answers every request with: each of these names twice. */
const REPEATED_ANSWER_FIELDS = 'set-cookie: a=1\r\nset-cookie: b=2\r\nx-foo: one\r\nx-foo: two\r\nwww-authenticate: Basic realm="x"\r\nwww-authenticate: Bearer\r\n';

/** Per request, by the path in its request line: its field lines in order. */
type HeadsByPath = Map<string, Field[]>;

/** Records each request head and answers it with 200 `ok`, REPEATED_ANSWER_FIELDS and a close (the relay waits for the model server to close). */
async function recordingUpstream(heads: HeadsByPath): Promise<ScriptedUpstream> {
  return headReadingUpstream((socket, [requestLine, ...lines]) => {
    heads.set(requestLine!.split(' ')[1]!, lines.map((line) => {
      const colon = line.indexOf(':');
      return [line.slice(0, colon).toLowerCase(), line.slice(colon + 1).trim()] as const;
    }));
    socket.end(`HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n${REPEATED_ANSWER_FIELDS}\r\nok`);
  });
}

/** The fields named `names`, in the order they came. */
const named = (fields: readonly Field[], names: readonly string[]): Field[] => fields.filter(([name]) => names.includes(name));

/**
 * Repeated request fields, each of a kind Node's headers object merges: kept once (user-agent,
 * authorization, referer, from), joined with ', ' (x-multi, accept) or with '; ' (cookie).
 */
const REPEATED_REQUEST_FIELDS: Field[] = [
  ['user-agent', 'one/1'], ['authorization', 'Basic b25lOjE='], ['x-multi', '1'], ['referer', 'https://one.example/'],
  ['user-agent', 'two/2'], ['authorization', 'Bearer two'], ['x-multi', '2'], ['referer', 'https://two.example/'],
  ['accept', 'text/plain'], ['from', 'a@example.com'], ['accept', 'application/json'], ['from', 'b@example.com'],
];
const REPEATED_NAMES = ['user-agent', 'authorization', 'x-multi', 'referer', 'accept', 'from'];
const COOKIES: Field[] = [['cookie', 'c=1'], ['cookie', 'd=2']];

const titleCase = (name: string): string => name.replace(/(^|-)([a-z])/g, (_, dash: string, letter: string) => dash + letter.toUpperCase());

/** The response fields named in REPEATED_ANSWER_FIELDS, as [name, value] pairs from a flat name, value list. */
function repeatedAnswerFields(raw: readonly string[]): Field[] {
  const fields: Field[] = [];
  for (let i = 0; i < raw.length; i += 2) fields.push([raw[i]!.toLowerCase(), raw[i + 1]!]);
  return named(fields, ['set-cookie', 'x-foo', 'www-authenticate']);
}

const EXPECTED_ANSWER_FIELDS: Field[] = [
  ['set-cookie', 'a=1'], ['set-cookie', 'b=2'], ['x-foo', 'one'], ['x-foo', 'two'], ['www-authenticate', 'Basic realm="x"'], ['www-authenticate', 'Bearer'],
];

describe('a repeated field reaches the other side line by line, both REST modes, HTTP/1.1 and HTTP/2', () => {
  const heads: HeadsByPath = new Map();
  const both = scriptedRestModeFronts(() => recordingUpstream(heads));

  /** `raw` on a new HTTP/1.1 connection: what came back until the proxy closed it. */
  async function http1Exchange(restMode: ForwardMode, raw: string): Promise<string> {
    const socket = await openRaw(both.front(restMode).restPort, both.pki);
    socket.write(raw);
    return readToClose(socket);
  }

  for (const restMode of FORWARD_MODES) {
    test(`--mtls_rest_mode ${restMode}, HTTP/1.1: every line of a repeated request field reaches the model server, in order`, { timeout: 20_000 }, async () => {
      const path = `/v2/models/h1-${restMode}`;
      // Names as most clients write them (User-Agent): case does not make a field another one.
      const fields = [...REPEATED_REQUEST_FIELDS, ...COOKIES].map(([name, value]) => `${titleCase(name)}: ${value}\r\n`).join('');
      assert.match(await http1Exchange(restMode, `GET ${path} HTTP/1.1\r\nhost: a\r\n${fields}connection: close\r\n\r\n`), /^HTTP\/1\.1 200 /);
      const received = heads.get(path)!;
      assert.deepEqual(named(received, REPEATED_NAMES), REPEATED_REQUEST_FIELDS);
      // An HTTP/1.1 client's Cookie lines pass as they came, as any other field's.
      assert.deepEqual(named(received, ['cookie']), COOKIES);
    });

    test(`--mtls_rest_mode ${restMode}, HTTP/1.1: every line of a repeated answer field reaches the client, in order`, { timeout: 20_000 }, async () => {
      const text = await http1Exchange(restMode, `GET /v2/models/h1-answer-${restMode} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n`);
      const lines = text.slice(0, text.indexOf('\r\n\r\n')).split('\r\n').slice(1);
      assert.deepEqual(repeatedAnswerFields(lines.flatMap((line) => [line.slice(0, line.indexOf(':')), line.slice(line.indexOf(':') + 1).trim()])), EXPECTED_ANSWER_FIELDS);
    });

    test(`--mtls_rest_mode ${restMode}, HTTP/2: every field of a repeated request field reaches the model server as a line of its own, in order; its cookies as one line joined with '; ' (RFC 9113 8.2.3)`, { timeout: 20_000 }, async () => {
      const path = `/v2/models/h2-${restMode}`;
      const client = await rawH2Client(both.front(restMode).restPort, both.pki);
      try {
        const pseudo: Field[] = [[':method', 'GET'], [':scheme', 'https'], [':path', path], [':authority', 'a']];
        const block = Buffer.concat([...pseudo, ...REPEATED_REQUEST_FIELDS, ...COOKIES].map(([name, value]) => literalField(name, value)));
        client.socket.write(h2Frame(H2.HEADERS, END_STREAM | END_HEADERS, 1, block));
        await eventually(() => heads.has(path), 'the request at the model server');
        const received = heads.get(path)!;
        assert.deepEqual(named(received, REPEATED_NAMES), REPEATED_REQUEST_FIELDS);
        assert.deepEqual(named(received, ['cookie']), [['cookie', 'c=1; d=2']]);
        await client.waitForFrame(H2.HEADERS);
      } finally {
        client.socket.destroy();
      }
    });

    test(`--mtls_rest_mode ${restMode}, HTTP/1.1: client copies of our fields, in any casing and count, are replaced by one of each; Host is the client's one line${restMode === 'terminate' ? '; hop-by-hop fields and those Connection names are not passed on' : ''}`, { timeout: 20_000 }, async () => {
      const path = `/v2/models/ours-${restMode}`;
      const fields = [
        'Connection: close, X-Drop-Me', 'X-Drop-Me: 1', 'x-drop-me: 2', 'Keep-Alive: timeout=5', 'TE: trailers', 'X-Kept: yes',
        'X-Forwarded-For: 203.0.113.7', 'x-forwarded-for: 198.51.100.9', 'X-Forwarded-Proto: http',
        'X-Forwarded-Client-Cert: Hash=evil', 'x-forwarded-client-cert: Hash=evil2', 'X_Forwarded_Client_Cert: Hash=evil3',
      ];
      assert.match(await http1Exchange(restMode, `GET ${path} HTTP/1.1\r\nHost: a\r\n${fields.join('\r\n')}\r\n\r\n`), /^HTTP\/1\.1 200 /);
      const received = heads.get(path)!;
      assert.deepEqual(named(received, ['host', 'x-kept', 'x-forwarded-for', 'x-forwarded-proto', 'x_forwarded_client_cert']), [
        ['host', 'a'], ['x-kept', 'yes'], ['x-forwarded-for', '203.0.113.7, 198.51.100.9, 127.0.0.1'], ['x-forwarded-proto', 'https'],
      ]);
      const identities = named(received, ['x-forwarded-client-cert']);
      assert.equal(identities.length, 1, JSON.stringify(identities));
      assert.match(identities[0]![1], /^Hash=[0-9a-f]{64};Subject="CN=client,OU=tests"/);
      // The relay's hop is the client's connection, whose connection-level fields the model server answers (README, REST relay).
      if (restMode === 'terminate') assert.deepEqual(named(received, ['x-drop-me', 'keep-alive', 'te']), []);
    });

    test(`--mtls_rest_mode ${restMode}, HTTP/2: every line of a repeated answer field reaches the client as a field of its own`, { timeout: 20_000 }, async () => {
      const session = h2Session(both.front(restMode).restPort, both.pki);
      try {
        const stream: ClientHttp2Stream = session.request({ ':method': 'GET', ':path': `/v2/models/h2-answer-${restMode}` });
        // Node's client passes the fields as they came after its merged object (not in @types/node).
        const [, , raw] = (await once(stream, 'response')) as [unknown, number, string[]];
        stream.resume();
        await once(stream, 'end');
        assert.deepEqual(repeatedAnswerFields(raw), EXPECTED_ANSWER_FIELDS);
      } finally {
        session.close();
      }
    });
  }
});
