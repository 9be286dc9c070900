import { pino, type Logger } from 'pino';
import type { AccessRecord } from './observer.js';
import { clipped } from './log.js';

/**
 * A refusal's detail can hold what the client sent (its Transfer-Encoding, its Expect), as long as a
 * head may be: cut past this many characters, as the log cuts a refused certificate's names.
 */
const DETAIL_CHARS = 256;

/** pino hands a string with any of these to JSON.stringify; the rest only need quotes. */
// eslint-disable-next-line no-control-regex -- the control characters are what JSON must escape
const NEEDS_ESCAPING = /["\\\u0000-\u001f\ud800-\udfff]/;

function jsonString(value: string): string {
  return NEEDS_ESCAPING.test(value) ? JSON.stringify(value) : `"${value}"`;
}

/** As pino writes a number: NaN and the infinities are not JSON. */
function jsonNumber(value: number): string {
  return Number.isFinite(value) ? String(value) : 'null';
}

/** The record's fields in AccessRecord's order, which is the order every forwarder builds them in. */
function accessFields(r: AccessRecord): string {
  let json = `,"listener":${jsonString(r.listener)},"protocol":${jsonString(r.protocol)}`;
  if (r.remote !== undefined) json += `,"remote":${jsonString(r.remote)}`;
  json += `,"subject":${jsonString(r.subject)},"serial":${jsonString(r.serial)},"method":${jsonString(r.method)},"path":${jsonString(r.path)},"status":${jsonNumber(r.status)}`;
  if (r.grpcStatus !== undefined) json += `,"grpcStatus":${jsonString(r.grpcStatus)}`;
  json += `,"bytesIn":${jsonNumber(r.bytesIn)},"bytesOut":${jsonNumber(r.bytesOut)},"durationMs":${jsonNumber(r.durationMs)}`;
  if (r.error !== undefined) {
    json += `,"error":${jsonString(r.error)}`;
    if (r.detail !== undefined) json += `,"detail":${jsonString(clipped(r.detail, DETAIL_CHARS))}`;
  }
  return json;
}

/** pino's per-logger state, reached through the symbols it exports for integrations. */
type PinoState = Record<symbol, unknown>;
/** Exported at run time, missing from pino's type declarations. */
const msgPrefixSym = (pino.symbols as unknown as Record<string, symbol>)['msgPrefixSym']!;

/**
 * Whether pino would write an access record as accessFields() does: nothing
 * configured that rewrites a line (mixin, log formatter, serializers beyond
 * pino's own for `err`, redaction, a nested key, a message prefix, a write hook) and a
 * destination that needs no per-line metadata. createLogger() configures none.
 */
function writesPlainLines(state: PinoState): boolean {
  const s = pino.symbols;
  const serializers = state[s.serializersSym] as Record<string, unknown>;
  const stringifiers = state[s.stringifiersSym] as object;
  const formatters = state[s.formattersSym] as { log?: unknown };
  const hooks = state[s.hooksSym] as { streamWrite?: unknown };
  const stream = state[s.streamSym] as Record<symbol, unknown>;
  return state[s.mixinSym] === undefined && !state[s.nestedKeySym] && state[s.messageKeySym] === 'msg' && state[msgPrefixSym] === undefined
    && formatters.log === undefined && hooks.streamWrite === undefined && stream[s.needsMetadataGsym] !== true
    && Reflect.ownKeys(stringifiers).length === 0 && Object.keys(serializers).every((key) => key === 'err');
}

/**
 * The access line at info, byte for byte what `logger.info(record, msg)`
 * writes (test/access-line.test.ts holds it to that; a detail cut to
 * DETAIL_CHARS first, on either path), built from pino's own
 * pieces (level, time, bindings, destination) with the record's fields
 * written by code that knows their types. One line per request is the
 * proxy's hottest log path: pino's generic object walk cost ~4.6 µs of a
 * line, this ~1.3, and 11 µs per REST request in the benchmark. Any other
 * logger configuration goes through pino itself.
 */
export function accessLineWriter(logger: Logger, msg: string): (record: AccessRecord) => void {
  const state = logger as unknown as PinoState;
  if (!writesPlainLines(state)) return (record) => logger.info(record.detail === undefined ? record : { ...record, detail: clipped(record.detail, DETAIL_CHARS) }, msg);
  const s = pino.symbols;
  const levelStart = (state[s.lsCacheSym] as Record<number, string>)[logger.levels.values.info!]!;
  const time = state[s.timeSym] as () => string;
  const bindings = state[s.chindingsSym] as string;
  const end = `,"msg":${JSON.stringify(msg)}${state[s.endSym] as string}`;
  const stream = state[s.streamSym] as { write(line: string): void };
  return (record) => {
    if (!logger.isLevelEnabled('info')) return;
    stream.write(levelStart + time() + bindings + accessFields(record) + end);
  };
}
