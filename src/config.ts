import { SocketAddress, isIP } from 'node:net';
import { availableParallelism } from 'node:os';
import { readFileSync } from 'node:fs';
import { posix } from 'node:path';
import { ConfigError } from './errors.js';
import { aLabel, clientAddress, parseSubnet, unbracketed, type Subnet } from './addresses.js';
import type { RawOptions } from './options.js';
import type { LevelWithSilent } from 'pino';
import { LOG_LEVELS } from './log.js';
import { OCSP_MODES, type OcspSettings } from './ocsp.js';

export interface HostPort {
  readonly host: string;
  readonly port: number;
}

/** Where a listener binds. */
export interface BindSpec {
  /** Addresses to bind; OVMS accepts comma-separated lists, so do we. Host names until resolved at start (bind-addresses.ts). */
  readonly hosts: readonly string[];
  /** Resolved: each address a host name gave, with that name (its addresses that are not on this machine are skipped). */
  readonly resolvedFrom?: Readonly<Record<string, string>> | undefined;
}

export interface ListenerConfig extends BindSpec {
  /** 0 asks the OS for a free port (library and tests only; the CLI treats 0 as "off"). */
  readonly port: number;
  readonly upstream: HostPort;
}

export interface TlsFiles {
  readonly cert: string;
  readonly key: string;
  readonly clientCa: string;
  readonly crl?: string | undefined;
  /**
   * The CRL is the container's default file: used whenever it is there, at
   * start and at every reload, since a Secret may gain it later. A CRL the
   * user named must exist.
   */
  readonly crlOptional?: boolean | undefined;
}

/** Who may connect, beyond "the CA vouches for them". Lists are OR-ed; all empty = anyone. */
export interface AllowList {
  readonly cn: readonly string[];
  readonly ou: readonly string[];
  readonly dns: readonly string[];
  readonly uri: readonly string[];
  readonly fingerprint: readonly string[];
}

/** Limits applied to every public connection. */
export interface Limits {
  readonly handshakeTimeoutMs: number;
  /** An HTTP/1.1 connection with no request in flight and nothing moving is closed after this. */
  readonly idleTimeoutMs: number;
  /** A connection to the model server not established by then fails (an upstream that drops SYNs would otherwise hold a request for minutes). */
  readonly upstreamConnectTimeoutMs: number;
  /** Per listener; 0 = unlimited. */
  readonly maxConnections: number;
  readonly maxConcurrentStreams: number;
  readonly maxHeaderSize: number;
  /** MiB, nghttp2's per-session budget before ENHANCE_YOUR_CALM. */
  readonly maxSessionMemoryMiB: number;
  readonly streamWindow: number;
  readonly connectionWindow: number;
  readonly verifyDepth: number;
  /** TLS 1.2 and 1.3, or 1.3 alone. */
  readonly minTlsVersion: MinTlsVersion;
}

/** The lowest TLS version a client may speak (`--mtls_min_tls_version`); 1.0 and 1.1 are never offered. */
export const MIN_TLS_VERSIONS = ['1.2', '1.3'] as const;
export type MinTlsVersion = (typeof MIN_TLS_VERSIONS)[number];

/**
 * The most fields a header list of `bytes` can hold: each counts its name, value and 32 octets
 * (RFC 9113 6.5.2). Node's own cap, 128 fields, refused a gRPC call with ~120 metadata entries
 * (RST_STREAM(ENHANCE_YOUR_CALM)) that was well within the size limit and that OVMS takes.
 */
export function headerFieldsWithin(bytes: number): number {
  return Math.floor(bytes / 32);
}

export interface Config {
  readonly grpc?: ListenerConfig | undefined;
  readonly rest?: ListenerConfig | undefined;
  readonly tls: TlsFiles;
  readonly allow: AllowList;
  readonly limits: Limits;
  readonly shutdownTimeoutMs: number;
  readonly logLevel: LevelWithSilent;
  readonly accessLog: boolean;
  readonly admin?: (BindSpec & { readonly port: number }) | undefined;
  readonly workers: number;
  /** `terminate`: every call through our HTTP/2 server (XFCC, per-call log). `relay`: frames passed as they are. */
  readonly grpcMode: ForwardMode;
  /** gRPC terminate: h2c connections each worker opens to the model server, calls taking them in turn. */
  readonly grpcUpstreamConnections: number;
  /** `terminate`: Node's HTTP server and client per request. `relay`: HTTP/1.1 heads parsed, bodies passed as they are. */
  readonly restMode: ForwardMode;
  /** Client certificates' OCSP status, asked before a connection is served; absent: not asked (`--mtls_ocsp off`). */
  readonly ocsp?: OcspSettings | undefined;
  /** Connections to the public ports begin with a PROXY protocol header naming the client (proxy-protocol.ts); absent: off. */
  readonly proxyProtocol?: ProxyProtocolSettings | undefined;
}

