import { ALL_OPTIONS, envVarName, type OptionSpec } from '../options.js';
import { productVersion } from '../version.js';
import { DEMO_SYNOPSIS } from './demo-command.js';

function optionLine(spec: OptionSpec): string {
  // The values an option takes, as each command's --help lists them: `--mtls_restart` would otherwise not name `on-failure`.
  const choices = spec.choices ? ` (${spec.choices.join('|')})` : '';
  const def = spec.defaultDescription ? ` (default: ${spec.defaultDescription})` : '';
  return `  --${spec.name.padEnd(26)} ${spec.describe}${choices}${def}\n  ${''.padEnd(28)} env: ${envVarName(spec.name)}\n`;
}

export function helpText(): string {
  return `ovms-mtls ${productVersion()} - mutual TLS front door for OpenVINO Model Server

Usage:
  ovms-mtls [OVMS options] [--mtls_* options]   drop-in OVMS entrypoint: starts OVMS on loopback behind mTLS
  ovms-mtls proxy [options]                      mTLS proxy in front of a model server that runs elsewhere
  ovms-mtls certs init|client|revoke|renew-crl [options]   make and manage certificates (no openssl needed)
  ovms-mtls check [--mtls_* options]             validate the TLS material the proxy would load
  ovms-mtls probe --host H [options]             check a running deployment like a client would
  ${DEMO_SYNOPSIS}
                                                 throwaway certs + stand-in model server + proxy, with commands to try
  ovms-mtls --help | --version
  ovms-mtls COMMAND --help                       one command's usage and options

Options (every option also reads OVMS_MTLS_<NAME>, e.g. --mtls_cert -> OVMS_MTLS_CERT;
the command line wins; --opt value and --opt=value both work, but a flag takes its value
only after '=', as OVMS's own do: --mtls_access_log=false (true|false|1|0|yes|no|on|off),
--mtls_access_log alone is true; a repeated option keeps its last value, an allow-list adds to it):
${ALL_OPTIONS.map(optionLine).join('')}
OVMS's own help: ovms-mtls --mtls_ovms_help
`;
}
