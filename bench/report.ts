/**
 * Turns measurements into what people read: ratios against nginx (same
 * worker count) and against the direct path, the Markdown tables, and the
 * verdict on each target of issue #6.
 */
import { mergeErrors, type Measurement } from './measure.js';
import { SCENARIOS } from './scenarios.js';
import type { ScenarioId } from './protocol.js';

export interface Row extends Measurement {
  /** Throughput / nginx's with the same worker count. */
  readonly vsNginx: number | undefined;
  readonly vsDirect: number | undefined;
  /** CPU per operation / nginx's. */
  readonly cpuVsNginx: number | undefined;
}

export interface Machine {
  readonly nproc: number;
  readonly cpuModel: string;
  readonly memGiB: number;
  readonly kernel: string;
  readonly node: string;
  readonly nginx: string | undefined;
  readonly loadBefore: string;
  readonly loadAfter: string;
}

export interface Verdict {
  readonly goal: string;
  readonly results: { readonly target: string; readonly value: string; readonly met: boolean | undefined }[];
}

export interface BenchResults {
  readonly date: string;
  readonly profile: string;
  readonly machine: Machine;
  readonly notes: readonly string[];
  readonly rows: readonly Row[];
  readonly verdicts: readonly Verdict[];
  readonly profileSummary?: string | undefined;
}

/**
 * Per scenario and target, the least disturbed round (its other figures come
 * with it): on a shared machine interference only ever slows a run down, so
 * that is the round with the highest throughput - or, for SSE, whose rate is
 * fixed by the upstream, the lowest p99 latency. Errors are not a round's
 * figure but the target's: those of every round count (a failed call in a
 * round that measured slower is still a failed call).
 */
export function bestRuns(all: readonly Measurement[]): Measurement[] {
  const groups = new Map<string, Measurement[]>();
  for (const m of all) {
    const key = `${m.scenario}\u0000${m.target}`;
    groups.set(key, [...(groups.get(key) ?? []), m]);
  }
  const better = (a: Measurement, b: Measurement) => (a.scenario === 'sse' ? (b.p99Ms ?? Infinity) < (a.p99Ms ?? Infinity) : b.throughput > a.throughput);
  return [...groups.values()].map((runs) => {
    const best = runs.reduce((a, b) => (better(a, b) ? b : a));
    if (runs.length === 1) return best;
    const tenths = (n: number) => Math.round(n * 10) / 10;
    const errorSamples: Record<string, number> = {};
    for (const r of runs) mergeErrors(errorSamples, r.errorSamples);
    return {
      ...best,
      errors: runs.reduce((n, r) => n + r.errors, 0),
      errorSamples,
      runs: runs.map((r) => tenths(r.throughput)),
      cpuUsPerOpRuns: runs.map((r) => (r.cpuUsPerOp === undefined ? undefined : tenths(r.cpuUsPerOp))),
      errorsRuns: runs.map((r) => r.errors),
    };
  });
}

export function withRatios(measurements: readonly Measurement[]): Row[] {
  const find = (scenario: ScenarioId, pick: (m: Measurement) => boolean) => measurements.find((m) => m.scenario === scenario && pick(m));
  return measurements.map((m) => {
    const nginx = find(m.scenario, (n) => n.kind === 'nginx' && n.workers === m.workers);
    const direct = find(m.scenario, (n) => n.kind === 'direct');
    const ratio = (a: number | undefined, b: number | undefined) => (a !== undefined && b !== undefined && b > 0 && m.kind !== 'direct' ? a / b : undefined);
    return {
      ...m,
      vsNginx: m.kind === 'nginx' ? undefined : ratio(m.throughput, nginx?.throughput),
      vsDirect: ratio(m.throughput, direct?.throughput),
      cpuVsNginx: m.kind === 'nginx' ? undefined : ratio(m.cpuUsPerOp, nginx?.cpuUsPerOp),
    };
  });
}

export function num(n: number | undefined): string {
  if (n === undefined || !Number.isFinite(n)) return '–';
  if (Math.abs(n) >= 1000) return Math.round(n).toLocaleString('en-US');
  if (Math.abs(n) >= 100) return n.toFixed(0);
  if (Math.abs(n) >= 10) return n.toFixed(1);
  return n.toFixed(2);
}

export function ratio(n: number | undefined): string {
  return n === undefined || !Number.isFinite(n) ? '–' : `${n.toFixed(2)}×`;
}

