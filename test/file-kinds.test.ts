/**
 * Paths to TLS files that name no regular file: a FIFO (mkfifo, or a shell's `<(...)`), a directory,
 * a device, a socket, or a file far larger than any PEM file. They were read as files: a FIFO as the
 * key hung the start-up (the entrypoint's deaf to SIGTERM) and a reload, after which SIGTERM logged
 * "stopped" and the process never exited; /dev/zero was read without end; a 2 GiB file was read whole.
 * Every child here gets a bounded wait and is killed in `finally`, so a regression fails its test
 * instead of hanging the suite.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, open, rm, symlink, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { BIN, cleanEnv, startCli } from './helpers/cli.js';
import { fakeRuns, FAKE_OVMS, makeFakeExecutable, startWrapper } from './helpers/entrypoint.js';
import { FILE_NAMES, plainCertDir, servedSerial, type TlsClient } from './helpers/reload.js';
import { freeLoopbackPorts } from '../src/ports.js';
import { normaliseSerial } from '../src/x509.js';
import { FileKindError, readRegularFile, readRegularFileSync } from '../src/regular-file.js';

/** Far longer than any of these runs takes; only a hang reaches it. */
const HANG_GUARD_MS = 60_000;

let pki: TestPki;
let dir: string;
let socketServer: Server;
const paths = { fifo: '', directory: '', socket: '', huge: '', loop: '' };

before(async () => {
  makeFakeExecutable();
  pki = await createTestPki();
  dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-file-kinds-'));
  paths.fifo = join(dir, 'fifo');
  assert.equal(spawnSync('mkfifo', [paths.fifo]).status, 0);
  paths.directory = join(dir, 'a-directory');
  await mkdir(paths.directory);
  paths.loop = join(dir, 'loop');
  await symlink(paths.loop, paths.loop);
  paths.socket = join(dir, 'socket');
  socketServer = createServer().listen(paths.socket);
  await once(socketServer, 'listening');
  // Sparse: no disk space taken, but 2 GiB to whoever reads it.
  paths.huge = join(dir, 'huge.crl');
  const huge = await open(paths.huge, 'w');
  await huge.truncate(2 * 1024 ** 3);
  await huge.close();
});

after(async () => {
  socketServer.close();
  await pki.cleanup();
  await rm(dir, { recursive: true, force: true });
});

/** `promise`, or a rejection naming what hung once HANG_GUARD_MS have passed. */
async function unlessHung<T>(promise: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const hung = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`still waiting for ${what} after ${HANG_GUARD_MS / 1000} s: hung`)), HANG_GUARD_MS);
  });
  try {
    return await Promise.race([promise, hung]);
  } finally {
    clearTimeout(timer);
  }
}

function killIfRunning(child: ChildProcess): void {
  if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
}

