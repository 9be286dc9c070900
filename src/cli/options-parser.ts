import yargsFactory from 'yargs';
import type { Argv, Options } from 'yargs';
import { ConfigError } from '../errors.js';
import { parseBoolean } from '../config.js';
import { closestName, optionsFromEnv, envVarName, refuseBlankText, type OptionSpec, type RawOptions } from '../options.js';
import { refuseSeparateFlagValue } from '../ovms-args.js';

/**
 * yargs settings shared by every command: snake_case names as OVMS spells them, no magic. Its dot
 * notation made `--mtls_allow_cn.x alice` an allow-list of the CN "[object Object]", and its negation
 * `--no-mtls_allow_cn` one of the CN "false": both are unknown options now.
 */
export const PARSER_CONFIGURATION = {
  'camel-case-expansion': false,
  'dot-notation': false,
  'boolean-negation': false,
  'strip-aliased': true,
  'duplicate-arguments-array': true,
  'flatten-duplicate-arrays': true,
} as const;

export function yargsOption(spec: OptionSpec): Options {
  // Numbers stay strings here: config.ts validates them with messages that name the flag.
  const type = spec.type === 'array' ? 'array' : spec.type === 'boolean' ? 'boolean' : 'string';
  const option: Options = {
    type,
    // `choices` are listed in the text, not enforced by yargs: its error is several lines; config.ts validates.
    describe: `${spec.describe}${spec.choices ? ` (${spec.choices.join('|')})` : ''} [env ${envVarName(spec.name)}]`,
    ...(spec.defaultDescription ? { defaultDescription: spec.defaultDescription } : {}),
  };
  if (spec.type === 'array') option.string = true;
  return option;
}

export function addOptions(y: Argv, specs: readonly OptionSpec[]): Argv {
  for (const spec of specs) y.option(spec.name, yargsOption(spec));
  return y;
}

/**
 * Command-line values win over environment values; scalars given several
 * times keep the last one, as OVMS does.
 */
export function collectOptions(parsed: Record<string, unknown>, specs: readonly OptionSpec[], env: NodeJS.ProcessEnv): RawOptions {
  const out: RawOptions = optionsFromEnv(env, specs.filter((spec) => parsed[spec.name] === undefined));
  for (const spec of specs) {
    const value = parsed[spec.name];
    if (value === undefined) continue;
    out[spec.name] = spec.type !== 'array' && Array.isArray(value) ? (value.at(-1) as string) : (value as RawOptions[string]);
    refuseBlankText(spec, out[spec.name]);
  }
  return out;
}

/**
 * yargs reads `--flag=VALUE` as true for the word `true` alone: `--mtls_access_log=1` or `=TRUE`
 * turned the access log off, where OVMS_MTLS_ACCESS_LOG=1 and the entrypoint read them as on,
 * and `=maybe` passed unnoticed. The value is read here with the words of every flag.
 */
function flagValuesSpelledOut(argv: readonly string[], flags: ReadonlySet<string>): string[] {
  return argv.map((arg) => {
    const match = /^--([\w-]+)=([\s\S]*)$/.exec(arg);
    if (!match || !flags.has(match[1]!)) return arg;
    return `--${match[1]}=${parseBoolean(match[1]!, match[2], false)}`;
  });
}

/**
 * yargs took the word after a flag as its value for `true` and `false` only: `proxy --mtls_access_log false`
 * turned the log off while `--mtls_access_log 0` was "unexpected argument '0'", and the entrypoint refuses
 * both. Every command now refuses a separate boolean word after a flag, naming `--flag=WORD`.
 */
function refuseSeparateFlagValues(argv: readonly string[], flags: ReadonlySet<string>): void {
  argv.forEach((arg, i) => {
    const name = /^--([\w-]+)$/.exec(arg)?.[1];
    if (name !== undefined && flags.has(name)) refuseSeparateFlagValue({ name, inlineValue: undefined }, argv[i + 1]);
  });
}

/** `COMMAND --help`: thrown by parseCommandLine so every command gets it; main prints `text` and exits 0. */
export class HelpRequested extends Error {
  constructor(readonly text: string) {
    super('help requested');
  }
}

