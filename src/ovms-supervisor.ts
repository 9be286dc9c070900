/**
 * Keeps one OVMS process: spawns it, polls readiness with backoff, reports
 * its exit, restarts it with backoff when the policy says so, and stops it
 * with a signal that escalates to SIGKILL: at shutdown, or (with a hang
 * watch) once ready OVMS answered nothing for the hang timeout. State changes are events; the
 * supervisor neither logs nor knows HTTP.
 */
import { EventEmitter } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import type { ChildProcess } from 'node:child_process';
import { failed, signalGroup, spawnChild, waitForExit, type ExitStatus, type SpawnCommand } from './ovms-child.js';
import { HangWatch, type Hang, type HangWatchOptions } from './ovms-watchdog.js';

export interface RestartPolicy {
  readonly mode: 'never' | 'on-failure';
  readonly initialBackoffMs: number;
  readonly maxBackoffMs: number;
  /** A run at least this long counts as healthy: the backoff starts over. */
  readonly stableAfterMs: number;
  /**
   * Failed runs in a row (none of them healthy) after which OVMS is not started again:
   * a model that cannot load must end the container with OVMS's error, not leave a
   * proxy in front of nothing.
   */
  readonly maxFailuresInARow: number;
}

export interface SupervisorOptions {
  /** Built at each spawn: ports may differ between runs. */
  readonly command: () => SpawnCommand;
  /** True once OVMS (this pid) answers on its loopback ports. */
  readonly probe: (pid: number | undefined) => Promise<boolean>;
  readonly restart: RestartPolicy;
  /**
   * OVMS exited before it was ever ready: resolve true to spawn it again at
   * once without counting a restart (e.g. a loopback port was taken meanwhile).
   */
  readonly retryStart?: (status: ExitStatus) => Promise<boolean>;
  /** Readiness polling backoff bounds, ms. */
  readonly probeInterval?: { readonly initial: number; readonly max: number };
  /** Off when absent: an OVMS that hangs once ready is then left as it is. */
  readonly hangWatch?: HangWatchSettings;
}

export interface HangWatchSettings extends HangWatchOptions {
  /** A hung OVMS gets SIGTERM (and SIGCONT), then SIGKILL after this. */
  readonly stopGraceMs: number;
}

export interface OvmsState {
  readonly up: boolean;
  readonly ready: boolean;
  readonly restarts: number;
  readonly pid: number | undefined;
}

export interface SupervisorEvents {
  spawn: [pid: number | undefined];
  ready: [pid: number | undefined];
  exit: [status: ExitStatus, pid: number | undefined];
  /** A restart is scheduled after the backoff; a stop before its end cancels it. */
  restarting: [attempt: number, delayMs: number];
  /** The backoff is over and OVMS is started again (`spawn` follows): the restart happened. */
  restarted: [restarts: number];
  /** OVMS failed `maxFailuresInARow` times in a row: no restart; `done` follows. */
  givingUp: [failuresInARow: number, status: ExitStatus];
  /** Respawning at once after a start failure that `retryStart` accepted. */
  retrying: [status: ExitStatus];
  /** OVMS answered nothing for the hang timeout: it is being ended; its `exit` follows, then what `next` says (the restart policy, as for a failure). */
  hung: [hang: Hang, next: AfterHang];
  /** Final: OVMS is down and will not be started again. */
  done: [status: ExitStatus];
}

/** What follows a hung run: a restart, giving up (on-failure's failures in a row are used up), or the end (mode never). */
export type AfterHang = 'restart' | 'give-up' | 'exit';

/** Exponential: initial * 2^failures, capped. */
export function nextBackoffMs(policy: RestartPolicy, consecutiveFailures: number): number {
  return Math.min(policy.maxBackoffMs, policy.initialBackoffMs * 2 ** consecutiveFailures);
}

function killGroup(child: ChildProcess): void {
  // OVMS leads its own process group; take helpers it forked along.
  signalGroup(child, 'SIGKILL');
}