/** The CLI run to its end, or killed once it hangs. */
async function runBounded(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, [BIN, ...args], { env: cleanEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
  child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
  try {
    const [code] = (await unlessHung(once(child, 'close'), `ovms-mtls ${args.slice(0, 2).join(' ')} to exit`)) as [number | null];
    return { code, stdout, stderr };
  } finally {
    killIfRunning(child);
  }
}

const set = (): Record<'cert' | 'key' | 'clientCa' | 'crl', string> => ({
  cert: pki.paths['server.pem']!,
  key: pki.paths['server.key']!,
  clientCa: pki.paths['client_cert_ca.pem']!,
  crl: pki.paths['client_cert_ca.crl']!,
});

function tlsFlags(files: Record<'cert' | 'key' | 'clientCa' | 'crl', string>): string[] {
  return ['--mtls_cert', files.cert, '--mtls_key', files.key, '--mtls_client_ca', files.clientCa, '--mtls_crl', files.crl];
}

const NOT_REGULAR = (kind: string, name: string) => new RegExp(`is ${kind}, not a regular file \\(give the path of the PEM file itself, such as ${name.replace('.', '\\.')} of \`ovms-mtls certs init\`; a pipe or device cannot be read again at reload\\)`);

/** [what, which file, its path (made in `before`), the line]: one of each kind, spread over the four files. */
const cases: [string, keyof ReturnType<typeof set>, () => string, RegExp][] = [
  ['a FIFO as the key', 'key', () => paths.fifo, /^ovms-mtls: --mtls_key: \S+\/fifo is a FIFO \(named pipe\), not a regular file \(give the path of the PEM file itself, such as server\.key of `ovms-mtls certs init`/],
  ['a directory as the client CA', 'clientCa', () => paths.directory, /^ovms-mtls: --mtls_client_ca: \S+\/a-directory is a directory, not a regular file \(give the file inside it, such as \S+\/a-directory\/client_cert_ca\.pem\)/],
  ['/dev/zero as the certificate', 'cert', () => '/dev/zero', new RegExp(`^ovms-mtls: --mtls_cert: /dev/zero ${NOT_REGULAR('a character device', 'server.pem').source}`)],
  ['a socket as the CRL', 'crl', () => paths.socket, new RegExp(`^ovms-mtls: --mtls_crl: \\S+/socket ${NOT_REGULAR('a socket', 'client_cert_ca.crl').source}`)],
  // Both said "cannot be read (ELOOP)" / "(ENOTDIR)", with nothing on what to change.
  ['a symlink loop as the certificate', 'cert', () => paths.loop, /^ovms-mtls: --mtls_cert: \S+\/loop is a symbolic link that never reaches a file \(a loop, or more than 40 links\): point it at the PEM file\n$/],
  ['a path through a file as the key', 'key', () => `${pki.paths['server.key']!}/server.key`, /^ovms-mtls: --mtls_key: \S+\/server\.key\/server\.key does not exist: a part of the path before its last is a file, not a directory \(check the path\)\n$/],
  ['a 2 GiB file as the CRL', 'crl', () => paths.huge, /^ovms-mtls: --mtls_crl: \S+\/huge\.crl is 2048 MiB, more than the 64 MiB limit \(a CRL of a million revocations is about 50 MiB: is it the right file\?\)/],
];

describe('a TLS file path that names no regular file', () => {
  for (const [label, role, path, line] of cases) {
    test(`${label}: the proxy exits 2 at start-up with one line naming the option, the path and what it is`, async () => {
      const res = await runBounded(['proxy', '--port', '1', '--mtls_grpc_upstream', '127.0.0.1:9', ...tlsFlags({ ...set(), [role]: path() })]);
      assert.equal(res.code, 2, res.stderr);
      assert.match(res.stderr, line);
      assert.equal(res.stderr.trim().split('\n').length, 1, res.stderr);
      assert.equal(res.stdout, '');
    });
  }

  test('a FIFO as the key: the OVMS entrypoint exits 2 with the same line and never starts OVMS', async () => {
    const [restPort] = (await freeLoopbackPorts(1)) as [number];
    const argvFile = join(dir, 'entrypoint-argv.jsonl');
    const wrapper = startWrapper(
      ['--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1', ...tlsFlags({ ...set(), key: paths.fifo }), '--mtls_ovms_binary', FAKE_OVMS, '--mtls_ovms_user', 'root'],
      { FAKE_OVMS_ARGV_FILE: argvFile },
    );
    try {
      const result = await unlessHung(wrapper.exited, 'the entrypoint to exit');
      assert.equal(result.code, 2, wrapper.stderr());
      assert.match(wrapper.stderr(), cases[0]![3]);
      assert.equal(wrapper.stderr().trim().split('\n').length, 1, wrapper.stderr());
      assert.deepEqual(fakeRuns(argvFile), []);
    } finally {
      killIfRunning(wrapper.child);
    }
  });

  test('check reports a FIFO key, /dev/zero and a 2 GiB CRL as FAIL lines naming what they are, and exits 1', async () => {
    const checks: [Partial<ReturnType<typeof set>>, RegExp][] = [
      [{ key: paths.fifo }, /^FAIL {2}--mtls_key: \S+\/fifo is a FIFO \(named pipe\), not a regular file /m],
      [{ key: '/dev/zero' }, /^FAIL {2}--mtls_key: \/dev\/zero is a character device, not a regular file /m],
      [{ crl: paths.huge }, /^FAIL {2}--mtls_crl: \S+\/huge\.crl is 2048 MiB, more than the 64 MiB limit /m],
    ];
    for (const [files, line] of checks) {
      const res = await runBounded(['check', ...tlsFlags({ ...set(), ...files })]);
      assert.equal(res.code, 1, res.stdout + res.stderr);
      assert.match(res.stdout, line);
      assert.match(res.stdout, /Result: FAILED/);
      assert.equal(res.stderr, '');
    }
  });

  test('at reload (SIGHUP and the file watch) a FIFO, /dev/zero, a directory and a 2 GiB CRL each fail with one line, the old certificate serves on, and SIGTERM still ends the proxy', async () => {
    const certs = await plainCertDir({ cert: pki.server.certPem, key: pki.server.keyPem, clientCa: pki.clientCa.certPem, crl: pki.crlPem });
    const client: TlsClient = { ca: pki.serverCa.certPem, cert: pki.client.certPem, key: pki.client.keyPem };
    const [port] = (await freeLoopbackPorts(1)) as [number];
    const cli = startCli(['proxy', '--rest_port', String(port), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', '127.0.0.1:9', ...tlsFlags(certs.files as ReturnType<typeof set>)]);
    const key = certs.files.key;
    const swaps: [string, () => Promise<void>, RegExp][] = [
      ['a FIFO as the key', async () => assert.equal(spawnSync('mkfifo', [key]).status, 0), /^--mtls_key: \S+ is a FIFO \(named pipe\), not a regular file /],
      ['/dev/zero as the key', () => symlink('/dev/zero', key), /^--mtls_key: \S+ is a character device, not a regular file /],
      ['a directory as the key', () => mkdir(key), /^--mtls_key: \S+ is a directory, not a regular file /],
      ['a 2 GiB CRL', async () => {
        await writeFile(key, pki.server.keyPem);
        await rm(certs.files.crl!);
        await symlink(paths.huge, certs.files.crl!);
      }, /^--mtls_crl: \S+ is 2048 MiB, more than the 64 MiB limit /],
    ];
    try {
      await unlessHung(Promise.race([cli.logs.waitFor((l) => l.event === 'listening'), cli.exited.then((code) => assert.fail(`proxy exited ${code}: ${cli.stderr()}`))]), 'the proxy to listen');
      const original = normaliseSerial(pki.server.serialHex);
      for (const [what, swap, reason] of swaps) {
        await rm(key, { recursive: true, force: true });
        await swap();
        cli.child.kill('SIGHUP');
        const failed = await unlessHung(cli.logs.waitFor((l) => l.event === 'reload_failed' && l.trigger === 'signal' && reason.test(String(l.reason))), `the failed reload of ${what}`);
        assert.doesNotMatch(String(failed.reason), /\n/);
        assert.equal(await unlessHung(servedSerial(port, client), 'a handshake'), original, `${what}: the old certificate must serve on`);
      }
      cli.child.kill('SIGTERM');
      assert.equal(await unlessHung(cli.exited, 'the proxy to exit on SIGTERM'), 0, cli.stderr());
    } finally {
      killIfRunning(cli.child);
      await rm(certs.dir, { recursive: true, force: true });
    }
  });
});

test('the OVMS entrypoint reloading onto a FIFO key logs one line, and SIGTERM still stops it and OVMS', async () => {
  const certs = await plainCertDir({ cert: pki.server.certPem, key: pki.server.keyPem, clientCa: pki.clientCa.certPem, crl: pki.crlPem });
  const [restPort] = (await freeLoopbackPorts(1)) as [number];
  const wrapper = startWrapper(['--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1', ...tlsFlags(certs.files as ReturnType<typeof set>), '--mtls_ovms_binary', FAKE_OVMS, '--mtls_ovms_user', 'root']);
  try {
    await unlessHung(wrapper.waitForEvent('ovms_ready'), 'OVMS to be ready');
    await rm(certs.files.key);
    assert.equal(spawnSync('mkfifo', [certs.files.key]).status, 0);
    wrapper.child.kill('SIGHUP');
    const failed = await unlessHung(wrapper.waitForLog((l) => l.event === 'reload_failed' && l.trigger === 'signal'), 'the failed reload');
    assert.match(String(failed.reason), /^--mtls_key: \S+ is a FIFO \(named pipe\), not a regular file /);
    wrapper.child.kill('SIGTERM');
    const result = await unlessHung(wrapper.exited, 'the entrypoint to exit on SIGTERM');
    assert.equal(result.code, 0, wrapper.stderr());
    assert.ok(wrapper.logs.some((l) => l.event === 'ovms_exited'), 'OVMS stopped with it');
  } finally {
    killIfRunning(wrapper.child);
    await rm(certs.dir, { recursive: true, force: true });
  }
});

describe('the certs and probe commands, given a path that names no regular file', () => {
  test('certs revoke --cert a FIFO or /dev/zero, and certs renew-crl with its CRL a FIFO, exit 2 with one line and leave no lock behind', async () => {
    const certs = join(dir, 'certs');
    assert.equal((await runBounded(['certs', 'init', '--dir', certs])).code, 0);
    const crl = join(certs, 'client_cert_ca.crl');
    await rm(crl);
    assert.equal(spawnSync('mkfifo', [crl]).status, 0);
    const runs: [string[], RegExp][] = [
      [['revoke', '--dir', certs, '--cert', paths.fifo], /^ovms-mtls: --cert \S+\/fifo is a FIFO \(named pipe\), not a regular file \(give the PEM file itself, as `ovms-mtls certs` wrote it\)\n$/],
      [['revoke', '--dir', certs, '--cert', '/dev/zero'], /^ovms-mtls: --cert \/dev\/zero is a character device, not a regular file /],
      [['renew-crl', '--dir', certs], /^ovms-mtls: \S+\/client_cert_ca\.crl is a FIFO \(named pipe\), not a regular file /],
    ];
    for (const [args, line] of runs) {
      const res = await runBounded(['certs', ...args]);
      assert.equal(res.code, 2, res.stderr);
      assert.match(res.stderr, line);
      assert.equal(res.stderr.trim().split('\n').length, 1, res.stderr);
    }
    assert.equal(existsSync(`${crl}.lock`), false);
  });

  test('probe --mtls_cert a FIFO exits 2 with one line before connecting', async () => {
    const res = await runBounded(['probe', '--host', '127.0.0.1', '--port', '9', '--mtls_cert', paths.fifo, '--mtls_key', pki.paths['client.key']!, '--mtls_ca', pki.paths['server_ca.pem']!]);
    assert.equal(res.code, 2, res.stderr);
    assert.equal(res.stderr, `ovms-mtls: --mtls_cert: ${paths.fifo} is a FIFO (named pipe), not a regular file (give the path of the PEM file itself)\n`);
  });
});

describe('readRegularFile', () => {
  // /proc files say size 0 and then give more: the read itself stops one byte past the limit.
  test('a file larger than its limit is refused while read, also when its size said otherwise', async () => {
    assert.throws(() => readRegularFileSync('/proc/self/status', 16), (err) => err instanceof FileKindError && err.problem === 'too_large' && /^is more than the 16 bytes limit$/.test(err.message));
    await assert.rejects(readRegularFile('/proc/self/status', 16), (err) => err instanceof FileKindError && err.problem === 'too_large');
    assert.match(readRegularFileSync('/proc/self/status', 1024 * 1024).toString(), /^Name:/);
  });

  test('a symlink to a regular file reads the file (Kubernetes secret mounts are symlinks)', async () => {
    const link = join(dir, FILE_NAMES.cert);
    await symlink(pki.paths['server.pem']!, link);
    assert.equal((await readRegularFile(link, 1024 * 1024)).toString(), pki.server.certPem);
  });
});
