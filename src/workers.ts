/**
 * `--mtls_workers N` (N > 1): the primary forks N proxy workers with
 * node:cluster. The listening sockets are the primary's (cluster creates
 * them on the first worker's listen, so a bind as root happens before any
 * privilege drop) and it hands connections round-robin, Node's default on
 * Linux. Everything that must exist once stays in the primary: OVMS, the
 * admin port, the certificate watch, signals and the exit code. A worker
 * that dies outside shutdown is logged and replaced. A worker whose event
 * loop is stuck holds up nothing of the primary's: every wait on one is
 * bounded, and the line that ends the wait names it; one that answers no
 * ping for a minute (MISSED_PINGS) is killed, and so replaced.
 */
import cluster, { type Worker } from 'node:cluster';
import type { AddressInfo } from 'node:net';
import { fileURLToPath } from 'node:url';
import type { Config } from './config.js';
import type { Logger } from './log.js';
import type { ListenerName } from './observer.js';
import type { RunningProxy } from './proxy.js';
import type { UserAccount } from './privileges.js';
import { AT_OPEN_FILES_LIMIT, type CheckResult } from './health.js';
import { tlsTexts, type TlsMaterial, type TlsTexts } from './tls-material.js';
import { sumMonotonic, type MetricsJson } from './metrics-aggregate.js';
import { ListenError, StartFailure, TlsMaterialError } from './errors.js';
import { isMessage, type FromWorker, type ToWorker, type UpstreamPorts } from './worker-protocol.js';
import { HandoffWatch, type UntakenOutcome } from './cluster-handoffs.js';

/** The module a worker process starts from; a single executable ignores it and runs its own main. */
const WORKER_ENTRY = fileURLToPath(new URL('./cli/worker-entry.js', import.meta.url));
/** A worker past its drain timeout is killed this much later: its own timeout should have ended it. */
const DRAIN_BACKSTOP_MS = 5000;
const REPLACE_BACKOFF = { initialMs: 500, maxMs: 30_000 };
/**
 * A worker that exits sooner than this after it listens counts as one that failed to start: replacing
 * it at once, as one that served, forked a new worker every second for ever when each died at start.
 */
const SETTLE_MS = 10_000;
/** How often each listening worker is asked whether it is alive; any message from it counts as an answer. */
const PING_MS = 5000;
/**
 * A listening worker that has answered none of this many pings in a row (a minute) is stuck (event
 * loop blocked, process stopped) and is killed, so that a new one takes its place. Left alone, it held
 * the connections it had and one new connection per listener without an answer for ever, and its
 * share of the capacity was gone until a restart. Far above anything a worker does in one go (a
 * reload of a large CRL takes seconds). Counted in pings, not in time since its last answer: after
 * the whole container was frozen (docker pause), or the primary itself was held up, every worker
 * would have looked silent for that long.
 */
const MISSED_PINGS = 12;

/** Why a replacement waits: a single early exit (an OOM kill soon after a start) read "workers keep exiting". */
function earlyExits(failures: number): string {
  const within = `within ${SETTLE_MS / 1000} s of listening`;
  return failures === 1 ? `it exited ${within}` : `${failures} workers in a row exited ${within}`;
}

/** None after a worker that served; doubling with each worker in a row, in the same place, that did not settle. */
function replacementDelayMs(failures: number): number {
  return failures === 0 ? 0 : Math.min(REPLACE_BACKOFF.maxMs, REPLACE_BACKOFF.initialMs * 2 ** (failures - 1));
}

export interface WorkerPoolOptions {
  readonly config: Config;
  /** The validated set the proxy starts with; reloads replace it. */
  readonly material: TlsMaterial;
  readonly logger: Logger;
  /** Started as root: the user each worker becomes once its listeners are up. */
  readonly dropTo?: UserAccount | undefined;
  /** Entrypoint mode: why calls cannot go to OVMS yet (undefined = ready). Proxy mode: absent. */
  readonly notReady?: () => string | undefined;
  /** Entrypoint mode: OVMS's current loopback ports, sent with every upstream change. */
  readonly ports?: () => UpstreamPorts;
  /** What a stop leaves the workers' drain (the entrypoint keeps OVMS's share out of it); default: the shutdown timeout. */
  readonly drainMs?: number | undefined;
  /** How long a /metrics scrape waits for each worker. Default 2000 ms. */
  readonly metricsTimeoutMs?: number;
}

