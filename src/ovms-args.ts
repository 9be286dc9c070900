/**
 * Splits an OVMS command line into what ovms-mtls owns and what OVMS gets.
 *
 * OVMS parses with cxxopts: `--opt value` and `--opt=value` both work and a
 * repeated option keeps its LAST value. The nginx example only understood
 * `--port N`, so `--port=N` or `--grpc_bind_address=0.0.0.0` slipped through
 * and OVMS listened publicly without TLS (FINDINGS). Here every spelling of
 * the four listener options is taken out, wherever it appears; everything
 * else reaches OVMS as the same argv elements, untouched.
 */
import { ConfigError } from './errors.js';
import { MTLS_OPTIONS, PUBLIC_OPTIONS, type OptionSpec, type RawOptions } from './options.js';

/** What the command line asks for. */
export type OvmsMode =
  /** Start OVMS on loopback behind the mTLS listeners. */
  | { readonly kind: 'serve' }
  /** Our own help. */
  | { readonly kind: 'help' }
  /** Our version, then OVMS's. */
  | { readonly kind: 'version' }
  /** OVMS's own --help (`--mtls_ovms_help`). */
  | { readonly kind: 'ovms-help' }
  /** A non-serving OVMS invocation (--pull, --list_models ...): run OVMS as is, nothing listens. */
  | { readonly kind: 'direct'; readonly flag: string };

export interface SplitOvmsArgv {
  readonly mode: OvmsMode;
  /** Our `--mtls_*` options by name; scalars keep the last value, arrays collect all. */
  readonly mtls: RawOptions;
  /** `port`, `rest_port`, `grpc_bind_address`, `rest_bind_address`: the public listeners (last value wins). */
  readonly listeners: RawOptions;
  /** Every other argument, in order, exactly as given. */
  readonly passthrough: readonly string[];
}

/** OVMS flags that make it do one job and exit instead of serving. */
export const NON_SERVING_FLAGS: readonly string[] = ['version', 'pull', 'list_models', 'add_to_config', 'remove_from_config', 'configure'];

/** Proxy-mode options: meaningless here because OVMS's loopback ports are chosen at start. */
const PROXY_ONLY = new Set(['mtls_grpc_upstream', 'mtls_rest_upstream']);

const MTLS_BY_NAME = new Map(MTLS_OPTIONS.map((spec) => [spec.name, spec]));
const PUBLIC_BY_NAME = new Map(PUBLIC_OPTIONS.map((spec) => [spec.name, spec]));

interface LongOption {
  readonly name: string;
  /** Set for the `--name=value` spelling. */
  readonly inlineValue: string | undefined;
}

/** `--name` or `--name=value`; undefined for anything else (values, short options, `--`). */
function longOption(arg: string): LongOption | undefined {
  const match = /^--([A-Za-z0-9][\w.-]*)(?:=([\s\S]*))?$/.exec(arg);
  if (!match) return undefined;
  return { name: match[1]!, inlineValue: match[2] };
}

const FALSE_WORDS = ['false', '0', 'no', 'off'];
const BOOLEAN_WORDS = [...FALSE_WORDS, 'true', '1', 'yes', 'on'];

function isFalse(value: string): boolean {
  return FALSE_WORDS.includes(value.toLowerCase());
}

function isBooleanWord(value: string | undefined): boolean {
  return value !== undefined && BOOLEAN_WORDS.includes(value.toLowerCase());
}

/**
 * A flag takes its value only as `--flag=value`, as cxxopts does for OVMS's own
 * flags: `--mtls_access_log false` would turn the access log ON and hand OVMS a
 * stray `false`, which it refuses as an unmatched argument after our listeners
 * are up. Refused here, naming the spelling that works.
 */
function flagValue(option: LongOption, next: string | undefined): string | true {
  if (option.inlineValue !== undefined) return option.inlineValue;
  if (isBooleanWord(next)) {
    throw new ConfigError(`--${option.name} is a flag and takes no separate value: write --${option.name}=${next} (or --${option.name} alone for true)`);
  }
  return true;
}

/** Takes the value of a value-taking option; `next` is the following argument. */
function optionValue(option: LongOption, next: string | undefined): { value: string; consumed: number } {
  if (option.inlineValue !== undefined) return { value: option.inlineValue, consumed: 0 };
  if (next === undefined || next.startsWith('--')) {
    throw new ConfigError(`--${option.name} needs a value (--${option.name} VALUE or --${option.name}=VALUE)`);
  }
  return { value: next, consumed: 1 };
}

function store(target: RawOptions, spec: OptionSpec, value: string | boolean): void {
  if (spec.type === 'array') {
    const previous = target[spec.name];
    target[spec.name] = [...(Array.isArray(previous) ? previous : []), String(value)];
  } else {
    target[spec.name] = value;
  }
}

function mtlsSpec(name: string): OptionSpec {
  const spec = MTLS_BY_NAME.get(name);
  if (!spec) throw new ConfigError(`unknown option --${name} (options starting with mtls_ belong to ovms-mtls; see \`ovms-mtls --help\`)`);
  if (PROXY_ONLY.has(name)) {
    throw new ConfigError(`--${name} is for \`ovms-mtls proxy\`; as the OVMS entrypoint, OVMS runs on loopback ports chosen at start`);
  }
  return spec;
}

