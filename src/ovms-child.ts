/**
 * Spawning and supervising OVMS. Knows processes, signals and exit codes;
 * nothing about HTTP (readiness comes in as a probe callback) and nothing
 * about logging (state changes go out as events, which the entrypoint logs
 * and a metrics module can count).
 */
import { spawn, type ChildProcess, type StdioOptions } from 'node:child_process';
import { accessSync, constants as fsConstants } from 'node:fs';
import { constants as osConstants } from 'node:os';
import { initGroups, type UserAccount } from './privileges.js';
import type { Identity } from './access-denial.js';

export interface ExitStatus {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  /** Ended by the hang watchdog (--mtls_ovms_hang_timeout): a failure, whatever the code. */
  readonly hung?: boolean;
  /** OVMS never ran: why the spawn failed (EMFILE, ENOENT ...), reported as exit code 127. */
  readonly spawnError?: string;
}

/** What `timeout` (coreutils) exits with when the command ran out of time: OVMS's own code may be 0 (it took SIGTERM) or 137. */
export const HUNG_EXIT_CODE = 124;

/** The ovms_exited line's text: a spawn that failed is not an OVMS that exited, and EMFILE is our limit to raise. */
export function describeExit(status: ExitStatus): string {
  if (status.spawnError === undefined) return status.code === 0 ? 'OVMS exited' : `OVMS exited with ${status.signal ?? status.code}`;
  const hint = SPAWN_ERROR_HINTS[status.spawnError];
  return `OVMS could not be started (${status.spawnError}${hint ? `: ${hint}` : ''})`;
}

const SPAWN_ERROR_HINTS: Readonly<Record<string, string>> = {
  EMFILE: 'this process is at its open-files limit; raise ulimit -n / the nofile limit',
  ENFILE: 'the machine is out of file descriptors (fs.file-max)',
};

/** The shell convention: the code, or 128+N for death by signal N; HUNG_EXIT_CODE for a hung OVMS. */
export function exitCodeOf(status: ExitStatus): number {
  if (status.hung) return HUNG_EXIT_CODE;
  if (status.code !== null) return status.code;
  const n = status.signal ? osConstants.signals[status.signal] : undefined;
  return n === undefined ? 1 : 128 + n;
}

export function failed(status: ExitStatus): boolean {
  return status.hung === true || status.code !== 0;
}

const SETPRIV_CANDIDATES = ['/usr/bin/setpriv', '/bin/setpriv', '/usr/sbin/setpriv'];

/** util-linux setpriv, which can give OVMS a parent-death signal; undefined when missing. */
export function findSetpriv(candidates: readonly string[] = SETPRIV_CANDIDATES): string | undefined {
  for (const path of candidates) {
    try {
      accessSync(path, fsConstants.X_OK);
      return path;
    } catch {
      // try the next one
    }
  }
  return undefined;
}

export interface CommandSpec {
  readonly binary: string;
  readonly args: readonly string[];
  /** Run as this user; needs root at spawn time. */
  readonly runAs?: UserAccount | undefined;
  /** Path of setpriv; without it OVMS can outlive a SIGKILLed wrapper. */
  readonly setpriv?: string | undefined;
  /** OVMS's environment; ours when absent. */
  readonly env?: NodeJS.ProcessEnv | undefined;
}

export interface SpawnCommand {
  readonly file: string;
  readonly args: readonly string[];
  readonly uid?: number;
  readonly gid?: number;
  readonly env?: NodeJS.ProcessEnv;
}

/**
 * OVMS must never outlive us, also when we are SIGKILLed (no handler runs
 * then). `setpriv --pdeathsig SIGKILL` asks the kernel to kill OVMS when our
 * thread dies. The kernel clears that signal when a process changes its uid,
 * so setpriv changes the user first and sets the signal after; it also sets
 * the supplementary groups (e.g. `render` for GPU access), which Node's own
 * `uid` spawn option would clear.
 */
export function spawnCommand(spec: CommandSpec): SpawnCommand {
  const { binary, args, runAs, setpriv } = spec;
  const env = spec.env ? { env: spec.env } : {};
  if (!setpriv) return { file: binary, args, ...(runAs ? { uid: runAs.uid, gid: runAs.gid } : {}), ...env };
  const user = runAs ? [`--reuid=${runAs.uid}`, `--regid=${runAs.gid}`, runAs.inPasswd ? '--init-groups' : '--clear-groups'] : [];
  return { file: setpriv, args: [...user, '--pdeathsig=SIGKILL', '--', binary, ...args], ...env };
}

/**
 * Who OVMS is when spawnCommand runs it as `user`, for judging its files before it starts: through
 * setpriv, with the groups --init-groups gives a user in /etc/passwd; a bare uid (--clear-groups)
 * and Node's own uid spawn (libuv clears the supplementary groups) keep only the gid.
 */
export function ovmsIdentity(user: UserAccount, setpriv: string | undefined): Identity {
  const groups = setpriv && user.inPasswd ? initGroups(user) : [user.gid];
  return { name: user.name, uid: user.uid, groups };
}

export function spawnChild(command: SpawnCommand, stdio: StdioOptions): ChildProcess {
  return spawn(command.file, [...command.args], {
    stdio,
    // Own process group: a terminal's Ctrl-C reaches only us, and we forward it once.
    detached: true,
    ...(command.uid !== undefined ? { uid: command.uid, gid: command.gid } : {}),
    ...(command.env ? { env: command.env } : {}),
  });
}

export function waitForExit(child: ChildProcess): Promise<ExitStatus> {
  return new Promise((resolve) => {
    let settled = false;
    const settle = (status: ExitStatus) => {
      if (settled) return;
      settled = true;
      resolve(status);
    };
    // 127 as a shell reports a command it cannot run.
    child.once('error', (err: NodeJS.ErrnoException) => settle({ code: 127, signal: null, spawnError: err.code ?? err.message }));
    child.once('exit', (code, signal) => settle({ code, signal }));
  });
}

/** `signal` to OVMS and every process of its group (OVMS leads it: spawnChild), the helpers it forked. */
export function signalGroup(child: ChildProcess, signal: NodeJS.Signals): void {
  try {
    if (child.pid !== undefined) process.kill(-child.pid, signal);
  } catch {
    child.kill(signal);
  }
}

/**
 * Runs a one-shot OVMS command (--version, --pull ...) with our stdio,
 * forwarding SIGTERM/SIGINT/SIGHUP; resolves with its exit status.
 * They go to OVMS's whole group, as a terminal's Ctrl-C reaches a plain `ovms --pull` and
 * whatever it runs (a model converter): OVMS is in a session of its own, which no terminal signals.
 */
export async function runToCompletion(command: SpawnCommand): Promise<ExitStatus> {
  const child = spawnChild(command, 'inherit');
  const forward = (signal: NodeJS.Signals) => signalGroup(child, signal);
  const signals: NodeJS.Signals[] = ['SIGTERM', 'SIGINT', 'SIGHUP'];
  for (const s of signals) process.on(s, forward);
  try {
    return await waitForExit(child);
  } finally {
    for (const s of signals) process.off(s, forward);
    // As when serving: what OVMS forked and left behind (a converter of a --pull that crashed) must not run on after us.
    signalGroup(child, 'SIGKILL');
  }
}