/** `--mtls_proxy_protocol` and `--mtls_proxy_protocol_from`. */
export interface ProxyProtocolSettings {
  /** The load balancers' addresses, whose connections alone carry a header; empty: every connection does. */
  readonly from: readonly Subnet[];
}

export const FORWARD_MODES = ['terminate', 'relay'] as const;
export type ForwardMode = (typeof FORWARD_MODES)[number];
export const RESTART_MODES = ['never', 'on-failure'] as const;

/** Every default in one place. */
export const DEFAULTS = {
  bindAddress: '0.0.0.0',
  adminBindAddress: '127.0.0.1',
  shutdownTimeoutSeconds: 30,
  /** Quiet time after the last change in a certificate directory before reloading: writers touch several files. */
  reloadDebounceMs: 200,
  /** How often the certificate files are looked at while a directory of theirs cannot be watched (inotify limits). */
  reloadPollMs: 5_000,
  logLevel: 'info' as LevelWithSilent,
  accessLog: true,
  grpcMode: 'terminate' as ForwardMode,
  /** Proxy mode; the entrypoint opens as many as OVMS runs gRPC servers (ovms-args.ts ovmsGrpcServers). */
  grpcUpstreamConnections: 1,
  /** Each is a descriptor and an HTTP/2 session per worker; OVMS caps --grpc_workers at its core count. */
  maxGrpcUpstreamConnections: 64,
  restMode: 'terminate' as ForwardMode,
  /** A lookup's bound: nginx's resolver and OCSP timeouts are a few seconds too; a client waits this long at most. */
  ocspTimeoutSeconds: 5,
  limits: {
    handshakeTimeoutMs: 10_000,
    idleTimeoutMs: 65_000,
    upstreamConnectTimeoutMs: 10_000,
    maxConnections: 0,
    maxConcurrentStreams: 128,
    maxHeaderSize: 64 * 1024,
    maxSessionMemoryMiB: 64,
    // FINDINGS: 64 KiB windows move MB-sized tensors at a fraction of nginx's speed.
    streamWindow: 1024 * 1024,
    connectionWindow: 16 * 1024 * 1024,
    verifyDepth: 5,
    minTlsVersion: '1.2' as MinTlsVersion,
  } satisfies Limits,
  tlsFilesInContainer: {
    cert: '/certs/server.pem',
    key: '/certs/server.key',
    clientCa: '/certs/client_cert_ca.pem',
    crl: '/certs/client_cert_ca.crl',
  },
  /** The OVMS entrypoint (src/cli/entrypoint-command.ts). */
  ovms: {
    binary: '/ovms/bin/ovms',
    /** The OVMS image's user; OVMS runs as it (and the proxy drops to it) when started as root. */
    user: 'ovms',
    /** The container's orchestrator restarts; restarting inside too would hide crash loops. */
    restart: 'never' as (typeof RESTART_MODES)[number],
    restartInitialBackoffMs: 500,
    restartMaxBackoffMs: 30_000,
    /** A run this long resets the backoff. */
    restartStableAfterMs: 60_000,
    /** Failed runs in a row after which --mtls_restart on-failure gives up and the entrypoint exits with OVMS's code. */
    restartMaxFailuresInARow: 5,
    /** New loopback ports tried when one was taken before OVMS could bind it. */
    portRetries: 3,
    /** Off: a watchdog that kills OVMS is opted into (deploy/ sets 60 s); see README. */
    hangTimeoutMs: 0,
  },
} as const;

export const EMPTY_ALLOW_LIST: AllowList = { cn: [], ou: [], dns: [], uri: [], fingerprint: [] };

function flag(name: string): string {
  return `--${name}`;
}

export function parseInteger(name: string, value: unknown, min: number, max: number): number {
  const text = String(value).trim();
  const n = /^-?\d+$/.test(text) ? Number(text) : NaN;
  if (!Number.isSafeInteger(n) || n < min || n > max) {
    throw new ConfigError(`${flag(name)}: '${String(value)}' is not a whole number between ${min} and ${max}`);
  }
  return n;
}

export function parsePort(name: string, value: unknown): number {
  return parseInteger(name, value, 0, 65535);
}

/**
 * Node timers hold at most 2^31-1 ms (24.8 days) and fire after 1 ms when
 * given more: `--mtls_idle_timeout 9999999` would close connections at once
 * and spin the idle sweep. The margin keeps a timeout plus a backstop (the
 * workers' drain) in range.
 */
export const MAX_SECONDS = 2_000_000;

const SECONDS_PER_UNIT: Readonly<Record<string, number>> = { ms: 0.001, s: 1, m: 60, h: 3600 };

/** `: give 60 for 1m`, for a duration written with a unit (as Go, nginx and Kubernetes spell them), which is refused. */
function secondsHint(value: unknown): string {
  const match = /^(\d+(?:\.\d+)?)(ms|s|m|h)$/i.exec(String(value).trim());
  if (!match) return '';
  const seconds = Number((Number(match[1]) * SECONDS_PER_UNIT[match[2]!.toLowerCase()]!).toPrecision(12));
  return `: give ${seconds} for ${match[0]}`;
}

