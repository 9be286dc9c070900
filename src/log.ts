import { pino, type Logger, type DestinationStream, type LevelWithSilent } from 'pino';
import pretty from 'pino-pretty';
import { BACKLOG_BYTES, LineSink, type SinkOptions } from './log-sink.js';

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

/** `text` cut to `max` characters (not inside a surrogate pair), saying how much was cut: for text a client chose. */
export function clipped(text: string, max: number): string {
  if (text.length <= max) return text;
  const end = /[\ud800-\udbff]/.test(text[max - 1]!) ? max - 1 : max;
  return `${text.slice(0, end)}... (${text.length - end} more characters)`;
}

/** The `event` of the lines the log observer writes per request and per relayed connection. */
export const ACCESS_EVENTS = { request: 'access', relayed: 'relay_access' } as const;
const ACCESS_MARKERS = Object.values(ACCESS_EVENTS).map((event) => `"event":"${event}"`);

function isAccessLine(line: string): boolean {
  return ACCESS_MARKERS.some((marker) => line.includes(marker));
}

/**
 * JSON lines to `fd`. An access line is buffered (one write per request cost
 * a syscall, 15-20 % of a small request's CPU); any other line goes out at
 * once, with the access lines before it, so order holds and a warning is
 * never late. A waiting line is written within 250 ms, and at exit. Our own
 * timer, so that nothing is written (nor tried) while nothing waits.
 *
 * Each line goes in as UTF-8 bytes and is measured alone: measuring the
 * whole pending batch again on every line (sonic-boom's string mode) cost a
 * line 1.95 µs in-process, 1.25 µs this way. The batches go to a LineSink,
 * which never blocks and never syncs the disk (an fsync held the event loop
 * for 1-5 ms under load: written bytes outlive the process anyway); see
 * log-sink.ts for a reader that lags, stops or vanishes.
 */
export function accessBufferedDestination(fd: number, options: SinkOptions = {}): DestinationStream {
  const sink = new LineSink(fd, options);
  let waiting: NodeJS.Timeout | undefined;
  let pending: Buffer[] = [];
  let held = 0;
  const flush = (): void => {
    clearTimeout(waiting);
    waiting = undefined;
    if (held === 0) return;
    const batch = pending.length === 1 ? pending[0]! : Buffer.concat(pending, held);
    const lines = pending.length;
    pending = [];
    held = 0;
    sink.write(batch, lines);
  };
  process.once('exit', () => {
    flush();
    sink.drainBeforeExit();
  });
  return {
    write(line: string): void {
      const bytes = Buffer.from(line, 'utf8');
      // Each write is whole lines, at most PIPE_BUF bytes of them; a longer line goes alone.
      if (held > 0 && held + bytes.length > ACCESS_BATCH_BYTES) flush();
      pending.push(bytes);
      held += bytes.length;
      if (!isAccessLine(line) || held > ACCESS_BATCH_BYTES) flush();
      else if (!waiting) waiting = setTimeout(flush, ACCESS_FLUSH_MS).unref();
    },
  };
}

/** A person at a terminal reads colourised lines; pipes and log collectors get JSON. */
function defaultDestination(options: SinkOptions): DestinationStream {
  if (process.stdout.isTTY) return pretty({ sync: true, colorize: true, translateTime: 'SYS:HH:MM:ss.l', ignore: 'pid,hostname,name' });
  return accessBufferedDestination(1, options);
}

/**
 * Every logger without a destination of its own writes through this one: a program embedding
 * the package may make a logger per proxy it starts, and each opened a descriptor of its own on
 * stdout and an exit hook it never gave back (Node warned of a leak at the eleventh), and held
 * its access lines apart, so another logger's warning overtook them.
 */
let stdoutDestination: DestinationStream | undefined;

/** The logger that opens it reports the lines it had to drop. */
function sharedStdoutDestination(reporter: () => Logger): DestinationStream {
  stdoutDestination ??= defaultDestination({ onDropped: (lines, reason) => reportDroppedLines(reporter(), lines, reason) });
  return stdoutDestination;
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
 * synchronous, access lines batched: a line is not lost when the process
 * exits right after logging it (fatal errors, signals), unless the reader of
 * stdout takes nothing for a second then. Nor does a reader that lags hold
 * up the proxy: lines it has no room for wait, within a bound, or are dropped
 * and counted (log-sink.ts).
 */
export function createLogger(options: LoggerOptions): Logger {
  const destination: DestinationStream = options.destination ?? sharedStdoutDestination(() => logger);
  const logger: Logger = pino(
    {
      level: options.level,
      base: { name: 'ovms-mtls' },
      timestamp: isoTimeByMillisecond(),
      formatters: { level: (label) => ({ level: label }) },
    },
    destination,
  );
  return logger;
}

/** Written once lines flow again: how many the log lost while its reader lagged (EAGAIN) or failed (EPIPE, ENOSPC ...). */
function reportDroppedLines(logger: Logger, lines: number, reason: string): void {
  const why = reason === 'EAGAIN' ? `nobody read the log for a while and over ${BACKLOG_BYTES / 1024} KiB waited` : `writing the log failed (${reason})`;
  logger.warn({ event: 'log_lines_dropped', lines, reason, pid: process.pid }, `${lines} log line(s) dropped: ${why}; requests were served meanwhile`);
}