/** Splits an OVMS-style argv; throws a ConfigError naming the flag on mistakes. */
export function splitOvmsArgv(argv: readonly string[]): SplitOvmsArgv {
  const mtls: RawOptions = {};
  const listeners: RawOptions = {};
  const passthrough: string[] = [];
  let help = false;
  let nonServing: string | undefined;
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i]!;
    if (arg === '--') {
      // cxxopts would hand everything after `--` to OVMS as positionals, where
      // our loopback options appended at the end would be ignored.
      throw new ConfigError("'--' is not supported: OVMS takes no positional arguments");
    }
    if (arg === '-h') { help = true; continue; }
    const option = longOption(arg);
    if (!option) { passthrough.push(arg); continue; }
    const { name } = option;
    if (name.startsWith('mtls_')) {
      const spec = mtlsSpec(name);
      if (spec.type === 'boolean') {
        store(mtls, spec, flagValue(option, argv[i + 1]));
      } else {
        const { value, consumed } = optionValue(option, argv[i + 1]);
        store(mtls, spec, value);
        i += consumed;
      }
      continue;
    }
    const publicSpec = PUBLIC_BY_NAME.get(name);
    if (publicSpec) {
      const { value, consumed } = optionValue(option, argv[i + 1]);
      listeners[publicSpec.name] = value;
      i += consumed;
      continue;
    }
    if (name === 'help') { help = true; continue; }
    // OVMS picks its mode by presence (cxxopts count()), whatever the value: `--pull=false` still pulls.
    if (NON_SERVING_FLAGS.includes(name)) nonServing ??= name;
    passthrough.push(arg);
  }
  return { mode: modeOf(help, nonServing, mtls), mtls, listeners, passthrough };
}

function modeOf(help: boolean, nonServing: string | undefined, mtls: RawOptions): OvmsMode {
  if (help) return { kind: 'help' };
  const ovmsHelp = mtls['mtls_ovms_help'];
  if (ovmsHelp === true || (typeof ovmsHelp === 'string' && !isFalse(ovmsHelp))) return { kind: 'ovms-help' };
  if (nonServing === 'version') return { kind: 'version' };
  if (nonServing !== undefined) return { kind: 'direct', flag: nonServing };
  return { kind: 'serve' };
}

/** OVMS's own loopback listeners; a port is present only for a listener the user asked for. */
export interface LoopbackPorts {
  readonly grpc?: number | undefined;
  readonly rest?: number | undefined;
}

export const LOOPBACK_HOST = '127.0.0.1';

export interface ServeArgvOptions {
  /**
   * True when every gRPC client reaches OVMS over the proxy's one upstream connection
   * (`--mtls_grpc_mode terminate`); in relay mode each client has a connection of its own.
   */
  readonly sharedGrpcConnection: boolean;
}

/**
 * OVMS limits the streams of each gRPC connection, "from a single client", to its core
 * count unless --grpc_channel_arguments sets grpc.max_concurrent_streams (grpcservermodule.cpp,
 * setDefaultGrpcChannelArgs). Over one shared connection that would cap all clients together:
 * on 2 cores, two open ModelStreamInfer streams would leave every other call waiting. Our
 * own per-client limit is --mtls_max_concurrent_streams. The largest value OVMS's stoi takes.
 */
export const UNCAPPED_OVMS_STREAMS = 2147483647;

/** The value of the last `--name V` / `--name=V` in an argv, as cxxopts keeps it. */
function lastValueOf(args: readonly string[], name: string): string | undefined {
  let value: string | undefined;
  for (let i = 0; i < args.length; i += 1) {
    const option = longOption(args[i]!);
    if (option?.name !== name) continue;
    if (option.inlineValue !== undefined) {
      value = option.inlineValue;
    } else if (i + 1 < args.length) {
      value = args[i + 1];
      i += 1;
    }
  }
  return value;
}

/** The user's channel arguments plus the lifted stream cap; undefined when the user set the cap (their choice stands). */
function uncappedChannelArguments(userValue: string | undefined): string | undefined {
  const entries = (userValue ?? '').split(',').filter((entry) => entry.trim() !== '');
  const key = (entry: string) => entry.split('=')[0]!.replace(/\s/g, '');
  if (entries.some((entry) => key(entry) === 'grpc.max_concurrent_streams')) return undefined;
  return [...entries, `grpc.max_concurrent_streams=${UNCAPPED_OVMS_STREAMS}`].join(',');
}

/**
 * The argv OVMS is started with: the user's arguments, then ours. Ours come
 * last so that, with OVMS's last-one-wins rule, they win even over a spelling
 * this module failed to recognise. Both bind addresses are always given: an
 * OVMS version that starts gRPC by default must not start it publicly.
 */
export function ovmsServeArgv(passthrough: readonly string[], ports: LoopbackPorts, options: ServeArgvOptions = { sharedGrpcConnection: false }): string[] {
  const args = [...passthrough];
  // 0 when gRPC is off: older OVMS releases default --port to 9178 and would take that port on loopback.
  args.push('--port', String(ports.grpc ?? 0));
  const channelArguments = ports.grpc !== undefined && options.sharedGrpcConnection ? uncappedChannelArguments(lastValueOf(passthrough, 'grpc_channel_arguments')) : undefined;
  // After the user's, so that by last-one-wins this merged list is the one OVMS applies.
  if (channelArguments !== undefined) args.push('--grpc_channel_arguments', channelArguments);
  args.push('--grpc_bind_address', LOOPBACK_HOST);
  if (ports.rest !== undefined) args.push('--rest_port', String(ports.rest));
  args.push('--rest_bind_address', LOOPBACK_HOST);
  return args;
}