/**
 * A number of seconds as written: digits, with a fraction if need be (2, 0.5); NaN otherwise. Number() took
 * 0x10, 1e3 and Infinity, which whole-number options refuse, and '' for 0: a flag given without a value
 * (`--mtls_handshake_timeout $UNSET`) would be a 1 ms timeout. Blanks around it go, as for whole numbers.
 */
export function plainSeconds(value: unknown): number {
  const text = String(value).trim();
  return /^(?:\d+(?:\.\d*)?|\.\d+)$/.test(text) ? Number(text) : NaN;
}

function parseSeconds(name: string, value: unknown): number {
  const n = plainSeconds(value);
  if (Number.isNaN(n)) throw new ConfigError(`${flag(name)}: '${String(value)}' is not a number of seconds >= 0${secondsHint(value)}`);
  if (n > MAX_SECONDS) throw new ConfigError(`${flag(name)}: '${String(value)}' is more than ${MAX_SECONDS} seconds (23 days), the longest timeout supported`);
  return Math.round(n * 1000);
}

/** `host:port`, `[v6]:port`; the host must be an IP or a plain DNS name. */
export function parseHostPort(name: string, value: unknown): HostPort {
  const text = String(value ?? '').trim();
  const match = /^\[([^\]]+)\]:(\d+)$/.exec(text) ?? /^([^:[\]]+):(\d+)$/.exec(text);
  if (!match || !isHostName(match[1]!)) {
    throw new ConfigError(`${flag(name)}: '${text}' is not host:port (${hostPortExample(text)})`);
  }
  // A scoped address (fe80::1%eth0) has no spelling in the http:// URL the upstream clients are built from.
  if (match[1]!.includes('%')) {
    throw new ConfigError(`${flag(name)}: '${text}': an IPv6 address with a zone (%...) is not supported; give one without (a global or unique local address)`);
  }
  // The whole value, not the port alone: "'0' is not a whole number" did not say which part was meant.
  const port = Number(match[2]);
  if (port < 1 || port > 65535) throw new ConfigError(`${flag(name)}: '${text}': port ${match[2]!} is not between 1 and 65535`);
  return { host: match[1]!, port };
}

