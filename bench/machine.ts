/** Facts about the machine a run came from, for the report. */
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { availableParallelism, loadavg, release, totalmem } from 'node:os';
import { join } from 'node:path';
import type { Machine } from './report.js';

export function findNginx(): string | undefined {
  for (const dir of [...(process.env['PATH'] ?? '').split(':'), '/usr/sbin', '/usr/local/sbin', '/usr/local/nginx/sbin']) {
    if (dir && existsSync(join(dir, 'nginx'))) return join(dir, 'nginx');
  }
  return undefined;
}

function nginxVersion(path: string): string {
  const out = spawnSync(path, ['-v'], { encoding: 'utf8' });
  return (out.stderr || out.stdout).trim().replace(/^nginx version: /, '');
}

export function loadAverage(): string {
  return loadavg().map((l) => l.toFixed(2)).join(', ');
}

export function machine(nginx: string | undefined, loadBefore: string): Machine {
  const cpuinfo = readFileSync('/proc/cpuinfo', 'utf8');
  return {
    nproc: availableParallelism(),
    cpuModel: /model name\s*:\s*(.*)/.exec(cpuinfo)?.[1]?.trim() ?? 'unknown CPU',
    memGiB: Math.round(totalmem() / 2 ** 30),
    kernel: release(),
    node: process.version,
    nginx: nginx ? nginxVersion(nginx) : undefined,
    loadBefore,
    loadAfter: loadAverage(),
  };
}
