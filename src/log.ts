import { pino, type Logger, type DestinationStream, type LevelWithSilent } from 'pino';
import pretty from 'pino-pretty';

export type { Logger };

export const LOG_LEVELS: readonly LevelWithSilent[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

export interface LoggerOptions {
  level: LevelWithSilent;
  /** Where JSON lines go; defaults to stdout. Tests pass a stream to read them back. */
  destination?: DestinationStream;
}

/** A person at a terminal reads colourised lines; pipes and log collectors get JSON. */
function defaultDestination(): DestinationStream {
  if (process.stdout.isTTY) return pretty({ sync: true, colorize: true, translateTime: 'SYS:HH:MM:ss.l', ignore: 'pid,hostname,name' });
  return pino.destination({ dest: 1, sync: true });
}

/**
 * One JSON line per event on stdout (pretty lines on a terminal). Writes are
 * synchronous: a line is never lost when the process exits right after
 * logging it (fatal errors, signals).
 */
export function createLogger(options: LoggerOptions): Logger {
  const destination = options.destination ?? defaultDestination();
  return pino(
    {
      level: options.level,
      base: { name: 'ovms-mtls' },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
    },
    destination,
  );
}