function errorCell(r: Row): string {
  if (r.errors === 0) return '0';
  const top = Object.entries(r.errorSamples).sort((a, b) => b[1] - a[1])[0];
  return top ? `**${r.errors}** (${top[0].replace(/\|/g, '/')})` : `**${r.errors}**`;
}

export function markdownTables(rows: readonly Row[]): string {
  const out: string[] = [];
  out.push('| Scenario | Target | Throughput | vs nginx | vs direct | p50 ms | p99 ms | Errors | CPU µs/op | CPU vs nginx | CPU cores | Peak RSS MiB |');
  out.push('|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|');
  for (const scenario of SCENARIOS.filter((s) => s.id !== 'idle')) {
    const group = rows.filter((r) => r.scenario === scenario.id);
    group.forEach((r, i) => {
      const name = i === 0 ? `${scenario.title} (${scenario.unit})` : '';
      out.push(`| ${name} | ${r.label} | ${num(r.throughput)} | ${ratio(r.vsNginx)} | ${ratio(r.vsDirect)} | ${num(r.p50Ms)} | ${num(r.p99Ms)} | ${errorCell(r)} | ${num(r.cpuUsPerOp)} | ${ratio(r.cpuVsNginx)} | ${num(r.cpuCores)} | ${num(r.peakRssMiB)} |`);
    });
  }
  const idle = rows.filter((r) => r.scenario === 'idle');
  if (idle.length > 0) {
    out.push(
      '',
      '| Idle mTLS HTTP/2 connections | Held | Errors | RSS per connection KiB | Peak RSS MiB | CPU ms/s, none open | CPU ms/s, all held |',
      '|---|--:|--:|--:|--:|--:|--:|',
    );
    for (const r of idle) {
      const cpu = r.idleCpuMsPerSecond;
      out.push(`| ${r.label} | ${num(r.throughput)} | ${errorCell(r)} | ${num(r.kibPerConnection)} | ${num(r.peakRssMiB)} | ${num(cpu?.unconnected)} | ${num(cpu?.holding)} |`);
    }
  }
  return out.join('\n');
}

/** Throughput with N workers over throughput with 1, per scenario, for the proxy and for nginx. */
export function markdownScaling(rows: readonly Row[]): string | undefined {
  const counts = [...new Set(rows.filter((r) => r.kind !== 'direct').map((r) => r.workers))].sort((a, b) => a - b);
  if (counts.length < 2) return undefined;
  const kinds: { label: string; pick: (r: Row) => boolean }[] = [
    { label: 'ovms-mtls', pick: (r) => r.kind === 'proxy' && !r.accessLog && !r.target.startsWith('compare') },
    { label: 'ovms-mtls relay', pick: (r) => r.target.endsWith('-relay') && !r.target.startsWith('compare') },
    { label: 'nginx', pick: (r) => r.kind === 'nginx' },
  ];
  const head = `| Scenario | ${kinds.flatMap((k) => counts.slice(1).map((n) => `${k.label} ${n} vs 1 worker`)).join(' | ')} |`;
  const out = [head, `|---|${kinds.flatMap(() => counts.slice(1).map(() => '--:')).join('|')}|`];
  for (const scenario of SCENARIOS.filter((s) => s.id !== 'idle')) {
    const cells = kinds.flatMap((k) => counts.slice(1).map((n) => {
      const one = rows.find((r) => r.scenario === scenario.id && r.workers === 1 && k.pick(r));
      const many = rows.find((r) => r.scenario === scenario.id && r.workers === n && k.pick(r));
      return one && many && one.throughput > 0 ? ratio(many.throughput / one.throughput) : '–';
    }));
    if (cells.some((c) => c !== '–')) out.push(`| ${scenario.title} | ${cells.join(' | ')} |`);
  }
  return out.join('\n');
}

interface Goal {
  readonly goal: string;
  readonly check: (rows: readonly Row[], target: Row) => { value: string; met: boolean | undefined } | undefined;
}

const pick = (rows: readonly Row[], scenario: ScenarioId, like: Row) => rows.find((r) => r.scenario === scenario && r.target === like.target);

