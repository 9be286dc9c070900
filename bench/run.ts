/**
 * `npm run bench`: measures ovms-mtls against nginx and against the direct
 * path, scenario by scenario, all on loopback, and writes
 * bench/results/latest.{md,json,svg}. See bench/README.md.
 */
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { constants as osConstants, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { writeBenchPki } from './pki.js';
import { SCENARIOS } from './scenarios.js';
import { USAGE, UsageError, parseOptions, type Options } from './options.js';
import { findNginx, loadAverage, machine } from './machine.js';
import { startTarget, startUpstream, stopAllTargets, type BenchContext, type TargetSpec } from './targets.js';
import { measure, type Measurement } from './measure.js';
import { bestRuns, markdownReport, num, verdicts, withRatios, type BenchResults } from './report.js';
import { svgChart } from './chart.js';
import { summarizeProfile } from './profile-summary.js';

const HERE = fileURLToPath(new URL('.', import.meta.url));
const REPO = resolve(HERE, '../..');
const RELAY_ARGS = ['--mtls_grpc_mode', 'relay', '--mtls_rest_mode', 'relay'];

function targetList(options: Options, workers: number[], nginx: boolean): TargetSpec[] {
  const list: TargetSpec[] = [];
  const w = (n: number) => `${n} worker${n > 1 ? 's' : ''}`;
  if (options.kinds.has('direct')) list.push({ id: 'direct', label: 'direct (no proxy)', kind: 'direct', workers: 0, accessLog: false });
  for (const n of workers) {
    if (nginx && options.kinds.has('nginx')) list.push({ id: `nginx-${n}w`, label: `nginx, ${w(n)}`, kind: 'nginx', workers: n, accessLog: true });
    if (options.kinds.has('proxy')) list.push({ id: `ovms-mtls-${n}w`, label: `ovms-mtls, ${w(n)}`, kind: 'proxy', workers: n, accessLog: false });
    if (options.kinds.has('proxy-log')) list.push({ id: `ovms-mtls-${n}w-log`, label: `ovms-mtls, ${w(n)}, access log`, kind: 'proxy', workers: n, accessLog: true });
    if (options.kinds.has('proxy-relay')) {
      list.push({ id: `ovms-mtls-${n}w-relay`, label: `ovms-mtls relay, ${w(n)}, access log`, kind: 'proxy', workers: n, accessLog: true, extraArgs: RELAY_ARGS });
    }
    // One process, nothing to scale: measured once, beside the 1-worker rows.
    if (options.kinds.has('node-pipe') && n === 1) list.push({ id: 'node-pipe', label: 'bare Node TLS pipe (reference)', kind: 'pipe', workers: 1, accessLog: false });
    if (options.compare) {
      const b = { cli: options.compare, nodeFlags: options.compareNodeFlags, extraArgs: options.compareArgs, node: options.compareNode?.path };
      const on = options.compareNode ? `, Node ${options.compareNode.version}` : '';
      if (options.kinds.has('proxy')) list.push({ id: `compare-${n}w`, label: `B: ovms-mtls, ${w(n)}${on}`, kind: 'proxy', workers: n, accessLog: false, ...b });
      if (options.kinds.has('proxy-log')) list.push({ id: `compare-${n}w-log`, label: `B: ovms-mtls, ${w(n)}, access log${on}`, kind: 'proxy', workers: n, accessLog: true, ...b });
      if (options.kinds.has('proxy-relay')) {
        list.push({ id: `compare-${n}w-relay`, label: `B: ovms-mtls relay, ${w(n)}, access log${on}`, kind: 'proxy', workers: n, accessLog: true, ...b, extraArgs: [...RELAY_ARGS, ...(options.compareArgs ?? [])] });
      }
    }
  }
  return list;
}

/**
 * Does this build run several workers? Starts it with 2 and counts its
 * processes. Returns why not, or undefined when it does.
 */
async function workersMissing(ctx: BenchContext): Promise<string | undefined> {
  try {
    const target = await startTarget({ id: 'workers-probe', label: 'ovms-mtls, 2 workers', kind: 'proxy', workers: 2, accessLog: false }, ctx, 'grpc-unary-1k');
    const processes = target.processes;
    await target.stop();
    return processes > 1 ? undefined : 'it ran as one process';
  } catch (err) {
    return `it did not start: ${(err as Error).message.split('\n')[0]}`;
  }
}

function progress(i: number, total: number, m: Measurement, unit: string): void {
  const what = m.scenario === 'idle'
    ? `${num(m.throughput)} held, ${num(m.kibPerConnection)} KiB/conn`
    : `${num(m.throughput)} ${unit}, p50 ${num(m.p50Ms)} ms, p99 ${num(m.p99Ms)} ms, CPU ${num(m.cpuUsPerOp)} µs/op`;
  process.stderr.write(`[${i}/${total}] ${m.scenario} · ${m.label}: ${what}, ${m.errors} errors\n`);
}

/**
 * Ctrl-C or `kill` mid-run: the proxy or nginx being measured would outlive
 * the bench (nothing tells them it went), holding its ports, and the
 * temporary directory would stay with its private keys. Stop them, remove
 * it, then exit as the signal would have. Drivers and the upstream follow
 * by themselves: they exit when their IPC channel to the bench closes.
 */
function stopOnSignals(dir: string, keep: boolean): void {
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.once(signal, () => {
      process.stderr.write(`bench: interrupted (${signal}): stopping the targets${keep ? '' : ` and removing ${dir}`}\n`);
      void stopAllTargets().finally(() => {
        if (keep) process.stderr.write(`bench: kept ${dir}\n`);
        else rmSync(dir, { recursive: true, force: true });
        process.exit(128 + osConstants.signals[signal]);
      });
    });
  }
}

