import type { Logger } from '../log.js';

export interface SignalHandlers {
  /** SIGHUP: reload certificates. */
  onReload?: () => void;
}

/**
 * Resolves with the first SIGTERM or SIGINT. Until then SIGHUP triggers a
 * reload. The handlers are removed when the promise settles, so a second
 * SIGINT during a long drain falls back to Node's default (immediate exit).
 */
export interface StopSignal {
  readonly signal: Promise<NodeJS.Signals>;
  dispose(): void;
}

export function waitForStopSignal(logger: Logger, handlers: SignalHandlers = {}): StopSignal {
  let resolveSignal!: (s: NodeJS.Signals) => void;
  const signal = new Promise<NodeJS.Signals>((resolve) => (resolveSignal = resolve));
  const onStop = (s: NodeJS.Signals) => {
    logger.info({ event: 'signal', signal: s }, `${s} received: draining`);
    dispose();
    resolveSignal(s);
  };
  const onHup = () => {
    if (handlers.onReload) handlers.onReload();
    else logger.info({ event: 'signal', signal: 'SIGHUP' }, 'SIGHUP received: nothing to reload');
  };
  const dispose = () => {
    process.off('SIGTERM', onStop);
    process.off('SIGINT', onStop);
    process.off('SIGHUP', onHup);
  };
  process.on('SIGTERM', onStop);
  process.on('SIGINT', onStop);
  process.on('SIGHUP', onHup);
  return { signal, dispose };
}
