import { test } from 'node:test';
import assert from 'node:assert/strict';
import { availableParallelism } from 'node:os';
import { cpusFromCgroupQuota, defaultWorkerCount, parseLimits } from '../src/config.js';

test('the default worker count follows a cgroup CPU quota and never exceeds the CPUs', () => {
  assert.equal(cpusFromCgroupQuota('max 100000'), undefined);
  assert.equal(cpusFromCgroupQuota('200000 100000'), 2);
  assert.equal(cpusFromCgroupQuota('150000 100000'), 2);
  assert.equal(cpusFromCgroupQuota('50000 100000'), 1);
  assert.equal(cpusFromCgroupQuota(undefined), undefined);
  assert.equal(defaultWorkerCount('100000 100000'), 1);
  assert.equal(defaultWorkerCount('max 100000'), availableParallelism());
  assert.equal(defaultWorkerCount('6400000 100000'), availableParallelism());
});

test('--mtls_idle_timeout is seconds (65 by default); a bad value names the option', () => {
  assert.equal(parseLimits({}).idleTimeoutMs, 65_000);
  assert.equal(parseLimits({ mtls_idle_timeout: '2.5' }).idleTimeoutMs, 2_500);
  assert.throws(() => parseLimits({ mtls_idle_timeout: 'soon' }), /--mtls_idle_timeout/);
});