async function main(): Promise<number> {
  const options = parseOptions(process.argv.slice(2), REPO);
  if (!options) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  if (!existsSync(join(REPO, 'dist/src/cli/main.js'))) throw new UsageError('dist/src is missing: build first (npx tsc -p tsconfig.json)');
  const loadBefore = loadAverage();
  const notes: string[] = [];
  // The machine line names the nginx installed even when --no-nginx skips it.
  const installedNginx = findNginx();
  const nginx = options.nginx ? installedNginx : undefined;
  if (!options.nginx && installedNginx) notes.push('nginx skipped (--no-nginx): no nginx rows, every ratio to nginx reads –');
  if (options.nginx && !nginx) {
    const message = 'nginx is not installed: skipping the nginx rows and every ratio to nginx (apt-get install -y nginx-light; see bench/README.md)';
    process.stderr.write(`bench: ${message}\n`);
    notes.push(message);
  }
  const dir = mkdtempSync(join(tmpdir(), 'ovms-mtls-bench-'));
  stopOnSignals(dir, options.keep);
  const pkiDir = join(dir, 'pki');
  mkdirSync(pkiDir, { mode: 0o755 });
  const pki = await writeBenchPki(pkiDir);
  const upstream = await startUpstream(pkiDir);
  const cpuProfileDir = join(dir, 'cpu-profile');
  try {
    const ctx: BenchContext = {
      dir, repoRoot: REPO, pki, upstream: upstream.ports, upstreamPid: upstream.child.pid!, nginx,
      maxConnections: options.settings.idleConnections + 2000,
      nodeFlags: options.nodeFlags,
      proxyArgs: options.proxyArgs,
    };
    let workers = options.workers;
    const missing = workers.some((n) => n > 1) ? await workersMissing(ctx) : undefined;
    if (missing) {
      workers = [1];
      const message = `--mtls_workers 2 does not work in this build (${missing}): only 1-worker rows were measured`;
      process.stderr.write(`bench: ${message}\n`);
      notes.push(message);
    }
    const targets = targetList(options, workers, nginx !== undefined);
    const { drivers, connections, streams } = options.load;
    const scenarios = SCENARIOS.filter((s) => options.scenarios.includes(s.id)).map((s) => s.id === 'idle' ? s : {
      ...s,
      drivers: drivers ?? s.drivers,
      spec: { ...s.spec, connections: connections ?? s.spec.connections, streamsPerConnection: streams ?? s.spec.streamsPerConnection },
    });
    if (Object.keys(options.load).length > 0) notes.push(`load overridden: ${JSON.stringify(options.load)}`);
    const measurements: Measurement[] = [];
    const total = scenarios.reduce((n, s) => n + targets.length * (s.id === 'idle' ? 1 : options.settings.rounds), 0);
    process.stderr.write(`bench: ${options.profile} profile, ${total} runs (${(options.settings.warmupMs / 1000).toFixed(1)} s warm-up + ${(options.settings.durationMs / 1000).toFixed(1)} s each), load average ${loadBefore}\n`);
    let i = 0;
    // The first Node target (ovms-mtls or the bare pipe) with 1 worker, in list order, is the one profiled.
    const profiled = targets.find((t) => (t.kind === 'proxy' || t.kind === 'pipe') && t.workers === 1);
    for (const scenario of scenarios) {
      // Rounds interleave the targets, so a burst of load from elsewhere on the machine hits them alike.
      for (let round = 0; round < (scenario.id === 'idle' ? 1 : options.settings.rounds); round++) for (const spec of targets) {
        i += 1;
        const profileThis = round === 0 && scenario.id === options.cpuProf && spec === profiled;
        try {
          const target = await startTarget(spec, ctx, scenario.id, profileThis ? cpuProfileDir : undefined);
          try {
            const m = await measure(scenario, spec, target, options.settings, ctx.upstreamPid);
            measurements.push(m);
            progress(i, total, m, scenario.unit);
          } finally {
            await target.stop();
          }
        } catch (err) {
          const message = `${scenario.id} · ${spec.label}: run failed: ${(err as Error).message}`;
          process.stderr.write(`[${i}/${total}] ${message}\n`);
          notes.push(message.split('\n')[0]!);
        }
      }
    }
    let profileSummary: string | undefined;
    if (options.cpuProf && existsSync(cpuProfileDir)) {
      const file = readdirSync(cpuProfileDir).find((f) => f.endsWith('.cpuprofile'));
      if (file) {
        const title = SCENARIOS.find((s) => s.id === options.cpuProf)!.title;
        profileSummary = `### CPU profile: ${profiled?.label}, ${title}\n\n${summarizeProfile(join(cpuProfileDir, file))}`;
        mkdirSync(options.out, { recursive: true });
        writeFileSync(join(options.out, `${options.cpuProf}.cpuprofile`), readFileSync(join(cpuProfileDir, file)));
      }
    }
    const rows = withRatios(bestRuns(measurements));
    const results: BenchResults = {
      date: new Date().toISOString(),
      profile: options.profile,
      machine: machine(installedNginx, loadBefore),
      notes,
      rows,
      verdicts: verdicts(rows),
      profileSummary,
    };
    const markdown = markdownReport(results);
    mkdirSync(options.out, { recursive: true });
    writeFileSync(join(options.out, 'latest.json'), `${JSON.stringify(results, null, 2)}\n`);
    writeFileSync(join(options.out, 'latest.md'), markdown);
    writeFileSync(join(options.out, 'latest.svg'), svgChart(rows, `ovms-mtls vs nginx, ${results.machine.nproc} × ${results.machine.cpuModel} (${options.profile}, ${results.date.slice(0, 10)})`));
    process.stdout.write(`${markdown}\nbench: wrote ${join(options.out, 'latest.{md,json,svg}')}\n`);
    return 0;
  } finally {
    upstream.child.kill('SIGTERM');
    if (options.keep) process.stderr.write(`bench: kept ${dir}\n`);
    else rmSync(dir, { recursive: true, force: true });
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    const usage = err instanceof UsageError || (err as NodeJS.ErrnoException).code?.startsWith('ERR_PARSE_ARGS');
    process.stderr.write(usage ? `bench: ${(err as Error).message} (npm run bench -- --help)\n` : `bench: ${(err as Error).stack ?? String(err)}\n`);
    process.exitCode = 1;
  },
);
