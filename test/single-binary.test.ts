/**
 * Builds the single executable once (about 5 s; needs the compiled dist/), copies
 * it away from the repository, runs it with an empty PATH (no node, no
 * node_modules within reach) and sends real gRPC and REST calls through it.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { copyFile, mkdir, mkdtemp, readdir, readFile, rename, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { createSecureServer, type ServerHttp2Stream } from 'node:http2';
import type { AddressInfo } from 'node:net';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { grpcClients, https1, startUpstream } from './helpers/harness.js';
import { eventually, httpGet, sample } from './helpers/ops.js';
import { FAKE_OVMS, makeFakeExecutable, tlsArgs } from './helpers/entrypoint.js';
import { freeLoopbackPorts } from '../src/ports.js';
import { unary } from '../src/demo/grpc-client.js';
import type { ModelServer } from '../src/demo/model-server.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const run = promisify(execFile);

let pki: TestPki;
let upstream: ModelServer;
let dir: string;
let exe: string;
let child: ChildProcess | undefined;
const ports = { grpc: 0, rest: 0, admin: 0 };

before(async () => {
  const { stdout } = await run(process.execPath, ['scripts/build-binary.mjs'], { cwd: ROOT, maxBuffer: 16 * 1024 * 1024 });
  assert.match(stdout, /wrote dist\/sea\/ovms-mtls/);
  dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-sea-'));
  exe = join(dir, 'ovms-mtls');
  await copyFile(join(ROOT, 'dist/sea/ovms-mtls'), exe);
  pki = await createTestPki();
  upstream = await startUpstream();
});

after(async () => {
  child?.kill('SIGKILL');
  await upstream?.close();
  await pki?.cleanup();
  if (dir) await rm(dir, { recursive: true, force: true });
});

const bareEnv = { PATH: '/nonexistent', HOME: '/nonexistent' };

describe('single executable', () => {
  test('prints its version with no node on PATH and no node_modules nearby', async () => {
    const pkg = JSON.parse(await readFile(join(ROOT, 'package.json'), 'utf8')) as { version: string };
    const { stdout } = await run(exe, ['--version'], { cwd: dir, env: bareEnv });
    assert.equal(stdout, `ovms-mtls ${pkg.version}\n`);
  });

  // Every argument is the executable's own, so NODE_OPTIONS is the one way to give Node or V8 an option (a heap size).
  // A V8 flag there made V8 reject the code cache built into the executable, and every process (each worker too)
  // printed "Warning: Code cache data rejected." and advice to run `ovms-mtls --trace-warnings`, an OVMS option.
  test('a V8 option in NODE_OPTIONS (a heap size) puts nothing on stderr', async () => {
    const env = { ...bareEnv, NODE_OPTIONS: '--max-old-space-size=200' };
    const { stdout, stderr } = await run(exe, ['check', '--mtls_cert', pki.paths['server.pem']!, '--mtls_key', pki.paths['server.key']!,
      '--mtls_client_ca', pki.paths['client_cert_ca.pem']!], { cwd: dir, env });
    assert.match(stdout, /^Result: OK/m);
    assert.equal(stderr, '');
  });

  // Its entry runs main() as a plain script: the failed write's error event came before main's exit, which the ES
  // module bin/ovms-mtls reached first, so only the executable died of it (stack trace, exit 1).
  test('stdout closed by its reader or on a full disk: no stack trace, and the exit code of the command', async () => {
    const closed = spawn(exe, ['--help'], { cwd: dir, env: bareEnv, stdio: ['ignore', 'pipe', 'pipe'] });
    closed.stdout!.destroy();
    let stderr = '';
    closed.stderr!.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    assert.equal((await once(closed, 'close'))[0], 0);
    assert.equal(stderr, '');
    // -v: --version also says on stderr, outside the OVMS image, that OVMS's version is not shown.
    const full = await run('/bin/sh', ['-c', `"${exe}" -v > /dev/full`], { cwd: dir, env: bareEnv });
    assert.equal(full.stderr, 'ovms-mtls: cannot write to stdout (ENOSPC): the rest of the output is lost\n');
  });

  test('runs the proxy and carries a real gRPC call and a real REST call', async () => {
    [ports.grpc, ports.rest, ports.admin] = (await freeLoopbackPorts(3)) as [number, number, number];
    child = spawn(exe, ['proxy',
      '--port', String(ports.grpc), '--grpc_bind_address', '127.0.0.1', '--mtls_grpc_upstream', `127.0.0.1:${upstream.grpcPort}`,
      '--rest_port', String(ports.rest), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`,
      '--mtls_cert', pki.paths['server.pem']!, '--mtls_key', pki.paths['server.key']!,
      '--mtls_client_ca', pki.paths['client_cert_ca.pem']!, '--mtls_crl', pki.paths['client_cert_ca.crl']!,
      '--mtls_admin_port', String(ports.admin)], { cwd: dir, env: bareEnv, stdio: ['ignore', 'pipe', 'inherit'] });
    let listening = 0;
    for await (const line of createInterface({ input: child.stdout! })) {
      if (/"event":"listening"/.test(line) && /"listener":"(grpc|rest)"/.test(line)) listening += 1;
      if (listening === 2) break;
    }
    child.stdout!.resume();

    const clients = grpcClients(`localhost:${ports.grpc}`, pki);
    try {
      const { response } = await unary(clients.kserve, 'ModelInfer', { model_name: 'dummy', inputs: [{ name: 'b', datatype: 'FP32', shape: [1, 10], contents: { fp32_contents: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] } }] });
      assert.deepEqual(response.outputs[0]?.contents?.fp32_contents, [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
    } finally {
      clients.close();
    }
    const rest = await https1(ports.rest, pki, { path: '/v2/models/dummy' });
    assert.equal(rest.status, 200);
    assert.equal(JSON.parse(rest.body).name, 'dummy');
    assert.ok(sample((await httpGet(ports.admin, '/metrics')).body, 'ovms_mtls_handshakes_total', { listener: 'grpc', result: 'accepted' })! >= 1);
  });

  test('its probe command (which needs the bundled .proto files) passes against itself', async () => {
    const { stdout } = await run(exe, ['probe', '--host', '127.0.0.1', '--port', String(ports.grpc), '--rest_port', String(ports.rest), '--model', 'dummy',
      '--mtls_cert', pki.paths['client.pem']!, '--mtls_key', pki.paths['client.key']!, '--mtls_ca', pki.paths['server_ca.pem']!], { cwd: dir, env: bareEnv });
    assert.match(stdout, /^probe: all 7 steps passed$/m);
  });

  test('its demo prints a probe command that works as pasted next to the executable alone (no bin/ovms-mtls there)', async () => {
    const [grpcPort, restPort] = (await freeLoopbackPorts(2)) as [number, number];
    const demo = spawn(exe, ['demo', '--port', String(grpcPort), '--rest_port', String(restPort)], { cwd: dir, env: bareEnv, stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      let out = '';
      demo.stdout!.setEncoding('utf8');
      await new Promise<void>((resolve, reject) => {
        demo.stdout!.on('data', (chunk: string) => {
          out += chunk;
          if (out.includes('Press Ctrl-C')) resolve();
        });
        demo.once('exit', (code) => reject(new Error(`demo exited ${code}: ${out}`)));
      });
      const probeLine = out.split('\n').map((line) => line.trim()).find((line) => / probe --host /.test(line));
      assert.ok(probeLine, out);
      const { stdout } = await run('/bin/sh', ['-c', probeLine], { cwd: dir, env: bareEnv });
      assert.match(stdout, /^probe: all 7 steps passed$/m);
      demo.kill('SIGINT');
      const [code] = await once(demo, 'exit');
      assert.equal(code, 0);
    } finally {
      if (demo.exitCode === null) demo.kill('SIGKILL');
    }
  });

  // A read-only root file system with no writable /tmp mounted (docker run --read-only without
  // --tmpfs /tmp): the executable cannot write out its .proto files there.
  test('with no writable temporary directory it still knows its version, and probe says in one line what it needs', async () => {
    const noTemp = { ...bareEnv, TMPDIR: join(dir, 'missing') };
    const pkg = JSON.parse(await readFile(join(ROOT, 'package.json'), 'utf8')) as { version: string };
    const { stdout } = await run(exe, ['--version'], { cwd: dir, env: noTemp });
    assert.equal(stdout, `ovms-mtls ${pkg.version}\n`);
    const probe = await run(exe, ['probe', '--host', '127.0.0.1', '--port', String(ports.grpc), '--model', 'dummy',
      '--mtls_cert', pki.paths['client.pem']!, '--mtls_key', pki.paths['client.key']!, '--mtls_ca', pki.paths['server_ca.pem']!], { cwd: dir, env: noTemp })
      .then(() => assert.fail('probe passed without its .proto files'), (err: { code: number; stderr: string }) => err);
    assert.equal(probe.code, 2, probe.stderr);
    assert.match(probe.stderr, /^ovms-mtls: .*kserve_v2\.proto.*TMPDIR.*\n$/);
    assert.equal(probe.stderr.split('\n').length, 2, probe.stderr);
  });

  // Every process (the primary and each cluster worker) used to unpack its assets into a fresh
  // temporary directory at start; one killed by SIGKILL (the OOM killer) left it in a /tmp that
  // outlives container restarts (a Kubernetes emptyDir), so they piled up.
  test('serving with workers writes nothing to the temporary directory, even when a worker or the whole process is killed', async () => {
    const temp = join(dir, 'serving-tmp');
    await mkdir(temp);
    const env = { ...bareEnv, TMPDIR: temp };
    const [grpcPort, restPort] = (await freeLoopbackPorts(2)) as [number, number];
    const serving = spawn(exe, ['proxy', '--mtls_workers', '2',
      '--port', String(grpcPort), '--grpc_bind_address', '127.0.0.1', '--mtls_grpc_upstream', `127.0.0.1:${upstream.grpcPort}`,
      '--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`,
      '--mtls_cert', pki.paths['server.pem']!, '--mtls_key', pki.paths['server.key']!, '--mtls_client_ca', pki.paths['client_cert_ca.pem']!],
    { cwd: dir, env, stdio: ['ignore', 'pipe', 'inherit'] });
    const lines: string[] = [];
    createInterface({ input: serving.stdout! }).on('line', (line) => lines.push(line));
    const event = (name: string): Record<string, unknown> | undefined =>
      lines.map((line) => JSON.parse(line) as Record<string, unknown>).find((record) => record['event'] === name);
    try {
      await eventually(() => event('workers_listening') !== undefined, 'workers_listening');
      const pids = event('workers_listening')!['pids'] as number[];
      assert.deepEqual(await readdir(temp), [], 'written while serving');

      process.kill(pids[0]!, 'SIGKILL');
      await eventually(() => lines.some((line) => /"event":"listening"/.test(line) && !pids.includes(JSON.parse(line).pid as number)), 'a new worker listening');
      assert.deepEqual(await readdir(temp), [], 'left behind by the killed worker or written by its successor');

      const { stdout } = await run(exe, ['probe', '--host', '127.0.0.1', '--port', String(grpcPort), '--rest_port', String(restPort), '--model', 'dummy',
        '--mtls_cert', pki.paths['client.pem']!, '--mtls_key', pki.paths['client.key']!, '--mtls_ca', pki.paths['server_ca.pem']!], { cwd: dir, env });
      assert.match(stdout, /^probe: all 7 steps passed$/m);
      assert.deepEqual(await readdir(temp), [], 'left behind by probe');

      serving.kill('SIGKILL');
      await once(serving, 'exit');
      const workersGone = (): boolean => lines.filter((line) => /"event":"listening"/.test(line)).every((line) => !alive(JSON.parse(line).pid as number));
      await eventually(workersGone, 'the workers to exit after their primary');
      assert.deepEqual(await readdir(temp), [], 'left behind after SIGKILL');
    } finally {
      if (serving.exitCode === null && serving.signalCode === null) serving.kill('SIGKILL');
    }
  });

  // Workers start from the executable's path: replaced or moved after the start (an upgrade that moves the old file
  // aside), the next worker could not be started. Node reports that as an 'error' event alone, which nothing handled:
  // the primary died of it with a stack trace (exit 1), and the worker still serving died with it.
  test('a worker that cannot be started again (the executable moved away) is logged and tried again while the other worker serves on', async () => {
    const home = join(dir, 'moved');
    await mkdir(home);
    const moving = join(home, 'ovms-mtls');
    await copyFile(exe, moving);
    const [restPort, adminPort] = (await freeLoopbackPorts(2)) as [number, number];
    const pool = startWithWorkers(moving, ['proxy', '--mtls_workers', '2',
      '--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`,
      '--mtls_cert', pki.paths['server.pem']!, '--mtls_key', pki.paths['server.key']!, '--mtls_client_ca', pki.paths['client_cert_ca.pem']!,
      '--mtls_admin_port', String(adminPort)], bareEnv);
    try {
      const reason = await pool.replacementFailure(() => rename(moving, `${moving}.old`));
      assert.match(reason, /^worker \d+ could not be started: spawn .*ovms-mtls ENOENT \(.*ovms-mtls was moved or deleted since the start/);
      assert.equal((await https1(restPort, pki, { path: '/v2/models/dummy' })).status, 200);
      assert.match((await httpGet(adminPort, '/readyz')).body, /1 of 2 workers listening/);

      await rename(`${moving}.old`, moving);
      await eventually(async () => /2 of 2 workers listening/.test((await httpGet(adminPort, '/readyz')).body), 'a new worker listening', 60_000);
      assert.equal(await pool.stop(), 0);
    } finally {
      pool.kill();
    }
  });

  // The entrypoint forks its first workers as root; the primary then runs as --mtls_user, and so forks those that replace them.
  test('the executable in a directory only root may enter, run as the entrypoint with --mtls_user: a replacement worker that cannot be started says why', { skip: process.getuid?.() !== 0 && 'needs root' }, async () => {
    makeFakeExecutable();
    const home = join(dir, 'root-only');
    await mkdir(home, { mode: 0o700 });
    const hidden = join(home, 'ovms-mtls');
    await copyFile(exe, hidden);
    const [restPort] = (await freeLoopbackPorts(1)) as [number];
    // The stand-in OVMS is a node script: node must be on its PATH.
    const pool = startWithWorkers(hidden, ['--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1', ...tlsArgs(pki),
      '--mtls_ovms_binary', FAKE_OVMS, '--mtls_ovms_user', 'nobody', '--mtls_user', 'nobody', '--mtls_workers=2'], { ...bareEnv, PATH: dirname(process.execPath) });
    try {
      const reason = await pool.replacementFailure(async () => undefined);
      assert.match(reason, /could not be started: spawn .*root-only\/ovms-mtls EACCES \(the user this process runs as may not execute .*root-only\/ovms-mtls: after --mtls_user it is no longer root/);
      // A stand-in OVMS still starting has no SIGTERM handler yet: it would die of the signal (143), not stop (0).
      await pool.logged('ovms_ready');
      assert.equal(await pool.stop(), 0);
    } finally {
      pool.kill();
    }
  });

  // A health check's probe is SIGKILLed at its timeout (Docker), a probe waiting on a hung model
  // server gets Ctrl-C: no exit handler runs, and each one left its .proto files behind.
  test('a probe ended by a signal while it waits on a server that never answers leaves nothing in the temporary directory', async () => {
    const temp = join(dir, 'probe-tmp');
    await mkdir(temp);
    const calls: ServerHttp2Stream[] = [];
    const silent = createSecureServer({ key: pki.server.keyPem, cert: pki.server.certPem }, () => undefined).on('stream', (stream) => calls.push(stream));
    silent.listen(0, '127.0.0.1');
    await once(silent, 'listening');
    try {
      for (const signal of ['SIGINT', 'SIGKILL'] as const) {
        const before = calls.length;
        const probe = spawn(exe, ['probe', '--host', '127.0.0.1', '--port', String((silent.address() as AddressInfo).port),
          '--mtls_cert', pki.paths['client.pem']!, '--mtls_key', pki.paths['client.key']!, '--mtls_ca', pki.paths['server_ca.pem']!],
        { cwd: dir, env: { ...bareEnv, TMPDIR: temp }, stdio: 'ignore' });
        try {
          // Its first gRPC call arrived: the .proto files were loaded before it was sent.
          await eventually(() => calls.length > before, `the probe's ServerLive call (${signal})`);
          probe.kill(signal);
          await once(probe, 'exit');
        } finally {
          if (probe.exitCode === null && probe.signalCode === null) probe.kill('SIGKILL');
        }
        assert.deepEqual(await readdir(temp), [], `left behind by a probe ended with ${signal}`);
      }
    } finally {
      for (const call of calls) call.session?.destroy();
      silent.close();
    }
  });

  test('stops on SIGTERM with exit code 0', async () => {
    child!.kill('SIGTERM');
    const [code] = await once(child!, 'exit');
    assert.equal(code, 0);
    child = undefined;
  });
});

/** `executable` serving with workers: its JSON lines, and a worker killed to see what replacing it comes to. */
function startWithWorkers(executable: string, args: readonly string[], env: NodeJS.ProcessEnv) {
  const serving = spawn(executable, args, { cwd: dir, env, stdio: ['ignore', 'pipe', 'pipe'] });
  const lines: string[] = [];
  let stderr = '';
  createInterface({ input: serving.stdout! }).on('line', (line) => lines.push(line));
  serving.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const records = (name: string): Record<string, unknown>[] =>
    lines.flatMap((line) => (line.startsWith('{') ? [JSON.parse(line) as Record<string, unknown>] : [])).filter((record) => record['event'] === name);
  return {
    /** Once the workers listen: `before`, then one worker killed; the reason its replacement could not start, the primary still up. */
    async replacementFailure(before: () => Promise<unknown>): Promise<string> {
      await eventually(() => records('workers_listening').length > 0 || serving.exitCode !== null, 'workers_listening');
      const pids = records('workers_listening')[0]?.['pids'] as number[] | undefined;
      assert.ok(pids, `no workers: ${stderr}`);
      await before();
      process.kill(pids[0]!, 'SIGKILL');
      await eventually(() => records('worker_start_failed').length > 0 || serving.exitCode !== null, 'worker_start_failed');
      assert.equal(serving.exitCode, null, `the primary exited: ${stderr}`);
      assert.equal(stderr, '');
      return String(records('worker_start_failed')[0]!['reason']);
    },
    /** Once a line with this event is out (or the process exited). */
    async logged(event: string): Promise<void> {
      await eventually(() => records(event).length > 0 || serving.exitCode !== null, event);
    },
    async stop(): Promise<number | null> {
      serving.kill('SIGTERM');
      const [code] = (await once(serving, 'exit')) as [number | null];
      return code;
    },
    kill(): void {
      if (serving.exitCode === null && serving.signalCode === null) serving.kill('SIGKILL');
    },
  };
}

/** A zombie counts as gone: its parent was killed, and who reaps it next is up to the container. */
function alive(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}
