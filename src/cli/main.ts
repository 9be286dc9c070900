import cluster from 'node:cluster';
import { isUserError } from '../errors.js';
import { productVersion } from '../version.js';
import { runProxyCommand } from './proxy-command.js';
import { runCertsCommand } from './certs-cli.js';
import { runCheckCommand } from './check-command.js';
import { runProbeCommand } from './probe-command.js';
import { helpText } from './help.js';
import { HelpRequested } from './options-parser.js';
import { runDemoCommand } from './demo-command.js';
import { runEntrypointCommand } from './entrypoint-command.js';
import { runWorker } from '../worker-main.js';
import { guardStartupSignals, releaseStopSignals } from '../startup-signals.js';
import { ALL_OPTIONS, envVarName } from '../options.js';

export interface Io {
  readonly stdout: NodeJS.WritableStream;
  readonly stderr: NodeJS.WritableStream;
  readonly env: NodeJS.ProcessEnv;
}

type Command = (argv: readonly string[], io: Io) => Promise<number>;

const COMMANDS: Record<string, Command> = {
  proxy: (argv, io) => runProxyCommand(argv, io.env),
  certs: (argv, io) => runCertsCommand(argv, io),
  check: (argv, io) => runCheckCommand(argv, io),
  probe: (argv, io) => runProbeCommand(argv, io.stdout),
  demo: (argv, io) => runDemoCommand(argv, io),
};

/** The commands that stop on SIGTERM/SIGINT (waitForStopSignal) rather than run to their end. */
const SERVING_COMMANDS: ReadonlySet<string> = new Set(['proxy', 'demo']);
const HELP_WORDS: ReadonlySet<string> = new Set(['--help', '-h', 'help']);

/**
 * Whether the command line may start a serving command: one that takes a SIGTERM/SIGINT held since
 * launch() as one that comes while it starts. An OVMS command line serves or not by its flags, which
 * the entrypoint reads (it releases the signals for its one-shot modes).
 */
function mayServe(first: string | undefined): boolean {
  if (first === undefined || HELP_WORDS.has(first) || first === '-v') return false;
  return SERVING_COMMANDS.has(first) || first.startsWith('-');
}

/** The help alone, with exit 2, left the user to guess what was wrong (an image started without its args). */
const NOTHING_TO_RUN = `nothing to run: give a command (${Object.keys(COMMANDS).join(', ')}) or OVMS's options, as to the ovms command (--port, --rest_port, --model_path ...); the usage follows`;

/** Runs one command line and returns the exit code; throws only on bugs or user errors. */
export async function run(argv: readonly string[], io: Io): Promise<number> {
  const [first, ...rest] = argv;
  if (!mayServe(first)) releaseStopSignals();
  if (first === undefined) {
    io.stderr.write(`ovms-mtls: ${NOTHING_TO_RUN}\n`);
    io.stdout.write(helpText());
    return 2;
  }
  if (HELP_WORDS.has(first)) {
    io.stdout.write(helpText());
    return 0;
  }
  if (first === '-v') {
    io.stdout.write(`ovms-mtls ${productVersion()}\n`);
    return 0;
  }
  const command = COMMANDS[first];
  if (command) {
    try {
      return await command(rest, io);
    } catch (err) {
      if (!(err instanceof HelpRequested)) throw err;
      io.stdout.write(err.text);
      return 0;
    }
  }
  // No subcommand: an OVMS command line (OVMS takes no positional arguments). `--version` lands here too: OVMS's version follows ours.
  if (first.startsWith('-')) return runEntrypointCommand(argv, io);
  io.stderr.write(`ovms-mtls: unknown command '${first}' (see \`ovms-mtls --help\`)\n`);
  return 2;
}

const OPTION_NAMES = new Set(ALL_OPTIONS.map((spec) => spec.name));

/**
 * A user error as printed. One about an option the command line did not give
 * is about a value from the environment: the line names the variable, which is
 * what the user has to change (a Kubernetes manifest, an EnvironmentFile).
 */
export function userErrorLine(message: string, argv: readonly string[], env: NodeJS.ProcessEnv): string {
  // probe reads no OVMS_MTLS_* (in the container they describe the server): naming one would mislead.
  if (argv[0] === 'probe') return message;
  const name = /^--([a-z_]+)\b/.exec(message)?.[1];
  if (name === undefined || !OPTION_NAMES.has(name)) return message;
  const onCommandLine = argv.some((arg) => arg === `--${name}` || arg.startsWith(`--${name}=`));
  const variable = envVarName(name);
  return onCommandLine || !env[variable] ? message : `${message} (set by ${variable} in the environment)`;
}

/**
 * A reader of stdout that is gone (`probe ... | grep -q FAIL`: grep exits at its first match) or a full
 * disk costs the rest of the output, and the command still ends with its own exit code. Unhandled, the
 * write error ended the process with Node's stack trace and exit 1.
 */
function carryOnWithoutStdout(err: NodeJS.ErrnoException): void {
  if (err.code !== 'EPIPE') process.stderr.write(`ovms-mtls: cannot write to stdout (${err.code ?? err.message}): the rest of the output is lost\n`);
}

/**
 * The process entry: the only place that exits. User errors print one line, no stack.
 * A proxy worker (--mtls_workers) gets its orders from the primary, not from argv.
 */
export function main(argv: readonly string[]): void {
  // Done by launch() already, but the single executable's bundle (scripts/build-binary.mjs) runs main() alone.
  guardStartupSignals();
  process.stdout.on('error', carryOnWithoutStdout);
  const io: Io = { stdout: process.stdout, stderr: process.stderr, env: process.env };
  (cluster.isWorker ? runWorker() : run(argv, io)).then(
    (code) => process.exit(code),
    (err: unknown) => {
      if (isUserError(err)) {
        process.stderr.write(`ovms-mtls: ${userErrorLine(err.message, argv, io.env)}\n`);
        process.exit(err.exitCode);
      }
      process.stderr.write(`ovms-mtls: internal error: ${(err as Error)?.stack ?? String(err)}\n`);
      process.exit(70);
    },
  );
}
