/**
 * Signals that come while the program loads: launch() installs these first, before the few hundred
 * milliseconds of importing main() and what it needs. Until then Node applied its defaults: SIGHUP
 * ended the process (exit 129: a `systemctl reload` right after a start stopped the service for good),
 * SIGUSR1 opened the inspector, and SIGTERM/SIGINT ended it with 128+N where a serving command that
 * is starting stops its start and exits 0. Imported by launch.ts: nothing heavy here.
 */
import { constants as osConstants } from 'node:os';
import { keepInspectorOff } from './inspector-signal.js';

let guarded = false;
let held: NodeJS.Signals | undefined;

function holdStop(signal: NodeJS.Signals): void {
  held ??= signal;
}

function ignoreHangup(): void {}

/**
 * For the whole run: SIGHUP ignored until a serving command takes it for a reload (the files it reads
 * a moment later are the current ones anyway), SIGUSR1 kept from the inspector. SIGTERM/SIGINT held
 * until the command is known: see takeHeldStopSignal and releaseStopSignals. Once: main() calls it too,
 * for the single executable, whose bundle runs main() without launch().
 */
export function guardStartupSignals(): void {
  if (guarded) return;
  guarded = true;
  process.on('SIGHUP', ignoreHangup);
  keepInspectorOff(() => undefined);
  process.on('SIGTERM', holdStop);
  process.on('SIGINT', holdStop);
}

/**
 * For a command that stops on SIGTERM/SIGINT, once its own handlers are on: the signal that came
 * before (it then stops as for one that comes while it starts), if any. The holding ends here.
 */
export function takeHeldStopSignal(): NodeJS.Signals | undefined {
  process.off('SIGTERM', holdStop);
  process.off('SIGINT', holdStop);
  const signal = held;
  held = undefined;
  return signal;
}

/**
 * For a command that runs to its end (certs, check, probe, --version, OVMS's one-shot modes): SIGTERM
 * and SIGINT end it by their default action, as before, and one that came while it loaded ends it now,
 * as it would have a moment later. Held for good, a Ctrl-C would be lost on a command that waits.
 */
export function releaseStopSignals(): void {
  const signal = takeHeldStopSignal();
  if (signal !== undefined) endBySignal(signal);
}

/**
 * Dies of `signal` (its default action), as if no handler had caught it. PID 1 of a PID
 * namespace cannot: the kernel ignores a signal it has no handler for, from inside the
 * namespace and from outside (SIGKILL aside), so the process would go on. It exits with the
 * code a shell (and tini) reports for death by that signal instead.
 */
export function endBySignal(signal: NodeJS.Signals): void {
  if (process.pid === 1) process.exit(128 + osConstants.signals[signal]);
  process.kill(process.pid, signal);
}
