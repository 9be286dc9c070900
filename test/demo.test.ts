import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, execFile } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, watch } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';
import { BIN, runCli } from './helpers/cli.js';
import { freeLoopbackPorts } from '../src/ports.js';

const run = promisify(execFile);
const ROOT = fileURLToPath(new URL('../../', import.meta.url));

/** Starts `demo ARGS` (under `wrap`, a command line ending in the one it runs) and resolves with it and what it printed once it says it is running. */
async function startDemo(args: string[], wrap: string[] = []): Promise<{ child: ReturnType<typeof spawn>; out: string }> {
  const [command, ...prefix] = [...wrap, process.execPath];
  const child = spawn(command!, [...prefix, BIN, 'demo', ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout!.setEncoding('utf8');
  child.stderr!.setEncoding('utf8').on('data', (c: string) => (err += c));
  await new Promise<void>((resolve, reject) => {
    child.stdout!.on('data', (c: string) => {
      out += c;
      if (out.includes('Press Ctrl-C')) resolve();
    });
    child.once('exit', (code) => reject(new Error(`demo exited ${code}: ${out}${err}`)));
  });
  return { child, out };
}

async function interrupt(child: ReturnType<typeof spawn>): Promise<number | null> {
  child.kill('SIGINT');
  const [code] = (await once(child, 'exit')) as [number | null];
  return code;
}

/**
 * Runs the curl and probe commands the demo printed, each as a shell runs a pasted line: in a directory
 * of its own, as a new shell (in ~, say) is anywhere but the repository root.
 */
async function assertPastedCommandsWork(out: string): Promise<void> {
  const commands = out.split('\n').map((l) => l.trim()).filter((l) => l.startsWith('curl ') || / probe --host /.test(l));
  assert.equal(commands.length, 4);
  const [infer, sse, refused, probe] = commands as [string, string, string, string];
  const cwd = await mkdtemp(join(tmpdir(), 'ovms-mtls-demo-shell-'));
  try {
    const inferred = JSON.parse((await run('bash', ['-c', infer], { cwd })).stdout);
    assert.deepEqual(inferred.outputs[0].data, [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
    assert.match((await run('bash', ['-c', sse], { cwd })).stdout, /data: \[DONE\]/);
    assert.match(JSON.parse((await run('bash', ['-c', refused], { cwd })).stdout).error, /^client certificate refused \(no_certificate\): /);
    assert.match((await run('bash', ['-c', probe], { cwd })).stdout, /ServerReady/);
  } finally {
    await rm(cwd, { recursive: true, force: true });
  }
}

test('demo starts certificates, a model server and the proxy, and every printed command works as pasted', async () => {
  const [grpcPort, restPort] = (await freeLoopbackPorts(2)) as [number, number];
  const { child, out } = await startDemo(['--port', String(grpcPort), '--rest_port', String(restPort)]);
  try {
    await assertPastedCommandsWork(out);
    const certDir = /Throwaway certificates \(valid 1 day\), removed on exit: (\S+)/.exec(out)![1]!;
    assert.ok(existsSync(certDir));
    assert.equal(await interrupt(child), 0);
    assert.equal(existsSync(certDir), false);
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
  }
});

/** A network namespace of its own (root, or user namespaces allowed): its ephemeral port range can be set. */
const NET_NAMESPACE = spawnSync('unshare', ['--user', '--map-root-user', '--net', 'true']).status === 0;

test(
  'demo on ports the system could have given its model server first: the model server takes others, and the demo starts',
  { skip: NET_NAMESPACE ? false : 'unshare --user --net is not available here' },
  async () => {
    // With the ephemeral range 40000-40003 the system gives 40001 first (odd ports, lower half first): asked for as --port,
    // it went to the model server, started on port 0 before the proxy binds, and the demo exited "the port is already in use".
    const range = 'ip link set lo up && sysctl -qw net.ipv4.ip_local_port_range="40000 40003" && exec "$@"';
    const wrap = ['unshare', '--user', '--map-root-user', '--net', 'sh', '-c', range, 'sh'];
    const { child, out } = await startDemo(['--port', '40001', '--rest_port', '40003'], wrap);
    try {
      assert.match(out, /localhost:40001 /);
      assert.equal(await interrupt(child), 0);
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
    }
  },
);

test('demo --dir on a new directory says the certificates are kept, and keeps them after Ctrl-C', async () => {
  const parent = await mkdtemp(join(tmpdir(), 'ovms-mtls-demo-keep-'));
  const dir = join(parent, 'certs');
  const { child, out } = await startDemo(['--dir', dir, '--port', '0', '--rest_port', '0']);
  try {
    assert.ok(out.includes(`Demo certificates (valid 1 day), kept after exit: ${dir}\n`), out);
    assert.doesNotMatch(out, /[Tt]hrowaway/);
    assert.equal(await interrupt(child), 0);
    assert.ok(existsSync(join(dir, 'client.key')) && existsSync(join(dir, 'client_cert_ca.key')), 'the set outlives the demo');
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
    await rm(parent, { recursive: true, force: true });
  }
});

// Read raw, a repeated --dir (a list) served from a temporary directory removed on exit, saying "Throwaway".
test('demo with --dir given twice keeps the last one, as every option does', async () => {
  const parent = await mkdtemp(join(tmpdir(), 'ovms-mtls-demo-twice-'));
  const dir = join(parent, 'second');
  const { child, out } = await startDemo(['--dir', join(parent, 'first'), '--dir', dir, '--port', '0', '--rest_port', '0']);
  try {
    assert.ok(out.includes(`Demo certificates (valid 1 day), kept after exit: ${dir}\n`), out);
    assert.equal(await interrupt(child), 0);
    assert.ok(existsSync(join(dir, 'client_cert_ca.key')), 'the set outlives the demo');
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
    await rm(parent, { recursive: true, force: true });
  }
});

// `--dir=` wrote the set, CA keys included, into the current directory; a --dir that is a file was a stack trace.
test('demo with a blank --dir, or a --dir that is a file, exits 2 with one line and writes nothing', async () => {
  const cwd = await mkdtemp(join(tmpdir(), 'ovms-mtls-demo-blank-'));
  try {
    for (const args of [['--dir='], ['--dir'], ['--dir', ' ']]) {
      // `timeout` bounds the run: a demo that takes the blank for the current directory serves until stopped.
      const res = await runCli(['demo', ...args, '--port', '0', '--rest_port', '0'], { cwd, wrap: ['timeout', '60'] });
      assert.equal(res.code, 2, res.stdout + res.stderr);
      assert.equal(res.stderr, 'ovms-mtls: --dir needs a value (--dir VALUE or --dir=VALUE)\n');
    }
    assert.deepEqual(await readdir(cwd), []);
    await writeFile(join(cwd, 'file'), 'not a directory');
    const res = await runCli(['demo', '--dir', join(cwd, 'file'), '--port', '0', '--rest_port', '0']);
    assert.equal(res.code, 2, res.stdout + res.stderr);
    // It said `cannot check FILE/server.pem: ENOTDIR: not a directory, lstat ...`, where `certs init --dir FILE` says this.
    assert.equal(res.stderr, `ovms-mtls: ${join(cwd, 'file')} exists and is not a directory\n`);
  } finally {
    await rm(cwd, { recursive: true, force: true });
  }
});

// Printed unquoted, a path with a space split in two: curl looked up the host `sp`, probe refused an extra argument.
test('demo --dir on a path with a space and a quote prints commands that work as pasted', async () => {
  const parent = await mkdtemp(join(tmpdir(), 'ovms-mtls-demo-paste-'));
  const dir = join(parent, "Bob's certs");
  const { child, out } = await startDemo(['--dir', dir, '--port', '0', '--rest_port', '0']);
  try {
    await assertPastedCommandsWork(out);
    assert.equal(await interrupt(child), 0);
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
    await rm(parent, { recursive: true, force: true });
  }
});

/** A demo interrupted once its first certificate file appears: its exit code, and whether it had said it was up by then. */
async function interruptAtFirstCertificate(): Promise<{ code: number | null; wasUp: boolean; keptWhole: boolean }> {
  const parent = await mkdtemp(join(tmpdir(), 'ovms-mtls-demo-early-'));
  const dir = join(parent, 'certs');
  await mkdir(dir);
  // The first certificate file is the moment: the demo is running its own code, well before it says "Press Ctrl-C".
  const watcher = watch(dir);
  const firstFile = once(watcher, 'change');
  const child = spawn(process.execPath, [BIN, 'demo', '--dir', dir, '--port', '0', '--rest_port', '0'], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout!.setEncoding('utf8').on('data', (c: string) => (out += c));
  try {
    await firstFile;
    const wasUp = /Press Ctrl-C/.test(out);
    const code = await interrupt(child);
    return { code, wasUp, keptWhole: existsSync(join(dir, 'client.key')) };
  } finally {
    watcher.close();
    if (child.exitCode === null) child.kill('SIGKILL');
    await rm(parent, { recursive: true, force: true });
  }
}

test('a Ctrl-C while the demo is still starting (its certificates being written) stops it with 0 once started, instead of killing it', async () => {
  // A machine that holds this process up past the demo's start lets the Ctrl-C come late: such a try proves nothing, so it is tried again.
  const tries: { code: number | null; wasUp: boolean; keptWhole: boolean }[] = [];
  do tries.push(await interruptAtFirstCertificate());
  while (tries.at(-1)!.wasUp && tries.length < 3);
  assert.ok(tries.some((t) => !t.wasUp), 'one Ctrl-C came while the demo was starting');
  for (const t of tries) {
    assert.equal(t.code, 0);
    assert.ok(t.keptWhole, 'the set it was writing is whole and kept');
  }
});

test('demo with a bad --mtls_log_level exits 2 with one line and leaves no temporary directory behind', async () => {
  const scratch = await mkdtemp(join(tmpdir(), 'ovms-mtls-demo-test-'));
  try {
    const res = await runCli(['demo', '--mtls_log_level', 'loud', '--port', '0', '--rest_port', '0'], { env: { ...process.env, TMPDIR: scratch } });
    assert.equal(res.code, 2, res.stderr);
    assert.equal(res.stderr, "ovms-mtls: --mtls_log_level: 'loud' is not one of fatal, error, warn, info, debug, trace, silent\n");
    assert.deepEqual(await readdir(scratch), []);
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
});

// `demo --port 9443 --rest_port 9443` said "the port is already in use", as if another process held it; the proxy names both options.
test('demo with the same port for gRPC and REST exits 2 naming both options, as the proxy does, and leaves no temporary directory behind', async () => {
  const scratch = await mkdtemp(join(tmpdir(), 'ovms-mtls-demo-test-'));
  try {
    const [port] = await freeLoopbackPorts(1);
    const res = await runCli(['demo', '--port', String(port), '--rest_port', String(port)], { env: { ...process.env, TMPDIR: scratch }, wrap: ['timeout', '60'] });
    assert.equal(res.code, 2, res.stdout + res.stderr);
    assert.equal(res.stderr, `ovms-mtls: --port and --rest_port are both ${port}: gRPC and REST need a port each, as for OVMS\n`);
    assert.deepEqual(await readdir(scratch), []);
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
});

// A read-only root file system with no writable /tmp (docker run --read-only without --tmpfs /tmp): the throwaway
// certificates have nowhere to go. That was "internal error" with a stack trace and exit 70.
test('demo with no writable temporary directory exits 2 with one line saying what to do', async () => {
  const res = await runCli(['demo', '--port', '0', '--rest_port', '0'], { env: { ...process.env, TMPDIR: join(tmpdir(), 'ovms-mtls-no-such-dir') }, wrap: ['timeout', '60'] });
  assert.equal(res.code, 2, res.stdout + res.stderr);
  assert.match(res.stderr, /^ovms-mtls: demo: cannot create a directory for its throwaway certificates in \S+ovms-mtls-no-such-dir: ENOENT; mount a writable \/tmp or set TMPDIR to a writable directory\n$/);
});

test('demo --dir on a directory that holds a certificate set exits 2 with one line and leaves the set as it was', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-demo-dir-'));
  try {
    assert.equal((await runCli(['certs', 'init', '--dir', dir])).code, 0);
    const caKey = await readFile(join(dir, 'client_cert_ca.key'));
    // A port in use ends a demo that went ahead and overwrote the set, instead of leaving it running.
    const taken = createServer();
    await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve));
    const res = await runCli(['demo', '--dir', dir, '--port', String((taken.address() as AddressInfo).port), '--rest_port', '0']).finally(() => taken.close());
    assert.equal(res.code, 2, res.stdout + res.stderr);
    assert.match(res.stderr, /^ovms-mtls: demo --dir: .*server\.pem already exists \(and 8 more of the files to write\); the demo writes a new set and keeps no existing one: give a new or empty --dir\n$/);
    assert.deepEqual(await readFile(join(dir, 'client_cert_ca.key')), caKey);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

// `demo --help` said `ovms-mtls demo [--port 9443] [--rest_port 8443] [--dir DIR]`, without the --mtls_log_level its
// option list and the README name, and the top-level --help said `ovms-mtls demo` with no options at all.
test("demo's usage line is the README's, in demo --help and in the top-level --help, and names every option demo takes", async () => {
  const reference = (await readFile(join(ROOT, 'README.md'), 'utf8')).split('## Command-line reference\n')[1]!;
  const synopsis = /^ovms-mtls demo .*$/m.exec(reference)![0];
  const demoHelp = await runCli(['demo', '--help']);
  assert.equal(demoHelp.stdout.split('\n')[0], synopsis);
  const options = [...demoHelp.stdout.matchAll(/^ {2}(--\w+) /gm)].map((m) => m[1]!);
  assert.deepEqual(options, ['--port', '--rest_port', '--dir', '--mtls_log_level']);
  for (const option of options) assert.ok(synopsis.includes(`[${option} `), `${synopsis} names ${option}`);
  assert.ok((await runCli(['--help'])).stdout.includes(`\n  ${synopsis}\n`), 'the top-level --help gives the same line');
});
