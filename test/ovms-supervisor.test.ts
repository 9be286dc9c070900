import { test } from 'node:test';
import assert from 'node:assert/strict';
import { OvmsSupervisor, type RestartPolicy } from '../src/ovms-supervisor.js';
import type { SpawnCommand } from '../src/ovms-child.js';

/** An OVMS stand-in that fails with code 3, after `seconds`. */
function failingAfter(seconds: number): SpawnCommand {
  return { file: '/bin/sh', args: ['-c', seconds === 0 ? 'exit 3' : `sleep ${seconds}; exit 3`] };
}

test('--mtls_restart on-failure: a run as long as stableAfterMs (60 s in the entrypoint) starts the failure count and the backoff over', { timeout: 60_000 }, async () => {
  // Scaled down: 2 s counts as a healthy run here; the quick runs are a shell that exits at once.
  const policy: RestartPolicy = { mode: 'on-failure', initialBackoffMs: 10, maxBackoffMs: 10_000, stableAfterMs: 2000, maxFailuresInARow: 3 };
  const runs = [failingAfter(0), failingAfter(0), failingAfter(2.5), failingAfter(0), failingAfter(0), failingAfter(0)];
  let spawned = 0;
  const supervisor = new OvmsSupervisor({ command: () => runs[spawned++]!, probe: async () => false, restart: policy });
  const delays: number[] = [];
  let gaveUp: number | undefined;
  supervisor.on('restarting', (_attempt, delayMs) => delays.push(delayMs));
  supervisor.on('givingUp', (failures) => (gaveUp = failures));
  supervisor.start();
  const status = await supervisor.done;
  assert.deepEqual(status, { code: 3, signal: null });
  // The long run's failure is the first of a new count; without the reset it would give up at that third run.
  assert.equal(spawned, 5);
  assert.equal(gaveUp, 3);
  assert.deepEqual(delays, [10, 20, 10, 20]);
});