interface Member {
  readonly worker: Worker;
  /** The connections Node's round-robin handed it that it has not taken yet: closed when it exits (cluster-handoffs.ts). */
  readonly handoffs: HandoffWatch;
  readonly listening: Promise<void>;
  /** Said hello: its messages are heard from now on (see FromWorker). */
  greeted: boolean;
  up: boolean;
  /** When it said it listens (performance.now()). */
  listeningSince?: number | undefined;
  /** When its last message came (performance.now()). */
  heardAt: number;
  /** When it was last pinged, and how many pings in a row it has left unanswered (MISSED_PINGS). */
  pingedAt?: number | undefined;
  missed: number;
  /** Killed by the pool as stuck (#killHung, #killStragglers), with a line saying so: its exit is on the way. */
  hung: boolean;
  /** Its last pong said it is at its open-files limit: it closes each connection handed to it. */
  full: boolean;
  /**
   * The workers before it in its place that exited before they settled. Per place, not per pool:
   * the other workers serving on must not cut the backoff of one that keeps failing.
   */
  readonly failuresBefore: number;
  /** Did not answer the last metrics request: said once, until it answers again. */
  silent: boolean;
  /**
   * Its metrics as last scraped (or as handed over after its drain). While it is silent they stand in for it whole: its
   * connections, streams and memory are still there. When it exits, its counters and histograms stay in the sums.
   */
  lastScraped?: MetricsJson | undefined;
}

export class WorkerPool implements RunningProxy {
  readonly addresses: Partial<Record<ListenerName, readonly AddressInfo[]>> = {};
  readonly #options: WorkerPoolOptions;
  readonly #members = new Map<number, Member>();
  readonly #pending = new Map<number, (metrics: MetricsJson) => void>();
  #nextRequest = 1;
  #started = false;
  #stopping = false;
  #replaceTimer: NodeJS.Timeout | undefined;
  #pinger: NodeJS.Timeout | undefined;
  #allExited: (() => void) | undefined;
  /** What every worker serves, including one started after the files went bad. */
  #tls: TlsTexts;
  /** Counters and histograms of the workers that exited, summed: /metrics totals must never fall. */
  #retired: MetricsJson = [];
  /**
   * Rejects once no worker can serve again: every worker exited, which closed the public ports
   * (node:cluster keeps a shared port open only while a worker listens on it), and a new one could
   * not open them again. The primary runs as --mtls_user by then, which may not bind a port below
   * 1024, or another process took the port: retrying for ever kept a process that served nothing.
   */
  readonly failed: Promise<never>;
  readonly #fail: (err: Error) => void;
  #lost = false;

  constructor(options: WorkerPoolOptions) {
    this.#options = options;
    this.#tls = tlsTexts(options.material);
    let fail!: (err: Error) => void;
    this.failed = new Promise<never>((_resolve, reject) => (fail = reject));
    this.failed.catch(() => undefined);
    this.#fail = fail;
  }

