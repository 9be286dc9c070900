/**
 * Helpers for the operations tests: plain-HTTP GETs
 * against the admin listener, metric lookups in Prometheus text, and an
 * observer that lets a test await the next finished request.
 */
import { EventEmitter, once } from 'node:events';
import { readFileSync } from 'node:fs';
import { request as httpRequest } from 'node:http';
import { NOOP_OBSERVER, type AccessRecord, type ProxyObserver } from '../../src/observer.js';

export interface PlainResponse {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

export function httpGet(port: number, path: string, method = 'GET', host = '127.0.0.1'): Promise<PlainResponse> {
  return new Promise((resolve, reject) => {
    const req = httpRequest({ host, port, path, method, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** The value of one sample, matching every given label; undefined when absent. */
export function sample(text: string, name: string, labels: Record<string, string> = {}): number | undefined {
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!match || match[1] !== name) continue;
    const have = Object.fromEntries([...(match[2] ?? '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((m) => [m[1], m[2]]));
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) return Number(match[3]);
  }
  return undefined;
}

/** The sum of every sample of `name`, whatever its labels. */
export function sumOf(metrics: string, name: string): number {
  return metrics.split('\n').filter((l) => l.startsWith(`${name}{`) || l.startsWith(`${name} `)).reduce((n, l) => n + Number(l.split(' ').at(-1)), 0);
}

/** Emits 'request' after the observers before it in combineObservers have seen the record. */
export function requestEvents(): { observer: ProxyObserver; next(): Promise<AccessRecord> } {
  const events = new EventEmitter();
  return {
    observer: { ...NOOP_OBSERVER, request: (record) => events.emit('request', record) },
    next: async () => ((await once(events, 'request')) as [AccessRecord])[0],
  };
}

/** Polls `probe` with backoff until it returns true; fails after `deadlineMs`. For states no event announces. */
export async function eventually(probe: () => boolean | Promise<boolean>, what: string, deadlineMs = 20_000): Promise<void> {
  const until = Date.now() + deadlineMs;
  let delay = 10;
  while (!(await probe())) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 500);
  }
}

/** `promise`, or a failure naming `what` if it has not settled after `boundMs`: for what must not hang, never for how fast it is. */
export async function settlesWithin<T>(promise: Promise<T>, boundMs: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const bound = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`still waiting for ${what} after ${boundMs / 1000} s: hung`)), boundMs)));
  try {
    return await Promise.race([promise, bound]);
  } finally {
    clearTimeout(timer);
  }
}

/** Counts uses of a method or getter of `prototype` until stop(): how often a code path does some costly work (a signature proof, an issuer check). */
export function countingUses(prototype: object, name: string): { readonly count: number; stop(): void } {
  const original = Object.getOwnPropertyDescriptor(prototype, name)!;
  let count = 0;
  const counted = <T extends (...args: never[]) => unknown>(use: T) =>
    function (this: unknown, ...args: Parameters<T>) {
      count++;
      return use.apply(this, args);
    };
  Object.defineProperty(prototype, name, original.get ? { ...original, get: counted(original.get) } : { ...original, value: counted(original.value as (...args: never[]) => unknown) });
  return {
    get count() {
      return count;
    },
    stop: () => Object.defineProperty(prototype, name, original),
  };
}

/** TCP connections to 127.0.0.1:`port` that a process still holds (an inode in /proc/net/tcp; one closed but still sending has none). */
export function heldConnectionsTo(port: number): number {
  const remote = `0100007F:${port.toString(16).toUpperCase().padStart(4, '0')}`;
  return readFileSync('/proc/net/tcp', 'utf8').split('\n').slice(1).filter((line) => {
    const fields = line.trim().split(/\s+/);
    return fields[2] === remote && fields[9] !== undefined && fields[9] !== '0';
  }).length;
}
