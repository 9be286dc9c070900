import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { pino } from 'pino';
import { accessLineWriter } from '../src/access-line.js';
import { createLogger, type Logger } from '../src/log.js';
import type { AccessRecord } from '../src/observer.js';

/** Quotes, backslashes, control characters, non-Latin letters, astral code points; some strings past pino's 100-character fast path. */
const tricky = fc.string({ unit: fc.constantFrom('a', 'Z', '0', ' ', '"', '\\', '\n', '\r', '\t', '\u0000', '\u001f', '\u007f', 'é', 'ü', '日', '😀', '\u2028', '/', ',', '=') , maxLength: 130 });
const text = fc.oneof(tricky, fc.string({ unit: 'binary', maxLength: 120 }), fc.string({ maxLength: 20 }));
const number = fc.oneof(fc.nat(), fc.integer(), fc.double());

/** Keys in AccessRecord's order, as every forwarder builds them; optional ones present as undefined too; a detail only with an error. */
const recordArb: fc.Arbitrary<AccessRecord> = fc.record({
  listener: fc.constantFrom('grpc', 'rest') as fc.Arbitrary<AccessRecord['listener']>,
  protocol: fc.constantFrom('h2', 'http/1.1') as fc.Arbitrary<AccessRecord['protocol']>,
  remote: fc.option(text, { nil: undefined }),
  subject: text,
  serial: text,
  method: text,
  path: text,
  status: number,
  grpcStatus: fc.option(text, { nil: undefined }),
  bytesIn: number,
  bytesOut: number,
  durationMs: number,
  error: fc.option(text, { nil: undefined }),
  detail: fc.option(text, { nil: undefined }),
}).map((record) => (record.error === undefined ? { ...record, detail: undefined } : record));

function capturing(level: 'info' | 'warn' = 'info'): { logger: Logger; lines: string[] } {
  const lines: string[] = [];
  return { logger: createLogger({ level, destination: { write: (line: string) => lines.push(line) } }), lines };
}

/** Two lines written in different milliseconds differ only there. */
const withoutTime = (line: string): string => line.replace(/"time":"[^"]*"/, '"time":""');

describe('access lines', () => {
  test('byte for byte what pino writes for the same record, for any field values', () => {
    const { logger, lines } = capturing();
    const child = logger.child({ event: 'access' });
    const write = accessLineWriter(child, 'request');
    fc.assert(
      fc.property(recordArb, (record) => {
        lines.length = 0;
        write(record);
        child.info(record, 'request');
        assert.equal(lines.length, 2);
        assert.equal(withoutTime(lines[0]!), withoutTime(lines[1]!));
        assert.ok(lines[0]!.endsWith('}\n'));
        JSON.parse(lines[0]!);
      }),
      { numRuns: 2000, includeErrorInReport: true },
    );
  });

  test("createLogger()'s loggers take the composed path, not pino's serializer", () => {
    const { logger, lines } = capturing();
    const child = logger.child({ event: 'access' });
    (child as unknown as Record<symbol, unknown>)[pino.symbols.asJsonSym] = () => {
      throw new Error('pino serialized the access line');
    };
    const write = accessLineWriter(child, 'request');
    write({ listener: 'rest', protocol: 'http/1.1', remote: '127.0.0.1', subject: 'CN=a', serial: '01', method: 'GET', path: '/v2', status: 200, bytesIn: 0, bytesOut: 2, durationMs: 0.25, error: undefined });
    assert.equal(lines.length, 1);
    assert.deepEqual(JSON.parse(lines[0]!), {
      level: 'info', time: JSON.parse(lines[0]!).time, name: 'ovms-mtls', event: 'access',
      listener: 'rest', protocol: 'http/1.1', remote: '127.0.0.1', subject: 'CN=a', serial: '01', method: 'GET', path: '/v2', status: 200, bytesIn: 0, bytesOut: 2, durationMs: 0.25, msg: 'request',
    });
  });

  test('a logger above info writes no access line', () => {
    const { logger, lines } = capturing('warn');
    accessLineWriter(logger.child({ event: 'access' }), 'request')({ listener: 'grpc', protocol: 'h2', remote: undefined, subject: 'CN=a', serial: '01', method: 'POST', path: '/x', status: 200, bytesIn: 1, bytesOut: 1, durationMs: 1 });
    assert.deepEqual(lines, []);
  });

  test('a refusal\'s detail past 256 characters is cut, saying how much was, on the composed path and through pino alike', () => {
    const { logger, lines } = capturing();
    const refused: AccessRecord = { listener: 'rest', protocol: 'http/1.1', remote: undefined, subject: 'CN=a', serial: '01', method: 'POST', path: '/', status: 501, bytesIn: 0, bytesOut: 0, durationMs: 0, error: 'bad_request', detail: `Transfer-Encoding "${'x'.repeat(400)}" is not supported (only chunked)` };
    accessLineWriter(logger.child({ event: 'access' }), 'request')(refused);
    accessLineWriter(pino({ mixin: () => ({}) }, { write: (line: string) => lines.push(line) }), 'request')(refused);
    const cut = `Transfer-Encoding "${'x'.repeat(237)}... (196 more characters)`;
    assert.deepEqual(lines.map((line) => JSON.parse(line).detail), [cut, cut]);
  });

  test('a logger configured to rewrite lines (redaction, a mixin, a serializer) is left to pino', () => {
    const lines: string[] = [];
    const destination = { write: (line: string) => lines.push(line) };
    const record: AccessRecord = { listener: 'rest', protocol: 'http/1.1', remote: '10.0.0.1', subject: 'CN=secret', serial: '01', method: 'GET', path: '/', status: 200, bytesIn: 0, bytesOut: 0, durationMs: 1 };
    accessLineWriter(pino({ redact: ['subject'] }, destination), 'request')(record);
    accessLineWriter(pino({ mixin: () => ({ pod: 'a' }) }, destination), 'request')(record);
    accessLineWriter(pino({ serializers: { path: () => '/hidden' } }, destination), 'request')(record);
    assert.equal(JSON.parse(lines[0]!).subject, '[Redacted]');
    assert.equal(JSON.parse(lines[1]!).pod, 'a');
    assert.equal(JSON.parse(lines[2]!).path, '/hidden');
  });
});
