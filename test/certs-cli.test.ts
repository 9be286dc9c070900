import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { X509Certificate } from 'node:crypto';
import { once } from 'node:events';
import { chmod, mkdir, mkdtemp, readdir, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import { BIN, runCli, runCommand } from './helpers/cli.js';
import { startProxy } from '../src/proxy.js';
import { createLogger } from '../src/log.js';
import { loadTlsMaterialSync } from '../src/tls-material.js';
import { DEFAULTS, EMPTY_ALLOW_LIST, type Config } from '../src/config.js';
import { LogCapture } from './helpers/harness.js';
import { KEY_KINDS, createCrl, parseCrl } from '../src/x509.js';

let root: string;
let counter = 0;
const freshDir = () => join(root, `set-${++counter}`);

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'ovms-mtls-certs-cli-'));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

function openssl(args: string[], cwd: string): { status: number | null; out: string } {
  const result = spawnSync('openssl', args, { cwd, encoding: 'utf8' });
  return { status: result.status, out: `${result.stdout}${result.stderr}` };
}

const verifyServer = (dir: string) => openssl(['verify', '-purpose', 'sslserver', '-CAfile', 'server_ca.pem', 'server.pem'], dir);
const verifyClient = (dir: string, cert: string) =>
  openssl(['verify', '-crl_check', '-purpose', 'sslclient', '-CAfile', 'client_cert_ca.pem', '-CRLfile', 'client_cert_ca.crl', cert], dir);

async function init(extra: string[] = []): Promise<string> {
  const dir = freshDir();
  const result = await runCli(['certs', 'init', '--dir', dir, ...extra]);
  assert.equal(result.code, 0, result.stderr);
  return dir;
}

