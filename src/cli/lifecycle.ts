import type { Logger } from '../log.js';
import { keepInspectorOff } from '../inspector-signal.js';
import { endBySignal, takeHeldStopSignal } from '../startup-signals.js';
import { envVarName, serviceLinkOptions } from '../options.js';

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
 * instead of killing the process. A second SIGINT or SIGTERM during a long drain
 * ends the process at once, by that signal (the default action), after a line that
 * says so (it also writes out the access lines still batched). The second one
 * is caught and raised again with the handlers gone, rather than left to the
 * default by removing the handlers at the first: a signal that comes before
 * the first one's handler has run (one right after our 'signal' line, which a
 * pipe carries at once) would be caught by the handler on its way out and lost.
 * As PID 1 (a container started without tini) the process exits with 128+N instead:
 * the kernel drops a signal PID 1 has no handler for, so the raise would be lost.
 * SIGHUP keeps its handler until `dispose`: Node's
 * default for it is to die, and a certificate rotation that lands during a
 * drain must neither cut the calls finishing nor change the exit code.
 */
export function waitForStopSignal(logger: Logger): StopSignal {
  let resolveSignal!: (s: NodeJS.Signals) => void;
  const signal = new Promise<NodeJS.Signals>((resolve) => (resolveSignal = resolve));
  let reload: (() => void) | undefined;
  let reloadPending = false;
  let stopping = false;
  const onStop = (s: NodeJS.Signals) => {
    if (stopping) {
      process.off('SIGTERM', onStop);
      process.off('SIGINT', onStop);
      // Written at once, with the access lines the batching still holds (calls that finished in the drain): the process dies next.
      logger.warn({ event: 'signal', signal: s, again: true }, `${s} received again: ending now, without waiting for the drain`);
      endBySignal(s);
      return;
    }
    stopping = true;
    logger.info({ event: 'signal', signal: s }, `${s} received: draining`);
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
  // One that came while the program loaded stops this start as one a moment later would.
  const held = takeHeldStopSignal();
  if (held !== undefined) onStop(held);
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

/**
 * The Kubernetes service links optionsFromEnv passed over, unless the command line gives that option
 * anyway: a listener the user may have meant to come from the variable is not there.
 */
export function warnServiceLinks(env: NodeJS.ProcessEnv, argv: readonly string[], logger: Logger): void {
  for (const name of serviceLinkOptions(env)) {
    if (argv.some((arg) => arg === `--${name}` || arg.startsWith(`--${name}=`))) continue;
    const variable = envVarName(name);
    logger.warn(
      { event: 'variable_ignored', variable },
      `${variable}=${env[variable]} is the variable Kubernetes sets for a Service of that name (a service link), not a value for --${name}: ignored (give --${name} on the command line if you meant one; enableServiceLinks: false in the pod spec keeps such variables out)`,
    );
  }
}
