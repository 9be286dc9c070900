/**
 * The one table of command-line options the product understands. yargs builds
 * the `proxy` command and `--help` from it; the OVMS entrypoint uses it to
 * pick our options out of an OVMS command line; the environment-variable
 * mapping is derived from it. Every default lives in src/config.ts.
 */
import { FORWARD_MODES, RESTART_MODES } from './config.js';
import { ConfigError } from './errors.js';
import { LOG_LEVELS } from './log.js';
import { OCSP_MODES } from './ocsp.js';

export type OptionType = 'string' | 'number' | 'boolean' | 'array';

export interface OptionSpec {
  readonly name: string;
  readonly type: OptionType;
  readonly describe: string;
  /** Shown in --help; the real default is applied in config.ts. */
  readonly defaultDescription?: string;
  readonly choices?: readonly string[];
}

/** Options OVMS itself also has: they name the PUBLIC listeners. */
export const PUBLIC_OPTIONS: readonly OptionSpec[] = [
  { name: 'port', type: 'number', describe: 'Public gRPC port (mTLS, HTTP/2)', defaultDescription: 'off' },
  { name: 'rest_port', type: 'number', describe: 'Public REST port (mTLS, HTTP/1.1 and HTTP/2); 0 = off', defaultDescription: 'off' },
  { name: 'grpc_bind_address', type: 'string', describe: 'Address(es) the public gRPC port binds, comma separated', defaultDescription: '0.0.0.0' },
  { name: 'rest_bind_address', type: 'string', describe: 'Address(es) the public REST port binds, comma separated', defaultDescription: '0.0.0.0' },
];

