/**
 * Runs one scenario against one running target: forks the driver processes,
 * waits for their warm-up, samples the target's CPU and memory from /proc
 * around the measured phase, and merges what the drivers report.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import { Histogram } from './histogram.js';
import type { DriverMessage, DriverSpec, ParentMessage, PhaseResult } from './protocol.js';
import { TreeSampler, cpuNanoseconds, memory, processTree } from './procstat.js';
import type { Scenario, ProfileSettings } from './scenarios.js';
import type { RunningTarget, TargetSpec } from './targets.js';

const DRIVER = fileURLToPath(new URL('./driver.js', import.meta.url));
/** Beyond its own budget, how long a driver may take before it is killed. */
const DRIVER_SLACK_MS = 40_000;

export interface Measurement {
  readonly scenario: Scenario['id'];
  readonly target: string;
  readonly label: string;
  readonly kind: TargetSpec['kind'];
  readonly workers: number;
  readonly accessLog: boolean;
  /** Processes in the target's tree (proxy primary + workers; nginx master + workers). */
  readonly processes: number;
  readonly ops: number;
  readonly errors: number;
  readonly errorSamples: Record<string, number>;
  /** Operations per second over the measured phase (idle: connections held). */
  readonly throughput: number;
  readonly p50Ms: number | undefined;
  readonly p99Ms: number | undefined;
  /** Target CPU (all processes, user + system) per operation, microseconds; undefined for direct. */
  readonly cpuUsPerOp: number | undefined;
  /** Share of one core the target used during the measured phase. */
  readonly cpuCores: number | undefined;
  /** Upstream CPU per operation, microseconds: shows it was not the bottleneck. */
  readonly upstreamCpuUsPerOp: number | undefined;
  /** Peak RSS summed over the target's processes, MiB; undefined for direct. */
  readonly peakRssMiB: number | undefined;
  /** Idle scenario: RSS growth per held connection, KiB. */
  readonly kibPerConnection: number | undefined;
  /**
   * Idle scenario: ms of CPU the target used per second of wall time with no connection open, then with
   * the connections held and silent (timers, monitors, keep-alive: what a proxy costs while nothing happens).
   */
  readonly idleCpuMsPerSecond?: { readonly unconnected: number; readonly holding: number };
  readonly seconds: number;
  /** With several rounds: every round's throughput; the other figures are the best round's. */
  readonly runs?: readonly number[];
  /** With several rounds: every round's CPU per operation, in the order of `runs` (A/B work compares these round by round). */
  readonly cpuUsPerOpRuns?: readonly (number | undefined)[];
  /** With several rounds: every round's errors, in the order of `runs` (`errors` is their sum). */
  readonly errorsRuns?: readonly number[];
}

class Drivers {
  readonly #children: ChildProcess[] = [];
  readonly #inbox: DriverMessage[][] = [];
  readonly #waiters: (() => void)[] = [];

