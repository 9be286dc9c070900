/**
 * The benchmark's command line (`npm run bench -- ...`, bench/options.ts):
 * a value that is not a number stops the bench before it measures anything,
 * with one line naming the option, instead of a report of zeros written
 * over bench/results.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
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