/** Options owned by ovms-mtls; all start with `mtls_`. */
export const MTLS_OPTIONS: readonly OptionSpec[] = [
  { name: 'mtls_grpc_upstream', type: 'string', describe: 'proxy mode: host:port of the model server gRPC (h2c) endpoint' },
  { name: 'mtls_rest_upstream', type: 'string', describe: 'proxy mode: host:port of the model server REST (HTTP/1.1) endpoint' },
  { name: 'mtls_cert', type: 'string', describe: 'Server certificate (PEM, may include the chain)', defaultDescription: '/certs/server.pem in entrypoint mode' },
  { name: 'mtls_key', type: 'string', describe: 'Server private key (PEM)', defaultDescription: '/certs/server.key in entrypoint mode' },
  { name: 'mtls_client_ca', type: 'string', describe: 'CA bundle that client certificates must chain to (PEM)', defaultDescription: '/certs/client_cert_ca.pem in entrypoint mode' },
  { name: 'mtls_crl', type: 'string', describe: 'Certificate revocation list(s) for client certificates (PEM)', defaultDescription: '/certs/client_cert_ca.crl whenever it exists, also when added later (entrypoint mode)' },
  { name: 'mtls_ocsp', type: 'string', describe: 'OCSP check of client certificates before a connection is served: off, leaf (the client certificate) or chain (every certificate of the verified chain below its root); fails closed', defaultDescription: 'off', choices: OCSP_MODES },
  { name: 'mtls_ocsp_responder', type: 'string', describe: 'With --mtls_ocsp: http:// URL of the OCSP responder asked instead of the one each certificate names (Authority Information Access)', defaultDescription: "the certificate's own" },
  { name: 'mtls_ocsp_timeout', type: 'number', describe: 'With --mtls_ocsp: seconds one OCSP lookup may take before the client is refused (ocsp_unavailable)', defaultDescription: '5' },
  { name: 'mtls_allow_cn', type: 'array', describe: 'Allow only clients with this subject CN (repeatable; allow-lists are OR-ed; a comma separates values, \\, is a comma inside one)' },
  { name: 'mtls_allow_ou', type: 'array', describe: 'Allow only clients with this subject OU (repeatable)' },
  { name: 'mtls_allow_dns', type: 'array', describe: 'Allow only clients with this DNS SAN (repeatable)' },
  { name: 'mtls_allow_uri', type: 'array', describe: 'Allow only clients with a URI SAN matching this pattern; * = one path segment, ** = any suffix (repeatable)' },
  { name: 'mtls_allow_fingerprint', type: 'array', describe: 'Allow only clients whose certificate DER has this SHA-256 (hex, colons optional; repeatable)' },
  { name: 'mtls_verify_depth', type: 'number', describe: 'Maximum client certificate chain length', defaultDescription: '5' },
  { name: 'mtls_min_tls_version', type: 'string', describe: 'Lowest TLS version clients may use on the public ports: 1.2 (TLS 1.2 and 1.3) or 1.3 (TLS 1.3 only)', defaultDescription: '1.2' },
  { name: 'mtls_log_level', type: 'string', describe: 'Log level', defaultDescription: 'info', choices: LOG_LEVELS },
  { name: 'mtls_access_log', type: 'boolean', describe: 'Log one line per request/RPC', defaultDescription: 'true' },
  { name: 'mtls_grpc_mode', type: 'string', describe: 'gRPC port: terminate (per-call HTTP/2, XFCC, per-call access log) or relay (HTTP/2 frames passed to one upstream connection per client; fastest, per-connection log, no XFCC)', defaultDescription: 'terminate', choices: FORWARD_MODES },
  { name: 'mtls_rest_mode', type: 'string', describe: 'REST port: terminate (Node HTTP server and client per request) or relay (HTTP/1.1 clients get one upstream connection each; heads parsed for XFCC and the access log, bodies passed as they are; fastest)', defaultDescription: 'terminate', choices: FORWARD_MODES },
  { name: 'mtls_grpc_upstream_connections', type: 'number', describe: 'gRPC terminate mode: connections each worker opens to the model server, calls taking them in turn; OVMS with --grpc_workers N runs N gRPC servers, and one connection reaches only one of them', defaultDescription: '1; entrypoint: 4 per OVMS gRPC server (--grpc_workers, GRPC_SERVERS), 1 for one' },
  { name: 'mtls_shutdown_timeout', type: 'number', describe: 'Seconds to let in-flight calls finish on shutdown (the entrypoint stops OVMS after them, within this time)', defaultDescription: '30' },
  { name: 'mtls_proxy_protocol', type: 'boolean', describe: 'Every connection to the public ports begins with a PROXY protocol header (v1 or v2) from the L4 load balancer in front; its client address is the one logged and forwarded. Connections without one are refused', defaultDescription: 'false' },
  { name: 'mtls_proxy_protocol_from', type: 'array', describe: 'With --mtls_proxy_protocol: only connections from these addresses or CIDR ranges (the load balancers) carry a header; others connect directly and are served under their own address (repeatable; a comma separates values)', defaultDescription: 'every address' },
  { name: 'mtls_handshake_timeout', type: 'number', describe: 'Seconds a client gets to complete the TLS handshake', defaultDescription: '10' },
  { name: 'mtls_upstream_connect_timeout', type: 'number', describe: 'Seconds a connection to the model server may take to be established before the request fails with 502 / UNAVAILABLE', defaultDescription: '10' },
  { name: 'mtls_idle_timeout', type: 'number', describe: 'Seconds before an HTTP/1.1 connection with no request in flight is closed, an HTTP/2 connection with no stream open gets a GOAWAY, a request head or body that stops arriving gets 408, and a client that takes none of what waits for it is closed', defaultDescription: '65' },
  { name: 'mtls_max_connections', type: 'number', describe: 'Maximum open connections per listener in each worker (0 = unlimited)', defaultDescription: '0' },
  { name: 'mtls_max_concurrent_streams', type: 'number', describe: 'HTTP/2 streams a client may open at once per connection; also the pipelined HTTP/1.1 requests of a connection forwarded at once (terminate mode)', defaultDescription: '128' },
  { name: 'mtls_max_header_size', type: 'number', describe: 'Largest request header block accepted, in bytes', defaultDescription: '65536' },
  { name: 'mtls_max_session_memory', type: 'number', describe: 'HTTP/2 memory per client connection, in MiB, on top of one stream window for each stream it may open (--mtls_max_concurrent_streams), before the peer is told to calm down', defaultDescription: '64' },
  { name: 'mtls_stream_window', type: 'number', describe: 'HTTP/2 per-stream flow-control window, in bytes', defaultDescription: '1048576' },
  { name: 'mtls_connection_window', type: 'number', describe: 'HTTP/2 per-connection flow-control window, in bytes', defaultDescription: '16777216' },
  { name: 'mtls_ovms_binary', type: 'string', describe: 'entrypoint mode: OVMS executable', defaultDescription: '/ovms/bin/ovms' },
  { name: 'mtls_ovms_help', type: 'boolean', describe: "entrypoint mode: print OVMS's own --help" },
  { name: 'mtls_ovms_user', type: 'string', describe: 'entrypoint mode, started as root: user OVMS runs as', defaultDescription: 'ovms' },
  { name: 'mtls_user', type: 'string', describe: 'entrypoint mode, started as root: user the proxy drops to after binding ports and reading keys; the --mtls_ovms_user or root (another user could not signal OVMS)', defaultDescription: 'the --mtls_ovms_user' },
  { name: 'mtls_restart', type: 'string', describe: 'entrypoint mode: restart OVMS when it fails, with backoff; after 5 failures in a row, exit with its code', defaultDescription: 'never', choices: RESTART_MODES },
  { name: 'mtls_ovms_hang_timeout', type: 'number', describe: 'entrypoint mode: seconds OVMS may go without answering (deadlocked, or stopped with SIGSTOP) once it has answered on its ports (a "not ready" answer while models load counts), before it is ended (SIGTERM, then SIGKILL) and --mtls_restart applies; 0 = off', defaultDescription: '0 (off)' },
  { name: 'mtls_admin_port', type: 'number', describe: 'Plain-HTTP admin port for /metrics, /healthz, /readyz', defaultDescription: 'off' },
  { name: 'mtls_admin_bind_address', type: 'string', describe: 'Address the admin port binds', defaultDescription: '127.0.0.1' },
  { name: 'mtls_workers', type: 'number', describe: 'Worker processes sharing the listeners', defaultDescription: 'CPUs available (a cgroup CPU quota, as a container CPU limit sets, caps it)' },
];

