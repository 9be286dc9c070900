/**
 * Settings of the OVMS entrypoint, from an OVMS command line split by
 * ovms-args.ts plus OVMS_MTLS_* environment variables (the command line wins).
 */
import { ALL_OPTIONS, optionsFromEnv, type RawOptions } from './options.js';
import { DEFAULTS, RESTART_MODES, checkAdminPort, optionalString, parseChoice, parseCommonConfig, parsePublicListeners, secondsOr, type Config, type PublicListenerSpec, type TlsFiles } from './config.js';
import { ovmsGrpcServers, type SplitOvmsArgv } from './ovms-args.js';
import type { RestartPolicy } from './ovms-supervisor.js';
import type { UserOption } from './privileges.js';

/** The program run as OVMS. */
export interface OvmsBinary {
  readonly path: string;
  /** By --mtls_ovms_binary (flag or environment); otherwise the image's. */
  readonly given: boolean;
}

export interface EntrypointSettings {
  readonly common: Omit<Config, 'grpc' | 'rest'>;
  readonly listeners: { readonly grpc?: PublicListenerSpec; readonly rest?: PublicListenerSpec };
  readonly binary: OvmsBinary;
  readonly restart: RestartPolicy;
  /** --mtls_ovms_hang_timeout: 0 = off. */
  readonly hangTimeoutMs: number;
  readonly ovmsUser: string;
  readonly proxyUser: string;
  /** --mtls_ovms_user and --mtls_user as given (flag or environment), not defaulted. */
  readonly usersGiven: Partial<Record<UserOption, string>>;
  /** The user's OVMS arguments minus ours and the listener options. */
  readonly passthrough: readonly string[];
}

/** Our options and the listener options, environment first, command line on top. */
export function entrypointOptions(split: SplitOvmsArgv, env: NodeJS.ProcessEnv): RawOptions {
  const given = { ...split.listeners, ...split.mtls };
  const specs = ALL_OPTIONS.filter((s) => s.name !== 'mtls_grpc_upstream' && s.name !== 'mtls_rest_upstream' && given[s.name] === undefined);
  return { ...optionsFromEnv(env, specs), ...given };
}

/**
 * The nginx example's mount points, so existing deployments keep working.
 * Its CRL is optional: used whenever the file is there, so one added to the
 * Secret later is picked up by the reload like any other change. Only with the
 * default client CA, because a CRL of another CA would make Node reject every
 * client (FINDINGS).
 */
export function containerTlsDefaults(raw: RawOptions): Partial<TlsFiles> {
  const d = DEFAULTS.tlsFilesInContainer;
  const defaultCa = raw['mtls_client_ca'] === undefined || raw['mtls_client_ca'] === d.clientCa;
  return { cert: d.cert, key: d.key, clientCa: d.clientCa, ...(defaultCa ? { crl: d.crl, crlOptional: true } : {}) };
}

/**
 * The entrypoint's supervision of OVMS (--mtls_restart, --mtls_ovms_hang_timeout), read as the entrypoint reads
 * them: `check` reads them with this too, or it said "the proxy would start" where the entrypoint exited 2.
 */
export function ovmsSupervision(raw: RawOptions): Pick<EntrypointSettings, 'restart' | 'hangTimeoutMs'> {
  return { restart: restartPolicy(raw), hangTimeoutMs: secondsOr(raw, 'mtls_ovms_hang_timeout', DEFAULTS.ovms.hangTimeoutMs) };
}

function restartPolicy(raw: RawOptions): RestartPolicy {
  const mode = parseChoice(raw, 'mtls_restart', RESTART_MODES, DEFAULTS.ovms.restart);
  const d = DEFAULTS.ovms;
  return { mode, initialBackoffMs: d.restartInitialBackoffMs, maxBackoffMs: d.restartMaxBackoffMs, stableAfterMs: d.restartStableAfterMs, maxFailuresInARow: d.restartMaxFailuresInARow };
}

/**
 * Upstream gRPC connections for an OVMS running `servers` gRPC servers on its port. The kernel
 * gives each connection to one server by a hash of its addresses, so as many connections as
 * servers leave some idle: against 4 C-core servers (grpcio, SO_REUSEPORT) 4 connections reached
 * 2 of them in each of 3 tries, 16 reached all 4 in each of 5.
 */
export function grpcConnectionsForServers(servers: number): number {
  return servers <= 1 ? 1 : Math.min(servers * 4, DEFAULTS.maxGrpcUpstreamConnections);
}

export function entrypointSettings(split: SplitOvmsArgv, env: NodeJS.ProcessEnv): EntrypointSettings {
  const raw = entrypointOptions(split, env);
  const ovmsUser = ovmsUserOf(raw);
  const listeners = parsePublicListeners(raw);
  const parsed = parseCommonConfig(raw, containerTlsDefaults(raw));
  checkAdminPort(parsed.admin, listeners);
  const common = raw['mtls_grpc_upstream_connections'] === undefined ? { ...parsed, grpcUpstreamConnections: grpcConnectionsForServers(ovmsGrpcServers(split.passthrough, env)) } : parsed;
  return {
    listeners,
    common,
    binary: ovmsBinaryOf(raw),
    ...ovmsSupervision(raw),
    ovmsUser,
    proxyUser: optionalString(raw, 'mtls_user') ?? ovmsUser,
    usersGiven: usersGiven(raw),
    passthrough: split.passthrough,
  };
}

function usersGiven(raw: RawOptions): Partial<Record<UserOption, string>> {
  const given: Partial<Record<UserOption, string>> = {};
  for (const flag of ['mtls_ovms_user', 'mtls_user'] as const) {
    const name = optionalString(raw, flag);
    if (name !== undefined) given[flag] = name;
  }
  return given;
}

function ovmsUserOf(raw: RawOptions): string {
  return optionalString(raw, 'mtls_ovms_user') ?? DEFAULTS.ovms.user;
}

/** The user OVMS runs as when started as root; for one-shot modes too (an empty value is the default, as when serving). */
export function ovmsUser(split: SplitOvmsArgv, env: NodeJS.ProcessEnv): string {
  return ovmsUserOf(entrypointOptions(split, env));
}

function ovmsBinaryOf(raw: RawOptions): OvmsBinary {
  const given = optionalString(raw, 'mtls_ovms_binary');
  return given === undefined ? { path: DEFAULTS.ovms.binary, given: false } : { path: given, given: true };
}

/** The OVMS binary, checked before anything listens; for one-shot modes too. */
export function ovmsBinary(split: SplitOvmsArgv, env: NodeJS.ProcessEnv): OvmsBinary {
  return ovmsBinaryOf(entrypointOptions(split, env));
}