/** `::1:9000` is one IPv6 address and no port, `http://ovms:8000` a URL: the spelling meant is shown. */
function hostPortExample(text: string): string {
  // gRPC's target syntax (unix:/path, unix:///path) or a socket's path: "a URL: give host:port alone, :PORT" was no help.
  if (/^unix:/i.test(text) || text.startsWith('/')) return 'a unix socket: the proxy reaches the model server over TCP only; give its host:port, e.g. 127.0.0.1:9000';
  const url = /^([A-Za-z][A-Za-z0-9+.-]*):\/\/([^/?#]*)/.exec(text);
  if (url) {
    const hostPort = /:\d+$/.test(url[2]!) ? url[2]! : `${url[2]!}:PORT`;
    // Users copy OVMS's URLs from its docs; an https:// one also needs telling that the upstream hop has no TLS.
    const plain = /^(https|grpcs)$/i.test(url[1]!) ? '; the model server is reached without TLS, h2c for gRPC and HTTP/1.1 for REST' : '';
    return `a URL: give host:port alone, ${hostPort}${plain}`;
  }
  const colon = text.lastIndexOf(':');
  const host = text.slice(0, colon);
  const port = text.slice(colon + 1);
  if (isIP(host) === 6 && /^\d+$/.test(port)) return `an IPv6 address goes in brackets: [${host}]:${port}`;
  return 'example: 127.0.0.1:9000 or [::1]:9000';
}

/**
 * A DNS name as resolvers take it: labels of letters, digits, hyphens (not at either end) and
 * underscores, which Docker Compose service names may hold (`model_server`) and Docker's DNS
 * resolves, though RFC 1123 host names may not; then an optional root dot (a fully qualified
 * `ovms.ns.svc.cluster.local.`, looked up without the search domains). Both were refused as
 * "not host:port".
 */
const DNS_NAME = /^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?$/;

function isHostName(host: string): boolean {
  return isIP(host) !== 0 || DNS_NAME.test(host);
}

/** Each address that takes a port on every address of its family. */
const WILDCARDS = [['0.0.0.0', 4], ['::', 6]] as const;

export function parseBindAddresses(name: string, value: unknown, fallback: string): string[] {
  const text = value === undefined || value === '' ? fallback : String(value);
  // A repeated address would be a second bind of the same port, refused as "in use".
  // `[::]` as nginx's `listen` and URLs write it, or `0:0::1` for `::1`: the address is the same.
  const hosts = [...new Set(text.split(',').map((h) => canonicalAddress(unbracketed(h.trim()))).filter(Boolean))];
  for (const host of hosts) {
    if (!isHostName(host)) throw new ConfigError(`${flag(name)}: '${host}' is not an IP address or host name`);
  }
  if (hosts.length === 0) throw new ConfigError(`${flag(name)}: no address given`);
  refuseCoveredAddresses(name, hosts);
  return hosts;
}

/**
 * 0.0.0.0 takes the port on every IPv4 address (and :: on every IPv6 one), so
 * a second bind of an address it covers fails, blamed on "another process".
 * `::` next to IPv4 addresses is fine: it is bound IPv6-only then (bindsIpv6Only).
 */
export function refuseCoveredAddresses(name: string, hosts: readonly string[], resolvedFrom: BindSpec['resolvedFrom'] = {}): void {
  for (const [wildcard, family] of WILDCARDS) {
    const covered = hosts.find((host) => host !== wildcard && isIP(host) === family);
    if (hosts.includes(wildcard) && covered !== undefined) {
      const from = resolvedFrom[covered];
      throw new ConfigError(`${flag(name)}: ${wildcard} already covers ${covered}${from === undefined ? '' : ` from ${from}`} (list one or the other)`);
    }
  }
}

/**
 * `::` listed with an IPv4 address is bound IPv6-only, as nginx binds [::]:
 * dual-stack, it would also take the port on the IPv4 addresses and their
 * own bind would fail. Alone, `::` stays dual-stack.
 */
export function bindsIpv6Only(host: string, hosts: readonly string[]): boolean {
  return host === '::' && hosts.some((other) => isIP(other) === 4);
}

/** The option's value as a string (last one wins), or undefined when absent or empty. */
export function optionalString(raw: RawOptions, name: string): string | undefined {
  const v = raw[name];
  if (v === undefined || v === '') return undefined;
  if (Array.isArray(v)) return v.at(-1);
  return String(v);
}

function stringList(raw: RawOptions, name: string, separator: string | RegExp = ','): string[] {
  const v = raw[name];
  if (v === undefined) return [];
  const list = Array.isArray(v) ? v : [v];
  return list.flatMap((item) => String(item).split(separator)).map((s) => s.trim()).filter(Boolean);
}

function requiredString(raw: RawOptions, name: string, hint: string): string {
  const v = optionalString(raw, name);
  if (v === undefined) throw new ConfigError(`${flag(name)} is required (${hint})`);
  return v;
}

const TRUE_WORDS = ['1', 'true', 'yes', 'on'];
const FALSE_WORDS = ['0', 'false', 'no', 'off'];

/** A value a flag takes, in any case: `true`, `0`, `Off`... */
export function isBooleanWord(value: string): boolean {
  return [...TRUE_WORDS, ...FALSE_WORDS].includes(value.toLowerCase());
}

export function parseBoolean(name: string, value: unknown, fallback: boolean): boolean {
  if (value === undefined) return fallback;
  if (typeof value === 'boolean') return value;
  const text = String(value).toLowerCase();
  if (TRUE_WORDS.includes(text)) return true;
  if (FALSE_WORDS.includes(text)) return false;
  throw new ConfigError(`${flag(name)}: '${String(value)}' is not true or false: give one of ${TRUE_WORDS.join(', ')} or ${FALSE_WORDS.join(', ')}`);
}

/** A number of seconds, in ms; absent = `fallbackMs`. */
export function secondsOr(raw: RawOptions, name: string, fallbackMs: number): number {
  const value = raw[name];
  return value === undefined ? fallbackMs : parseSeconds(name, value);
}

/**
 * A timeout that has no "off": 0 (or less than 1 ms) would time out every client at once, a
 * proxy that starts and serves no one, where a reader of `0 = off` elsewhere expects no limit.
 */
function timeoutOr(raw: RawOptions, name: string, fallbackMs: number): number {
  const ms = secondsOr(raw, name, fallbackMs);
  if (ms < 1) {
    throw new ConfigError(`${flag(name)}: '${String(raw[name])}' would time out at once, and this timeout cannot be turned off: give a number of seconds above 0 (default ${fallbackMs / 1000})`);
  }
  return ms;
}

/** Absent = the default; given without a value is an error, as for ports, not the default in disguise. */
function numberOr(raw: RawOptions, name: string, fallback: number, min: number, max: number): number {
  const v = raw[name];
  return v === undefined ? fallback : parseInteger(name, v, min, max);
}

export function parseLimits(raw: RawOptions): Limits {
  const d = DEFAULTS.limits;
  return {
    handshakeTimeoutMs: timeoutOr(raw, 'mtls_handshake_timeout', d.handshakeTimeoutMs),
    idleTimeoutMs: timeoutOr(raw, 'mtls_idle_timeout', d.idleTimeoutMs),
    upstreamConnectTimeoutMs: timeoutOr(raw, 'mtls_upstream_connect_timeout', d.upstreamConnectTimeoutMs),
    maxConnections: numberOr(raw, 'mtls_max_connections', d.maxConnections, 0, 10_000_000),
    maxConcurrentStreams: numberOr(raw, 'mtls_max_concurrent_streams', d.maxConcurrentStreams, 1, 2 ** 31 - 1),
    maxHeaderSize: numberOr(raw, 'mtls_max_header_size', d.maxHeaderSize, 1024, 16 * 1024 * 1024),
    maxSessionMemoryMiB: numberOr(raw, 'mtls_max_session_memory', d.maxSessionMemoryMiB, 1, 64 * 1024),
    streamWindow: numberOr(raw, 'mtls_stream_window', d.streamWindow, 65535, 2 ** 31 - 1),
    connectionWindow: numberOr(raw, 'mtls_connection_window', d.connectionWindow, 65535, 2 ** 31 - 1),
    verifyDepth: numberOr(raw, 'mtls_verify_depth', d.verifyDepth, 1, 100),
    minTlsVersion: parseMinTlsVersion(raw, d.minTlsVersion),
  };
}

/** `1.3`, or `TLSv1.3` as nginx's ssl_protocols and Node's minVersion write it. */
function parseMinTlsVersion(raw: RawOptions, fallback: MinTlsVersion): MinTlsVersion {
  const value = optionalString(raw, 'mtls_min_tls_version');
  if (value === undefined) return fallback;
  const version = value.replace(/^tlsv/i, '');
  if ((MIN_TLS_VERSIONS as readonly string[]).includes(version)) return version as MinTlsVersion;
  const why = /^1(\.[01])?$/.test(version) ? 'TLS 1.0 and 1.1 are never offered (deprecated by RFC 8996)' : 'that is no TLS version';
  throw new ConfigError(`${flag('mtls_min_tls_version')}: '${value}': ${why}; give 1.2 (TLS 1.2 and 1.3, the default) or 1.3 (TLS 1.3 only)`);
}

export function parseAllowList(raw: RawOptions): AllowList {
  return {
    cn: allowRules(raw, 'mtls_allow_cn'),
    ou: allowRules(raw, 'mtls_allow_ou'),
    // DNS names are case-insensitive (RFC 4343): isAllowed compares lower case.
    dns: allowRules(raw, 'mtls_allow_dns').map(dnsRule),
    uri: allowRules(raw, 'mtls_allow_uri'),
    fingerprint: allowRules(raw, 'mtls_allow_fingerprint').map((f) => normalizeFingerprint(f)),
  };
}

/**
 * An allow option given with nothing in it (`--mtls_allow_cn $UNSET_VAR`, `--mtls_allow_cn=`)
 * would leave every list empty, and empty lists admit every client the CA vouches for: the
 * restriction the user asked for would silently be off.
 */
function allowRules(raw: RawOptions, name: string): string[] {
  // `\,` is a comma inside a value: subject names hold commas (CN=Smith\, John), and a plain comma separates values.
  const rules = stringList(raw, name, /(?<!\\),/).map((rule) => rule.replace(/\\,/g, ','));
  if (raw[name] !== undefined && rules.length === 0) {
    throw new ConfigError(`${flag(name)} was given without a value; an empty allow-list would admit every client the CA vouches for (give a value, or leave the option out)`);
  }
  return rules;
}

/**
 * A DNS rule in any case, and in another script as the A-label certificates hold (`certs` writes
 * bücher.example as xn--bcher-kva.example): given as written, it matched no certificate.
 */
function dnsRule(name: string): string {
  const ascii = aLabel(name);
  if (ascii === '') throw new ConfigError(`--mtls_allow_dns: '${name}' is not a host name (no IDNA form)`);
  return ascii.toLowerCase();
}

function normalizeFingerprint(value: string): string {
  const hex = value.replace(/:/g, '').toLowerCase();
  if (!/^[0-9a-f]{64}$/.test(hex)) {
    throw new ConfigError(`--mtls_allow_fingerprint: '${value}' is not a SHA-256 fingerprint (64 hex digits, colons optional)`);
  }
  return hex;
}

/** The option's value (last one wins) when it is one of `choices`, else `fallback` when absent. */
export function parseChoice<T extends string>(raw: RawOptions, name: string, choices: readonly T[], fallback: T): T {
  const value = optionalString(raw, name) ?? fallback;
  if (!(choices as readonly string[]).includes(value)) {
    throw new ConfigError(`--${name}: '${value}' is not one of ${choices.join(', ')}`);
  }
  return value as T;
}

export function parseTlsFiles(raw: RawOptions, defaults?: Partial<TlsFiles>): TlsFiles {
  const hint = 'a PEM file; `ovms-mtls certs init --dir certs` makes a set';
  const pick = (name: string, fallback: string | undefined) => optionalString(raw, name) ?? fallback;
  return {
    cert: pick('mtls_cert', defaults?.cert) ?? requiredString(raw, 'mtls_cert', hint),
    key: pick('mtls_key', defaults?.key) ?? requiredString(raw, 'mtls_key', hint),
    clientCa: pick('mtls_client_ca', defaults?.clientCa) ?? requiredString(raw, 'mtls_client_ca', hint),
    crl: pick('mtls_crl', defaults?.crl),
    ...(optionalString(raw, 'mtls_crl') === undefined && defaults?.crlOptional ? { crlOptional: true } : {}),
  };
}

function parseWorkers(raw: RawOptions): number {
  return numberOr(raw, 'mtls_workers', defaultWorkerCount(), 1, 1024);
}

export interface PublicListenerSpec extends BindSpec {
  readonly port?: number | undefined;
}

/** OVMS refuses this too; the second bind would fail as "the port is already in use", as if by another process. */
export function refuseSharedPublicPort(grpcPort: number, restPort: number): void {
  if (grpcPort > 0 && grpcPort === restPort) {
    throw new ConfigError(`--port and --rest_port are both ${grpcPort}: gRPC and REST need a port each, as for OVMS`);
  }
}

/** The public listeners as OVMS's own options describe them; 0 or absent = off. */
export function parsePublicListeners(raw: RawOptions): { grpc?: PublicListenerSpec; rest?: PublicListenerSpec } {
  const grpcPort = raw['port'] === undefined ? 0 : parsePort('port', lastOf(raw['port']));
  const restPort = raw['rest_port'] === undefined ? 0 : parsePort('rest_port', lastOf(raw['rest_port']));
  refuseSharedPublicPort(grpcPort, restPort);
  const result: { grpc?: PublicListenerSpec; rest?: PublicListenerSpec } = {};
  if (grpcPort > 0) result.grpc = { port: grpcPort, hosts: parseBindAddresses('grpc_bind_address', lastOf(raw['grpc_bind_address']), DEFAULTS.bindAddress) };
  if (restPort > 0) result.rest = { port: restPort, hosts: parseBindAddresses('rest_bind_address', lastOf(raw['rest_bind_address']), DEFAULTS.bindAddress) };
  if (!result.grpc && !result.rest) {
    throw new ConfigError('no public port: give --port (gRPC) and/or --rest_port (REST), as for OVMS');
  }
  return result;
}


/**
 * The admin port on an address a public port also binds: the second bind would fail as
 * "the port is already in use (stop what uses it ...)", sending the user after another process.
 */
export function checkAdminPort(admin: Config['admin'], listeners: { grpc?: PublicListenerSpec; rest?: PublicListenerSpec }): void {
  if (!admin) return;
  for (const [name, spec] of [['port', listeners.grpc], ['rest_port', listeners.rest]] as const) {
    if (spec?.port !== admin.port) continue;
    if (listsClash(admin.hosts, spec.hosts)) throw new ConfigError(`--mtls_admin_port and --${name} are both ${admin.port} on the same address: the admin listener needs a port of its own`);
  }
}

/** One (family, address) a bind takes on its port; `*` = every address of the family. */
interface PortClaim {
  readonly family: number;
  readonly address: string;
}

/**
 * What binding `host` (one of `hosts`) takes, as Linux decides a clash: 0.0.0.0 every IPv4
 * address, `::` every IPv6 one and, dual-stack, every IPv4 one too. 0.0.0.0 and ::1 on the
 * same port do not clash, nor do an IPv6-only `::` and 0.0.0.0. A host name claims nothing
 * here: its addresses are checked once resolved (bind-addresses.ts).
 */
function portClaims(host: string, hosts: readonly string[]): PortClaim[] {
  if (host === '::') return bindsIpv6Only(host, hosts) ? [{ family: 6, address: '*' }] : [{ family: 6, address: '*' }, { family: 4, address: '*' }];
  if (host === '0.0.0.0') return [{ family: 4, address: '*' }];
  const address = canonicalAddress(host);
  const family = isIP(address);
  return family === 0 ? [] : [{ family, address }];
}

/** Could a bind of one list and a bind of the other, on the same port, take the same (family, address)? */
function listsClash(hosts: readonly string[], others: readonly string[]): boolean {
  const theirs = others.flatMap((host) => portClaims(host, others));
  return hosts.flatMap((host) => portClaims(host, hosts)).some((mine) => theirs.some((other) => claimsOverlap(mine, other)));
}

function claimsOverlap(a: PortClaim, b: PortClaim): boolean {
  return a.family === b.family && (a.address === '*' || b.address === '*' || a.address === b.address);
}

/** `0:0::1` and `::1` are one address (and one bind), `::ffff:127.0.0.1` and 127.0.0.1 too; IPv4 has one spelling already (isIP refuses the others). */
export function canonicalAddress(host: string): string {
  if (isIP(host) !== 6) return host;
  const [address, zone] = host.split('%');
  const canonical = new SocketAddress({ address: address!, family: 'ipv6' }).address;
  // An IPv4-mapped address reaches only that IPv4 address's clients, so it takes its port:
  // as itself, its clash with 127.0.0.1 or 0.0.0.0 is named as such, not as "in use".
  return zone === undefined ? clientAddress(canonical)! : `${canonical}%${zone}`;
}

function lastOf(value: RawOptions[string]): RawOptions[string] {
  return Array.isArray(value) ? value.at(-1) : value;
}

/** A count of upstream connections in relay mode would be taken and do nothing: relay gives each client its own connection. */
function refuseTerminateOnlyOptions(raw: RawOptions, grpcMode: ForwardMode): void {
  if (grpcMode !== 'relay' || raw['mtls_grpc_upstream_connections'] === undefined) return;
  throw new ConfigError('--mtls_grpc_upstream_connections applies to --mtls_grpc_mode terminate only: in relay mode each client gets its own connection to the model server; drop the option (or OVMS_MTLS_GRPC_UPSTREAM_CONNECTIONS)');
}

/** Everything except the listeners, shared by `proxy` and the OVMS entrypoint. */
export function parseCommonConfig(raw: RawOptions, tlsDefaults?: Partial<TlsFiles>): Omit<Config, 'grpc' | 'rest'> {
  const adminPort = raw['mtls_admin_port'] === undefined ? 0 : parsePort('mtls_admin_port', raw['mtls_admin_port']);
  const grpcMode = parseChoice(raw, 'mtls_grpc_mode', FORWARD_MODES, DEFAULTS.grpcMode);
  refuseTerminateOnlyOptions(raw, grpcMode);
  return {
    tls: parseTlsFiles(raw, tlsDefaults),
    allow: parseAllowList(raw),
    limits: parseLimits(raw),
    shutdownTimeoutMs: secondsOr(raw, 'mtls_shutdown_timeout', DEFAULTS.shutdownTimeoutSeconds * 1000),
    logLevel: parseChoice(raw, 'mtls_log_level', LOG_LEVELS, DEFAULTS.logLevel),
    accessLog: parseBoolean('mtls_access_log', raw['mtls_access_log'], DEFAULTS.accessLog),
    admin: adminPort > 0 ? { port: adminPort, hosts: parseBindAddresses('mtls_admin_bind_address', raw['mtls_admin_bind_address'], DEFAULTS.adminBindAddress) } : undefined,
    workers: parseWorkers(raw),
    grpcMode,
    grpcUpstreamConnections: numberOr(raw, 'mtls_grpc_upstream_connections', DEFAULTS.grpcUpstreamConnections, 1, DEFAULTS.maxGrpcUpstreamConnections),
    restMode: parseChoice(raw, 'mtls_rest_mode', FORWARD_MODES, DEFAULTS.restMode),
    ocsp: parseOcsp(raw),
    proxyProtocol: parseProxyProtocol(raw),
  };
}

/** `--mtls_proxy_protocol` and the load balancers it may be narrowed to; `_from` without it would do nothing, so it is refused. */
function parseProxyProtocol(raw: RawOptions): ProxyProtocolSettings | undefined {
  const on = parseBoolean('mtls_proxy_protocol', raw['mtls_proxy_protocol'], false);
  const from = stringList(raw, 'mtls_proxy_protocol_from');
  if (raw['mtls_proxy_protocol_from'] !== undefined && from.length === 0) {
    throw new ConfigError('--mtls_proxy_protocol_from was given without a value: give the load balancers\' addresses or ranges (10.0.0.0/8, 192.0.2.7, 2001:db8::/32), or leave it out for every connection to carry a header');
  }
  if (!on) {
    if (from.length > 0) throw new ConfigError('--mtls_proxy_protocol_from applies only with --mtls_proxy_protocol: add --mtls_proxy_protocol, or drop --mtls_proxy_protocol_from');
    return undefined;
  }
  return { from: from.map(subnetOf) };
}

function subnetOf(text: string): Subnet {
  const subnet = parseSubnet(text);
  if (subnet === undefined) throw new ConfigError(`--mtls_proxy_protocol_from: '${text}' is not an IP address or a CIDR range (give e.g. 10.0.0.0/8, 192.0.2.7 or 2001:db8::/32)`);
  return subnet;
}

/** `--mtls_ocsp` and its companions; those given without it would silently do nothing, so they are refused. */
function parseOcsp(raw: RawOptions): OcspSettings | undefined {
  const mode = parseChoice(raw, 'mtls_ocsp', OCSP_MODES, 'off');
  const responder = optionalString(raw, 'mtls_ocsp_responder');
  if (mode === 'off') {
    const stray = ['mtls_ocsp_responder', 'mtls_ocsp_timeout'].find((name) => raw[name] !== undefined);
    if (stray) throw new ConfigError(`--${stray} applies only with --mtls_ocsp leaf or chain: add --mtls_ocsp, or drop --${stray}`);
    return undefined;
  }
  return { mode, responder: responder === undefined ? undefined : parseResponderUrl(responder), timeoutMs: timeoutOr(raw, 'mtls_ocsp_timeout', DEFAULTS.ocspTimeoutSeconds * 1000) };
}

function parseResponderUrl(value: string): string {
  const hint = 'give an http:// URL, e.g. http://ocsp.example.com/ or http://10.0.0.5:2560/ocsp';
  if (!URL.canParse(value)) throw new ConfigError(`--mtls_ocsp_responder: '${value}' is not a URL (${hint})`);
  const url = new URL(value);
  if (url.protocol !== 'http:') throw new ConfigError(`--mtls_ocsp_responder: '${value}' is not http:// (OCSP is asked over plain HTTP, its answers being signed; ${hint})`);
  if (url.username || url.password) throw new ConfigError(`--mtls_ocsp_responder: '${value}' holds a user name or password, which OCSP does not use (${hint})`);
  return url.href;
}

/**
 * One worker per CPU this process may use: the CPUs it may run on, capped by a
 * cgroup CPU quota (a Kubernetes CPU limit of 2 on a 64-core node means 2).
 */
export function defaultWorkerCount(quotaCpus: number | undefined = cgroupCpuQuota()): number {
  return Math.max(1, Math.min(availableParallelism(), quotaCpus ?? Infinity));
}

/** The cgroup v1 line for the cpu controller, alone or mounted with others (`4:cpu,cpuacct:/kubepods/...`). */
const V1_CPU_CGROUP = /^\d+:(?:[^:]*,)?cpu(?:,[^:]*)?:(\/.*)$/m;

/**
 * The tightest CPU quota on this process, in CPUs: its own cgroup's and those of the cgroups above
 * it, in cgroup v2 (`cpu.max`) and in cgroup v1 (`cpu.cfs_quota_us`, under the cpu controller's
 * mount). v1 is what Docker and Kubernetes use on hosts still booted with it (RHEL 8, Amazon Linux
 * 2): read v2 alone, a CPU limit of 2 there left one worker per CPU of the node, each some 40 MB of its own.
 * In a container (a cgroup namespace of its own) the process's cgroup is the root it sees, `/`; a
 * systemd service sits at /system.slice/NAME.service, where CPUQuota= puts its quota (a slice
 * above may hold one too), and the root of the hierarchy has none. A v1 container without a
 * namespace of its own is shown its host path, which does not exist under the mount: the walk up
 * reaches the mount's root, which is the container's own cgroup.
 */
export function cgroupCpuQuota(procSelfCgroup = textOrEmpty('/proc/self/cgroup'), root = '/sys/fs/cgroup'): number | undefined {
  const v2 = tightestUpFrom(/^0::(\/.*)$/m.exec(procSelfCgroup)?.[1] ?? '/', (dir) => cpusFromCgroupQuota(textOrEmpty(posix.join(root, dir, 'cpu.max'))));
  const v1Own = V1_CPU_CGROUP.exec(procSelfCgroup)?.[1];
  const v1 = v1Own === undefined ? undefined : tightestUpFrom(v1Own, (dir) => cpusFromV1Quota(posix.join(root, 'cpu', dir)));
  return v1 === undefined || (v2 !== undefined && v2 < v1) ? v2 : v1;
}

/** The smallest quota of cgroup `own` and those above it; a path outside our namespace (/../..) has none of it visible. */
function tightestUpFrom(own: string, quotaOf: (dir: string) => number | undefined): number | undefined {
  let dir = own.split('/').includes('..') ? '/' : own;
  let tightest: number | undefined;
  for (;;) {
    const cpus = quotaOf(dir);
    if (cpus !== undefined && (tightest === undefined || cpus < tightest)) tightest = cpus;
    if (dir === '/') return tightest;
    dir = posix.dirname(dir);
  }
}

/** cgroup v1 keeps quota and period in two files; a quota of -1 is none. */
function cpusFromV1Quota(dir: string): number | undefined {
  const quota = textOrEmpty(posix.join(dir, 'cpu.cfs_quota_us')).trim();
  const period = textOrEmpty(posix.join(dir, 'cpu.cfs_period_us')).trim();
  return cpusFromCgroupQuota(`${quota} ${period}`);
}

/** `cpu.max` holds "QUOTA PERIOD" or "max PERIOD"; undefined when there is no quota. */
export function cpusFromCgroupQuota(cpuMax: string | undefined): number | undefined {
  const [quota, period] = (cpuMax ?? '').trim().split(/\s+/);
  const q = Number(quota);
  const p = Number(period);
  if (!Number.isFinite(q) || !Number.isFinite(p) || q <= 0 || p <= 0) return undefined;
  return Math.max(1, Math.ceil(q / p));
}

function textOrEmpty(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return '';
  }
}
