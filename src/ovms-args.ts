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
import { isBooleanWord, parseBoolean } from './config.js';
import { MTLS_OPTIONS, PUBLIC_OPTIONS, closestName, envVarName, optionNeedsValue, optionSpec, refuseBlankText, type OptionSpec, type RawOptions } from './options.js';

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

/** Non-serving flags that took a path in later OVMS releases: in neither list below. */
const FLAG_OR_VALUE = new Set(['add_to_config', 'remove_from_config']);

/**
 * OVMS's boolean flags (cxxopts `value<bool>`, implicit value true): they take a value only
 * as `--flag=value` and never consume the next argument.
 */
const OVMS_FLAGS = new Set([
  ...NON_SERVING_FLAGS.filter((flag) => !FLAG_OR_VALUE.has(flag)),
  'help', 'metrics_enable', 'allow_credentials', 'overwrite_models', 'verbose_response',
  'stateful', 'idle_sequence_cleanup', 'low_latency_transformation', 'draft_eagle3_mode',
]);

/**
 * OVMS options that take a value (cli_parser.cpp and the --task parsers in graph_export/). cxxopts gives such
 * an option the next argument whatever it is, so one left without a value would take
 * whatever comes next: another of the user's options, or the `--port` we append.
 */
const OVMS_VALUE_OPTIONS = new Set([
  'grpc_workers', 'grpc_max_threads', 'grpc_memory_quota', 'rest_workers', 'log_level', 'log_path', 'trace_path',
  'grpc_channel_arguments', 'file_system_poll_wait_seconds', 'sequence_cleaner_poll_wait_minutes',
  'custom_node_resources_cleaner_interval_seconds', 'cache_dir', 'metrics_list', 'cpu_extension', 'allowed_local_media_path',
  'allowed_origins', 'allowed_methods', 'allowed_headers', 'config_path', 'source_model', 'gguf_filename',
  'model_repository_path', 'task', 'weight-format', 'extra_quantization_params', 'model_name', 'model_path', 'batch_size',
  'shape', 'layout', 'model_version_policy', 'nireq', 'target_device', 'plugin_config', 'max_sequence_number',
  'max_num_seqs', 'pipeline_type', 'enable_prefix_caching', 'max_num_batched_tokens', 'cache_size', 'draft_source_model',
  'dynamic_split_fuse', 'reasoning_parser', 'tool_parser', 'enable_tool_guided_generation', 'kv_cache_precision',
  'max_prompt_len', 'model_distribution_policy', 'api_key_file', 'allowed_media_domains', 'source_loras', 'vocoder', 'mean',
  'scale', 'color_format', 'precision', 'cache_interval_multiplier', 'num_streams', 'normalize', 'truncate', 'pooling',
  'max_length', 'resolution', 'max_resolution', 'default_resolution', 'num_images_per_prompt', 'guidance_scale',
  'max_num_images_per_prompt', 'default_num_inference_steps', 'max_num_inference_steps',
]);

/** Proxy-mode options: meaningless here because OVMS's loopback ports are chosen at start. */
const PROXY_ONLY = new Set(['mtls_grpc_upstream', 'mtls_rest_upstream']);

const MTLS_BY_NAME = new Map(MTLS_OPTIONS.map((spec) => [spec.name, spec]));
const PUBLIC_BY_NAME = new Map(PUBLIC_OPTIONS.map((spec) => [spec.name, spec]));

