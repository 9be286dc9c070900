/**
 * The bench command line. Defaults live in scenarios.ts (PROFILES, SCENARIOS);
 * the experiment options (--compare, --node-flags, --proxy-args, load
 * overrides) exist for A/B measurements of a change.
 */
import { execFileSync } from 'node:child_process';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import type { ScenarioId } from './protocol.js';
import { PROFILES, SCENARIOS, type Profile, type ProfileSettings } from './scenarios.js';

/** A command line the bench cannot run: its message says what to change, with no stack. */
export class UsageError extends Error {}

const DEFAULT_TARGETS = ['direct', 'nginx', 'proxy', 'proxy-log', 'proxy-relay'];
const TARGETS = [...DEFAULT_TARGETS, 'node-pipe'];

export const USAGE = `usage: npm run bench -- [options]
  --full                 longer runs and 10,000 idle connections (default: quick profile, ~10 min)
  --workers 1,2          worker counts to compare (proxy --mtls_workers and nginx worker_processes)
  --scenarios a,b        subset of: ${SCENARIOS.map((s) => s.id).join(', ')}
  --targets a,b          subset of: direct, nginx, proxy, proxy-log, proxy-relay (default: all of these),
                         node-pipe (a bare Node TLS pipe: the floor of any Node proxy; only when named)
  --duration S           measured seconds per run        --warmup S   warm-up seconds per run
  --idle N               idle connections to hold        --no-nginx   skip nginx even if installed
  --cpu-prof SCENARIO    profile the first ovms-mtls target with 1 worker during that scenario (node --cpu-prof);
                         the bare pipe when it is the only Node target
  --rounds N             run every scenario N times, targets interleaved; report each target's best round
  --node-flags "F ..."   extra node options for the proxy processes (experiments)
  --drivers N  --connections N  --streams N
                         override every scenario's driver processes, connections per driver,
                         and requests in flight per HTTP/2 connection (defaults: bench/scenarios.ts)
  --proxy-args "A ..."   extra options for every proxy (experiments)
  --compare FILE         A/B: also run the proxy launched by FILE (another build's bin/ovms-mtls)
  --compare-node-flags "F ..."  --compare-args "A ..."  --compare-node NODE
                         A/B: node options, proxy options or another node executable (another Node version)
                         for those B rows (FILE defaults to bin/ovms-mtls)
  --out DIR              where results go (default bench/results)
  --keep                 keep the temporary directory (configs, logs, certificates)`;

export interface Options {
  profile: Profile;
  settings: ProfileSettings;
  workers: number[];
  scenarios: ScenarioId[];
  kinds: Set<string>;
  nginx: boolean;
  cpuProf: ScenarioId | undefined;
  nodeFlags: string[];
  compare: string | undefined;
  compareNodeFlags: string[] | undefined;
  compareArgs: string[] | undefined;
  /** The node executable and its version for the B rows, when not this one. */
  compareNode: { path: string; version: string } | undefined;
  proxyArgs: string[];
  load: { drivers?: number; connections?: number; streams?: number };
  out: string;
  keep: boolean;
}

/**
 * The number an option's value spells. Anything else is a usage error: read
 * as NaN, '--duration 3s' measured nothing and reported 0 operations/s.
 */
function numberOf(option: string, value: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n)) throw new UsageError(`--${option} takes a number, not '${value}'`);
  return n;
}

function workerCounts(values: string[]): number[] {
  return values.map((v) => {
    const n = numberOf('workers', v);
    if (!Number.isInteger(n) || n < 1) throw new UsageError(`--workers takes worker counts of 1 or more (--workers 1,2), not '${v}'`);
    return n;
  });
}

/** The node executable given to --compare-node and the version it reports; a usage error when it does not run. */
function nodeExecutable(path: string): { path: string; version: string } {
  try {
    const version = execFileSync(path, ['-p', 'process.version'], { encoding: 'utf8', timeout: 30_000, stdio: ['ignore', 'pipe', 'ignore'] }).trim();
    if (/^v\d+\.\d+\.\d+/.test(version)) return { path, version };
  } catch {
    // reported below, as for output that is not a version
  }
  throw new UsageError(`--compare-node: '${path}' did not run as node (node -p process.version); give the path of a node executable`);
}