export class OvmsSupervisor extends EventEmitter<SupervisorEvents> {
  readonly #options: SupervisorOptions;
  /** Resolves with OVMS's last exit status once it will not run again. */
  readonly done: Promise<ExitStatus>;
  #resolveDone!: (status: ExitStatus) => void;
  #child: ChildProcess | undefined;
  #ready = false;
  #readyThisRun = false;
  #restarts = 0;
  #consecutiveFailures = 0;
  #stopping = false;
  #finished = false;
  #lastStatus: ExitStatus | undefined;
  #restartTimer: NodeJS.Timeout | undefined;
  #hangWatch: HangWatch | undefined;
  /** The run the watchdog is ending: its exit is a failure whatever its code. */
  #hungChild: ChildProcess | undefined;
  /** How long that run had run when it hung: its length for the failure count, so that `hung` announces the restart that happens. */
  #hungAfterMs = 0;
  /** When the current run was spawned (performance.now()). */
  #startedAt = 0;
  /** SIGKILL timers of the current run, cleared when it exits. */
  readonly #escalations = new Set<NodeJS.Timeout>();

  constructor(options: SupervisorOptions) {
    super();
    this.#options = options;
    this.done = new Promise((resolve) => (this.#resolveDone = resolve));
  }

  start(): void {
    this.#spawn();
  }

  state(): OvmsState {
    return { up: this.#child !== undefined, ready: this.#ready, restarts: this.#restarts, pid: this.#child?.pid };
  }

  /**
   * OVMS keeps running, but is not started again once it exits (a
   * restart already scheduled is cancelled): the entrypoint is stopping.
   */
  stopRestarting(): void {
    this.#stopping = true;
    clearTimeout(this.#restartTimer);
    // A drain can outlast the hang timeout; OVMS must not be killed under it.
    this.#hangWatch?.end();
    if (!this.#child) this.#finish(this.#lastStatus ?? { code: 0, signal: null });
  }

  /**
   * Sends `signal` to OVMS, SIGKILL after `timeoutMs`; no restarts after
   * this. Resolves with OVMS's exit status (the last one if it was down).
   */
  async stop(signal: NodeJS.Signals, timeoutMs: number): Promise<ExitStatus> {
    this.stopRestarting();
    const child = this.#child;
    if (!child) return this.done;
    this.#terminate(child, signal, timeoutMs);
    return this.done;
  }

  /** `signal`, then SIGKILL to its group after `timeoutMs` unless it exited by then. */
  #terminate(child: ChildProcess, signal: NodeJS.Signals, timeoutMs: number): void {
    child.kill(signal);
    // A stopped OVMS (SIGSTOP, SIGTSTP) acts on no signal until it is continued: without this it
    // would sit out its whole share and be SIGKILLed (exit 137) instead of exiting by itself, its
    // own code. systemd sends SIGCONT after SIGTERM for the same reason.
    child.kill('SIGCONT');
    const escalate = setTimeout(() => {
      this.#escalations.delete(escalate);
      killGroup(child);
    }, timeoutMs);
    this.#escalations.add(escalate);
  }

  #spawn(): void {
    const child = spawnChild(this.#options.command(), ['ignore', 'inherit', 'inherit']);
    this.#child = child;
    this.#readyThisRun = false;
    this.#startedAt = performance.now();
    const exited = waitForExit(child);
    child.once('spawn', () => {
      this.emit('spawn', child.pid);
      void this.#pollReadiness(child, exited);
    });
    void exited.then((status) => {
      this.#endWatching();
      // Helpers OVMS forked would outlive it: reparented, holding memory and maybe its loopback ports, zombies if we are PID 1.
      killGroup(child);
      return this.#onExit(child, status, performance.now() - this.#startedAt);
    });
  }

  async #pollReadiness(child: ChildProcess, exited: Promise<ExitStatus>): Promise<void> {
    const { initial, max } = this.#options.probeInterval ?? { initial: 50, max: 1000 };
    const gone = new AbortController();
    void exited.then(() => gone.abort());
    let delay = initial;
    while (!gone.signal.aborted) {
      if (await this.#options.probe(child.pid)) {
        if (gone.signal.aborted || this.#child !== child) return;
        this.#ready = true;
        this.#readyThisRun = true;
        this.emit('ready', child.pid);
        this.#watchForHang(child);
        return;
      }
      await sleep(delay, undefined, { signal: gone.signal }).catch(() => undefined);
      delay = Math.min(max, Math.round(delay * 1.5));
    }
  }

  /** From the first readiness on: loading models at start (ports not yet open) is never a hang. */
  #watchForHang(child: ChildProcess): void {
    const settings = this.#options.hangWatch;
    if (!settings || this.#stopping || child.pid === undefined) return;
    this.#hangWatch = new HangWatch(child.pid, settings, (hang) => this.#endHung(child, hang, settings.stopGraceMs));
  }

  #endHung(child: ChildProcess, hang: Hang, stopGraceMs: number): void {
    if (this.#stopping || this.#child !== child) return;
    this.#hungChild = child;
    this.#hungAfterMs = performance.now() - this.#startedAt;
    this.emit('hung', hang, this.#afterFailure(this.#hungAfterMs));
    this.#terminate(child, 'SIGTERM', stopGraceMs);
  }

  /** The run is over: no hang check and no SIGKILL may reach it (or a later process given its pid). */
  #endWatching(): void {
    this.#hangWatch?.end();
    this.#hangWatch = undefined;
    for (const timer of this.#escalations) clearTimeout(timer);
    this.#escalations.clear();
  }

  async #onExit(child: ChildProcess, exitStatus: ExitStatus, ranMs: number): Promise<void> {
    this.#child = undefined;
    this.#ready = false;
    this.emit('exit', exitStatus, child.pid);
    // Ended by the watchdog: a failure even when OVMS took its SIGTERM and exited 0.
    const hung = this.#hungChild === child;
    const status: ExitStatus = hung ? { ...exitStatus, hung: true } : exitStatus;
    this.#hungChild = undefined;
    this.#lastStatus = status;
    if (this.#stopping) return this.#finish(status);
    if (!this.#readyThisRun && (await this.#retryAccepted(status))) {
      if (this.#stopping) return this.#finish(status);
      this.emit('retrying', status);
      return this.#spawn();
    }
    if (this.#options.restart.mode !== 'on-failure' || !failed(status)) return this.#finish(status);
    const failures = this.#failuresInARowWith(hung ? this.#hungAfterMs : ranMs);
    if (failures >= this.#options.restart.maxFailuresInARow) {
      this.emit('givingUp', failures, status);
      return this.#finish(status);
    }
    const delay = nextBackoffMs(this.#options.restart, failures - 1);
    this.#consecutiveFailures = failures;
    this.emit('restarting', this.#restarts + 1, delay);
    this.#restartTimer = setTimeout(() => {
      this.#restarts += 1;
      this.emit('restarted', this.#restarts);
      this.#spawn();
    }, delay);
  }

  /**
   * Whether `retryStart` wants a respawn at once. A question it cannot answer is a no, and the
   * restart policy applies: at the open-files limit the port check's own listen failed (EMFILE),
   * and that rejection, escaping this exit handler, ended the whole entrypoint as a proxy failure (70).
   */
  async #retryAccepted(status: ExitStatus): Promise<boolean> {
    if (!this.#options.retryStart) return false;
    try {
      return await this.#options.retryStart(status);
    } catch {
      return false;
    }
  }

  /** This failure's place in the failures in a row: a run as long as stableAfterMs starts the count over. */
  #failuresInARowWith(ranMs: number): number {
    return ranMs >= this.#options.restart.stableAfterMs ? 1 : this.#consecutiveFailures + 1;
  }

  /** What follows a run that fails after `ranMs`. */
  #afterFailure(ranMs: number): AfterHang {
    if (this.#options.restart.mode !== 'on-failure') return 'exit';
    return this.#failuresInARowWith(ranMs) < this.#options.restart.maxFailuresInARow ? 'restart' : 'give-up';
  }

  #finish(status: ExitStatus): void {
    if (this.#finished) return;
    this.#finished = true;
    this.emit('done', status);
    this.#resolveDone(status);
  }
}
