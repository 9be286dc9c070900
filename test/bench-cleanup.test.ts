/**
 * The benchmark (`npm run bench`, bench/) leaves nothing running behind it:
 * interrupted mid-run, or with a target that never became ready, every
 * process it started is gone and its temporary directory (certificates and
 * private keys, logs) removed. No figure is measured here.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { processTree } from '../bench/procstat.js';
import { findNginx } from '../bench/machine.js';
import { writeBenchPki } from '../bench/pki.js';
import { startTarget, type BenchContext } from '../bench/targets.js';
import { processGone } from './helpers/entrypoint.js';
import { cleanEnv } from './helpers/cli.js';

const RUN = fileURLToPath(new URL('../bench/run.js', import.meta.url));
const REPO = fileURLToPath(new URL('../..', import.meta.url));

function commandLine(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' ');
  } catch {
    return '';
  }
}

/** Processes that have a file under `dir` open (nginx's workers keep their logs open). */
function processesHolding(dir: string): number[] {
  return readdirSync('/proc').filter((e) => /^\d+$/.test(e)).map(Number).filter((pid) => {
    try {
      return readdirSync(`/proc/${pid}/fd`).some((fd) => {
        try {
          return readlinkSync(`/proc/${pid}/fd/${fd}`).startsWith(dir);
        } catch {
          return false;
        }
      });
    } catch {
      return false;
    }
  });
}

async function waitFor(what: string, ms: number, condition: () => boolean): Promise<void> {
  const deadline = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`gave up waiting for ${what} after ${ms} ms`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

function killLeftovers(pids: readonly number[]): void {
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
}

test('SIGINT to the bench mid-run stops the proxy it measures and removes its temporary directory, then exits 130', async () => {
  const scratch = mkdtempSync(join(tmpdir(), 'bench-cleanup-'));
  const benchTmp = join(scratch, 'tmp');
  mkdirSync(benchTmp);
  const bench = spawn(process.execPath, [RUN, '--no-nginx', '--targets', 'proxy', '--workers', '1', '--scenarios', 'rest-h1-1k',
    '--warmup', '0.2', '--duration', '120', '--rounds', '1', '--drivers', '1', '--connections', '1', '--out', join(scratch, 'out')], {
    cwd: REPO, env: { ...cleanEnv(), TMPDIR: benchTmp }, stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  bench.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
  const exited = once(bench, 'exit') as Promise<[number | null, NodeJS.Signals | null]>;
  let started: number[] = [];
  try {
    // Measuring: the proxy answered its probe and a driver is loading it.
    await waitFor('the proxy under load', 120_000, () => {
      started = processTree(bench.pid!).slice(1);
      const lines = started.map(commandLine);
      return lines.some((l) => l.includes('bin/ovms-mtls proxy')) && lines.some((l) => l.includes('bench/driver.js'));
    });
    bench.kill('SIGINT');
    const [code, signal] = await Promise.race([exited, new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`bench still running 30 s after SIGINT:\n${stderr}`)), 30_000))]);
    await waitFor(`every process the bench started to end (${started.map(commandLine).join('; ')})`, 10_000, () => started.every(processGone));
    assert.deepEqual(readdirSync(benchTmp), [], 'the bench temporary directory is removed');
    assert.deepEqual({ code, signal }, { code: 130, signal: null }, stderr);
    assert.match(stderr, /bench: interrupted \(SIGINT\)/);
  } finally {
    if (bench.exitCode === null && bench.signalCode === null) bench.kill('SIGKILL');
    killLeftovers(started.filter((pid) => !processGone(pid)));
    rmSync(scratch, { recursive: true, force: true });
  }
});

test('nginx that never becomes ready is stopped with its workers: none keeps serving its ports', { skip: findNginx() === undefined && 'nginx is not installed' }, async () => {
  const dir = mkdtempSync(join(tmpdir(), 'bench-cleanup-nginx-'));
  try {
    const pkiDir = join(dir, 'pki');
    mkdirSync(pkiDir, { mode: 0o755 });
    // No upstream listens on port 9: every probe through nginx gets a 502, so it is never ready.
    const ctx: BenchContext = {
      dir, repoRoot: REPO, pki: await writeBenchPki(pkiDir), upstream: { grpc: 9, rest: 9, restH2c: 9, tls: 9 }, upstreamPid: process.pid,
      nginx: findNginx(), maxConnections: 64, nodeFlags: [], proxyArgs: [],
    };
    const spec = { id: 'nginx-2w', label: 'nginx, 2 workers', kind: 'nginx', workers: 2, accessLog: true } as const;
    await assert.rejects(startTarget(spec, ctx, 'rest-h1-1k'), /nginx, 2 workers: not ready/);
    await waitFor('no process left with the run directory open', 10_000, () => processesHolding(dir).length === 0);
  } finally {
    killLeftovers(processesHolding(dir));
    rmSync(dir, { recursive: true, force: true });
  }
});
