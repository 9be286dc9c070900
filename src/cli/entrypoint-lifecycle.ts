/**
 * How an entrypoint run ends, and with which exit code:
 *  - SIGTERM/SIGINT: stop accepting and drain, then forward the signal to
 *    OVMS; OVMS's exit code (SIGKILL if it hangs). All within the shutdown
 *    timeout (see shutdownBudget).
 *  - OVMS exits for good (also when --mtls_restart on-failure gives up):
 *    drain the listeners; OVMS's exit code (128+N when it died of signal N).
 *  - The proxy fails (an uncaught error, workers that cannot listen again): OVMS gets SIGTERM, SIGKILL after
 *    the shutdown timeout; exit code 70 (EX_SOFTWARE, as for internal errors).
 */
import type { Logger } from '../log.js';
import { describeExit, exitCodeOf, HUNG_EXIT_CODE, type ExitStatus } from '../ovms-child.js';
import type { AfterHang, OvmsSupervisor } from '../ovms-supervisor.js';
import type { RunningProxy } from '../proxy.js';
import type { LoopbackPorts } from '../ovms-args.js';
import { waitForStopSignal, type StopSignal } from './lifecycle.js';
import { isUserError } from '../errors.js';

export const PROXY_FATAL_EXIT_CODE = 70;

/** OVMS's share of the shutdown timeout, at most: time to exit by itself after its signal. */
const OVMS_STOP_SHARE_MS = 5000;

/** Time OVMS gets to exit by itself after its signal before SIGKILL, when nothing else needs the time: half the shutdown timeout, at most 5 s. */
export function ovmsStopShareMs(shutdownTimeoutMs: number): number {
  return Math.min(OVMS_STOP_SHARE_MS, shutdownTimeoutMs / 2);
}

/**
 * The drain comes first, OVMS's signal after: OVMS closes its REST connections
 * when signalled (its HTTP server quits), which would cut every REST call and
 * streamed reply still in flight through the proxy. The whole stop fits in the
 * shutdown timeout, so that an orchestrator's grace period set from it holds:
 * the drain may take all of it but OVMS's share, and OVMS gets what is left,
 * at least that share, before SIGKILL.
 */
export function shutdownBudget(timeoutMs: number): { drainMs: number; ovmsMs: (drainedMs: number) => number } {
  const ovmsShare = ovmsStopShareMs(timeoutMs);
  return { drainMs: timeoutMs - ovmsShare, ovmsMs: (drainedMs) => Math.max(ovmsShare, timeoutMs - drainedMs) };
}

/** Proxy first, OVMS second; resolves with OVMS's exit status. */
async function stopInOrder(options: RunUntilDoneOptions, signal: NodeJS.Signals): Promise<ExitStatus> {
  const { proxy, supervisor, logger, shutdownTimeoutMs } = options;
  // OVMS stays up for the calls draining, but is not started again if it exits meanwhile.
  supervisor.stopRestarting();
  const budget = shutdownBudget(shutdownTimeoutMs);
  const started = performance.now();
  await proxy.shutdown(budget.drainMs);
  const ovmsMs = budget.ovmsMs(performance.now() - started);
  if (supervisor.state().up) logger.info({ event: 'ovms_stopping', signal, killAfterMs: Math.round(ovmsMs) }, `listeners drained: sending ${signal} to OVMS`);
  return supervisor.stop(signal, ovmsMs);
}

export interface RunUntilDoneOptions {
  readonly proxy: RunningProxy;
  readonly supervisor: OvmsSupervisor;
  readonly logger: Logger;
  readonly shutdownTimeoutMs: number;
  /** Signal handlers installed before startup, so a SIGTERM while starting drains instead of killing. */
  readonly stop?: StopSignal;
  /** Rejects when the proxy fails; defaults to uncaught exceptions, unhandled rejections and the proxy's `failed`. */
  readonly fatal?: Promise<never>;
}

type Ending =
  | { kind: 'signal'; signal: NodeJS.Signals }
  | { kind: 'ovms'; status: ExitStatus }
  | { kind: 'fatal'; error: unknown };

/** Turns uncaught errors into a rejection instead of a crash that would skip stopping OVMS. */
function uncaughtErrors(): { promise: Promise<never>; dispose(): void } {
  let reject!: (err: unknown) => void;
  const promise = new Promise<never>((_resolve, rej) => (reject = rej));
  promise.catch(() => undefined);
  const onError = (err: unknown) => reject(err);
  process.on('uncaughtException', onError);
  process.on('unhandledRejection', onError);
  return {
    promise,
    dispose() {
      process.off('uncaughtException', onError);
      process.off('unhandledRejection', onError);
    },
  };
}