  /**
   * Forks every worker; resolves when all listen, or at once when `stopRequested` resolves first
   * (a SIGTERM must not wait for a worker stuck in its start: shutdown() ends it). Rejects with
   * the first worker's startup error, every worker gone.
   */
  async start(stopRequested: Promise<unknown> = new Promise(() => undefined)): Promise<this> {
    cluster.setupPrimary({ exec: WORKER_ENTRY, args: [] });
    const members: Member[] = [];
    try {
      for (let i = 0; i < this.#options.config.workers; i += 1) members.push(this.#fork());
      const allListening = Promise.all(members.map((m) => m.listening)).then(() => true);
      if (!(await Promise.race([allListening, stopRequested.then(() => false)]))) return this;
    } catch (err) {
      await this.#stopAll(0);
      throw err;
    }
    this.#started = true;
    this.#pinger = setInterval(() => this.#pingListening(), PING_MS);
    this.#pinger.unref();
    this.#options.logger.info({ event: 'workers_listening', workers: members.length, pids: members.map((m) => m.worker.process.pid) }, `${members.length} workers listening`);
    return this;
  }

  port(listener: ListenerName): number | undefined {
    return this.addresses[listener]?.[0]?.port;
  }

  /** The primary holds no connections: each worker closes its own revoked ones when it reloads. */
  listeners(): [] {
    return [];
  }

  /** The primary's reloader validated the new set: every worker loads it, and so will every worker started later. A broken set never gets here. */
  reloadTls(material: TlsMaterial): void {
    this.#tls = tlsTexts(material);
    this.#broadcast({ type: 'reload', tls: this.#tls });
  }

  /** OVMS started, became ready, exited, or moved to new loopback ports. */
  upstreamChanged(): void {
    this.#broadcast({ type: 'upstream', notReady: this.#options.notReady?.(), ports: this.#options.ports?.() });
  }

  /**
   * For /readyz: ready while at least one listening worker serves, until shutdown begins. A worker
   * does not when it left the last ping unanswered (event loop stuck, process stopped: PING_MS
   * apart, and killed only after MISSED_PINGS), or its last pong said it is at its open-files
   * limit. Counting them, /readyz said 200 for a minute while every worker was stuck and each
   * client waited. One that does not serve beside one that does is named but keeps the pod ready.
   */
  check(): CheckResult {
    const up = [...this.#members.values()].filter((m) => m.up);
    const silent = up.filter((m) => m.missed > 0).length;
    const full = up.filter((m) => m.missed === 0 && m.full).length;
    const notes = [
      ...(silent > 0 ? [`${silent} answering no ping (event loop stuck or process stopped?)`] : []),
      ...(full > 0 ? [`${full} ${AT_OPEN_FILES_LIMIT}`] : []),
    ];
    const detail = [`${up.length} of ${this.#options.config.workers} workers listening`, ...notes].join(', ');
    return { ok: up.length > silent + full && !this.#stopping, detail: this.#stopping ? `draining; ${detail}` : detail };
  }

  /**
   * Every listening worker's metrics, and the counts of those that exited. A worker that does not
   * answer in time is there as last scraped, gauges too: left out, the connections it still holds and
   * its memory vanished from the sums while it was stuck. One that exited meanwhile is in the retired sum.
   */
  async collectMetrics(): Promise<MetricsJson[]> {
    const timeoutMs = this.#options.metricsTimeoutMs ?? 2000;
    const asked = [...this.#members.values()].filter((m) => m.up);
    const answers = await Promise.all(asked.map(async (m) => {
      const metrics = await this.#askMetrics(m.worker, timeoutMs);
      if (metrics) m.lastScraped = metrics;
      if (this.#members.has(m.worker.id)) this.#noteAnswer(m, metrics !== undefined, timeoutMs);
      return metrics;
    }));
    // Who is still a member is read with the retired sum, once every answer is in: a worker that answered and then
    // exited while another was slow to answer is in that sum already, and was counted twice (a total that then fell).
    const live = asked.flatMap((m, i) => (this.#members.has(m.worker.id) ? [answers[i] ?? m.lastScraped] : []));
    return [...live.filter((m): m is MetricsJson => m !== undefined), this.#retired];
  }

  /** A worker that stops answering is named once, and once more when it answers again. */
  #noteAnswer(member: Member, answered: boolean, timeoutMs: number): void {
    const silent = !answered;
    if (silent === member.silent) return;
    member.silent = silent;
    const { id, process: { pid } } = member.worker;
    if (answered) this.#options.logger.info({ event: 'worker_answering', worker: id, pid }, `worker ${id} (pid ${pid}) answers again`);
    else this.#options.logger.warn({ event: 'worker_unresponsive', worker: id, pid, timeoutMs }, `worker ${id} (pid ${pid}) did not answer within ${timeoutMs} ms (event loop stuck or process stopped?): /metrics has its numbers as last scraped`);
  }

  /** Every worker drains (stops accepting, in-flight calls finish for up to `timeoutMs`) and exits. */
  shutdown(timeoutMs: number): Promise<void> {
    return this.#stopAll(timeoutMs);
  }

  #fork(failuresBefore = 0): Member {
    const worker = forkWorker();
    let settle!: { resolve: () => void; reject: (err: Error) => void };
    const listening = new Promise<void>((resolve, reject) => (settle = { resolve, reject }));
    listening.catch(() => undefined);
    const member: Member = { worker, handoffs: new HandoffWatch(worker.process), listening, greeted: false, up: false, silent: false, failuresBefore, heardAt: performance.now(), missed: 0, hung: false, full: false };
    this.#members.set(worker.id, member);
    worker.on('message', (message: unknown) => {
      if (isMessage<FromWorker>(message)) this.#onMessage(member, message, settle);
    });
    worker.on('exit', (code, signal) => {
      settle.reject(new StartFailure(`worker ${worker.id} (pid ${worker.process.pid}) exited (${signal ?? code}) before it listened${exitHint(signal)}`));
      // Node may report the exit before the channel has delivered the worker's last message (its final counts).
      if (worker.isConnected()) worker.once('disconnect', () => this.#onExit(member, code, signal));
      else this.#onExit(member, code, signal);
    });
    // Node reports a process it could not start (no pid) by this event alone, never by 'exit'. Unhandled, it ended
    // the primary with a stack trace (exit 1), and every worker with it: a pids limit reached, the executable moved.
    worker.on('error', (err: Error) => {
      if (worker.process.pid !== undefined) return this.#options.logger.warn({ event: 'worker_error', worker: worker.id, pid: worker.process.pid, reason: err.message }, `worker ${worker.id} (pid ${worker.process.pid}): ${err.message}`);
      const failure = spawnFailure(`worker ${worker.id}`, err);
      settle.reject(failure);
      this.#onSpawnFailed(member, failure);
    });
    return member;
  }

  /** A worker whose process never started: it leaves the pool as one that exited before it listened would. */
  #onSpawnFailed(member: Member, failure: StartFailure): void {
    this.#members.delete(member.worker.id);
    member.handoffs.settleUntaken();
    if (this.#members.size === 0) this.#allExited?.();
    if (this.#stopping || !this.#started || this.#lost) return;
    this.#replaceLater(member.failuresBefore + 1, failure.message);
  }

  /** Its line names why; the next try waits as after a worker that exited soon after it started. */
  #replaceLater(failures: number, reason: string): void {
    const delayMs = replacementDelayMs(failures);
    this.#options.logger.error({ event: 'worker_start_failed', reason, restartInMs: delayMs }, `${reason}: trying again in ${delayMs / 1000} s`);
    this.#replaceTimer = setTimeout(() => this.#replace(failures), delayMs);
  }

  #onMessage(member: Member, message: FromWorker, settle: { resolve: () => void; reject: (err: Error) => void }): void {
    member.heardAt = performance.now();
    switch (message.type) {
      case 'hello': {
        member.greeted = true;
        if (this.#stopping) return this.#send(member.worker, { type: 'drain', timeoutMs: 0 });
        const { config, dropTo, notReady, ports, drainMs = config.shutdownTimeoutMs } = this.#options;
        return this.#send(member.worker, { type: 'start', config, tls: this.#tls, dropTo, gated: notReady !== undefined, notReady: notReady?.(), ports: ports?.(), drainMs });
      }
      case 'listening':
        member.up = true;
        member.listeningSince = performance.now();
        for (const [name, list] of Object.entries(message.addresses)) this.addresses[name as ListenerName] ??= list;
        return settle.resolve();
      case 'failed':
        return settle.reject(startupError(message));
      case 'metrics':
        this.#pending.get(message.id)?.(message.metrics);
        return;
      case 'final':
        // What it leaves in the sums when it exits (#onExit), in place of its counts as last scraped.
        member.lastScraped = message.metrics;
        return;
      case 'pong':
        member.full = !message.room;
        return;
    }
  }

  /** Pings every listening worker; one that answered none of MISSED_PINGS in a row is killed, and its exit brings a new one (#onExit). */
  #pingListening(): void {
    const now = performance.now();
    for (const member of this.#members.values()) {
      if (!member.up || member.hung) continue;
      const answered = member.pingedAt === undefined || member.heardAt >= member.pingedAt;
      member.missed = answered ? 0 : member.missed + 1;
      if (member.missed >= MISSED_PINGS) {
        this.#killHung(member, now - member.heardAt);
        continue;
      }
      member.pingedAt = now;
      this.#send(member.worker, { type: 'ping' });
    }
  }

  #killHung(member: Member, silentMs: number): void {
    member.hung = true;
    const { id, process: { pid } } = member.worker;
    const seconds = Math.round(silentMs / 1000);
    this.#options.logger.error({ event: 'worker_hung', worker: id, pid, silentMs: Math.round(silentMs) }, `worker ${id} (pid ${pid}) has answered nothing for ${seconds} s (event loop stuck or process stopped?): killed with SIGKILL, a new one takes its place`);
    member.worker.process.kill('SIGKILL');
  }

  #onExit(member: Member, code: number | null, signal: string | null): void {
    this.#members.delete(member.worker.id);
    const untaken = member.handoffs.settleUntaken();
    if (member.lastScraped) this.#retired = sumMonotonic(this.#retired, member.lastScraped);
    if (this.#members.size === 0) this.#allExited?.();
    if (this.#stopping) return this.#exitedInDrain(member, code, signal, untaken);
    if (!this.#started || this.#lost) return;
    const pid = member.worker.process.pid;
    const settled = member.listeningSince !== undefined && performance.now() - member.listeningSince >= SETTLE_MS;
    const failures = settled ? 0 : member.failuresBefore + 1;
    const delayMs = replacementDelayMs(failures);
    const when = delayMs === 0 ? 'starting a new one' : `starting a new one in ${delayMs / 1000} s (${earlyExits(failures)})`;
    this.#options.logger.error({ event: 'worker_exited', worker: member.worker.id, pid, code, signal, restartInMs: delayMs, ...untakenField(untaken) }, `worker ${member.worker.id} (pid ${pid}) exited with ${signal ?? code}: ${when}${untakenNote(untaken)}`);
    this.#replaceTimer = setTimeout(() => this.#replace(failures), delayMs);
  }

  /**
   * A worker that drained exits 0. One that ends otherwise in the shutdown (the out-of-memory killer, a
   * kill -9) cut the calls it still had, and was logged by no line: the operator saw a clean stop.
   * One that never listened had no calls: the start failed (every worker fails a bind of a port in
   * use, exit 1) or was stopped (a Ctrl-C reaches a worker before its handlers), and the one line
   * that says why is the start's. Naming it here put error lines about calls cut before that line.
   */
  #exitedInDrain(member: Member, code: number | null, signal: string | null, untaken: UntakenOutcome): void {
    if (member.hung || member.listeningSince === undefined || (code === 0 && signal === null)) return;
    const { id, process: { pid } } = member.worker;
    this.#options.logger.error({ event: 'worker_exited', worker: id, pid, code, signal, ...untakenField(untaken) }, `worker ${id} (pid ${pid}) exited with ${signal ?? code} during the shutdown: the calls it still had were cut (not replaced: the proxy is stopping)${untakenNote(untaken)}`);
  }

  #replace(failuresBefore: number): void {
    if (this.#stopping || this.#lost) return;
    let member: Member;
    try {
      member = this.#fork(failuresBefore);
    } catch (err) {
      return this.#replaceLater(failuresBefore + 1, (err as Error).message);
    }
    member.listening.catch((err: Error) => {
      // Stopped before it listened because the pool is shutting down: no failure; a spawn failure has its line already.
      if (this.#stopping || this.#lost || err instanceof SpawnFailure) return;
      if (err instanceof ListenError) return this.#cannotListenAgain(err);
      this.#options.logger.error({ event: 'worker_start_failed', reason: err.message }, `a new worker failed to start: ${err.message}`);
    });
  }

  /** A bind that failed once the pool served: the ports closed with the last worker, and what opened them at the start is gone. */
  #cannotListenAgain(err: ListenError): void {
    this.#lost = true;
    const reason = `every worker exited, which closed the public ports, and a new worker cannot open them again (${err.message}): exiting, so that a fresh start binds them`;
    this.#fail(new ListenError(reason, { cause: err }));
  }

  async #stopAll(timeoutMs: number): Promise<void> {
    this.#stopping = true;
    clearTimeout(this.#replaceTimer);
    clearInterval(this.#pinger);
    if (this.#members.size === 0) return;
    const exited = new Promise<void>((resolve) => (this.#allExited = resolve));
    this.#broadcast({ type: 'drain', timeoutMs });
    const backstop = setTimeout(() => this.#killStragglers(timeoutMs + DRAIN_BACKSTOP_MS), timeoutMs + DRAIN_BACKSTOP_MS);
    await exited;
    clearTimeout(backstop);
  }

  /** Workers still there well after their drain should have ended them: stuck (or stopped), so killed, each named. */
  #killStragglers(afterMs: number): void {
    for (const member of this.#members.values()) {
      const { worker } = member;
      member.hung = true;
      const { id, process: { pid } } = worker;
      this.#options.logger.error({ event: 'worker_killed', worker: id, pid, afterMs }, `worker ${id} (pid ${pid}) had not exited ${afterMs / 1000} s into the shutdown (event loop stuck or process stopped?): killed with SIGKILL`);
      worker.process.kill('SIGKILL');
    }
  }

  #askMetrics(worker: Worker, timeoutMs: number): Promise<MetricsJson | undefined> {
    const id = this.#nextRequest++;
    return new Promise((resolve) => {
      const done = (metrics: MetricsJson | undefined) => {
        clearTimeout(timer);
        this.#pending.delete(id);
        resolve(metrics);
      };
      const timer = setTimeout(() => done(undefined), timeoutMs);
      this.#pending.set(id, done);
      this.#send(worker, { type: 'metrics', id });
    });
  }

  /** Only to workers that said hello: a message sent earlier would be lost; `start` carries the state they missed. */
  #broadcast(message: ToWorker): void {
    for (const m of this.#members.values()) if (m.greeted) this.#send(m.worker, message);
  }

  /** A worker that is exiting has no channel left; its exit event tells the rest. */
  #send(worker: Worker, message: ToWorker): void {
    if (!worker.isConnected()) return;
    worker.send(message, (err: Error | null) => {
      if (err) this.#options.logger.debug({ event: 'worker_send_failed', worker: worker.id, reason: err.message }, 'message to a worker not delivered');
    });
  }
}

/** The worker_exited line's counts of the connections handed to the worker that it never took, when there were any. */
function untakenField({ handedOn, closed }: UntakenOutcome): { untakenConnections?: number; untakenClosed?: number } {
  return { ...(handedOn + closed > 0 ? { untakenConnections: handedOn + closed } : {}), ...(closed > 0 ? { untakenClosed: closed } : {}) };
}

function untakenNote({ handedOn, closed }: UntakenOutcome): string {
  const connections = (n: number) => (n === 1 ? 'a connection' : `${n} connections`);
  const notes = [
    ...(handedOn > 0 ? [`${connections(handedOn)} handed to it that it had not taken yet went to another worker`] : []),
    ...(closed > 0 ? [`${connections(closed)} handed to it that it had not taken yet closed, no other worker serving the port (their clients see the connection close before the handshake)`] : []),
  ];
  return notes.map((note) => `; ${note}`).join('');
}

/** A worker process that could not be started at all. */
class SpawnFailure extends StartFailure {}

/** cluster.fork(), whose spawn errors other than the usual few (ENOMEM, say) are thrown rather than reported by 'error'. */
function forkWorker(): Worker {
  try {
    return cluster.fork();
  } catch (err) {
    throw spawnFailure('a new worker', err);
  }
}

function spawnFailure(who: string, err: unknown): SpawnFailure {
  const reason = err instanceof Error ? err.message : String(err);
  return new SpawnFailure(`${who} could not be started: ${reason}${spawnHint((err as NodeJS.ErrnoException).code)}`, { cause: err });
}

/** What the usual spawn errors come to for the operator. */
function spawnHint(code: string | undefined): string {
  switch (code) {
    case 'EAGAIN': return ' (the limit on processes and threads is reached: the container\'s pids limit, ulimit -u or systemd\'s TasksMax)';
    case 'ENOMEM': return ' (out of memory)';
    case 'ENOENT': return ` (${process.execPath} was moved or deleted since the start; workers start from that path)`;
    // Workers started later are forked by the primary as --mtls_user, the entrypoint's first ones as root.
    case 'EACCES': return ` (the user this process runs as may not execute ${process.execPath}: after --mtls_user it is no longer root; put it where that user can run it, e.g. /usr/local/bin, mode 0755)`;
    case 'EMFILE': case 'ENFILE': return ' (the open-files limit is reached)';
    // Thrown by cluster.fork(), not emitted: the kernel refused to run a worker with the primary's environment.
    case 'E2BIG': return ' (the environment is more than the kernel passes to a new program: a quarter of the stack limit, ulimit -s, in all, 128 KiB for each variable)';
    default: return '';
  }
}

/** Why a worker may have ended before it listened: the proxy sends no SIGKILL to a worker that is starting. */
function exitHint(signal: string | null): string {
  return signal === 'SIGKILL' ? ' (killed from outside: the out-of-memory killer, or a kill -9?)' : '';
}

/** A worker's startup error as the same one-line user error the single-process path throws. */
function startupError(message: Extract<FromWorker, { type: 'failed' }>): Error {
  if (message.code === 'ERR_LISTEN') return new ListenError(message.message);
  if (message.code === 'ERR_TLS_MATERIAL') return new TlsMaterialError(message.message);
  return new Error(`a proxy worker failed to start: ${message.message}`);
}
