/**
 * What `ovms-mtls proxy` takes, and the configuration it makes of it. The package entry exports
 * proxyConfigFromOptions for programs, which give the command line's option names as keys: a
 * name the command line would refuse is refused here too, where it was dropped without a word.
 */
import { ALL_OPTIONS, closestName, refuseBlankText, type OptionSpec, type RawOptions } from './options.js';
import { ConfigError } from './errors.js';
import { hostAndPort } from './addresses.js';
import { checkAdminPort, optionalString, parseCommonConfig, parseHostPort, parsePublicListeners, type Config, type HostPort, type PublicListenerSpec } from './config.js';

type PublicListeners = { readonly grpc?: PublicListenerSpec | undefined; readonly rest?: PublicListenerSpec | undefined };

// --mtls_user too: only the entrypoint drops privileges, and a proxy that took the option would stay root without a word.
export const ENTRYPOINT_ONLY: ReadonlySet<string> = new Set(['mtls_ovms_binary', 'mtls_ovms_help', 'mtls_ovms_user', 'mtls_ovms_hang_timeout', 'mtls_restart', 'mtls_user']);
export const PROXY_OPTIONS: readonly OptionSpec[] = ALL_OPTIONS.filter((o) => !ENTRYPOINT_ONLY.has(o.name));
const PROXY_OPTIONS_BY_NAME: ReadonlyMap<string, OptionSpec> = new Map(PROXY_OPTIONS.map((o) => [o.name, o]));

/** An entrypoint option given to `proxy`: one line saying so, rather than "unknown option". */
export function entrypointOnlyError(name: string): ConfigError {
  const hint = name === 'mtls_user' ? 'start `ovms-mtls proxy` as the user it should run as (systemd User=, docker --user)' : '`ovms-mtls proxy` starts no OVMS';
  return new ConfigError(`--${name} applies to the OVMS entrypoint only: ${hint}`);
}

/**
 * `mtlsAllowCn`, `--mtls_allow_cn`, `mtls-allow-cn`, `allow_cn`, `OVMS_MTLS_ALLOW_CN` (its variable):
 * the option a program spelling a flag its own way meant, if any.
 */
function optionMeant(name: string): string | undefined {
  const snakeCase = /^[A-Z0-9_]+$/.test(name)
    ? name.toLowerCase().replace(/^ovms_mtls_/, '')
    : name.replace(/^-+/, '').replace(/-/g, '_').replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
  return [snakeCase, `mtls_${snakeCase}`].find((candidate) => PROXY_OPTIONS_BY_NAME.has(candidate)) ?? closestName(snakeCase, PROXY_OPTIONS_BY_NAME.keys());
}

/**
 * What the command line refuses before the configuration is read. Taken for an option not given,
 * a misspelt name (`mtls_alow_cn`) left the allow-list empty, and every client the CA vouches for
 * got in; an empty `mtls_crl` left revocation unchecked, an empty bind address bound them all.
 */
function refuseWhatCommandLineRefuses(raw: RawOptions): void {
  for (const [name, value] of Object.entries(raw)) {
    const spec = PROXY_OPTIONS_BY_NAME.get(name);
    if (spec) {
      if (value !== undefined) refuseBlankText(spec, value);
      continue;
    }
    if (ENTRYPOINT_ONLY.has(name)) throw entrypointOnlyError(name);
    const meant = optionMeant(name);
    throw new ConfigError(meant === undefined
      ? `unknown option '${name}': the names are those of \`ovms-mtls proxy --help\`, without the dashes`
      : `unknown option '${name}' (did you mean '${meant}'?)`);
  }
}

/** `ovms-mtls proxy`: public listeners forward to upstreams given on the command line. */
export function proxyConfigFromOptions(raw: RawOptions): Config {
  refuseWhatCommandLineRefuses(raw);
  const listeners = parsePublicListeners(raw);
  const common = parseCommonConfig(raw);
  checkAdminPort(common.admin, listeners);
  // The example is the port OVMS's docs (and ours) give that protocol: REST pointed at the gRPC port answers nothing useful.
  const upstream = (name: string, listenerFlag: string, example: string) => {
    const value = optionalString(raw, name);
    if (value === undefined) throw new ConfigError(`--${name} is required with --${listenerFlag} (host:port of the model server, e.g. ${example})`);
    return parseHostPort(name, value);
  };
  const config = {
    ...common,
    grpc: listeners.grpc ? { hosts: listeners.grpc.hosts, port: listeners.grpc.port ?? 0, upstream: upstream('mtls_grpc_upstream', 'port', '127.0.0.1:9000') } : undefined,
    rest: listeners.rest ? { hosts: listeners.rest.hosts, port: listeners.rest.port ?? 0, upstream: upstream('mtls_rest_upstream', 'rest_port', '127.0.0.1:8000') } : undefined,
  };
  refuseUpstreamOnOwnPort(listeners, { grpc: config.grpc?.upstream, rest: config.rest?.upstream });
  return config;
}

const WILDCARDS: ReadonlySet<string> = new Set(['0.0.0.0', '::']);

/** Whether a listener bound to `hosts` takes connections to `host`, as far as can be told without a lookup. */
function listensOn(hosts: readonly string[], host: string): boolean {
  const target = host.toLowerCase();
  const loopback = target === 'localhost' || /^127\./.test(target) || (target === '::1' && hosts.includes('::'));
  return hosts.some((bind) => bind.toLowerCase() === target || (WILDCARDS.has(bind) && loopback));
}

/**
 * An upstream that is one of the proxy's own public ports (a port number pasted twice) started, and each
 * call went to the proxy's TLS port in plain HTTP: every call failed, 502 or UNAVAILABLE, and every one
 * logged a failed handshake of the proxy's own, which named nothing the user had set.
 */
export function refuseUpstreamOnOwnPort(listeners: PublicListeners, upstreams: { grpc?: HostPort | undefined; rest?: HostPort | undefined }): void {
  const own = [['port', listeners.grpc], ['rest_port', listeners.rest]] as const;
  for (const [name, upstream] of [['mtls_grpc_upstream', upstreams.grpc], ['mtls_rest_upstream', upstreams.rest]] as const) {
    if (!upstream) continue;
    const { host, port } = upstream;
    const target = own.find(([, listener]) => listener?.port === port && listensOn(listener.hosts, host));
    if (target) {
      throw new ConfigError(`--${name} ${hostAndPort(host, port)} is this proxy's own --${target[0]}: it would forward every call to itself (give the model server's host:port)`);
    }
  }
}

// The command serves these around startProxy(); a program that gave them got one process and no admin port, without a word.
const COMMAND_ONLY: readonly string[] = ['mtls_workers', 'mtls_admin_port', 'mtls_admin_bind_address'];

/**
 * proxyConfigFromOptions for the package entry: also refuses what only the `ovms-mtls proxy`
 * command serves (its workers and admin listener), which startProxy() does not.
 */
export function libraryProxyConfig(raw: RawOptions): Config {
  const given = COMMAND_ONLY.find((name) => raw[name] !== undefined);
  if (given !== undefined) {
    throw new ConfigError(`${given} is served by the \`ovms-mtls proxy\` command (its workers and admin listener), not by startProxy(): leave it out, or run the command`);
  }
  return proxyConfigFromOptions(raw);
}
