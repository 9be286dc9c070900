import yargsFactory from 'yargs';
import type { Argv, Options } from 'yargs';
import { ConfigError } from '../errors.js';
import { optionsFromEnv, envVarName, type OptionSpec, type RawOptions } from '../options.js';

/** yargs settings shared by every command: snake_case names as OVMS spells them, no magic. */
export const PARSER_CONFIGURATION = {
  'camel-case-expansion': false,
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
  const out: RawOptions = optionsFromEnv(env, specs);
  for (const spec of specs) {
    const value = parsed[spec.name];
    if (value === undefined) continue;
    out[spec.name] = spec.type !== 'array' && Array.isArray(value) ? (value.at(-1) as string) : (value as RawOptions[string]);
  }
  return out;
}

/** Parses `argv` for one command; user mistakes become one-line ConfigErrors. */
export async function parseCommandLine(argv: readonly string[], specs: readonly OptionSpec[], usage: string): Promise<Record<string, unknown>> {
  const y = yargsFactory([...argv])
    .parserConfiguration(PARSER_CONFIGURATION)
    .scriptName('ovms-mtls')
    .usage(usage)
    .strict()
    .version(false)
    .help(false)
    .exitProcess(false)
    .fail((message, err) => {
      throw err ?? new ConfigError(unknownOptionMessage(message));
    });
  addOptions(y, specs);
  return (await y.parseAsync()) as Record<string, unknown>;
}

function unknownOptionMessage(message: string): string {
  const unknown = /^Unknown arguments?: (.*)$/.exec(message);
  if (!unknown) return message;
  const names = unknown[1]!.split(', ').map((n) => (n.length > 1 ? `--${n}` : n));
  return `unknown option ${names.join(', ')} (see \`ovms-mtls --help\`)`;
}