export const ALL_OPTIONS: readonly OptionSpec[] = [...PUBLIC_OPTIONS, ...MTLS_OPTIONS];

const BY_NAME = new Map(ALL_OPTIONS.map((spec) => [spec.name, spec]));

export function optionSpec(name: string): OptionSpec | undefined {
  return BY_NAME.get(name);
}

/**
 * `--mtls_cert` <-> `OVMS_MTLS_CERT`, `--port` <-> `OVMS_MTLS_PORT`: the
 * prefix `OVMS_MTLS_` followed by the option name without `mtls_`, upper-cased.
 */
export function envVarName(optionName: string): string {
  return 'OVMS_MTLS_' + optionName.replace(/^mtls_/, '').toUpperCase();
}

/** For the usage of the commands that read the environment: `proxy --help` and `check --help` did not say they do. */
export const ENVIRONMENT_HELP = 'Every option can also come from the environment as OVMS_MTLS_<NAME without mtls_> (--mtls_cert -> OVMS_MTLS_CERT,\n--port -> OVMS_MTLS_PORT); the command line wins.';

/** How a name is compared with the option names: case, leading dashes and `-` for `_` aside. */
function comparable(name: string): string {
  return name.replace(/^-+/, '').toLowerCase().replace(/-/g, '_');
}

/** Edits (a character added, dropped or changed, or two neighbours swapped) that turn `a` into `b`. */
function editDistance(a: string, b: string): number {
  let before: number[] = [];
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i += 1) {
    const row = [i];
    for (let j = 1; j <= b.length; j += 1) {
      const change = previous[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1);
      let best = Math.min(previous[j]! + 1, row[j - 1]! + 1, change);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) best = Math.min(best, before[j - 2]! + 1);
      row.push(best);
    }
    [before, previous] = [previous, row];
  }
  return previous[b.length]!;
}

/**
 * The name among `candidates` a misspelt one most likely meant (`mtls_cetr`, `mtls-cert`, `MTLS_ALOW_CN`):
 * the one closest to it, within two edits (one for a name of three letters or fewer). None when two are
 * as close: a guess between them would send the user after the wrong one.
 */
export function closestName(name: string, candidates: Iterable<string>): string | undefined {
  const wanted = comparable(name);
  const allowed = wanted.length <= 3 ? 1 : 2;
  let best: string | undefined;
  let bestDistance = allowed + 1;
  let tied = false;
  for (const candidate of candidates) {
    const distance = editDistance(wanted, comparable(candidate));
    if (distance < bestDistance) [best, bestDistance, tied] = [candidate, distance, false];
    else if (distance === bestDistance) tied = true;
  }
  return tied ? undefined : best;
}

export type RawOptions = Record<string, string | number | boolean | string[] | undefined>;

/** An option given with nothing (last, before another option, or an unset shell variable): the same line in every command. */
export function optionNeedsValue(name: string): ConfigError {
  return new ConfigError(`--${name} needs a value (--${name} VALUE or --${name}=VALUE)`);
}

/**
 * A text option given with nothing on the command line (`--mtls_crl $UNSET`, `--grpc_bind_address=`)
 * was taken for absent: the proxy and the entrypoint served without revocation checks, or on every
 * address, and said nothing. Numbers and allow-lists have messages of their own (config.ts).
 */
export function refuseBlankText(spec: OptionSpec, value: RawOptions[string]): void {
  if (spec.type === 'string' && String(value).trim() === '') throw optionNeedsValue(spec.name);
}

/**
 * Kubernetes gives every pod a variable per Service of its namespace, `<NAME>_PORT=tcp://10.96.0.12:9000`
 * (Docker's links): for a Service named ovms-mtls, as deploy/kubernetes names it, that is OVMS_MTLS_PORT,
 * for ovms-mtls-rest OVMS_MTLS_REST_PORT. Read as --port, a pod that serves REST only failed to start on a
 * variable nobody had set. A port option never has this shape, so such a value is no option of ours.
 */