export interface LongOption {
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

/**
 * A flag takes its value only as `--flag=value`, as cxxopts does for OVMS's own
 * flags: `--mtls_access_log false` would turn the access log ON and hand OVMS a
 * stray `false`, which it refuses as an unmatched argument after our listeners
 * are up. Refused here, naming the spelling that works.
 */
function flagValue(option: LongOption, next: string | undefined): string | true {
  refuseSeparateFlagValue(option, next);
  return option.inlineValue ?? true;
}

/**
 * Ours and OVMS's flags alike (`--metrics_enable false` makes OVMS exit 64, after our listeners are up).
 * `spelling` gives the word the suggested `--flag=WORD` takes: ours read every boolean word.
 */
export function refuseSeparateFlagValue(option: LongOption, next: string | undefined, spelling: (word: string) => string = (word) => word): void {
  if (option.inlineValue === undefined && next !== undefined && isBooleanWord(next)) {
    throw new ConfigError(`--${option.name} is a flag and takes no separate value: write --${option.name}=${spelling(next)} (or --${option.name} alone for true)`);
  }
}

/**
 * cxxopts reads a flag's value as t, T, true, True, 1 or their false counterparts, and nothing else:
 * `--metrics_enable=TRUE` or `=yes` makes OVMS exit 64 ("Argument 'TRUE' failed to parse").
 */
function cxxoptsWord(word: string): string {
  return parseBoolean('', word, false) ? 'true' : 'false';
}

/** `next` can be the value of a value-taking option: a `--` option after it is a missing value instead. */
function isValue(next: string | undefined): next is string {
  return next !== undefined && !next.startsWith('--');
}

/** Takes the value of a value-taking option; `next` is the following argument. */
function optionValue(option: LongOption, next: string | undefined): { value: string; consumed: number } {
  if (option.inlineValue !== undefined) return { value: option.inlineValue, consumed: 0 };
  if (!isValue(next)) throw optionNeedsValue(option.name);
  return { value: next, consumed: 1 };
}

/** An option of OVMS's or ours, as opposed to a value that merely starts with `--` (`--extra_quantization_params --sym`). */
function isKnownOption(arg: string): boolean {
  const name = longOption(arg)?.name;
  if (name === undefined) return false;
  return name.startsWith('mtls_') || PUBLIC_BY_NAME.has(name) || OVMS_FLAGS.has(name) || OVMS_VALUE_OPTIONS.has(name);
}

/**
 * The argv elements an OVMS option of the user's takes: itself, and its value when given
 * separately. A value-taking option takes the next argument, as cxxopts does, unless there
 * is none or it is an option we know: then the value was forgotten, and the option would
 * take the next option (or the `--port` we append) as its value. An option we do not know
 * (a newer OVMS) takes the next argument when that is no option; otherwise it may be a flag
 * and stands alone.
 */
function ovmsOption(option: LongOption, arg: string, next: string | undefined): string[] {
  if (OVMS_FLAGS.has(option.name)) {
    refuseSeparateFlagValue(option, next, cxxoptsWord);
    return [arg];
  }
  if (option.inlineValue !== undefined) return [arg];
  if (OVMS_VALUE_OPTIONS.has(option.name)) {
    if (next === undefined || isKnownOption(next)) throw optionNeedsValue(option.name);
    return [arg, next];
  }
  return next !== undefined && longOption(next) === undefined ? [arg, next] : [arg];
}

/**
 * An option of the user's that OVMS would get last without a value: the listener options
 * we append come right after it, and it would take our `--port` as its value (and OVMS our
 * port number as a stray argument). A known value-taking option never gets here without its
 * value (ovmsOption); an unknown one may be a flag of a newer OVMS, which `=true` makes certain.
 */
function unknownOptionLast(name: string): ConfigError {
  return new ConfigError(`--${name} has no value and is not an OVMS flag ovms-mtls knows: give it a value (--${name}=VALUE), or write --${name}=true if it is a flag`);
}

/** `--port 9000` as ONE argument, where no value-taking option came before it: cxxopts sees no option in it. */
function joinedOption(arg: string): boolean {
  return /^--[A-Za-z0-9][\w.-]*\s/.test(arg);
}

/**
 * A command line given as one string (Kubernetes `args: ["--port 9000 --rest_port 8000 ..."]`)
 * reached OVMS as a stray argument it refuses (exit 64), after our listeners were up; with every
 * option in it, the wrapper said "no public port: give --port", naming what the user had given.
 */
function joinedArgument(arg: string): ConfigError {
  const firstWords = arg.trim().split(/\s+/).slice(0, 2).map((word) => `'${word}'`).join(', ');
  return new ConfigError(`'${arg}' is one argument, from which OVMS reads no option (it would exit 64): give each option and each value as an argument of its own (${firstWords}, ...; in Kubernetes args, one list item each)`);
}

function store(target: RawOptions, spec: OptionSpec, value: string | boolean): void {
  if (spec.type === 'array') {
    const previous = target[spec.name];
    target[spec.name] = [...(Array.isArray(previous) ? previous : []), String(value)];
  } else {
    target[spec.name] = value;
  }
}

/**
 * One of ours written with dashes or capitals (`--mtls-cert`, `--MTLS_KEY=`). No OVMS option starts so,
 * yet it went to OVMS as one of OVMS's, with its value: the wrapper served with other certificates
 * (those mounted at /certs) until OVMS refused the option (exit 64), or said "--mtls_cert:
 * /certs/server.pem does not exist", a path the user never gave.
 */
function misspelledOwnOption(name: string): ConfigError | undefined {
  const canonical = name.toLowerCase().replace(/-/g, '_');
  if (name.startsWith('mtls_') || !canonical.startsWith('mtls_')) return undefined;
  const meant = MTLS_BY_NAME.has(canonical) ? canonical : closestName(canonical, MTLS_BY_NAME.keys());
  const spelling = meant === undefined ? '' : `: --${meant}`;
  return new ConfigError(`unknown option --${name} (ovms-mtls writes its options in lower case with underscores${spelling}; see \`ovms-mtls --help\`)`);
}

function mtlsSpec(name: string): OptionSpec {
  const spec = MTLS_BY_NAME.get(name);
  if (!spec) {
    const meant = closestName(name, MTLS_BY_NAME.keys());
    throw new ConfigError(`unknown option --${name} (${meant === undefined ? '' : `did you mean --${meant}? `}options starting with mtls_ belong to ovms-mtls; see \`ovms-mtls --help\`)`);
  }
  if (PROXY_ONLY.has(name)) {
    throw new ConfigError(`--${name} is for \`ovms-mtls proxy\`; as the OVMS entrypoint, OVMS runs on loopback ports chosen at start`);
  }
  return spec;
}

/** Splits an OVMS-style argv; throws a ConfigError naming the flag on mistakes. `env`: for OVMS_MTLS_OVMS_HELP. */
export function splitOvmsArgv(argv: readonly string[], env: NodeJS.ProcessEnv = {}): SplitOvmsArgv {
  const mtls: RawOptions = {};
  const listeners: RawOptions = {};
  const passthrough: string[] = [];
  let help = false;
  let nonServing: string | undefined;
  /** The last argument OVMS gets, when it is an unknown option standing alone. */
  let openOption: string | undefined;
  /** The first option written together with its value in one argument (`--port 9000`). */
  let joined: string | undefined;
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i]!;
    if (arg === '--') {
      // cxxopts would hand everything after `--` to OVMS as positionals, where
      // our loopback options appended at the end would be ignored.
      throw new ConfigError("'--' is not supported: OVMS takes no positional arguments");
    }
    if (arg === '-h') { help = true; continue; }
    const option = longOption(arg);
    if (!option) {
      if (joinedOption(arg)) joined ??= arg;
      passthrough.push(arg);
      openOption = undefined;
      continue;
    }
    const { name } = option;
    const misspelled = misspelledOwnOption(name);
    if (misspelled) throw misspelled;
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
    const taken = ovmsOption(option, arg, argv[i + 1]);
    passthrough.push(...taken);
    openOption = taken.length === 1 && option.inlineValue === undefined && !OVMS_FLAGS.has(name) ? name : undefined;
    i += taken.length - 1;
  }
  const mode = modeOf(help, nonServing, mtls, env);
  if (mode.kind !== 'help') refuseBlankValues({ ...listeners, ...mtls });
  // Only when serving do our options follow the user's; a one-shot run gets their argv as is.
  if (mode.kind === 'serve' && openOption !== undefined) throw unknownOptionLast(openOption);
  if (mode.kind === 'serve' && joined !== undefined) throw joinedArgument(joined);
  return { mode, mtls, listeners, passthrough };
}