describe('certs init (CLI)', () => {
  test('writes the nginx example file names plus the server CA, with private keys readable by the owner only', async () => {
    const dir = freshDir();
    const result = await runCli(['certs', 'init', '--dir', dir]);
    assert.equal(result.code, 0, result.stderr);
    for (const name of ['server.pem', 'server_ca.pem', 'client_cert_ca.pem', 'client_cert_ca.crl', 'client.pem']) {
      assert.equal((await stat(join(dir, name))).mode & 0o777, 0o644, name);
    }
    for (const name of ['server.key', 'server_ca.key', 'client_cert_ca.key', 'client.key']) {
      assert.equal((await stat(join(dir, name))).mode & 0o777, 0o600, name);
    }
    assert.match(result.stdout, /server_ca\.pem .*clients trust this/);
    assert.match(result.stdout, /expire in 1 day/);
  });

  test('the server certificate passes openssl verify -purpose sslserver, is no CA, and names localhost and the loopback addresses', async () => {
    const dir = await init();
    const verdict = verifyServer(dir);
    assert.equal(verdict.status, 0, verdict.out);
    const server = new X509Certificate(await readFile(join(dir, 'server.pem')));
    assert.equal(server.ca, false);
    assert.match(server.subjectAltName ?? '', /DNS:localhost/);
    assert.match(server.subjectAltName ?? '', /IP Address:127\.0\.0\.1/);
    assert.deepEqual(server.keyUsage, ['1.3.6.1.5.5.7.3.1']);
    assert.equal(server.publicKey.asymmetricKeyType, 'ec');
  });

  test('the client certificate passes openssl verify -purpose sslclient with the CRL checked, and the empty CRL verifies against the client CA', async () => {
    const dir = await init();
    const verdict = verifyClient(dir, 'client.pem');
    assert.equal(verdict.status, 0, verdict.out);
    const crl = openssl(['crl', '-in', 'client_cert_ca.crl', '-CAfile', 'client_cert_ca.pem', '-noout', '-text'], dir);
    assert.equal(crl.status, 0, crl.out);
    assert.match(crl.out, /verify OK/);
    assert.match(crl.out, /No Revoked Certificates/);
    const ca = openssl(['x509', '-in', 'client_cert_ca.pem', '-noout', '-text'], dir).out;
    assert.match(ca, /CA:TRUE/);
    assert.match(ca, /Certificate Sign, CRL Sign/);
  });

  test('--server_name, --san, --days and --key shape the server certificate', async () => {
    const dir = await init(['--server_name', 'ovms.example.com', '--san', 'DNS:alt.example.com,IP:10.1.2.3', '--days', '30', '--key', 'rsa2048']);
    const server = new X509Certificate(await readFile(join(dir, 'server.pem')));
    assert.match(server.subject, /CN=ovms\.example\.com/);
    assert.match(server.subjectAltName ?? '', /DNS:ovms\.example\.com/);
    assert.match(server.subjectAltName ?? '', /DNS:alt\.example\.com/);
    assert.match(server.subjectAltName ?? '', /IP Address:10\.1\.2\.3/);
    assert.equal(server.publicKey.asymmetricKeyType, 'rsa');
    const days = (new Date(server.validTo).getTime() - Date.now()) / 86_400_000;
    assert.ok(days > 29 && days <= 30, `valid for ${days} days`);
    assert.equal(verifyServer(dir).status, 0);
  });

  test('refuses to overwrite an existing set without --force, in one line, and overwrites it with --force', async () => {
    const dir = await init();
    const before = await readFile(join(dir, 'server.pem'), 'utf8');
    const refused = await runCli(['certs', 'init', '--dir', dir]);
    assert.equal(refused.code, 2);
    assert.match(refused.stderr, /^ovms-mtls: .*server\.pem already exists .*pass --force to overwrite\n$/);
    assert.equal(await readFile(join(dir, 'server.pem'), 'utf8'), before);
    const forced = await runCli(['certs', 'init', '--dir', dir, '--force']);
    assert.equal(forced.code, 0, forced.stderr);
    assert.notEqual(await readFile(join(dir, 'server.pem'), 'utf8'), before);
  });

  test('init --force that cannot write one of its files (here a file size limit) replaces none: no new server.pem beside the old key, no temp file left', async () => {
    const dir = await init(['--key', 'rsa3072']);
    const names = (await readdir(dir)).sort();
    const before = await Promise.all(names.map((name) => readFile(join(dir, name), 'utf8')));
    // A real write failure: with RLIMIT_FSIZE at 2 KiB the RSA-3072 server.pem (~1.5 KiB) fits, its key (~2.5 KiB) gets EFBIG.
    const { code, stderr } = await runCommand('bash', ['-c', 'ulimit -f 2; exec "$@"', 'bash', process.execPath, BIN, 'certs', 'init', '--dir', dir, '--key', 'rsa3072', '--force']);
    assert.equal(code, 2, stderr);
    assert.match(stderr, /^ovms-mtls: cannot write .*server\.key: EFBIG.*; none of the 9 files was replaced\n$/);
    assert.deepEqual((await readdir(dir)).sort(), names);
    assert.deepEqual(await Promise.all(names.map((name) => readFile(join(dir, name), 'utf8'))), before);
    assert.equal(verifyServer(dir).status, 0);
  });

  test('a malformed --san, --days or --key is one line naming the flag, exit 2', async () => {
    for (const [args, pattern] of [
      [['--san', 'foo.example'], /--san "foo\.example": expected DNS:<name> or IP:<address>/],
      [['--san', 'IP:fe80::1%eth0'], /--san "IP:fe80::1%eth0": a certificate cannot hold a zone \(%eth0\); write IP:fe80::1/],
      [['--days', 'ten'], /--days: 'ten' is not a whole number/],
      [['--key', 'dsa'], /--key dsa: use one of ec, rsa2048/],
    ] as [string[], RegExp][]) {
      const result = await runCli(['certs', 'init', '--dir', freshDir(), ...args]);
      assert.equal(result.code, 2, result.stdout);
      assert.match(result.stderr, pattern);
      assert.equal(result.stderr.trim().split('\n').length, 1, result.stderr);
    }
  });

  test('a flag given without a value (an unset shell variable) is one line naming it, exit 2, and writes nothing', async () => {
    for (const args of [['--days', ''], ['--days'], ['--days', '--force'], ['--days='], ['--key', ''], ['--server_name', ' ']]) {
      const dir = freshDir();
      const result = await runCli(['certs', 'init', '--dir', dir, ...args]);
      const flag = args[0]!.replace('=', '');
      assert.equal(result.code, 2, `${args.join(' ')}: ${result.stdout}`);
      assert.equal(result.stderr.trim(), `ovms-mtls: ${flag} needs a value (${flag} VALUE or ${flag}=VALUE)`);
      await assert.rejects(stat(dir), /ENOENT/);
    }
    const root = freshDir();
    await mkdir(root);
    const noDir = await runCli(['certs', 'init', '--dir', ''], { cwd: root });
    assert.equal(noDir.code, 2);
    assert.match(noDir.stderr, /--dir needs a value/);
    assert.deepEqual(await readdir(root), []);
    const dir = await init(['--days', '30']);
    const renew = await runCli(['certs', 'renew-crl', '--dir', dir, '--days', '']);
    assert.equal(renew.code, 2);
    assert.match(renew.stderr, /^ovms-mtls: --days needs a value/);
  });

  test('a --dir the kernel will not create (under /proc) is one line naming it, exit 2, instead of spinning in mkdir -p', async () => {
    // `timeout` bounds the run: Node's own recursive mkdir retries such a path for ever.
    const result = await runCli(['certs', 'init', '--dir', '/proc/ovms-mtls-certs/set'], { wrap: ['timeout', '60'] });
    assert.equal(result.code, 2, result.stderr);
    assert.equal(result.stderr.trim(), "ovms-mtls: cannot create directory /proc/ovms-mtls-certs/set: ENOENT: no such file or directory, mkdir '/proc/ovms-mtls-certs'");
  });

  // It said "EACCES: permission denied, open '.../server.pem.4242.1f2e3d4c.tmp'": a temp file the user never asked for, and not what to change.
  test('a --dir its user may not write is one line naming the uid and the directory that refused it, exit 2, nothing written', { skip: !(process.getuid?.() === 0 && existsSync('/usr/bin/setpriv')) && 'needs root and util-linux setpriv' }, async () => {
    // Not under `root`: mkdtemp makes it 0700, which the user may not enter at all (the message says so, tested below).
    const base = await mkdtemp(join(tmpdir(), 'ovms-mtls-certs-nobody-'));
    await chmod(base, 0o755);
    try {
      const shut = join(base, 'read-only');
      await mkdir(shut, { mode: 0o555 });
      await chmod(shut, 0o555);
      const asNobody = { wrap: ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups'], cwd: '/' };
      const files = await runCli(['certs', 'init', '--dir', shut], asNobody);
      assert.equal(files.code, 2, files.stderr);
      assert.equal(files.stderr, `ovms-mtls: cannot write ${join(shut, 'server.pem')}: uid 65534 (groups 65534) may not create files in ${shut} (mode 0555, owner uid 0, group 0): give --dir a directory this user may write, or run as its owner; none of the 9 files was replaced\n`);
      const nested = await runCli(['certs', 'init', '--dir', join(shut, 'set', 'a')], asNobody);
      assert.equal(nested.code, 2, nested.stderr);
      assert.equal(nested.stderr, `ovms-mtls: cannot create directory ${join(shut, 'set', 'a')}: uid 65534 (groups 65534) may not create files in ${shut} (mode 0555, owner uid 0, group 0): give --dir a directory this user may write, or run as its owner\n`);
      assert.deepEqual(await readdir(shut), []);
      const enclosed = await runCli(['certs', 'init', '--dir', join(root, 'set')], asNobody);
      assert.equal(enclosed.stderr, `ovms-mtls: cannot create directory ${join(root, 'set')}: uid 65534 (groups 65534) may not enter ${root} (mode 0700, owner uid 0, group 0): give --dir a directory this user may write, or run as its owner\n`);
    } finally {
      await rm(base, { recursive: true });
    }
  });

  // Each of these was "internal error:" with Node's stack trace and exit 70: only ENOENT was an answer.
  test('a --dir that is a file or a symlink loop, or a --cert name past the system limit, is one line naming the path, exit 2', async () => {
    const dir = await init();
    const loop = join(root, 'loop');
    await symlink(loop, loop);
    const cases = [
      ['certs', 'client', '--dir', join(dir, 'client_cert_ca.crl'), '--name', 'ml'],
      ['certs', 'init', '--dir', loop],
      ['certs', 'client', '--dir', loop, '--name', 'ml'],
      ['certs', 'revoke', '--dir', dir, '--cert', 'c'.repeat(300)],
    ];
    for (const args of cases) {
      const result = await runCli(args);
      assert.equal(result.code, 2, `${args.join(' ')}: ${result.stderr}`);
      assert.match(result.stderr, /^ovms-mtls: cannot (check|create directory) \S+: (ENOTDIR|ELOOP|ENAMETOOLONG): [^\n]*\n$/, args.join(' '));
    }
  });

  test('an unknown subcommand is refused with a hint, and `certs --help` prints the usage', async () => {
    const unknown = await runCli(['certs', 'renew']);
    assert.equal(unknown.code, 2);
    assert.match(unknown.stderr, /unknown subcommand 'renew' \(use init, client, revoke or renew-crl/);
    const help = await runCli(['certs', '--help']);
    assert.equal(help.code, 0);
    assert.match(help.stdout, /ovms-mtls certs init/);
    // The client line said `[--key ec]`, though certs client takes every key type init takes.
    for (const subcommand of ['init', 'client']) {
      const line = help.stdout.split('\n').find((l) => l.includes(`ovms-mtls certs ${subcommand} `));
      assert.ok(line?.includes(`[--key ${KEY_KINDS.join('|')}]`), `certs ${subcommand} usage: ${line}`);
    }
  });
});

describe('certs client and revoke (CLI)', () => {
  test('certs client issues a clientAuth certificate with a SPIFFE URI that openssl verifies against the client CA', async () => {
    const dir = await init();
    const result = await runCli(['certs', 'client', '--dir', dir, '--name', 'reader', '--uri', 'spiffe://example.org/ns/ml/sa/reader', '--days', '7']);
    assert.equal(result.code, 0, result.stderr);
    assert.equal((await stat(join(dir, 'reader.key'))).mode & 0o777, 0o600);
    const verdict = verifyClient(dir, 'reader.pem');
    assert.equal(verdict.status, 0, verdict.out);
    const cert = new X509Certificate(await readFile(join(dir, 'reader.pem')));
    assert.match(cert.subject, /CN=reader/);
    assert.equal(cert.subjectAltName, 'URI:spiffe://example.org/ns/ml/sa/reader');
    assert.deepEqual(cert.keyUsage, ['1.3.6.1.5.5.7.3.2']);
  });

  test('certs client without --name says which flag is missing', async () => {
    const dir = await init();
    const result = await runCli(['certs', 'client', '--dir', dir]);
    assert.equal(result.code, 2);
    assert.match(result.stderr, /--name is required/);
  });

  test('certs revoke puts the certificate on the CRL: openssl then reports it revoked while other clients still verify', async () => {
    const dir = await init();
    assert.equal((await runCli(['certs', 'client', '--dir', dir, '--name', 'leaver'])).code, 0);
    const result = await runCli(['certs', 'revoke', '--dir', dir, '--cert', join(dir, 'leaver.pem')]);
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stdout, /Revoked .*leaver\.pem/);
    const revoked = verifyClient(dir, 'leaver.pem');
    assert.notEqual(revoked.status, 0);
    assert.match(revoked.out, /certificate revoked/);
    assert.equal(verifyClient(dir, 'client.pem').status, 0);
    const crl = openssl(['crl', '-in', 'client_cert_ca.crl', '-CAfile', 'client_cert_ca.pem', '-noout'], dir);
    assert.match(crl.out, /verify OK/);
  });

  test('certs revoke --cert naming a key, a DER certificate or a directory says which, naming --cert, and leaves the CRL as it was', async () => {
    const dir = await init();
    const crlPath = join(dir, 'client_cert_ca.crl');
    const crlBefore = await readFile(crlPath);
    await writeFile(join(dir, 'client.der'), new X509Certificate(await readFile(join(dir, 'client.pem'))).raw);
    const cases: [string, RegExp][] = [
      ['client.key', /^ovms-mtls: --cert \S+client\.key holds a private key, not a certificate \(give the certificate \(\.pem\) to --cert, not its key\)$/],
      ['client.der', /^ovms-mtls: --cert \S+client\.der holds a DER \(binary\) certificate, not PEM \(convert it: `openssl x509 -inform DER/],
      ['.', /^ovms-mtls: --cert \S+ is a directory, not a regular file/],
    ];
    for (const [cert, expected] of cases) {
      const result = await runCli(['certs', 'revoke', '--dir', dir, '--cert', join(dir, cert)]);
      assert.equal(result.code, 2, result.stderr);
      assert.equal(result.stderr.trim().split('\n').length, 1, result.stderr);
      assert.match(result.stderr.trim(), expected);
    }
    assert.deepEqual(await readFile(crlPath), crlBefore);
  });
});

describe('certs renew-crl (CLI)', () => {
  const DAY_MS = 24 * 60 * 60 * 1000;
  const checkFlags = (dir: string) =>
    ['--mtls_cert', 'server.pem', '--mtls_key', 'server.key', '--mtls_client_ca', 'client_cert_ca.pem', '--mtls_crl', 'client_cert_ca.crl'].map((a) => (a.includes('.') ? join(dir, a) : a));

  test('an expired CRL, which locks every client out, is re-signed with the same revocations and fresh dates', async () => {
    const dir = await init(['--days', '60']);
    assert.equal((await runCli(['certs', 'client', '--dir', dir, '--name', 'leaver'])).code, 0);
    assert.equal((await runCli(['certs', 'revoke', '--dir', dir, '--cert', 'leaver'])).code, 0);
    const crlPath = join(dir, 'client_cert_ca.crl');
    const revoked = parseCrl(await readFile(crlPath, 'utf8')).revoked;
    const issuer = { certPem: await readFile(join(dir, 'client_cert_ca.pem'), 'utf8'), keyPem: await readFile(join(dir, 'client_cert_ca.key'), 'utf8'), serialHex: '' };
    await writeFile(crlPath, await createCrl({ issuer, revoked, thisUpdate: new Date(Date.now() - 3 * DAY_MS), nextUpdate: new Date(Date.now() - DAY_MS), crlNumber: 7n }));
    const stale = await runCli(['check', ...checkFlags(dir)]);
    assert.notEqual(stale.code, 0);
    assert.match(stale.stdout + stale.stderr, /expired on/);

    const renewed = await runCli(['certs', 'renew-crl', '--dir', dir, '--days', '30']);
    assert.equal(renewed.code, 0, renewed.stderr);
    assert.match(renewed.stdout, /CRL number 8, 1 revoked, next update/);
    const crl = parseCrl(await readFile(crlPath, 'utf8'));
    assert.equal(crl.crlNumber, 8n);
    assert.deepEqual(crl.revoked, revoked);
    assert.ok(Math.abs(crl.nextUpdate!.getTime() - (Date.now() + 30 * DAY_MS)) < DAY_MS);
    assert.equal((await runCli(['check', ...checkFlags(dir)])).code, 0);
    assert.match(verifyClient(dir, 'leaver.pem').out, /certificate revoked/);
    assert.equal(verifyClient(dir, 'client.pem').status, 0);
  });

  test('without --days the new CRL lives as long as the one it replaces; a bad --days is refused in one line', async () => {
    const dir = await init(['--days', '30']);
    assert.equal((await runCli(['certs', 'renew-crl', '--dir', dir, '--days', '5'])).code, 0);
    const crlPath = join(dir, 'client_cert_ca.crl');
    const before = parseCrl(await readFile(crlPath, 'utf8'));
    assert.equal((await runCli(['certs', 'renew-crl', '--dir', dir])).code, 0);
    const after = parseCrl(await readFile(crlPath, 'utf8'));
    assert.equal(after.nextUpdate!.getTime() - after.thisUpdate.getTime(), before.nextUpdate!.getTime() - before.thisUpdate.getTime());
    assert.equal(after.crlNumber, (before.crlNumber ?? 0n) + 1n);
    const bad = await runCli(['certs', 'renew-crl', '--dir', dir, '--days', '0']);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /--days/);
    assert.equal(bad.stderr.trim().split('\n').length, 1, bad.stderr);
  });
});

describe('nothing certs signs outlives the client CA (CLI)', () => {
  const DAY_MS = 24 * 60 * 60 * 1000;
  const opensslDate = (dir: string, args: string[]) => openssl(args, dir).out.trim().split('=')[1];

  test('certs client and renew-crl with a --days past the client CA\'s expiry end with the CA and say so; the CRL still serves', async () => {
    const dir = await init(['--days', '30']);
    const caEnd = opensslDate(dir, ['x509', '-noout', '-enddate', '-in', 'client_cert_ca.pem']);
    const caEndIso = new Date(new X509Certificate(await readFile(join(dir, 'client_cert_ca.pem'))).validTo).toISOString();

    const client = await runCli(['certs', 'client', '--dir', dir, '--name', 'yearly', '--days', '365']);
    assert.equal(client.code, 0, client.stderr);
    assert.equal(opensslDate(dir, ['x509', '-noout', '-enddate', '-in', 'yearly.pem']), caEnd);
    assert.match(client.stdout, new RegExp(`Certificates are valid until ${caEndIso}\\.`));
    assert.match(client.stdout, new RegExp(`Note: the certificate ends with the client CA, at ${caEndIso}, 33\\d days short of the 365 days asked: nothing outlives the CA that signs it\\. For longer, make a new set before then with \`ovms-mtls certs init --dir ${dir} --force\`: it replaces both CAs, so every client then needs the new server_ca\\.pem and a new certificate\\.`));

    const renewed = await runCli(['certs', 'renew-crl', '--dir', dir, '--days', '365']);
    assert.equal(renewed.code, 0, renewed.stderr);
    assert.equal(opensslDate(dir, ['crl', '-noout', '-nextupdate', '-in', 'client_cert_ca.crl']), caEnd);
    assert.match(renewed.stdout, new RegExp(`next update ${caEndIso}\\.\nNote: the CRL's next update ends with the client CA, at ${caEndIso}, 33\\d days short of the 365 days asked`));
    assert.equal(verifyClient(dir, 'yearly.pem').status, 0);

    // A lifetime taken over from the old CRL (here one of 401 days) is cut the same way, without an 'asked'.
    const issuer = { certPem: await readFile(join(dir, 'client_cert_ca.pem'), 'utf8'), keyPem: await readFile(join(dir, 'client_cert_ca.key'), 'utf8'), serialHex: '' };
    await writeFile(join(dir, 'client_cert_ca.crl'), await createCrl({ issuer, thisUpdate: new Date(Date.now() - DAY_MS), nextUpdate: new Date(Date.now() + 400 * DAY_MS), crlNumber: 9n }));
    const inherited = await runCli(['certs', 'renew-crl', '--dir', dir]);
    assert.equal(inherited.code, 0, inherited.stderr);
    assert.equal(opensslDate(dir, ['crl', '-noout', '-nextupdate', '-in', 'client_cert_ca.crl']), caEnd);
    // No --days, no length asked for: only the date, without the new set (both CAs replaced) that a --days asked for is told of.
    assert.match(inherited.stdout, new RegExp(`Note: the CRL's next update ends with the client CA, at ${caEndIso}: nothing outlives the CA that signs it\\.\n`));
    assert.doesNotMatch(inherited.stdout, /--force/);
    assert.equal((await runCli(['check', '--mtls_cert', join(dir, 'server.pem'), '--mtls_key', join(dir, 'server.key'), '--mtls_client_ca', join(dir, 'client_cert_ca.pem'), '--mtls_crl', join(dir, 'client_cert_ca.crl')])).code, 0);
  });
});

describe('a set made by certs init serves the proxy', () => {
  test('the proxy starts on the files of `certs init` and accepts client.pem, verified against server_ca.pem', async () => {
    const dir = await init();
    const config: Config = {
      rest: { hosts: ['127.0.0.1'], port: 0, upstream: { host: '127.0.0.1', port: 9 } },
      tls: { cert: join(dir, 'server.pem'), key: join(dir, 'server.key'), clientCa: join(dir, 'client_cert_ca.pem'), crl: join(dir, 'client_cert_ca.crl') },
      allow: EMPTY_ALLOW_LIST,
      limits: DEFAULTS.limits,
      shutdownTimeoutMs: 1000,
      logLevel: 'debug',
      accessLog: false,
      workers: 1,
      grpcMode: 'terminate',
      grpcUpstreamConnections: 1,
      restMode: 'terminate',
    };
    const logs = new LogCapture();
    const proxy = await startProxy({ config, material: loadTlsMaterialSync(config.tls), logger: createLogger({ level: 'debug', destination: logs }) });
    try {
      const socket = tlsConnect({
        host: '127.0.0.1',
        port: proxy.port('rest')!,
        servername: 'localhost',
        ca: await readFile(join(dir, 'server_ca.pem')),
        cert: await readFile(join(dir, 'client.pem')),
        key: await readFile(join(dir, 'client.key')),
        ALPNProtocols: ['http/1.1'],
      });
      await once(socket, 'secureConnect');
      assert.equal(socket.authorized, true, String(socket.authorizationError));
      socket.write('GET /v2/health/live HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n');
      const [first] = (await once(socket, 'data')) as [Buffer];
      // No model server behind it: a 502 still proves the client got through TLS and the checks.
      assert.match(first.toString('latin1'), /^HTTP\/1\.1 \d{3} /);
      socket.destroy();
      assert.equal(logs.lines.filter((l) => l.event === 'client_refused').length, 0);
    } finally {
      await proxy.shutdown(1000);
    }
  });
});
