import type { Logger } from './log.js';

let installed = false;
/** The latest caller's: main() installs the listener before any logger exists, a command hands its logger on later. */
let currentLogger: () => Logger | undefined = () => undefined;

/**
 * SIGUSR1 would start Node's inspector on 127.0.0.1:9229, where anyone able
 * to signal the process, and every container sharing the pod's network, could
 * run code inside the proxy and read its private key. A listener of our own
 * keeps the inspector off (Node 20 has no --disable-sigusr1); the signal is
 * logged and otherwise ignored. `--inspect` given on purpose still works.
 */
export function keepInspectorOff(logger: () => Logger | undefined): void {
  currentLogger = logger;
  if (installed) return;
  installed = true;
  process.on('SIGUSR1', () => {
    currentLogger()?.warn({ event: 'signal_ignored', signal: 'SIGUSR1' }, 'SIGUSR1 ignored: the Node.js inspector stays off (start with --inspect to debug)');
  });
}
