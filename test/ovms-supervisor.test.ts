import { test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import { OvmsSupervisor, type AfterHang, type HangWatchSettings, type RestartPolicy } from '../src/ovms-supervisor.js';
import { describeExit, exitCodeOf, HUNG_EXIT_CODE, spawnChild, waitForExit, type ExitStatus, type SpawnCommand } from '../src/ovms-child.js';
import { hangCheckPeriodMs, type Hang, type Liveness } from '../src/ovms-watchdog.js';
import { logSupervisorEvents } from '../src/cli/entrypoint-lifecycle.js';
import { createLogger } from '../src/log.js';
import { LogCapture } from './helpers/harness.js';

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

/** Runs until killed; `onTerm` is the shell's SIGTERM trap ('' = ignore it). */
function runningUntilSignalled(onTerm: string): SpawnCommand {
  return { file: '/bin/sh', args: ['-c', `trap '${onTerm}' TERM; while :; do sleep 0.05; done`] };
}

const NEVER: RestartPolicy = { mode: 'never', initialBackoffMs: 10, maxBackoffMs: 10, stableAfterMs: 60_000, maxFailuresInARow: 5 };

/** One long-running stand-in, ready at once, watched for hangs. */
function watched(onTerm: string, hangWatch: HangWatchSettings): OvmsSupervisor {
  return new OvmsSupervisor({ command: () => runningUntilSignalled(onTerm), probe: async () => true, restart: NEVER, hangWatch });
}

/** The supervisor's events in order, as names. */
function recordEvents(supervisor: OvmsSupervisor): string[] {
  const seen: string[] = [];
  for (const event of ['spawn', 'ready', 'exit', 'restarting', 'hung', 'done'] as const) supervisor.on(event, () => seen.push(event));
  return seen;
}

test('hang watch: a check that never returns is not doubled, and counts as no answer; OVMS that exits by itself on the SIGTERM ends with one outcome, a failure though it chose its code', { timeout: 60_000 }, async () => {
  let checks = 0;
  const supervisor = watched('exit 3', { timeoutMs: 500, stopGraceMs: 30_000, check: () => ((checks += 1), new Promise<Liveness>(() => undefined)) });
  const seen = recordEvents(supervisor);
  let hang: Hang | undefined;
  supervisor.on('hung', (h) => (hang = h));
  supervisor.start();
  const status = await supervisor.done;
  assert.deepEqual(status, { code: 3, signal: null, hung: true });
  assert.equal(exitCodeOf(status), HUNG_EXIT_CODE);
  assert.deepEqual(seen, ['spawn', 'ready', 'hung', 'exit', 'done']);
  assert.equal(checks, 1);
  assert.equal(hang?.stopped, false);
  assert.ok(hang!.silentMs >= 500, String(hang!.silentMs));
});

test('hang watch: an OVMS deaf to SIGTERM is SIGKILLed after the stop grace, and on-failure starts it again', { timeout: 60_000 }, async () => {
  const policy: RestartPolicy = { ...NEVER, mode: 'on-failure' };
  let spawned = 0;
  const supervisor = new OvmsSupervisor({
    command: () => runningUntilSignalled(spawned++ === 0 ? '' : 'exit 0'),
    probe: async () => spawned === 1,
    restart: policy,
    hangWatch: { timeoutMs: 500, stopGraceMs: 200, check: async () => 'stopped' },
  });
  const exits: ExitStatus[] = [];
  const restarted: AfterHang[] = [];
  supervisor.on('exit', (status) => exits.push(status));
  supervisor.on('hung', (_hang, next) => restarted.push(next));
  supervisor.start();
  await once(supervisor, 'restarting');
  assert.deepEqual(exits, [{ code: null, signal: 'SIGKILL' }]);
  assert.deepEqual(restarted, ['restart']);
  await once(supervisor, 'spawn');
  assert.equal(supervisor.state().restarts, 1);
  assert.equal(spawned, 2);
  // It may not have set its trap yet: how it ends is not the point.
  await supervisor.stop('SIGKILL', 0);
});

test('hang watch: once the entrypoint is stopping (draining), a silent OVMS is not killed under the drain', { timeout: 60_000 }, async () => {
  let checks = 0;
  const supervisor = watched('exit 0', { timeoutMs: 200, stopGraceMs: 1000, check: async () => ((checks += 1), 'silent') });
  const seen = recordEvents(supervisor);
  supervisor.start();
  try {
    await once(supervisor, 'ready');
    supervisor.stopRestarting();
    // Several hang timeouts and check periods.
    await sleep(3000);
    assert.deepEqual(seen, ['spawn', 'ready']);
    assert.equal(checks, 0);
    assert.equal(supervisor.state().up, true);
    assert.deepEqual(await supervisor.stop('SIGTERM', 5000), { code: 0, signal: null });
  } finally {
    await supervisor.stop('SIGKILL', 0);
  }
});

test('hang watch: six checks per timeout, one every 1 to 10 s', () => {
  assert.equal(hangCheckPeriodMs(60_000), 10_000);
  assert.equal(hangCheckPeriodMs(12_000), 2000);
  assert.equal(hangCheckPeriodMs(1000), 1000);
  assert.equal(hangCheckPeriodMs(600_000), 10_000);
});

// Under the open-files limit the spawn itself fails (EMFILE): that was logged 'OVMS exited with 127', as if OVMS had run, the reason dropped.
test('a spawn that fails is reported with its reason, and EMFILE names the limit to raise', async () => {
  const status = await waitForExit(spawnChild({ file: '/nonexistent/ovms', args: [] }, 'ignore'));
  assert.deepEqual(status, { code: 127, signal: null, spawnError: 'ENOENT' });
  assert.equal(describeExit(status), 'OVMS could not be started (ENOENT)');
  assert.equal(describeExit({ code: 127, signal: null, spawnError: 'EMFILE' }), 'OVMS could not be started (EMFILE: this process is at its open-files limit; raise ulimit -n / the nofile limit)');
  assert.equal(describeExit({ code: 3, signal: null }), 'OVMS exited with 3');
  assert.equal(describeExit({ code: null, signal: 'SIGKILL' }), 'OVMS exited with SIGKILL');
});

test('--mtls_restart on-failure: a restart is counted (restarted) when OVMS starts again, not when it is scheduled; a stop during the backoff cancels it uncounted', { timeout: 60_000 }, async () => {
  const slow: RestartPolicy = { mode: 'on-failure', initialBackoffMs: 60_000, maxBackoffMs: 60_000, stableAfterMs: 60_000, maxFailuresInARow: 5 };
  const cancelled = new OvmsSupervisor({ command: () => failingAfter(0), probe: async () => false, restart: slow });
  const counted: number[] = [];
  cancelled.on('restarted', (restarts) => counted.push(restarts));
  cancelled.start();
  await once(cancelled, 'restarting');
  assert.deepEqual(await cancelled.stop('SIGTERM', 0), { code: 3, signal: null });
  assert.deepEqual(counted, [], 'a restart that never happened was counted');
  assert.equal(cancelled.state().restarts, 0);

  const quick: RestartPolicy = { ...slow, initialBackoffMs: 10, maxBackoffMs: 10 };
  let spawned = 0;
  const restarted = new OvmsSupervisor({ command: () => (spawned++ === 0 ? failingAfter(0) : runningUntilSignalled('exit 0')), probe: async () => false, restart: quick });
  const countedAfter: number[] = [];
  restarted.on('restarted', (restarts) => countedAfter.push(restarts));
  restarted.start();
  try {
    await once(restarted, 'restarting');
    await once(restarted, 'spawn');
    assert.deepEqual(countedAfter, [1]);
  } finally {
    await restarted.stop('SIGKILL', 0);
  }
});

// A fifth failure in a row that was a hang was announced "then restarting it" (ovms_hung), and the next line gave up.
test('hang watch: the hung event says what follows, and it is what happens: giving up, not a restart, when that failure is the last allowed in a row', { timeout: 60_000 }, async () => {
  const policy: RestartPolicy = { mode: 'on-failure', initialBackoffMs: 10, maxBackoffMs: 10, stableAfterMs: 60_000, maxFailuresInARow: 2 };
  let spawned = 0;
  const supervisor = new OvmsSupervisor({
    // The first run fails at once; the second is ready, then answers nothing.
    command: () => (spawned++ === 0 ? failingAfter(0) : runningUntilSignalled('exit 0')),
    probe: async () => spawned === 2,
    restart: policy,
    hangWatch: { timeoutMs: 500, stopGraceMs: 5000, check: async () => 'silent' },
  });
  const seen = recordEvents(supervisor);
  const announced: AfterHang[] = [];
  supervisor.on('hung', (_hang, next) => announced.push(next));
  const logs = new LogCapture();
  logSupervisorEvents(supervisor, createLogger({ level: 'info', destination: logs }), () => ({}));
  supervisor.start();
  try {
    assert.deepEqual(await supervisor.done, { code: 0, signal: null, hung: true });
    assert.deepEqual(seen, ['spawn', 'exit', 'restarting', 'spawn', 'ready', 'hung', 'exit', 'done']);
    assert.deepEqual(announced, ['give-up']);
    const hung = logs.lines.find((l) => l.event === 'ovms_hung')!;
    assert.match(hung['msg'] as string, /then exiting with 124 \(--mtls_restart on-failure gives up: too many failures in a row\)/);
  } finally {
    await supervisor.stop('SIGKILL', 0);
  }
});
