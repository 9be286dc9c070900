import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));

/** The reporter flags of `npm test`, as package.json gives them. */
function npmTestReporterFlags(): string[] {
  const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { scripts: { test: string } };
  return pkg.scripts.test.split(/\s+/).filter((word) => word.startsWith('--test-reporter'));
}

function runNodeTest(files: string[]): Promise<{ code: number; stdout: string }> {
  // A runner started from inside a test file would otherwise report to this one, not to its stdout.
  const env = { ...process.env };
  delete env['NODE_TEST_CONTEXT'];
  return new Promise((resolve) => {
    execFile(process.execPath, ['--test', ...npmTestReporterFlags(), ...files], { cwd: ROOT, env }, (error, stdout) => {
      resolve({ code: typeof error?.code === 'number' ? error.code : 0, stdout });
    });
  });
}

const FAILING = `import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
describe('outer suite', () => {
  describe('inner suite', () => {
    it('passes', () => {});
    it('adds wrongly', () => { assert.equal(1 + 1, 3, 'the sum the test wanted'); });
  });
});
`;
const PASSING = `import { it } from 'node:test';
it('passes too', () => {});
`;
const CRASHING = `process.stderr.write('the fixture file is missing\\n');
throw new Error('crashed before any test');
`;

test('npm test lists each failed test after the TAP summary, with its suites, file, line and error, and a crashed file with its stderr; a passing run prints TAP alone', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'failure-summary-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const [failing, passing, crashing] = ['failing', 'passing', 'crashing'].map((name) => join(dir, `${name}.test.mjs`)) as [string, string, string];
  await writeFile(failing, FAILING);
  await writeFile(passing, PASSING);
  await writeFile(crashing, CRASHING);

  const failed = await runNodeTest([passing, failing, crashing]);
  assert.equal(failed.code, 1);
  const summaryAt = failed.stdout.indexOf('\n# fail 2\n');
  const listAt = failed.stdout.indexOf('FAILED (2)');
  assert.ok(summaryAt > 0, failed.stdout);
  assert.ok(listAt > summaryAt, `the list of failures comes after the TAP summary:\n${failed.stdout}`);
  const list = failed.stdout.slice(listAt);
  assert.match(list, /^- outer suite > inner suite > adds wrongly$/m);
  assert.match(list, /failing\.test\.mjs:6:5$/m);
  assert.match(list, /AssertionError \[ERR_ASSERTION\]: the sum the test wanted/);
  assert.match(list, /^- .*crashing\.test\.mjs$/m);
  assert.match(list, /^ +the fixture file is missing$/m, 'a crashed file\'s stderr says why');
  assert.match(list, /^ +Error: crashed before any test$/m);
  assert.doesNotMatch(list, /^- outer suite$|^- outer suite > inner suite$|passes/m, 'suites failed by their tests and passing tests are not listed');

  const passed = await runNodeTest([passing]);
  assert.equal(passed.code, 0);
  assert.match(passed.stdout, /^# pass 1$/m);
  assert.doesNotMatch(passed.stdout, /FAILED/);
});