const GOALS: Goal[] = [
  {
    goal: 'gRPC 1 KiB unary: throughput ≥ 1.0× nginx and CPU per call ≤ 1.5× nginx',
    check: (rows, t) => {
      const r = pick(rows, 'grpc-unary-1k', t);
      if (!r || r.vsNginx === undefined) return undefined;
      return { value: `${ratio(r.vsNginx)} / CPU ${ratio(r.cpuVsNginx)}`, met: r.vsNginx >= 1 && (r.cpuVsNginx ?? Infinity) <= 1.5 && r.errors === 0 };
    },
  },
  {
    goal: 'gRPC 2.9 MB unary: throughput ≥ 1.0× nginx, zero errors',
    check: (rows, t) => {
      const r = pick(rows, 'grpc-unary-2.9m', t);
      if (!r || r.vsNginx === undefined) return undefined;
      return { value: `${ratio(r.vsNginx)}, ${r.errors} errors`, met: r.vsNginx >= 1 && r.errors === 0 };
    },
  },
  {
    goal: 'REST 1 KiB (HTTP/1.1 and HTTP/2): throughput ≥ 1.0× nginx',
    check: (rows, t) => {
      const h1 = pick(rows, 'rest-h1-1k', t);
      const h2 = pick(rows, 'rest-h2-1k', t);
      if (h1?.vsNginx === undefined || h2?.vsNginx === undefined) return undefined;
      return { value: `h1 ${ratio(h1.vsNginx)}, h2 ${ratio(h2.vsNginx)}`, met: h1.vsNginx >= 1 && h2.vsNginx >= 1 && h1.errors + h2.errors === 0 };
    },
  },
  {
    goal: 'SSE: p99 from upstream write to client receipt ≤ 1 ms',
    check: (rows, t) => {
      const r = pick(rows, 'sse', t);
      if (!r || r.p99Ms === undefined) return undefined;
      return { value: `p99 ${num(r.p99Ms)} ms`, met: r.p99Ms <= 1 && r.errors === 0 };
    },
  },
  {
    goal: 'Handshakes/s ≥ 0.8× nginx',
    check: (rows, t) => {
      const r = pick(rows, 'handshake', t);
      if (!r || r.vsNginx === undefined) return undefined;
      return { value: ratio(r.vsNginx), met: r.vsNginx >= 0.8 && r.errors === 0 };
    },
  },
  {
    goal: 'Idle connections: ≤ 40 KiB RSS each (10,000 held in --full)',
    check: (rows, t) => {
      const r = pick(rows, 'idle', t);
      if (!r || r.kibPerConnection === undefined) return undefined;
      return { value: `${num(r.kibPerConnection)} KiB × ${num(r.throughput)}`, met: r.kibPerConnection <= 40 && r.errors === 0 };
    },
  },
];

export function verdicts(rows: readonly Row[]): Verdict[] {
  const proxies = rows.filter((r, i) => r.kind === 'proxy' && rows.findIndex((o) => o.target === r.target) === i);
  return GOALS.map((g) => ({
    goal: g.goal,
    results: proxies.flatMap((p) => {
      const result = g.check(rows, p);
      return result ? [{ target: p.label, ...result }] : [];
    }),
  }));
}

export function markdownVerdicts(list: readonly Verdict[]): string {
  const out = ['| Target (issue #6) | Result | Met |', '|---|---|:-:|'];
  for (const v of list) {
    for (const r of v.results) out.push(`| ${v.goal} | ${r.target}: ${r.value} | ${r.met === undefined ? '?' : r.met ? 'yes' : '**no**'} |`);
    if (v.results.length === 0) out.push(`| ${v.goal} | not measured (scenario not run, or no nginx) | ? |`);
  }
  return out.join('\n');
}

export function markdownReport(results: BenchResults): string {
  const m = results.machine;
  const scaling = markdownScaling(results.rows);
  return [
    `## ovms-mtls benchmark (${results.profile} profile, ${results.date})`,
    '',
    `Machine: ${m.nproc} × ${m.cpuModel}, ${m.memGiB} GiB RAM, Linux ${m.kernel}, Node ${m.node}, ${m.nginx ?? 'nginx not installed'}.`,
    `Load average before: ${m.loadBefore}; after: ${m.loadAfter}.`,
    ...results.notes.map((n) => `- ${n}`),
    '',
    markdownTables(results.rows),
    '',
    markdownVerdicts(results.verdicts),
    ...(scaling ? ['', '### Scaling with workers (throughput ratio)', '', scaling] : []),
    ...(results.profileSummary ? ['', results.profileSummary] : []),
    '',
  ].join('\n');
}
