import { existsSync } from 'node:fs';
import { ALL_OPTIONS } from '../options.js';
import { DEFAULTS, parseAllowList, parseLimits, parseTlsFiles, type TlsFiles } from '../config.js';
import type { RawOptions } from '../options.js';
import { checkTlsFiles, formatReport } from '../check.js';
import { collectOptions, parseCommandLine } from './options-parser.js';
import type { Io } from './main.js';

export const CHECK_USAGE = `ovms-mtls check [--mtls_cert F --mtls_key F --mtls_client_ca F [--mtls_crl F]] [other proxy options]

Validates the TLS material the proxy would load, with the same checks and messages as at startup,
and prints a short report. Exit 0 only when the proxy would start and serve. Without file options
it checks the container paths (${DEFAULTS.tlsFilesInContainer.cert}, ...).`;

/**
 * The container layout when no file is named, as the entrypoint uses it; the
 * CRL only when it exists there and the CA bundle was not named elsewhere.
 */
function containerDefaults(raw: RawOptions): Partial<TlsFiles> {
  const { crl, ...rest } = DEFAULTS.tlsFilesInContainer;
  const useCrl = raw['mtls_client_ca'] === undefined && existsSync(crl);
  return useCrl ? { ...rest, crl } : rest;
}

/** `ovms-mtls check ...`: 0 when the material is good, 1 when the proxy would refuse it. */
export async function runCheckCommand(argv: readonly string[], io: Io): Promise<number> {
  const parsed = await parseCommandLine(argv, ALL_OPTIONS, CHECK_USAGE);
  const raw = collectOptions(parsed, ALL_OPTIONS, io.env);
  // The proxy refuses bad allow-lists and limits before it looks at a file: so does check.
  parseAllowList(raw);
  parseLimits(raw);
  const report = checkTlsFiles(parseTlsFiles(raw, containerDefaults(raw)));
  io.stdout.write(formatReport(report));
  return report.ok ? 0 : 1;
}
