import { pino, type Logger, type DestinationStream, type LevelWithSilent } from 'pino';
import pretty from 'pino-pretty';

export type { Logger };

export const LOG_LEVELS: readonly LevelWithSilent[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

export interface LoggerOptions {
  level: LevelWithSilent;
  /** Where JSON lines go; defaults to stdout. Tests pass a stream to read them back. */
  destination?: DestinationStream;
}

/**
 * Access lines wait until a batch would pass this many bytes, or this long: a loaded proxy
 * writes them in batches, as nginx's `buffer=` does. PIPE_BUF, because in the entrypoint OVMS
 * writes to the same stdout pipe: a pipe write of up to PIPE_BUF bytes lands whole, a longer
 * one can be split (when the reader lags) and OVMS's lines land inside our JSON lines.
 */
const ACCESS_BATCH_BYTES = 4096;
const ACCESS_FLUSH_MS = 250;

/** The `event` of the lines the log observer writes per request and per relayed connection. */
export const ACCESS_EVENTS = { request: 'access', relayed: 'relay_access' } as const;
const ACCESS_MARKERS = Object.values(ACCESS_EVENTS).map((event) => `"event":"${event}"`);

function isAccessLine(line: string): boolean {
  return ACCESS_MARKERS.some((marker) => line.includes(marker));
}

/** sonic-boom in buffer mode; its type declarations know only strings. */
interface ByteSink {
  write(bytes: Buffer): boolean;
  flush(): void;
}

/**
 * JSON lines to `fd`. An access line is buffered (one write per request cost
 * a syscall, 15-20 % of a small request's CPU); any other line goes out at
 * once, with the access lines before it, so order holds and a warning is
 * never late. A waiting line is written within 250 ms, and at exit. Our own
 * timer rather than sonic-boom's periodic flush, which writes even when
 * nothing waits (an empty write every 250 ms, for ever).
 *
 * `flush()`, not `flushSync()`: in sync mode both write synchronously, but
 * flushSync() also fsyncs, and on a log file that held the event loop for
 * 1-5 ms four times a second under load (every request waited behind it).
 * Nothing needs the disk sync: written bytes outlive the process anyway.
 * flush() writes everything held, because the buffer is always emptied down
 * to under minLength, which is below sonic-boom's maxWrite (one chunk).
 *
 * Each line goes in as UTF-8 bytes (sonic-boom's buffer mode): in its string
 * mode every write measured the whole pending batch again (a flatten and a
 * UTF-8 count of up to 8 KiB per line) and every flush encoded the batch
 * twice; a line cost 1.95 µs in-process, 1.25 µs this way.
 */
export function accessBufferedDestination(fd: number): DestinationStream {
  // minLength above any batch we build: sonic-boom never writes on its own, the batching below decides.
  const out = pino.destination({ dest: fd, sync: true, minLength: 2 * ACCESS_BATCH_BYTES, contentMode: 'buffer' }) as unknown as ByteSink;
  let waiting: NodeJS.Timeout | undefined;
  let held = 0;
  const flush = (): void => {
    clearTimeout(waiting);
    waiting = undefined;
    held = 0;
    out.flush();
  };
  process.once('exit', () => {
    if (waiting) flush();
  });
  return {
    write(line: string): void {
      const bytes = Buffer.from(line, 'utf8');
      // Each write is whole lines, at most PIPE_BUF bytes of them; a longer line goes alone.
      if (held > 0 && held + bytes.length > ACCESS_BATCH_BYTES) flush();
      out.write(bytes);
      held += bytes.length;
      if (!isAccessLine(line) || held > ACCESS_BATCH_BYTES) flush();
      else if (!waiting) waiting = setTimeout(flush, ACCESS_FLUSH_MS).unref();
    },
  };
}

/** A person at a terminal reads colourised lines; pipes and log collectors get JSON. */
function defaultDestination(): DestinationStream {
  if (process.stdout.isTTY) return pretty({ sync: true, colorize: true, translateTime: 'SYS:HH:MM:ss.l', ignore: 'pid,hostname,name' });
  return accessBufferedDestination(1);
}

/** pino's isoTime, formatted once per millisecond: a loaded proxy writes many lines in each. */
function isoTimeByMillisecond(): () => string {
  let last = -1;
  let stamp = '';
  return () => {
    const now = Date.now();
    if (now !== last) {
      last = now;
      stamp = `,"time":"${new Date(now).toISOString()}"`;
    }
    return stamp;
  };
}

/**
 * One JSON line per event on stdout (pretty lines on a terminal). Writes are
 * synchronous, access lines batched: a line is never lost when the process
 * exits right after logging it (fatal errors, signals).
 */
export function createLogger(options: LoggerOptions): Logger {
  const destination = options.destination ?? defaultDestination();
  return pino(
    {
      level: options.level,
      base: { name: 'ovms-mtls' },
      timestamp: isoTimeByMillisecond(),
      formatters: { level: (label) => ({ level: label }) },
    },
    destination,
  );
}
