/**
 * The helpers that run the CLI as a child (startCli, startWrapper) resolve `exited` only once what the
 * process tree wrote is read, and never wait without bound for it: a test that reads the last lines
 * after `await exited` must find them, and a process left holding the pipe must not hang the test.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startCli } from './helpers/cli.js';
import { processGone, startWrapper } from './helpers/entrypoint.js';
import { eventually, settlesWithin } from './helpers/ops.js';

/**
 * A launcher (`wrap`) that leaves a background shell on the CLI's stdout and stderr: it writes one JSON
 * line and one stderr line once the CLI has exited (it waits for the CLI's pid to go), then sleeps on
 * for `holdSeconds` with the pipes open. It writes its pid first, to stderr.
 */
function lateWriter(holdSeconds: number): string[] {
  const script = [
    'sh -c \'echo "holder $$" >&2; while kill -0 "$1" 2>/dev/null; do sleep 0.05; done;',
    'echo "{\\"event\\":\\"late\\"}"; echo late-stderr >&2;',
    `exec sleep ${holdSeconds}' late "$$" &`,
    'exec "$@"',
  ].join(' ');
  return ['sh', '-c', script, 'launcher'];
}

function holderPid(stderr: string): number {
  return Number(/holder (\d+)/.exec(stderr)?.[1]);
}

test('startCli: a line a process left behind writes after the CLI has exited is in logs and stderr() once `exited` resolves', async () => {
  const cli = startCli(['--version'], { wrap: lateWriter(0) });
  assert.equal(await settlesWithin(cli.exited, 60_000, 'the CLI to exit'), 0);
  assert.ok(cli.logs.lines.some((l) => l.event === 'late'), JSON.stringify(cli.logs.lines));
  assert.match(cli.stderr(), /late-stderr/);
});

test('startCli: a process left holding stdout and stderr does not hold `exited`', async () => {
  const cli = startCli(['--version'], { wrap: lateWriter(300) });
  try {
    // The bound is for a hang only: `exited` waits a couple of seconds for the pipes, never for the holder's 300 s.
    assert.equal(await settlesWithin(cli.exited, 60_000, '`exited` while a holder keeps the pipes open'), 0);
    assert.ok(cli.logs.lines.some((l) => l.event === 'late'), JSON.stringify(cli.logs.lines));
  } finally {
    const holder = holderPid(cli.stderr());
    if (holder > 0 && !processGone(holder)) process.kill(holder, 'SIGKILL');
  }
});

test('startWrapper: a line a process left behind writes after the CLI has exited is in logs once `exited` resolves', async () => {
  const wrapper = startWrapper(['--version'], {}, lateWriter(0));
  const exit = await settlesWithin(wrapper.exited, 60_000, 'the CLI to exit');
  assert.equal(exit.code, 0, wrapper.stderr());
  assert.ok(wrapper.logs.some((l) => l.event === 'late'), JSON.stringify(wrapper.logs));
  assert.match(wrapper.stderr(), /late-stderr/);
  await eventually(() => processGone(holderPid(wrapper.stderr())), 'the late writer to end');
});