/** A command's usage followed by its options, with defaults and choices, as `--help` prints them. */
export function commandHelp(usage: string, specs: readonly OptionSpec[]): string {
  const lines = specs.map((spec) => {
    const choices = spec.choices ? ` (${spec.choices.join('|')})` : '';
    const def = spec.defaultDescription ? ` (default: ${spec.defaultDescription})` : '';
    return `  --${spec.name.padEnd(30)} ${spec.describe}${choices}${def}\n`;
  });
  return `${usage.trimEnd()}\n\nOptions:\n${lines.join('')}`;
}

/**
 * Parses `argv` for `command` (`proxy`, `certs init`, ...); user mistakes become one-line ConfigErrors
 * that point at that command's own `--help`, `--help` / `-h` a HelpRequested.
 */
export async function parseCommandLine(argv: readonly string[], specs: readonly OptionSpec[], usage: string, command: string): Promise<Record<string, unknown>> {
  if (argv.includes('--help') || argv.includes('-h')) throw new HelpRequested(commandHelp(usage, specs));
  refuseEndOfOptions(argv);
  const flags = new Set(specs.filter((spec) => spec.type === 'boolean').map((spec) => spec.name));
  refuseSeparateFlagValues(argv, flags);
  const y = yargsFactory(flagValuesSpelledOut(argv, flags))
    .parserConfiguration(PARSER_CONFIGURATION)
    .scriptName('ovms-mtls')
    .usage(usage)
    // yargs follows LANG/LC_ALL: under de_DE its "Unknown argument" came out as "Unbekanntes Argument",
    // which unknownOptionMessage does not recognise (the single executable, without yargs' locale files, stayed English).
    .locale('en')
    .strict()
    .version(false)
    .help(false)
    .exitProcess(false)
    .fail((message, err) => {
      throw err ?? new ConfigError(unknownOptionMessage(message, argv, specs, command));
    });
  addOptions(y, specs);
  return (await y.parseAsync()) as Record<string, unknown>;
}

/**
 * yargs reads no option after `--`, and said nothing: `proxy ... -- --mtls_allow_cn alice` served
 * without its allow-list, admitting every client the CA vouches for.
 */
function refuseEndOfOptions(argv: readonly string[]): void {
  const at = argv.indexOf('--');
  if (at === -1) return;
  const after = argv.slice(at + 1, at + 3).map((word) => `'${word}'`).join(' ');
  throw new ConfigError(`'--' ends the options, and nothing after it would be read${after ? ` (${after}${at + 3 < argv.length ? ' ...' : ''})` : ''}: remove it`);
}

/** `--mtls_cetr (did you mean --mtls_cert?)`; `--no-FLAG`, which yargs no longer reads as false, `--FLAG=false`. */
function withSuggestion(name: string, specs: readonly OptionSpec[]): string {
  const option = name.length > 1 ? `--${name}` : `-${name}`;
  const negated = /^no-(.+)$/.exec(name)?.[1];
  const flag = specs.find((spec) => spec.type === 'boolean' && spec.name === negated);
  const meant = flag ? `--${flag.name}=false` : closestName(name, specs.map((spec) => spec.name));
  return meant === undefined ? option : `${option} (did you mean ${meant.startsWith('--') ? meant : `--${meant}`}?)`;
}

/**
 * yargs lists stray words (`--mtls_access_log maybe`, `proxy extra`) with unknown options, by
 * bare name; printed as `--maybe` they would send the user after an option never typed.
 */
function unknownOptionMessage(message: string, argv: readonly string[], specs: readonly OptionSpec[], command: string): string {
  const unknown = /^Unknown arguments?: (.*)$/.exec(message);
  if (!unknown) return message;
  const names = unknown[1]!.split(', ');
  const stray = names.filter((n) => argv.includes(n));
  const options = names.filter((n) => !stray.includes(n)).map((n) => withSuggestion(n, specs));
  const parts = [
    ...(options.length > 0 ? [`unknown option ${options.join(', ')}`] : []),
    ...(stray.length > 0 ? [`unexpected argument ${stray.map((w) => `'${w}'`).join(', ')}`] : []),
  ];
  const hint = stray.length > 0 ? '; options take their value as --name VALUE or --name=VALUE' : '';
  // The top-level help lists commands, not their options: the command's own help is the one that answers.
  return `${parts.join('; ')}${hint} (see \`ovms-mtls ${command} --help\`)`;
}
