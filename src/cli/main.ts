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
import { keepInspectorOff } from '../inspector-signal.js';
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

/** The help alone, with exit 2, left the user to guess what was wrong (an image started without its args). */
const NOTHING_TO_RUN = `nothing to run: give a command (${Object.keys(COMMANDS).join(', ')}) or OVMS's options, as to the ovms command (--port, --rest_port, --model_path ...); the usage follows`;

/** Runs one command line and returns the exit code; throws only on bugs or user errors. */
export async function run(argv: readonly string[], io: Io): Promise<number> {
  const [first, ...rest] = argv;
  if (first === undefined) {
    io.stderr.write(`ovms-mtls: ${NOTHING_TO_RUN}\n`);
    io.stdout.write(helpText());
    return 2;
  }
  if (first === '--help' || first === '-h' || first === 'help') {
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

function ignoreHangup(): void {}

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
  // First: until a listener exists, SIGUSR1 opens the inspector, and startup (reading keys, binding) takes a while.
  keepInspectorOff(() => undefined);
  // SIGHUP's default ends the process, and the serving commands take it (reload) only once started:
  // ignored until then, as the files read a moment later are the current ones anyway.
  process.on('SIGHUP', ignoreHangup);
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
