/**
 * The event-loop delay gauges sample every 10 ms (prom-client's convention: their readings include
 * those 10 ms), and the timer behind them wakes an idle process 100 times a second, ~5 ms of CPU per
 * second each. A proxy without --mtls_admin_port serves no /metrics, so none of its processes may run
 * that timer; with the admin port every process does, as /metrics merges theirs. Seen from outside
 * through Node's diagnostic report, which lists each process's libuv timers.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestPki } from './helpers/pki.js';
import { startCli } from './helpers/cli.js';
import { startUpstreamFixture } from './helpers/harness.js';
import { eventually } from './helpers/ops.js';
import { freeLoopbackPorts } from '../src/ports.js';
import type { ModelServer } from '../src/demo/model-server.js';

/** The resolution of the event-loop delay histograms: a libuv timer repeating every this many ms. */
const SAMPLING_MS = 10;

let pki: TestPki;
let upstream: ModelServer;
let closeAll: () => Promise<void>;

before(async () => ({ pki, upstream, close: closeAll } = await startUpstreamFixture()));
after(() => closeAll());

interface LibuvHandle {
  type: string;
  is_active: boolean;
  repeat?: number;
}

interface Report {
  header: { processId: number };
  libuv: LibuvHandle[];
}

/** The reports in `dir` that are whole: a process writes its report in pieces. */
async function wholeReports(dir: string): Promise<Report[]> {
  const reports: Report[] = [];
  for (const file of (await readdir(dir)).filter((f) => f.endsWith('.json'))) {
    try {
      reports.push(JSON.parse(await readFile(join(dir, file), 'utf8')) as Report);
    } catch {
      // still being written
    }
  }
  return reports;
}

/** Each process's count of active timers repeating every SAMPLING_MS, from a report it writes on SIGURG. */
async function samplingTimers(pids: number[], dir: string): Promise<Map<number, number>> {
  for (const pid of pids) process.kill(pid, 'SIGURG');
  let reports: Report[] = [];
  await eventually(async () => (reports = await wholeReports(dir)).length === pids.length, `a diagnostic report from each of ${pids.length} processes`);
  return new Map(reports.map((r) => [r.header.processId, r.libuv.filter((h) => h.type === 'timer' && h.is_active && h.repeat === SAMPLING_MS).length]));
}

for (const admin of [false, true]) {
  const title = admin
    ? 'with --mtls_admin_port, the primary and each worker sample their event-loop delay for /metrics'
    : 'without --mtls_admin_port, neither the primary nor a worker runs the event-loop delay sampler that woke it 100 times a second';
  test(title, async (t) => {
    const reports = await mkdtemp(join(tmpdir(), 'ovms-mtls-reports-'));
    t.after(() => rm(reports, { recursive: true, force: true }));
    const [grpcPort, adminPort] = (await freeLoopbackPorts(2)) as [number, number];
    const cli = startCli([
      'proxy', '--mtls_workers', '2', '--port', String(grpcPort), '--grpc_bind_address', '127.0.0.1', '--mtls_grpc_upstream', `127.0.0.1:${upstream.grpcPort}`,
      '--mtls_cert', pki.paths['server.pem']!, '--mtls_key', pki.paths['server.key']!, '--mtls_client_ca', pki.paths['client_cert_ca.pem']!,
      ...(admin ? ['--mtls_admin_port', String(adminPort)] : []),
    ], { env: { NODE_OPTIONS: `--report-on-signal --report-signal=SIGURG --report-directory=${reports}` } });
    try {
      const workers = (await cli.logs.waitFor((l) => l.event === 'workers_listening'))['pids'] as number[];
      const pids = [cli.child.pid!, ...workers];
      const timers = await samplingTimers(pids, reports);
      assert.deepEqual([...timers.keys()].sort(), [...pids].sort());
      for (const [pid, count] of timers) {
        if (admin) assert.ok(count >= 1, `process ${pid} samples its event-loop delay`);
        else assert.equal(count, 0, `process ${pid} runs ${count} ${SAMPLING_MS} ms sampling timer(s) while nothing serves /metrics`);
      }
    } finally {
      cli.child.kill('SIGTERM');
      await cli.exited;
    }
  });
}
