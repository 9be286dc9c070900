import { pino, type Logger, type DestinationStream, type LevelWithSilent } from 'pino';

export type { Logger };

export const LOG_LEVELS: readonly LevelWithSilent[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

export interface LoggerOptions {
  level: LevelWithSilent;
  /** Where JSON lines go; defaults to stdout. Tests pass a stream to read them back. */
  destination?: DestinationStream;
}

/**
 * One JSON line per event on stdout. Writes are synchronous: a line is never
 * lost when the process exits right after logging it (fatal errors, signals).
 */
export function createLogger(options: LoggerOptions): Logger {
  const destination = options.destination ?? pino.destination({ dest: 1, sync: true });
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

/** A logger that drops everything; for library users who bring none. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
