/**
 * How the benchmark's rounds become its report (bench/report.ts): each
 * target keeps its best round's figures, but a failed operation in any round
 * stays in the Errors column and in the verdicts. No figure is measured here.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { Measurement } from '../bench/measure.js';
import { bestRuns, markdownTables, verdicts, withRatios } from '../bench/report.js';

function round(target: string, kind: Measurement['kind'], throughput: number, errors: Record<string, number>): Measurement {
  const count = Object.values(errors).reduce((n, e) => n + e, 0);
  return {
    scenario: 'grpc-unary-2.9m', target, label: target, kind, workers: 1, accessLog: false, processes: 1,
    ops: throughput * 3, errors: count, errorSamples: errors, throughput, p50Ms: 1, p99Ms: 2,
    cpuUsPerOp: 100, cpuCores: 0.5, upstreamCpuUsPerOp: 10, peakRssMiB: 50, kibPerConnection: undefined, seconds: 3,
  };
}

test('a target whose slower round failed calls reports them: Errors sums every round, the verdict on "zero errors" is not met', () => {
  const rows = withRatios(bestRuns([
    round('nginx-1w', 'nginx', 100, {}),
    round('ovms-mtls-1w', 'proxy', 90, { 'grpc-status 13: injected': 7, 'stream reset 2': 1 }),
    round('nginx-1w', 'nginx', 100, {}),
    round('ovms-mtls-1w', 'proxy', 120, {}),
  ]));
  const proxy = rows.find((r) => r.target === 'ovms-mtls-1w')!;
  assert.equal(proxy.throughput, 120, 'the best round figures');
  assert.deepEqual(proxy.runs, [90, 120]);
  assert.equal(proxy.errors, 8);
  assert.deepEqual(proxy.errorsRuns, [8, 0]);
  assert.deepEqual(proxy.errorSamples, { 'grpc-status 13: injected': 7, 'stream reset 2': 1 });
  assert.match(markdownTables(rows), /\| ovms-mtls-1w \| 120 \| 1\.20× .*\| \*\*8\*\* \(grpc-status 13: injected\) \|/);
  const goal = verdicts(rows).find((v) => v.goal.startsWith('gRPC 2.9 MB'))!;
  assert.deepEqual(goal.results, [{ target: 'ovms-mtls-1w', value: '1.20×, 8 errors', met: false }]);
});

test('the idle table gives the CPU a target used per second with no connection open and with all of them held', () => {
  const idle = (target: string, kind: Measurement['kind'], unconnected: number, holding: number): Measurement => ({
    ...round(target, kind, 2000, {}), scenario: 'idle', p50Ms: undefined, p99Ms: undefined, cpuUsPerOp: undefined, cpuCores: undefined,
    kibPerConnection: 40.5, idleCpuMsPerSecond: { unconnected, holding },
  });
  const tables = markdownTables(withRatios([idle('nginx-1w', 'nginx', 0, 0.1), idle('ovms-mtls-1w', 'proxy', 1.62, 12.5)]));
  assert.match(tables, /\| CPU ms\/s, none open \| CPU ms\/s, all held \|/);
  assert.match(tables, /^\| nginx-1w \| 2,000 \| 0 \| 40\.5 \| 50\.0 \| 0\.00 \| 0\.10 \|$/m);
  assert.match(tables, /^\| ovms-mtls-1w \| 2,000 \| 0 \| 40\.5 \| 50\.0 \| 1\.62 \| 12\.5 \|$/m);
});
