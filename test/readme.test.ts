import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { ALL_OPTIONS } from '../src/options.js';

const ROOT = new URL('../../', import.meta.url);
const readme = readFileSync(new URL('README.md', ROOT), 'utf8');

test('the README command-line reference names every option the product accepts', () => {
  const missing = ALL_OPTIONS.map((o) => `--${o.name}`).filter((flag) => !readme.includes(`\`${flag}\``));
  assert.deepEqual(missing, []);
});

test('CI runs exactly the test command the README gives', () => {
  const ci = readFileSync(new URL('.ci/run', ROOT), 'utf8');
  assert.match(readme, /^npm test\s/m);
  assert.match(ci, /^npm test$/m);
});