  constructor(specs: DriverSpec[]) {
    specs.forEach((spec, i) => {
      const child = fork(DRIVER, [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
      this.#children.push(child);
      this.#inbox.push([]);
      child.on('message', (m: DriverMessage) => {
        this.#inbox[i]!.push(m);
        for (const wake of this.#waiters.splice(0)) wake();
      });
      child.on('exit', () => {
        for (const wake of this.#waiters.splice(0)) wake();
      });
      child.send({ type: 'start', spec } satisfies ParentMessage);
    });
  }

  broadcast(message: ParentMessage): void {
    for (const child of this.#children) if (child.connected) child.send(message);
  }

  /** The next message of `type` from every driver; throws on failure, early exit or timeout. */
  async collect<T extends DriverMessage['type']>(type: T, timeoutMs: number): Promise<Extract<DriverMessage, { type: T }>[]> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found: Extract<DriverMessage, { type: T }>[] = [];
      for (let i = 0; i < this.#children.length; i++) {
        const inbox = this.#inbox[i]!;
        const failed = inbox.find((m) => m.type === 'failed');
        if (failed && failed.type === 'failed') throw new Error(`driver ${i}: ${failed.message}`);
        const index = inbox.findIndex((m) => m.type === type);
        if (index >= 0) found.push(inbox[index] as Extract<DriverMessage, { type: T }>);
        else if (this.#children[i]!.exitCode !== null) throw new Error(`driver ${i} exited (${this.#children[i]!.exitCode}) before '${type}'`);
      }
      if (found.length === this.#children.length) {
        for (const inbox of this.#inbox) inbox.splice(inbox.findIndex((m) => m.type === type), 1);
        return found;
      }
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`drivers did not report '${type}' within ${timeoutMs} ms`);
      let timer: NodeJS.Timeout | undefined;
      await new Promise<void>((resolve) => {
        this.#waiters.push(resolve);
        timer = setTimeout(resolve, left);
      });
      clearTimeout(timer);
    }
  }

  async close(): Promise<void> {
    await Promise.all(this.#children.map(async (child) => {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = once(child, 'exit');
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
      if (child.connected) child.disconnect();
      await exited;
      clearTimeout(timer);
    }));
  }
}

function driverSpecs(scenario: Scenario, target: RunningTarget, settings: ProfileSettings): DriverSpec[] {
  return Array.from({ length: scenario.drivers }, (_, i) => ({
    ...scenario.spec,
    endpoint: target.endpoint(scenario.id),
    warmupMs: settings.warmupMs,
    durationMs: settings.durationMs,
    maxOps: settings.maxOps,
    // Idle: split the connections over the drivers (each process holds its share of sockets).
    idleConnections: Math.floor(settings.idleConnections / scenario.drivers) + (i < settings.idleConnections % scenario.drivers ? 1 : 0),
  }));
}

export function mergeErrors(into: Record<string, number>, from: Record<string, number>): void {
  for (const [reason, count] of Object.entries(from)) into[reason] = (into[reason] ?? 0) + count;
}

function base(scenario: Scenario, spec: TargetSpec, target: RunningTarget) {
  return { scenario: scenario.id, target: spec.id, label: spec.label, kind: spec.kind, workers: spec.workers, accessLog: spec.accessLog, processes: target.processes };
}

export async function measure(scenario: Scenario, spec: TargetSpec, target: RunningTarget, settings: ProfileSettings, upstreamPid: number): Promise<Measurement> {
  if (scenario.id === 'idle') return measureIdle(scenario, spec, target, settings);
  const drivers = new Drivers(driverSpecs(scenario, target, settings));
  try {
    const warmups = await drivers.collect('ready', settings.warmupMs + DRIVER_SLACK_MS);
    const proxySampler = new TreeSampler(target.pid);
    const upstreamSampler = new TreeSampler(upstreamPid);
    proxySampler.start();
    upstreamSampler.start();
    const started = performance.now();
    drivers.broadcast({ type: 'go' });
    const dones = await drivers.collect('done', settings.durationMs + DRIVER_SLACK_MS);
    const seconds = (performance.now() - started) / 1000;
    const proxy = proxySampler.stop();
    const upstream = upstreamSampler.stop();
    const histogram = new Histogram();
    const errorSamples: Record<string, number> = {};
    let ops = 0;
    let errors = 0;
    const results: PhaseResult[] = dones.map((d) => d.result);
    for (const r of results) {
      ops += r.ops;
      errors += r.errors;
      histogram.merge(r.histogram);
      mergeErrors(errorSamples, r.errorSamples);
    }
    // Warm-up errors count too: a failed call is a failed call.
    for (const w of warmups) {
      errors += w.warmup.errors;
      mergeErrors(errorSamples, w.warmup.errorSamples);
    }
    const isDirect = spec.kind === 'direct';
    return {
      ...base(scenario, spec, target),
      ops,
      errors,
      errorSamples,
      throughput: ops / seconds,
      p50Ms: histogram.count ? histogram.percentile(0.5) / 1000 : undefined,
      p99Ms: histogram.count ? histogram.percentile(0.99) / 1000 : undefined,
      cpuUsPerOp: isDirect || ops === 0 ? undefined : (proxy.cpuSeconds * 1e6) / ops,
      cpuCores: isDirect ? undefined : proxy.cpuSeconds / seconds,
      upstreamCpuUsPerOp: ops === 0 ? undefined : (upstream.cpuSeconds * 1e6) / ops,
      peakRssMiB: isDirect ? undefined : proxy.peakKiB / 1024,
      kibPerConnection: undefined,
      seconds,
    };
  } finally {
    await drivers.close();
  }
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Lowest summed RSS over a few samples: garbage not yet collected should not count as per-connection cost. */
async function settledRssKiB(pid: number): Promise<number> {
  let lowest = Infinity;
  for (let i = 0; i < 5; i++) {
    lowest = Math.min(lowest, memory(processTree(pid)).rssKiB);
    await sleep(400);
  }
  return lowest;
}

/** Windows of CPU measured while idle; the quietest is reported (see cpuMsPerSecond). */
const IDLE_CPU_WINDOWS = 3;
const IDLE_CPU_WINDOW_MS = 3000;

/**
 * CPU the process tree used per second of wall time while the bench only watched it, ms: the quietest of a few
 * windows, as the first ones can still hold the garbage collection or lazy compiling that followed the last work.
 */
async function cpuMsPerSecond(pid: number): Promise<number> {
  const pids = processTree(pid);
  let quietest = Infinity;
  for (let i = 0; i < IDLE_CPU_WINDOWS; i++) {
    const cpuBefore = cpuNanoseconds(pids);
    const started = performance.now();
    await sleep(IDLE_CPU_WINDOW_MS);
    quietest = Math.min(quietest, (cpuNanoseconds(pids) - cpuBefore) / 1e6 / ((performance.now() - started) / 1000));
  }
  return quietest;
}

async function measureIdle(scenario: Scenario, spec: TargetSpec, target: RunningTarget, settings: ProfileSettings): Promise<Measurement> {
  const before = await settledRssKiB(target.pid);
  const unconnected = await cpuMsPerSecond(target.pid);
  const started = performance.now();
  const drivers = new Drivers(driverSpecs(scenario, target, settings));
  try {
    const holding = await drivers.collect('holding', 30_000 + settings.idleConnections * 20);
    const opened = holding.reduce((n, h) => n + h.opened, 0);
    const after = await settledRssKiB(target.pid);
    const holdingCpu = await cpuMsPerSecond(target.pid);
    const peak = memory(processTree(target.pid)).peakKiB;
    drivers.broadcast({ type: 'release' });
    const dones = await drivers.collect('done', 30_000);
    const errorSamples: Record<string, number> = {};
    for (const h of holding) mergeErrors(errorSamples, h.errorSamples);
    for (const d of dones) mergeErrors(errorSamples, d.result.errorSamples);
    const held = dones.reduce((n, d) => n + d.result.ops, 0);
    return {
      ...base(scenario, spec, target),
      ops: held,
      errors: settings.idleConnections - held,
      errorSamples,
      throughput: held,
      p50Ms: undefined,
      p99Ms: undefined,
      cpuUsPerOp: undefined,
      cpuCores: undefined,
      upstreamCpuUsPerOp: undefined,
      peakRssMiB: peak / 1024,
      kibPerConnection: opened > 0 ? (after - before) / opened : undefined,
      idleCpuMsPerSecond: { unconnected, holding: holdingCpu },
      seconds: (performance.now() - started) / 1000,
    };
  } finally {
    await drivers.close();
  }
}
