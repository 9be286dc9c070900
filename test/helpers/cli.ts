/** Runs the built CLI (`bin/ovms-mtls`) as users do: a child process, exit code, output. */
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import type { Readable } from 'node:stream';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { LogCapture } from './harness.js';

export const BIN = fileURLToPath(new URL('../../../bin/ovms-mtls', import.meta.url));

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** `wrap`: a command line the CLI runs under (`unshare ...`), its own last. */
export interface CliOptions {
  env?: NodeJS.ProcessEnv;
  wrap?: readonly string[];
}

/** The program and arguments that run the CLI, under `wrap` if given. */
function cliCommand(args: readonly string[], wrap: readonly string[] = []): [string, string[]] {
  const [command, ...prefix] = [...wrap, process.execPath];
  return [command!, [...prefix, BIN, ...args]];
}

export function runCli(args: string[], options: CliOptions & { cwd?: string } = {}): Promise<CliResult> {
  return runCommand(...cliCommand(args, options.wrap), options);
}

/** Any program (curl, openssl) run to its end: exit code and output. */
export async function runCommand(command: string, args: string[], options: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): Promise<CliResult> {
  const child = spawn(command, args, { cwd: options.cwd, env: { ...cleanEnv(), ...options.env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
  child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
  const [code] = (await once(child, 'close')) as [number | null];
  return { code, stdout, stderr };
}

export interface LongRunningCli {
  child: ChildProcess;
  logs: LogCapture;
  stderr(): string;
  exited: Promise<number | null>;
}

/** Starts a long-running command; its JSON log lines on stdout land in `logs`. */
export function startCli(args: string[], options: CliOptions = {}): LongRunningCli {
  const child = spawn(...cliCommand(args, options.wrap), { env: { ...cleanEnv(), ...options.env }, stdio: ['ignore', 'pipe', 'pipe'] });
  const logs = new LogCapture();
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (c: string) => (stderr += c));
  createInterface({ input: child.stdout! }).on('line', (line) => {
    if (line.startsWith('{')) logs.write(line);
  });
  const exited = exitWithOutput(child).then(({ code }) => code);
  return { child, logs, stderr: () => stderr, exited };
}

/**
 * How long, once the process has exited, its stdout and stderr may take to end. A process it started
 * (OVMS, a worker left behind) can hold the pipes open long after: then the wait ends anyway.
 */
const OUTPUT_AFTER_EXIT_MS = 2000;

/**
 * How `child` ended, once all it wrote has been read too ('end' of stdout and stderr), or
 * OUTPUT_AFTER_EXIT_MS after its exit. 'exit' alone comes when the process ends, with its last
 * lines maybe still in the pipe; 'close' waits for every holder of the pipes, without bound.
 * Call it at spawn: the 'exit' it waits for must not have passed.
 */
export async function exitWithOutput(child: ChildProcess): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  const [code, signal] = (await once(child, 'exit')) as [number | null, NodeJS.Signals | null];
  let timer: NodeJS.Timeout | undefined;
  const bound = new Promise<void>((resolve) => (timer = setTimeout(resolve, OUTPUT_AFTER_EXIT_MS)));
  await Promise.race([Promise.all([ended(child.stdout), ended(child.stderr)]), bound]);
  clearTimeout(timer);
  return { code, signal };
}

/** Resolves once `stream` has delivered its last byte ('end'), or can deliver none ('close', or no stream). */
function ended(stream: Readable | null): Promise<void> {
  if (!stream || stream.readableEnded || stream.destroyed) return Promise.resolve();
  return new Promise((resolve) => {
    stream.once('end', resolve);
    stream.once('close', resolve);
  });
}

/** No OVMS_MTLS_* (nor `alsoDrop`-prefixed) variable from the developer's shell may change what a test runs. */
export function cleanEnv(...alsoDrop: string[]): NodeJS.ProcessEnv {
  const prefixes = ['OVMS_MTLS_', ...alsoDrop];
  return Object.fromEntries(Object.entries(process.env).filter(([k]) => !prefixes.some((p) => k.startsWith(p))));
}