export async function runUntilDone(options: RunUntilDoneOptions): Promise<number> {
  const { proxy, supervisor, logger, shutdownTimeoutMs } = options;
  const stop = options.stop ?? waitForStopSignal(logger);
  const uncaught = uncaughtErrors();
  const fatal = options.fatal ?? (proxy.failed ? Promise.race([uncaught.promise, proxy.failed]) : uncaught.promise);
  try {
    const ending = await Promise.race<Ending>([
      stop.signal.then((signal) => ({ kind: 'signal', signal })),
      supervisor.done.then((status) => ({ kind: 'ovms', status })),
      fatal.catch((error: unknown) => ({ kind: 'fatal', error })),
    ]);
    switch (ending.kind) {
      case 'signal': {
        const status = await stopInOrder(options, ending.signal);
        return finish(logger, exitCodeOf(status), 'OVMS stopped');
      }
      case 'ovms':
        await proxy.shutdown(shutdownTimeoutMs);
        return finish(logger, exitCodeOf(ending.status), ending.status.hung ? 'OVMS hung (--mtls_ovms_hang_timeout)' : 'OVMS exited');
      case 'fatal': {
        const error = ending.error instanceof Error ? ending.error : new Error(String(ending.error));
        // One the user can act on is said in its line; a bug keeps its stack.
        logger.fatal({ event: 'proxy_failed', ...(isUserError(error) ? { reason: error.message } : { err: error }) }, `proxy failed: ${error.message}; stopping OVMS`);
        await supervisor.stop('SIGTERM', shutdownTimeoutMs);
        return finish(logger, PROXY_FATAL_EXIT_CODE, 'proxy failed');
      }
    }
  } finally {
    stop.dispose();
    uncaught.dispose();
  }
}

function finish(logger: Logger, exitCode: number, why: string): number {
  logger.info({ event: 'stopped', exitCode }, `${why}: exiting with ${exitCode}`);
  return exitCode;
}

const AFTER_HANG: Readonly<Record<AfterHang, string>> = {
  restart: 'then restarting it (--mtls_restart on-failure)',
  'give-up': `then exiting with ${HUNG_EXIT_CODE} (--mtls_restart on-failure gives up: too many failures in a row) so that the orchestrator restarts the container`,
  exit: `then exiting with ${HUNG_EXIT_CODE} (--mtls_restart never) so that the orchestrator restarts the container`,
};

/** One JSON line per OVMS state change. */
export function logSupervisorEvents(supervisor: OvmsSupervisor, logger: Logger, ports: () => LoopbackPorts): void {
  supervisor.on('spawn', (pid) => logger.info({ event: 'ovms_started', pid, ports: ports() }, 'OVMS started'));
  supervisor.on('ready', (pid) => logger.info({ event: 'ovms_ready', pid, ports: ports() }, 'OVMS is ready'));
  supervisor.on('exit', (status, pid) => {
    const fields = { event: 'ovms_exited', pid, code: status.code, signal: status.signal, exitCode: exitCodeOf(status), spawnError: status.spawnError };
    logger[status.code === 0 ? 'info' : 'warn'](fields, describeExit(status));
  });
  supervisor.on('restarting', (attempt, delayMs) => logger.warn({ event: 'ovms_restarting', attempt, delayMs }, `restarting OVMS in ${delayMs} ms`));
  supervisor.on('hung', (hang, next) => {
    const what = hang.stopped ? 'is stopped (SIGSTOP or SIGTSTP)' : 'does not answer';
    const then = AFTER_HANG[next];
    logger.error(
      { event: 'ovms_hung', pid: hang.pid, state: hang.stopped ? 'stopped' : 'not_answering', silentMs: hang.silentMs },
      `OVMS (pid ${hang.pid}) ${what}: no answer for ${(hang.silentMs / 1000).toFixed(1)} s (--mtls_ovms_hang_timeout); ending it (SIGTERM, then SIGKILL), ${then}`,
    );
  });
  supervisor.on('retrying', () => logger.warn({ event: 'ovms_retrying' }, 'starting OVMS again'));
  supervisor.on('givingUp', (failures, status) => {
    const exitCode = exitCodeOf(status);
    logger.error({ event: 'ovms_gave_up', failures, exitCode }, `OVMS failed ${failures} times in a row: not restarting it, exiting with ${exitCode}`);
  });
}