export function isServiceLink(variable: string, value: string | undefined): boolean {
  return variable.endsWith('_PORT') && /^(tcp|udp|sctp):\/\/\S+:\d+$/.test(value ?? '');
}

/** The options whose OVMS_MTLS_* variable optionsFromEnv passes over as a Kubernetes service link, for a warning naming them. */
export function serviceLinkOptions(env: NodeJS.ProcessEnv, specs: readonly OptionSpec[] = ALL_OPTIONS): string[] {
  return specs.map((spec) => spec.name).filter((name) => isServiceLink(envVarName(name), env[envVarName(name)]));
}

/**
 * Unset, these let in clients the user meant to keep out: every client the CA vouches for, or
 * revoked ones. Set to nothing (`OVMS_MTLS_ALLOW_CN=${CN}` with CN unset, a value left out of
 * an env file), such a variable is refused as `--mtls_allow_cn=` is, not taken for unset.
 */
const OPENS_WHEN_UNSET: ReadonlyMap<string, string> = new Map([
  ...['cn', 'ou', 'dns', 'uri', 'fingerprint'].map((kind): [string, string] => [`mtls_allow_${kind}`, 'an empty allow-list would admit every client the CA vouches for']),
  ['mtls_crl', 'read as unset, it could leave revocation unchecked'],
  ['mtls_ocsp', 'read as unset, it would leave OCSP unchecked'],
]);

function refuseEmptyVariable(spec: OptionSpec): void {
  const risk = OPENS_WHEN_UNSET.get(spec.name);
  if (risk !== undefined) throw new ConfigError(`${envVarName(spec.name)} is set but empty: ${risk} (give it a value, or unset it)`);
}

const OPTION_VARIABLES: ReadonlyMap<string, string> = new Map(ALL_OPTIONS.map((spec) => [envVarName(spec.name), spec.name]));

/**
 * The names Kubernetes gives a Service's variables (`<NAME>_SERVICE_HOST`, `_SERVICE_PORT[_<PORT NAME>]`,
 * `_PORT_<N>_<PROTO>[_PROTO|_PORT|_ADDR]`, and `_PORT` of a link's value: isServiceLink) and Docker's container links (`<NAME>_NAME`,
 * `<NAME>_ENV_<VAR>`): a Service named ovms-mtls or ovms-mtls-admin sets them in every pod of its namespace.
 */
const LINK_VARIABLE = /^OVMS_MTLS_(?:\w+_)?(?:SERVICE_HOST|SERVICE_PORT(?:_\w+)?|PORT_\d+_(?:TCP|UDP|SCTP)(?:_PROTO|_PORT|_ADDR)?|NAME|ENV_\w+)$/;

export function isLinkVariable(variable: string): boolean {
  return LINK_VARIABLE.test(variable);
}

/**
 * An OVMS_MTLS_* variable that names no option was passed over without a word: OVMS_MTLS_ALOW_CN=alice
 * left the allow-list empty, and every client the CA vouches for got in, where `--mtls_alow_cn` is refused.
 */
function refuseUnknownVariables(env: NodeJS.ProcessEnv): void {
  for (const variable of Object.keys(env)) {
    if (!variable.startsWith('OVMS_MTLS_') || OPTION_VARIABLES.has(variable) || isLinkVariable(variable) || isServiceLink(variable, env[variable])) continue;
    const meant = closestName(variable, OPTION_VARIABLES.keys());
    const hint = meant === undefined ? 'the variables are the options\' names, listed by `ovms-mtls --help`' : `did you mean ${meant}, for --${OPTION_VARIABLES.get(meant)}?`;
    throw new ConfigError(`${variable} is set in the environment but is no option's variable (${hint}): correct its name, or unset it`);
  }
}

/** Values from the environment, for every option not given on the command line. Set to nothing, a variable counts as unset (but see OPENS_WHEN_UNSET). */
export function optionsFromEnv(env: NodeJS.ProcessEnv, specs: readonly OptionSpec[] = ALL_OPTIONS): RawOptions {
  refuseUnknownVariables(env);
  const out: RawOptions = {};
  for (const spec of specs) {
    const variable = envVarName(spec.name);
    const value = env[variable];
    if (value === undefined || isServiceLink(variable, value)) continue;
    if (value === '') {
      refuseEmptyVariable(spec);
      continue;
    }
    // A list stays whole here: config.ts splits it at the commas that are not `\,`, as it does a command-line value.
    out[spec.name] = spec.type === 'array' ? [value] : value;
  }
  return out;
}
