import { ALL_OPTIONS, ENVIRONMENT_HELP, type RawOptions } from '../options.js';
import { DEFAULTS, checkAdminPort, optionalString, parseCommonConfig, parseHostPort, parsePublicListeners, type Config } from '../config.js';
import { containerTlsDefaults, ovmsSupervision } from '../entrypoint-config.js';
import { checkTlsFiles, formatReport } from '../check.js';
import { collectOptions, parseCommandLine } from './options-parser.js';
import type { Io } from './main.js';
import { refuseUpstreamOnOwnPort } from '../proxy-options.js';

export const CHECK_USAGE = `ovms-mtls check [--mtls_cert F --mtls_key F --mtls_client_ca F [--mtls_crl F]] [other proxy options]

Validates the TLS material the proxy would load, with the same checks and messages as at startup,
and prints a short report. Exit 0 only when the proxy would start and serve. Without file options
it checks the container paths (${DEFAULTS.tlsFilesInContainer.cert}, ...).
${ENVIRONMENT_HELP}`;

/** `ovms-mtls check ...`: 0 when the material is good, 1 when the proxy would refuse it. */
export async function runCheckCommand(argv: readonly string[], io: Io): Promise<number> {
  const parsed = await parseCommandLine(argv, ALL_OPTIONS, CHECK_USAGE, 'check');
  const raw = collectOptions(parsed, ALL_OPTIONS, io.env);
  // The proxy and the entrypoint refuse a bad option (a log level, a mode, a worker count, an allow-list) before they look
  // at a file, and take the container's files as the entrypoint does when none is named: so does check, with their parser.
  const { tls, admin } = parseCommonConfig(raw, containerTlsDefaults(raw));
  checkListenerOptions(raw, admin);
  ovmsSupervision(raw);
  const report = checkTlsFiles(tls);
  io.stdout.write(formatReport(report));
  return report.ok ? 0 : 1;
}

/**
 * The public ports' addresses and the upstreams, when given, as the proxy and the entrypoint read
 * them: `check --rest_port 8443 --rest_bind_address ::,::1` (or an upstream `::1:8000`, a port
 * shared by gRPC and REST or by the admin listener) said "OK - the proxy would start" and exited 0,
 * where the proxy refused to start. Without a public port, check looks at the TLS material alone.
 */
function checkListenerOptions(raw: RawOptions, admin: Config['admin']): void {
  if (raw['port'] === undefined && raw['rest_port'] === undefined) return;
  const listeners = parsePublicListeners(raw);
  checkAdminPort(admin, listeners);
  const upstream = (name: string, listener: unknown) => {
    const value = optionalString(raw, name);
    return listener && value !== undefined ? parseHostPort(name, value) : undefined;
  };
  refuseUpstreamOnOwnPort(listeners, { grpc: upstream('mtls_grpc_upstream', listeners.grpc), rest: upstream('mtls_rest_upstream', listeners.rest) });
}
