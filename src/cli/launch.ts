/**
 * Loads the command line and runs it, for bin/ovms-mtls and each proxy worker. This module
 * imports nothing heavy: Node's ESM loader opens a program's modules many at a time, and
 * under a small open-files limit (below about 100) that failed before main() could say why,
 * with Node's stack trace and no hint of the limit.
 */
import { openFilesLimit } from '../fd-headroom.js';

export async function launch(argv: readonly string[]): Promise<void> {
  // Read first: once the loader has failed, the descriptors it holds leave none to read it with.
  const limit = openFilesLimit();
  let cli: typeof import('./main.js');
  try {
    cli = await import('./main.js');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EMFILE') throw err;
    process.stderr.write(`ovms-mtls: ${tooFewFilesToLoad(limit)}\n`);
    process.exit(1);
  }
  cli.main(argv);
}

export function tooFewFilesToLoad(limit: number | undefined): string {
  const which = limit === undefined ? 'the open-files limit' : `the open-files limit (${limit})`;
  return `${which} is too small to load the program: raise it to 1024 or more (ulimit -n 1024; docker run --ulimit nofile=65536; LimitNOFILE= in a systemd unit)`;
}