/** The parsed command line, or undefined when help was asked for. Throws on an unknown scenario or a value that is not a number. */
export function parseOptions(argv: string[], repoRoot: string): Options | undefined {
  const { values } = parseArgs({
    args: argv,
    options: {
      full: { type: 'boolean' }, workers: { type: 'string' }, scenarios: { type: 'string' }, targets: { type: 'string' },
      duration: { type: 'string' }, warmup: { type: 'string' }, idle: { type: 'string' }, rounds: { type: 'string' },
      'no-nginx': { type: 'boolean' }, 'cpu-prof': { type: 'string' }, 'node-flags': { type: 'string' }, 'proxy-args': { type: 'string' },
      compare: { type: 'string' }, 'compare-node-flags': { type: 'string' }, 'compare-node': { type: 'string' }, 'compare-args': { type: 'string' }, drivers: { type: 'string' }, connections: { type: 'string' }, streams: { type: 'string' },
      out: { type: 'string' }, keep: { type: 'boolean' }, help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) return undefined;
  const profile: Profile = values.full ? 'full' : 'quick';
  const base = PROFILES[profile];
  const seconds = (option: string, v: string | undefined, fallback: number) => (v === undefined ? fallback : Math.max(0.2, numberOf(option, v)) * 1000);
  const count = (option: string, v: string, max: number) => Math.max(1, Math.min(max, Math.floor(numberOf(option, v)) || 1));
  const list = (v: string | undefined) => v?.split(',').map((s) => s.trim()).filter(Boolean);
  const scenarios = (list(values.scenarios) ?? SCENARIOS.map((s) => s.id)) as ScenarioId[];
  for (const s of [...scenarios, ...(values['cpu-prof'] ? [values['cpu-prof']] : [])]) {
    if (!SCENARIOS.some((d) => d.id === s)) throw new UsageError(`unknown scenario '${s}' (one of ${SCENARIOS.map((d) => d.id).join(', ')})`);
  }
  const kinds = list(values.targets) ?? DEFAULT_TARGETS;
  for (const k of kinds) if (!TARGETS.includes(k)) throw new UsageError(`unknown target '${k}' (one of ${TARGETS.join(', ')})`);
  return {
    profile,
    settings: {
      warmupMs: seconds('warmup', values.warmup, base.warmupMs),
      durationMs: seconds('duration', values.duration, base.durationMs),
      maxOps: base.maxOps,
      idleConnections: values.idle === undefined ? base.idleConnections : Math.max(1, Math.min(15_000, numberOf('idle', values.idle))),
      rounds: values.rounds === undefined ? base.rounds : Math.max(1, Math.min(20, Math.floor(numberOf('rounds', values.rounds)) || 1)),
    },
    workers: workerCounts(list(values.workers) ?? ['1', '2']),
    scenarios,
    kinds: new Set(kinds),
    nginx: !values['no-nginx'],
    cpuProf: values['cpu-prof'] as ScenarioId | undefined,
    load: {
      ...(values.drivers ? { drivers: count('drivers', values.drivers, 16) } : {}),
      ...(values.connections ? { connections: count('connections', values.connections, 1000) } : {}),
      ...(values.streams ? { streams: count('streams', values.streams, 1000) } : {}),
    },
    compare: values.compare !== undefined ? resolve(values.compare) : values['compare-node-flags'] !== undefined || values['compare-args'] !== undefined || values['compare-node'] !== undefined ? join(repoRoot, 'bin/ovms-mtls') : undefined,
    compareNode: values['compare-node'] === undefined ? undefined : nodeExecutable(resolve(values['compare-node'])),
    compareNodeFlags: values['compare-node-flags']?.split(' ').filter(Boolean),
    compareArgs: values['compare-args']?.split(' ').filter(Boolean),
    proxyArgs: values['proxy-args']?.split(' ').filter(Boolean) ?? [],
    nodeFlags: values['node-flags']?.split(' ').filter(Boolean) ?? [],
    out: resolve(values.out ?? join(repoRoot, 'bench/results')),
    keep: values.keep ?? false,
  };
}
