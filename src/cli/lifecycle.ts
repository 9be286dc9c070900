import type { Logger } from '../log.js';
import { keepInspectorOff } from '../inspector-signal.js';

export interface StopSignal {
  /** The first SIGTERM or SIGINT. */
  readonly signal: Promise<NodeJS.Signals>;
  /**
   * Sets what SIGHUP does (reload certificates). A SIGHUP that arrived before
   * a handler was set (listeners still starting) runs it now instead of being lost.
   */
  onReload(handler: () => void): void;
  dispose(): void;
}

/**
 * Install first, before anything starts: a SIGTERM while starting then drains
 * instead of killing the process. The stop handlers are removed when a stop
 * signal arrives, so a second SIGINT during a long drain falls back to Node's
 * default (immediate exit). SIGHUP keeps its handler until `dispose`: Node's
 * default for it is to die, and a certificate rotation that lands during a
 * drain must neither cut the calls finishing nor change the exit code.
 */
export function waitForStopSignal(logger: Logger): StopSignal {
  let resolveSignal!: (s: NodeJS.Signals) => void;
  const signal = new Promise<NodeJS.Signals>((resolve) => (resolveSignal = resolve));
  let reload: (() => void) | undefined;
  let reloadPending = false;
  const onStop = (s: NodeJS.Signals) => {
    logger.info({ event: 'signal', signal: s }, `${s} received: draining`);
    process.off('SIGTERM', onStop);
    process.off('SIGINT', onStop);
    resolveSignal(s);
  };
  const onHup = () => {
    if (reload) reload();
    else reloadPending = true;
  };
  const dispose = () => {
    process.off('SIGTERM', onStop);
    process.off('SIGINT', onStop);
    process.off('SIGHUP', onHup);
  };
  process.on('SIGTERM', onStop);
  process.on('SIGINT', onStop);
  process.on('SIGHUP', onHup);
  keepInspectorOff(() => logger);
  return {
    signal,
    dispose,
    onReload(handler) {
      reload = handler;
      if (reloadPending) {
        reloadPending = false;
        handler();
      }
    },
  };
}
