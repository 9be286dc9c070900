/**
 * Signals that come while `ovms-mtls` loads, before main() runs (importing it takes a few hundred ms):
 * SIGHUP ended the process (exit 129: a `systemctl reload` right after a start stopped the service for
 * good), SIGUSR1 opened the Node.js inspector, and SIGTERM/SIGINT ended it with 128+N where a serving
 * command that is starting stops its start and exits 0. test/fixtures/hold-launch holds the load of
 * main.js until the test has sent its signal: no timing.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { eventually } from './helpers/ops.js';
import { fakeRuns, FAKE_OVMS, makeFakeExecutable, startWrapper, tlsArgs, type Wrapper } from './helpers/entrypoint.js';
import { freeLoopbackPorts } from '../src/ports.js';

const HOLD_LAUNCH = fileURLToPath(new URL('./fixtures/hold-launch.js', import.meta.url));

let pki: TestPki;
let dir: string;
let runs = 0;

before(async () => {
  makeFakeExecutable();
  pki = await createTestPki();
  dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-launch-signals-'));
});

after(async () => {
  await pki.cleanup();
  await rm(dir, { recursive: true, force: true });
});

interface Held {
  wrapper: Wrapper;
  /** Where the stand-in OVMS writes each run's argv. */
  argvFile: string;
}

/**
 * `ovms-mtls args` held inside its load of main.js, sent `signal` there, then let go. `nodeOptions`: more for
 * NODE_OPTIONS, which the stand-in OVMS inherits too (it loads no main.js, so it is not held).
 */
async function signalWhileLoading(args: readonly string[], signal: NodeJS.Signals, nodeOptions = ''): Promise<Held> {
  runs += 1;
  const hold = join(dir, `hold-${runs}`);
  const argvFile = join(dir, `argv-${runs}.jsonl`);
  const wrapper = startWrapper(args, { NODE_OPTIONS: `--import=${HOLD_LAUNCH} ${nodeOptions}`, HOLD_LAUNCH_PATH: hold, FAKE_OVMS_ARGV_FILE: argvFile });
  const exitedFirst = wrapper.exited.then((r) => Promise.reject(new Error(`exited (${r.code ?? r.signal}) before its load was held: ${wrapper.stderr()}`)));
  exitedFirst.catch(() => {});
  await Promise.race([eventually(() => existsSync(`${hold}.held`), 'the load of main.js held'), exitedFirst]);
  assert.equal(Number(readFileSync(`${hold}.held`, 'utf8')), wrapper.child.pid);
  wrapper.child.kill(signal);
  await writeFile(`${hold}.go`, '');
  return { wrapper, argvFile };
}

async function servingArgs(): Promise<string[]> {
  const [restPort] = (await freeLoopbackPorts(1)) as [number];
  return ['--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1', ...tlsArgs(pki), '--mtls_ovms_binary', FAKE_OVMS, '--mtls_ovms_user', 'root'];
}

for (const signal of ['SIGHUP', 'SIGUSR1'] as const) {
  test(`${signal} while the entrypoint loads neither ends it nor opens the inspector: it starts OVMS and serves, and stops on SIGTERM with 0`, { timeout: 60_000 }, async () => {
    const [inspectPort] = (await freeLoopbackPorts(1)) as [number];
    const { wrapper } = await signalWhileLoading(await servingArgs(), signal, `--inspect-port=127.0.0.1:${inspectPort}`);
    try {
      await wrapper.waitForEvent('ovms_ready');
    } finally {
      wrapper.child.kill('SIGTERM');
    }
    assert.deepEqual(await wrapper.exited, { code: 0, signal: null }, wrapper.stderr());
    assert.doesNotMatch(wrapper.stderr(), /Debugger listening/);
  });
}

for (const signal of ['SIGTERM', 'SIGINT'] as const) {
  test(`a ${signal} while the entrypoint loads stops its start as one while the listeners start does: OVMS is not started, and the exit code is 0`, { timeout: 60_000 }, async () => {
    const { wrapper, argvFile } = await signalWhileLoading(await servingArgs(), signal);
    assert.deepEqual(await wrapper.exited, { code: 0, signal: null }, wrapper.stderr());
    assert.ok(wrapper.logs.some((l) => l.event === 'signal' && l['signal'] === signal), JSON.stringify(wrapper.logs));
    assert.equal(wrapper.logs.find((l) => l.event === 'stopped')?.['exitCode'], 0);
    assert.deepEqual(fakeRuns(argvFile), []);
  });
}

// A command that runs to its end is not stopped and drained: held for good, the signal would be lost (a Ctrl-C on a --pull that waits).
test('a SIGTERM while a command that runs to its end loads (-v, certs init, OVMS --version) ends it by that signal, as one a moment later would: none of it runs', { timeout: 60_000 }, async () => {
  const certDir = join(dir, 'certs-not-written');
  for (const args of [['-v'], ['certs', 'init', '--dir', certDir], ['--version', '--mtls_ovms_binary', FAKE_OVMS]]) {
    const { wrapper, argvFile } = await signalWhileLoading(args, 'SIGTERM');
    assert.deepEqual(await wrapper.exited, { code: null, signal: 'SIGTERM' }, args.join(' '));
    assert.deepEqual(wrapper.ovmsLines, [], args.join(' '));
    assert.deepEqual(fakeRuns(argvFile), [], args.join(' '));
  }
  assert.equal(existsSync(certDir) ? (await readdir(certDir)).length : 0, 0);
});
