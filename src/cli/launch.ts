/**
 * Loads the command line and runs it, for bin/ovms-mtls and each proxy worker. This module
 * imports nothing heavy: Node's ESM loader opens a program's modules many at a time, and
 * under a small open-files limit (below about 100) that failed before main() could say why,
 * with Node's stack trace and no hint of the limit. For the same reason it imports one module
 * statically: the loader opens a module's static imports at once, and a second one failed under
 * a limit that let each through alone.
 */
import { guardStartupSignals } from '../startup-signals.js';

export async function launch(argv: readonly string[]): Promise<void> {
  // First: loading the program takes a few hundred milliseconds, in which a signal met Node's defaults.
  guardStartupSignals();
  let limit: number | undefined;
  let cli: typeof import('./main.js');
  try {
    // Read before the program loads: once the loader has failed, the descriptors it holds leave none to read it with.
    limit = (await import('../fd-headroom.js')).openFilesLimit();
    cli = await import('./main.js');
  } catch (err) {
    if (!loadFailedForLimit(err, limit)) throw err;
    process.stderr.write(`ovms-mtls: ${tooFewFilesToLoad(limit)}\n`);
    process.exit(1);
  }
  cli.main(argv);
}

/**
 * The errors Node's loader turns an EMFILE into: a module's package.json it could not read, or, where it takes
 * that package.json for absent, what resolving without it comes to: a package it could not find, a subpath
 * import that names a directory.
 */
const LOADER_ERRORS = new Set(['ERR_INVALID_PACKAGE_CONFIG', 'ERR_MODULE_NOT_FOUND', 'MODULE_NOT_FOUND', 'ERR_UNSUPPORTED_DIR_IMPORT']);

/**
 * Whether loading failed for the open-files limit. EMFILE reaches us as itself only sometimes: Node 24's
 * loader reports "Cannot read package config ...: too many open files." (ERR_INVALID_PACKAGE_CONFIG). Node 20's
 * takes a package.json it could not open for none, and fails on what that package's "exports" or "main" would
 * have resolved: "Cannot find package .../node_modules/yargs/index.js" (ERR_MODULE_NOT_FOUND), "Directory
 * import .../escalade/sync is not supported" (ERR_UNSUPPORTED_DIR_IMPORT; yargs imports it), "Cannot find module
 * '@peculiar/asn1-schema'" from a require() (MODULE_NOT_FOUND). Which one depends on which read the limit cut,
 * and so on timing. Under a limit below what the message asks for, any of them is taken for it.
 */
export function loadFailedForLimit(err: unknown, limit: number | undefined): boolean {
  const { code, message } = err as NodeJS.ErrnoException;
  if (code === 'EMFILE' || /too many open files/i.test(String(message))) return true;
  return code !== undefined && LOADER_ERRORS.has(code) && limit !== undefined && limit < ENOUGH_FILES_TO_LOAD;
}

/** What tooFewFilesToLoad() asks for: far more than loading takes (about 70 with Node 20, 25 with Node 24). */
const ENOUGH_FILES_TO_LOAD = 1024;

export function tooFewFilesToLoad(limit: number | undefined): string {
  const which = limit === undefined ? 'the open-files limit' : `the open-files limit (${limit})`;
  return `${which} is too small to load the program: raise it to ${ENOUGH_FILES_TO_LOAD} or more (ulimit -n ${ENOUGH_FILES_TO_LOAD}; docker run --ulimit nofile=65536; LimitNOFILE= in a systemd unit)`;
}
