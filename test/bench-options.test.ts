/**
 * The benchmark's command line (`npm run bench -- ...`, bench/options.ts):
 * a value that is not a number stops the bench before it measures anything,
 * with one line naming the option, instead of a report of zeros written
 * over bench/results.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { runCommand } from './helpers/cli.js';
import { findNginx } from '../bench/machine.js';

const RUN = fileURLToPath(new URL('../bench/run.js', import.meta.url));

const CASES: [string[], RegExp][] = [
  [['--duration', '3s'], /--duration takes a number, not '3s'/],
  [['--warmup', 'one'], /--warmup takes a number, not 'one'/],
  [['--idle', '2k'], /--idle takes a number, not '2k'/],
  [['--rounds', 'three'], /--rounds takes a number, not 'three'/],
  [['--streams', 'many'], /--streams takes a number, not 'many'/],
  [['--workers', '1,two'], /--workers takes a number, not 'two'/],
  [['--workers', '0'], /--workers takes worker counts of 1 or more \(--workers 1,2\), not '0'/],
  [['--compare-node', '/nonexistent/node'], /--compare-node: '\/nonexistent\/node' did not run as node \(node -p process.version\); give the path of a node executable/],
  [['--compare-node', '/bin/true'], /--compare-node: '\/bin\/true' did not run as node/],
];

for (const [args, message] of CASES) {
  test(`bench ${args.join(' ')}: one line naming the option, exit 1, nothing measured or written`, async () => {
    const out = join(mkdtempSync(join(tmpdir(), 'bench-options-')), 'results');
    try {
      const r = await runCommand(process.execPath, [RUN, '--no-nginx', '--targets', 'direct', '--scenarios', 'rest-h1-1k', '--out', out, ...args]);
      assert.equal(r.code, 1, r.stderr);
      assert.match(r.stderr, message);
      assert.equal(r.stderr.trimEnd().split('\n').length, 1, r.stderr);
      assert.match(r.stderr, /\(npm run bench -- --help\)$/m);
      assert.equal(existsSync(out), false, 'no results written');
    } finally {
      rmSync(join(out, '..'), { recursive: true, force: true });
    }
  });
}

test('bench --no-nginx with nginx installed: the report names the installed nginx and says it was skipped, not "nginx not installed"', { skip: findNginx() === undefined && 'nginx is not installed' }, async () => {
  const out = join(mkdtempSync(join(tmpdir(), 'bench-options-')), 'results');
  try {
    const r = await runCommand(process.execPath, [RUN, '--no-nginx', '--targets', 'direct', '--scenarios', 'rest-h1-1k', '--warmup', '0.2', '--duration', '0.2', '--rounds', '1', '--connections', '1', '--drivers', '1', '--out', out]);
    assert.equal(r.code, 0, r.stderr);
    const report = readFileSync(join(out, 'latest.md'), 'utf8');
    assert.doesNotMatch(report, /nginx not installed/);
    assert.match(report, /Node v[\d.]+, nginx\/[\d.]+\./);
    assert.match(report, /^- nginx skipped \(--no-nginx\)/m);
  } finally {
    rmSync(join(out, '..'), { recursive: true, force: true });
  }
});

test('bench --compare-node: the B rows run on that node executable and their labels name its version', async () => {
  const out = join(mkdtempSync(join(tmpdir(), 'bench-options-')), 'results');
  // A node that notes each command line it runs, then runs it.
  const node = join(out, '..', 'node');
  const noted = join(out, '..', 'ran');
  writeFileSync(node, `#!/bin/sh\necho "$*" >> '${noted}'\nexec '${process.execPath}' "$@"\n`, { mode: 0o755 });
  try {
    const r = await runCommand(process.execPath, [RUN, '--no-nginx', '--targets', 'proxy,proxy-relay', '--scenarios', 'rest-h1-1k', '--workers', '1', '--compare-node', node,
      '--warmup', '0.2', '--duration', '0.2', '--rounds', '1', '--connections', '1', '--drivers', '1', '--out', out]);
    assert.equal(r.code, 0, r.stderr);
    const rows = (JSON.parse(readFileSync(join(out, 'latest.json'), 'utf8')) as { rows: { target: string; label: string; ops: number }[] }).rows;
    assert.deepEqual(rows.map((row) => [row.target, row.label]), [
      ['ovms-mtls-1w', 'ovms-mtls, 1 worker'],
      ['ovms-mtls-1w-relay', 'ovms-mtls relay, 1 worker, access log'],
      ['compare-1w', `B: ovms-mtls, 1 worker, Node ${process.version}`],
      ['compare-1w-relay', `B: ovms-mtls relay, 1 worker, access log, Node ${process.version}`],
    ]);
    for (const row of rows) assert.ok(row.ops > 0, `${row.label} answered`);
    const proxies = readFileSync(noted, 'utf8').split('\n').filter((line) => / proxy /.test(line));
    assert.equal(proxies.length, 2, 'the two B rows, and only they, ran on it');
    assert.match(proxies[1]!, /--mtls_rest_mode relay/);
  } finally {
    rmSync(join(out, '..'), { recursive: true, force: true });
  }
});