/**
 * As in `proxy`, a text option whose last value is blank is refused: taken for absent,
 * `--grpc_bind_address=` bound every address and `--mtls_crl ""` served without revocation checks.
 */
function refuseBlankValues(given: RawOptions): void {
  for (const [name, value] of Object.entries(given)) refuseBlankText(optionSpec(name)!, value);
}

/**
 * A value that is no boolean word (`--mtls_ovms_help=flase`) is refused, as for every other flag:
 * taken as true, it printed OVMS's help and exited 0 where the user had meant to serve.
 */
function modeOf(help: boolean, nonServing: string | undefined, mtls: RawOptions, env: NodeJS.ProcessEnv): OvmsMode {
  if (help) return { kind: 'help' };
  if (parseBoolean('mtls_ovms_help', mtls['mtls_ovms_help'], false)) return { kind: 'ovms-help' };
  if (nonServing === 'version') return { kind: 'version' };
  if (nonServing !== undefined) return { kind: 'direct', flag: nonServing };
  if (mtls['mtls_ovms_help'] === undefined && ovmsHelpFromEnv(env)) return { kind: 'ovms-help' };
  return { kind: 'serve' };
}

/**
 * OVMS_MTLS_OVMS_HELP, as every option may come from the environment. The command line wins
 * (`--mtls_ovms_help=false`), and it turns only a run that would serve into the help.
 */
function ovmsHelpFromEnv(env: NodeJS.ProcessEnv): boolean {
  const value = env[envVarName('mtls_ovms_help')];
  return value !== undefined && value !== '' && parseBoolean('mtls_ovms_help', value, false);
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

/**
 * How many gRPC servers OVMS starts on its port, as grpcservermodule.cpp counts them: the
 * GRPC_SERVERS environment variable when it is a positive integer, else --grpc_workers (at
 * least 1). Each is a listener of its own under SO_REUSEPORT, reached only by the connections
 * the kernel hands it. A value OVMS itself would refuse counts as 1 (OVMS then exits and
 * says why).
 */
export function ovmsGrpcServers(passthrough: readonly string[], env: NodeJS.ProcessEnv): number {
  const positive = (value: string | undefined) => (value !== undefined && /^\s*\d+\s*$/.test(value) ? Number(value) : 0);
  return positive(env['GRPC_SERVERS']) || positive(lastValueOf(passthrough, 'grpc_workers')) || 1;
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
