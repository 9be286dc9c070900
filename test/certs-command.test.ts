import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { once } from 'node:events';
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import tls from 'node:tls';
import { CERT_FILES, certsClient, certsInit, certsRenewCrl, certsRevoke } from '../src/certs-command.js';
import { ConfigError } from '../src/errors.js';
import { CLOCK_SKEW_MS, createCa, createCrl, issueClientCert, parseCrl, parseCrlSerials } from '../src/x509.js';

function openssl(args: string[], cwd: string): { status: number | null; out: string } {
  const result = spawnSync('openssl', args, { cwd, encoding: 'utf8' });
  return { status: result.status, out: `${result.stdout}${result.stderr}` };
}

function x509Text(path: string, cwd: string): string {
  const { status, out } = openssl(['x509', '-noout', '-text', '-in', path], cwd);
  assert.equal(status, 0, out);
  return out;
}

function verifyClient(dir: string, cert: string): { status: number | null; out: string } {
  const args = ['verify', '-crl_check', '-purpose', 'sslclient', '-CAfile', CERT_FILES.clientCaCert, '-CRLfile', CERT_FILES.clientCaCrl, cert];
  return openssl(args, dir);
}

async function modeOf(path: string): Promise<number> {
  return (await stat(path)).mode & 0o777;
}

/** Asserts a ConfigError whose one-line message matches `pattern`. */
function configError(pattern: RegExp): (err: unknown) => true {
  return (err: unknown) => {
    assert.ok(err instanceof ConfigError, `expected ConfigError, got ${String(err)}`);
    assert.match(err.message, pattern);
    assert.doesNotMatch(err.message, /\n/);
    return true;
  };
}

let root: string;
let counter = 0;
/** A fresh, not yet existing directory below this file's temp root. */
function freshDir(): string {
  counter += 1;
  return join(root, `case-${counter}`, 'certs');
}

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'ovms-mtls-certs-'));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('certs init', () => {
  test('creates the directory and writes nine files, keys readable by the owner only', async () => {
    const dir = freshDir();
    const report = await certsInit({ dir });
    assert.deepEqual((await readdir(dir)).sort(), Object.values(CERT_FILES).sort());
    assert.equal(await modeOf(dir), 0o755);
    for (const file of report.files) {
      assert.equal(await modeOf(file.path), file.name.endsWith('.key') ? 0o600 : 0o644, file.name);
    }
    assert.equal(report.files.length, 9);
  });

  test('sets the exact modes even under a restrictive umask', async () => {
    const previous = process.umask(0o077);
    try {
      const dir = freshDir();
      await certsInit({ dir });
      assert.equal(await modeOf(join(dir, CERT_FILES.serverCert)), 0o644);
      assert.equal(await modeOf(join(dir, CERT_FILES.clientCaCrl)), 0o644);
      assert.equal(await modeOf(join(dir, CERT_FILES.serverKey)), 0o600);
    } finally {
      process.umask(previous);
    }
  });

  test('produces a server certificate and a client certificate that openssl verifies for their purpose', async () => {
    const dir = freshDir();
    await certsInit({ dir });
    const server = openssl(['verify', '-purpose', 'sslserver', '-CAfile', CERT_FILES.serverCaCert, CERT_FILES.serverCert], dir);
    assert.equal(server.status, 0, server.out);
    const client = verifyClient(dir, CERT_FILES.clientCert);
    assert.equal(client.status, 0, client.out);
    const serverText = x509Text(CERT_FILES.serverCert, dir);
    assert.match(serverText, /Version: 3 \(0x2\)/);
    assert.match(serverText, /CA:FALSE/);
    assert.match(serverText, /TLS Web Server Authentication/);
    assert.match(x509Text(CERT_FILES.clientCert, dir), /Version: 3 \(0x2\)[\s\S]*CA:FALSE[\s\S]*TLS Web Client Authentication/);
  });

  test('gives the two CAs different names so that OpenSSL never confuses them', async () => {
    const dir = freshDir();
    await certsInit({ dir });
    const serverCa = new X509Certificate(await readFile(join(dir, CERT_FILES.serverCaCert)));
    const clientCa = new X509Certificate(await readFile(join(dir, CERT_FILES.clientCaCert)));
    assert.notEqual(serverCa.subject, clientCa.subject);
  });

  test('names localhost, 127.0.0.1 and ::1 in the server certificate, plus every --san entry', async () => {
    const dir = freshDir();
    await certsInit({ dir, san: ['DNS:ovms.example.com', 'ip:10.0.0.5', 'IP:fd00::5'] });
    const cert = new X509Certificate(await readFile(join(dir, CERT_FILES.serverCert)));
    assert.equal(
      cert.subjectAltName,
      'DNS:localhost, DNS:ovms.example.com, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1, IP Address:10.0.0.5, IP Address:FD00:0:0:0:0:0:0:5',
    );
  });

  test('an IPv6 --san written with an IPv4 tail names that address, not another one', async () => {
    const dir = freshDir();
    await certsInit({ dir, serverName: 'ovms.internal', san: ['IP:::ffff:10.0.0.1', 'IP:2001:db8::1.2.3.4'] });
    const cert = new X509Certificate(await readFile(join(dir, CERT_FILES.serverCert)));
    // Before: IP Address:0:0:0:0:0:0:FFFF:10 and IP Address:2001:DB8:0:0:0:0:0:1, the tail read as one hex group.
    assert.equal(cert.subjectAltName, 'DNS:ovms.internal, IP Address:0:0:0:0:0:FFFF:A00:1, IP Address:2001:DB8:0:0:0:0:102:304');
    assert.equal(cert.checkIP('::ffff:10.0.0.1'), '::ffff:10.0.0.1');
    assert.equal(cert.checkIP('2001:db8::1.2.3.4'), '2001:db8::1.2.3.4');
    assert.equal(cert.checkIP('2001:db8::1'), undefined);
  });

  // Before: '--server_name "bücher.example" is not a valid DNS name' with no way forward.
  test('a name in another script goes in as the A-label clients match, and Python verifies the server by its Unicode name', async () => {
    const dir = freshDir();
    await certsInit({ dir, serverName: 'bücher.example', san: ['DNS:日本.jp'] });
    const [certPem, keyPem] = await Promise.all([readFile(join(dir, CERT_FILES.serverCert)), readFile(join(dir, CERT_FILES.serverKey))]);
    assert.equal(new X509Certificate(certPem).subjectAltName, 'DNS:xn--bcher-kva.example, DNS:xn--wgv71a.jp');
    const server = tls.createServer({ cert: certPem, key: keyPem }, (socket) => socket.end());
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    let python: ReturnType<typeof spawn> | undefined;
    try {
      const { port } = server.address() as AddressInfo;
      const script = [
        'import socket, ssl, sys',
        'context = ssl.create_default_context(cafile=sys.argv[1])',
        'for name in ("bücher.example", "日本.jp"):',
        '    context.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[2]))), server_hostname=name).close()',
      ].join('\n');
      python = spawn('/usr/bin/python3', ['-c', script, join(dir, CERT_FILES.serverCaCert), String(port)], { stdio: ['ignore', 'ignore', 'pipe'] });
      let stderr = '';
      python.stderr!.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
      const [code] = (await once(python, 'exit')) as [number | null];
      assert.equal(code, 0, stderr);
    } finally {
      python?.kill();
      server.close();
    }
  });

  test('adds no loopback addresses for another server name and uses an IP server name as an IP SAN', async () => {
    const named = freshDir();
    await certsInit({ dir: named, serverName: 'ovms.internal' });
    assert.equal(new X509Certificate(await readFile(join(named, CERT_FILES.serverCert))).subjectAltName, 'DNS:ovms.internal');
    const numbered = freshDir();
    await certsInit({ dir: numbered, serverName: '192.0.2.7' });
    assert.equal(new X509Certificate(await readFile(join(numbered, CERT_FILES.serverCert))).subjectAltName, 'IP Address:192.0.2.7');
  });

  test('rejects malformed --san entries before writing anything', async () => {
    for (const san of ['ovms.example.com', 'IP:999.1.1.1', 'DNS:bad name', 'URI:spiffe://x', 'DNS:', 'DNS:bü\tcher.example', 'DNS:bü cher.example']) {
      const dir = freshDir();
      await assert.rejects(certsInit({ dir, san: [san] }), configError(/--san .*expected DNS:<name> or IP:<address>|--san .*not a valid DNS name/));
      await assert.rejects(stat(dir), { code: 'ENOENT' });
    }
  });

  test('rejects a non-integer or non-positive --days and an unknown --key', async () => {
    await assert.rejects(certsInit({ dir: freshDir(), days: 0 }), configError(/--days 0/));
    await assert.rejects(certsInit({ dir: freshDir(), days: 1.5 }), configError(/--days 1\.5/));
    await assert.rejects(certsInit({ dir: freshDir(), key: 'dsa' as never }), configError(/--key dsa: use one of ec, rsa2048/));
  });

  test('refuses to overwrite existing files without --force, naming the file, and overwrites with it', async () => {
    const dir = freshDir();
    await certsInit({ dir });
    const before = await readFile(join(dir, CERT_FILES.serverCert), 'utf8');
    await assert.rejects(certsInit({ dir }), configError(/server\.pem already exists.*--force/));
    assert.equal(await readFile(join(dir, CERT_FILES.serverCert), 'utf8'), before);
    await certsInit({ dir, force: true });
    assert.notEqual(await readFile(join(dir, CERT_FILES.serverCert), 'utf8'), before);
    assert.equal(await modeOf(join(dir, CERT_FILES.clientKey)), 0o600);
    assert.deepEqual((await readdir(dir)).filter((name) => name.endsWith('.tmp')), []);
  });

  test('with --force, names the client certificates left in the directory that the replaced client CA issued, and how to issue them again', async () => {
    const dir = freshDir();
    await certsInit({ dir });
    await certsClient({ dir, name: 'alice' });
    await certsClient({ dir, name: 'bob' });
    await writeFile(join(dir, 'notes.pem'), 'not a certificate');
    const replaced = await certsInit({ dir, force: true });
    assert.match(replaced.summary, /\nNote: alice\.pem, bob\.pem were issued by the client CA this replaced and no longer get in: issue them again with `ovms-mtls certs client --dir \S+ --name NAME --force`\.$/);

    await certsClient({ dir, name: 'alice', force: true });
    const again = await certsInit({ dir, force: true });
    // bob.pem came from the CA before: the one this init replaces did not issue it.
    assert.match(again.summary, /\nNote: alice\.pem was issued by the client CA this replaced and no longer gets in: issue it again with `ovms-mtls certs client --dir \S+ --name alice --force`\.$/);
  });

  test('summarises the files and warns that one-day certificates expire tomorrow', async () => {
    const report = await certsInit({ dir: freshDir() });
    assert.match(report.summary, /Wrote 9 files to /);
    assert.match(report.summary, /server\.key\s+0600/);
    assert.match(report.summary, /expire in 1 day.*--days/);
    assert.match(report.summary, new RegExp(`valid until ${report.validUntil.toISOString()}`));
  });

  test('issues certificates and a CRL for the requested number of days without the expiry warning', async () => {
    const dir = freshDir();
    const report = await certsInit({ dir, days: 30 });
    assert.doesNotMatch(report.summary, /expire in 1 day/);
    const days = (report.validUntil.getTime() - Date.now()) / 86_400_000;
    assert.ok(days > 29.9 && days <= 30, String(days));
    const crl = parseCrl(await readFile(join(dir, CERT_FILES.clientCaCrl), 'utf8'));
    assert.deepEqual(crl.revoked, []);
    assert.equal(crl.crlNumber, 1n);
    assert.ok(crl.nextUpdate && crl.nextUpdate.getTime() - Date.now() > 29.9 * 86_400_000);
  });

  test('leaves and CRL end no later than their CA even when their keys take seconds to make (RSA 4096)', async () => {
    const dir = freshDir();
    await certsInit({ dir, key: 'rsa4096' });
    const end = async (name: string) => new Date(new X509Certificate(await readFile(join(dir, name))).validTo).getTime();
    assert.ok((await end(CERT_FILES.serverCert)) <= (await end(CERT_FILES.serverCaCert)), 'server.pem outlives server_ca.pem');
    assert.ok((await end(CERT_FILES.clientCert)) <= (await end(CERT_FILES.clientCaCert)), 'client.pem outlives client_cert_ca.pem');
    const crl = parseCrl(await readFile(join(dir, CERT_FILES.clientCaCrl), 'utf8'));
    assert.ok(crl.nextUpdate!.getTime() <= (await end(CERT_FILES.clientCaCert)), 'the CRL outlives client_cert_ca.pem');
  });

  test('can use RSA keys throughout', async () => {
    const dir = freshDir();
    await certsInit({ dir, key: 'rsa2048' });
    assert.match(x509Text(CERT_FILES.serverCert, dir), /rsaEncryption[\s\S]*Digital Signature, Key Encipherment/);
    assert.equal(verifyClient(dir, CERT_FILES.clientCert).status, 0);
  });
});

describe('certs client', () => {
  let dir: string;
  before(async () => {
    dir = freshDir();
    await certsInit({ dir });
  });

  test('issues NAME.pem and NAME.key from the client CA with the given URI and DNS names', async () => {
    const report = await certsClient({ dir, name: 'alice', uri: ['spiffe://example.org/ns/ml/sa/alice'], dns: ['alice.example.org'] });
    assert.deepEqual(report.files.map((f) => f.name), ['alice.pem', 'alice.key']);
    assert.equal(await modeOf(join(dir, 'alice.key')), 0o600);
    const verified = verifyClient(dir, 'alice.pem');
    assert.equal(verified.status, 0, verified.out);
    const text = x509Text('alice.pem', dir);
    assert.match(text, /Subject: CN = alice/);
    assert.match(text, /URI:spiffe:\/\/example\.org\/ns\/ml\/sa\/alice/);
    assert.match(text, /DNS:alice\.example\.org/);
  });

  test('a --days past the client CA\'s expiry ends the certificate with the CA and says by how much, instead of a date that never counts', async () => {
    const report = await certsClient({ dir, name: 'long-lived', days: 365 });
    const caEnd = new X509Certificate(await readFile(join(dir, CERT_FILES.clientCaCert))).validTo;
    assert.equal(new X509Certificate(await readFile(join(dir, 'long-lived.pem'))).validTo, caEnd);
    assert.equal(report.validUntil.getTime(), new Date(caEnd).getTime());
    const iso = new Date(caEnd).toISOString();
    assert.match(report.summary, new RegExp(`Note: the certificate ends with the client CA, at ${iso}, 364 days short of the 365 days asked: .*certs init --dir .* --force`));
    // The way to longer replaces both CAs: said, as every client then needs new files.
    assert.match(report.summary, /`: it replaces both CAs, so every client then needs the new server_ca\.pem and a new certificate\.$/);
    assert.doesNotMatch(report.summary, /expire in 1 day/);
    assert.equal(verifyClient(dir, 'long-lived.pem').status, 0);
  });

  // Right after a default init, `certs client`, `revoke` and `renew-crl` with no --days said "For longer, make a new set before
  // then: `ovms-mtls certs init --dir ... --force`": to a user who asked for no length, a command that replaces both CAs and
  // so locks every client out until given new files.
  test('without --days, what the client CA ends says only when it ends, and suggests no certs init --force', async () => {
    const caEnd = new Date(new X509Certificate(await readFile(join(dir, CERT_FILES.clientCaCert))).validTo).toISOString();
    const endsWithCa = (what: string) => new RegExp(`\nNote: ${what} ends with the client CA, at ${caEnd}: nothing outlives the CA that signs it\\.(\n|$)`);
    // A CRL living past the CA, whose lifetime the next one takes over: the CA is then what ends it, whenever this runs.
    const issuer = { certPem: await readFile(join(dir, CERT_FILES.clientCaCert), 'utf8'), keyPem: await readFile(join(dir, CERT_FILES.clientCaKey), 'utf8'), serialHex: '' };
    const outlivingCrl = async () => writeFile(join(dir, CERT_FILES.clientCaCrl), await createCrl({ issuer, nextUpdate: new Date(Date.now() + 400 * 86_400_000) }));

    const summaries = [(await certsClient({ dir, name: 'default-days' })).summary];
    assert.match(summaries[0]!, endsWithCa('the certificate'));
    await outlivingCrl();
    summaries.push((await certsRevoke({ dir, cert: 'default-days' })).summary);
    assert.match(summaries[1]!, endsWithCa("the CRL's next update"));
    await outlivingCrl();
    summaries.push((await certsRenewCrl({ dir })).summary);
    assert.match(summaries[2]!, endsWithCa("the CRL's next update"));
    for (const summary of summaries) assert.doesNotMatch(summary, /--force|For longer/);
  });

  test('a renew-crl --days past the client CA\'s expiry says how much shorter the CRL lives, to the nearest day, not a day less', async () => {
    // The CA has 1 day left and the new CRL's thisUpdate is backdated a few minutes: it lives 1 day and minutes, 3 days 23 h short of 5.
    const report = await certsRenewCrl({ dir, days: 5 });
    assert.match(report.summary, /, 4 days short of the 5 days asked: nothing outlives the CA that signs it/);
  });

  test('refuses to issue from a client CA that has expired, instead of writing a certificate that can never verify', async () => {
    const expiredDir = freshDir();
    await certsInit({ dir: expiredDir });
    const oldCa = await createCa({ commonName: 'ovms-mtls expired client CA', notBefore: new Date(Date.now() - 5 * 86_400_000), days: 2 });
    await writeFile(join(expiredDir, CERT_FILES.clientCaCert), oldCa.certPem);
    await writeFile(join(expiredDir, CERT_FILES.clientCaKey), oldCa.keyPem, { mode: 0o600 });
    await assert.rejects(
      certsClient({ dir: expiredDir, name: 'late', days: 5 }),
      configError(/client_cert_ca\.pem expired on \S+: no certificate it signs can verify; make a new set with `ovms-mtls certs init --dir .* --force`/),
    );
    await assert.rejects(readFile(join(expiredDir, 'late.pem')), /ENOENT/);
  });

  test('refuses to replace an existing client without --force', async () => {
    await certsClient({ dir, name: 'carol' });
    await assert.rejects(certsClient({ dir, name: 'carol' }), configError(/carol\.pem already exists.*--force/));
    await certsClient({ dir, name: 'carol', force: true });
  });

  test('says to run certs init first when the directory has no client CA', async () => {
    const empty = freshDir();
    await assert.rejects(certsClient({ dir: empty, name: 'alice' }), configError(/client_cert_ca\.pem not found: run `ovms-mtls certs init --dir .*` first/));
  });

  test('refuses names that are not plain file names or would overwrite the PKI itself', async () => {
    await assert.rejects(certsClient({ dir, name: '../evil' }), configError(/--name "\.\.\/evil"/));
    await assert.rejects(certsClient({ dir, name: 'client_cert_ca', force: true }), configError(/would overwrite/));
  });

  test('rejects a --uri that is not an absolute URI', async () => {
    await assert.rejects(certsClient({ dir, name: 'dave', uri: ['example.org/alice'] }), configError(/--uri "example\.org\/alice" is not an absolute URI/));
  });

  test('rejects a --uri with characters a URI SAN cannot hold, which Go and Python refuse the certificate for, and names the encoded form', async () => {
    await assert.rejects(certsClient({ dir, name: 'eve', uri: ['spiffe://example.org/ns/é'] }),
      configError(/^--uri "spiffe:\/\/example\.org\/ns\/é" holds characters a URI cannot .*; percent-encode them, e\.g\. "spiffe:\/\/example\.org\/ns\/%C3%A9"$/));
    await assert.rejects(certsClient({ dir, name: 'eve', uri: ['spiffe://example.org/a b'] }), configError(/e\.g\. "spiffe:\/\/example\.org\/a%20b"/));
    await assert.rejects(readFile(join(dir, 'eve.pem')), /ENOENT/);
    await certsClient({ dir, name: 'eve', uri: ['spiffe://example.org/ns/%C3%A9', 'urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66'] });
  });
});

describe('a client CA outside its validity', () => {
  const DAY_MS = 86_400_000;
  /** A set whose client CA is replaced by `ca`, with a client certificate `held.pem` that CA signed. */
  async function setWithClientCa(ca: Awaited<ReturnType<typeof createCa>>): Promise<string> {
    const dir = freshDir();
    await certsInit({ dir, days: 30 });
    await writeFile(join(dir, CERT_FILES.clientCaCert), ca.certPem);
    await writeFile(join(dir, CERT_FILES.clientCaKey), ca.keyPem, { mode: 0o600 });
    await writeFile(join(dir, 'held.pem'), (await issueClientCert({ issuer: ca, commonName: 'held', notBefore: new Date(Date.now() - 6 * DAY_MS), days: 60 })).certPem);
    return dir;
  }

  /** Client, renew-crl and revoke are each refused with `pattern`, and the directory keeps its CRL and gains no certificate. */
  async function assertAllRefused(dir: string, pattern: (signs: string) => RegExp): Promise<void> {
    const crlBefore = await readFile(join(dir, CERT_FILES.clientCaCrl), 'utf8');
    await assert.rejects(certsClient({ dir, name: 'late', days: 5 }), configError(pattern('certificate')));
    await assert.rejects(certsRenewCrl({ dir, days: 5 }), configError(pattern('CRL')));
    await assert.rejects(certsRenewCrl({ dir }), configError(pattern('CRL')));
    await assert.rejects(certsRevoke({ dir, cert: 'held' }), configError(pattern('CRL')));
    await assert.rejects(readFile(join(dir, 'late.pem')), /ENOENT/);
    assert.equal(await readFile(join(dir, CERT_FILES.clientCaCrl), 'utf8'), crlBefore);
  }

  test('an expired one is refused for certs client, renew-crl and revoke alike, instead of a CRL that ends before it begins', async () => {
    const ca = await createCa({ commonName: 'ovms-mtls expired client CA', notBefore: new Date(Date.now() - 5 * DAY_MS), days: 2 });
    const dir = await setWithClientCa(ca);
    await assertAllRefused(dir, (signs) => new RegExp(`client_cert_ca\\.pem expired on \\S+: no ${signs} it signs can verify; make a new set with \`ovms-mtls certs init --dir .* --force\`$`));
  });

  test('one not valid yet (this clock behind the one that made it) is refused with both times, for certs client, renew-crl and revoke alike', async () => {
    const ca = await createCa({ commonName: 'ovms-mtls future client CA', notBefore: new Date(Date.now() + 2 * DAY_MS), days: 30 });
    const dir = await setWithClientCa(ca);
    const start = new Date(new X509Certificate(ca.certPem).validFrom).toISOString();
    await assertAllRefused(
      dir,
      (signs) => new RegExp(`client_cert_ca\\.pem is not valid before ${start} and this machine's clock reads \\S+: a ${signs} it signs now would not verify until then; set this machine's clock right, or wait$`),
    );
  });

  test('one starting a minute ahead of this clock (a skew the 5 minutes of backdating absorb) still signs', async () => {
    const ca = await createCa({ commonName: 'ovms-mtls skewed client CA', notBefore: new Date(Date.now() + 60_000), days: 30 });
    const dir = await setWithClientCa(ca);
    await rm(join(dir, CERT_FILES.clientCaCrl));
    await certsClient({ dir, name: 'soon', days: 5 });
    await certsRenewCrl({ dir, days: 5 });
    await certsRevoke({ dir, cert: 'held' });
  });
});

describe('certs revoke', () => {
  let dir: string;
  before(async () => {
    dir = freshDir();
    await certsInit({ dir });
    await certsClient({ dir, name: 'alice' });
    await certsClient({ dir, name: 'bob' });
  });

  test('adds the serial to the CRL, bumps the CRL number and keeps the earlier entries', async () => {
    const crlPath = join(dir, CERT_FILES.clientCaCrl);
    const initial = parseCrl(await readFile(crlPath, 'utf8'));
    const alice = await certsRevoke({ dir, cert: join(dir, 'alice.pem') });
    const bob = await certsRevoke({ dir, cert: 'bob' });
    const crlPem = await readFile(crlPath, 'utf8');
    const crl = parseCrl(crlPem);
    assert.deepEqual(parseCrlSerials(crlPem).sort(), [alice.serialHex, bob.serialHex].sort());
    assert.equal(crl.crlNumber, 3n);
    assert.equal(bob.crlNumber, 3n);
    // The re-signed CRL lives as long as the one it replaced, unless that would outlive the CA.
    const caEnd = new Date(new X509Certificate(await readFile(join(dir, CERT_FILES.clientCaCert))).validTo);
    const span = initial.nextUpdate!.getTime() - initial.thisUpdate.getTime();
    assert.equal(crl.nextUpdate!.getTime(), Math.min(crl.thisUpdate.getTime() + span, caEnd.getTime()));
    assert.equal(await modeOf(crlPath), 0o644);

    const listed = openssl(['crl', '-noout', '-text', '-CAfile', CERT_FILES.clientCaCrl.replace('.crl', '.pem'), '-in', CERT_FILES.clientCaCrl], dir);
    assert.match(listed.out, /verify OK/);
    assert.ok(listed.out.includes(`Serial Number: ${alice.serialHex.toUpperCase()}`), listed.out);
    assert.match(verifyClient(dir, 'alice.pem').out, /certificate revoked/);
    assert.equal(verifyClient(dir, CERT_FILES.clientCert).status, 0);
  });

  // The second one said "was already revoked on <date>": the CRL's date, set 5 minutes before the first revoke ran, as if it were when the user revoked.
  test('revoking a certificate twice leaves the CRL untouched and gives the revocation date as the CRL\'s, set before the revoke ran', async () => {
    await certsClient({ dir, name: 'erin' });
    const revokedAt = Date.now();
    const first = await certsRevoke({ dir, cert: 'erin' });
    const crlBefore = await readFile(join(dir, CERT_FILES.clientCaCrl), 'utf8');
    const again = await certsRevoke({ dir, cert: 'erin' });
    assert.equal(again.alreadyRevoked, true);
    assert.deepEqual(again.files, []);
    assert.equal(await readFile(join(dir, CERT_FILES.clientCaCrl), 'utf8'), crlBefore);
    const dated = parseCrl(crlBefore).revoked.find((entry) => entry.serialHex === first.serialHex)!.date;
    assert.ok(dated.getTime() < revokedAt, 'the CRL dates the revocation before the revoke ran');
    assert.equal(
      again.summary,
      `${join(dir, 'erin.pem')} (serial ${first.serialHex}, CN=erin) was already revoked; ${join(dir, CERT_FILES.clientCaCrl)} is unchanged. ` +
        `The CRL dates the revocation ${dated.toISOString()}: \`certs revoke\` dates it, as the CRL itself, ${CLOCK_SKEW_MS / 60_000} minutes before it runs, for machines whose clock is behind this one's.`,
    );
  });

  test('refuses a certificate issued by another CA, and the client CA itself', async () => {
    const otherDir = freshDir();
    await certsInit({ dir: otherDir });
    await assert.rejects(certsRevoke({ dir, cert: join(otherDir, CERT_FILES.clientCert) }), configError(/was not issued by client_cert_ca\.pem/));
    await assert.rejects(certsRevoke({ dir, cert: join(dir, CERT_FILES.serverCert) }), configError(/was not issued by client_cert_ca\.pem/));
    await assert.rejects(certsRevoke({ dir, cert: join(dir, CERT_FILES.clientCaCert) }), configError(/is the client CA itself/));
  });

  test('revokes run at the same time all land on the CRL, each with its own CRL number', async () => {
    const names = ['p1', 'p2', 'p3', 'p4', 'p5', 'p6'];
    for (const name of names) await certsClient({ dir, name });
    const crlPath = join(dir, CERT_FILES.clientCaCrl);
    const numberBefore = parseCrl(await readFile(crlPath, 'utf8')).crlNumber!;
    // Before the lock, each read the same old CRL and the last rename won: 1 of 6 revocations survived.
    const reports = await Promise.all(names.map((name) => certsRevoke({ dir, cert: name })));
    const crl = parseCrl(await readFile(crlPath, 'utf8'));
    const onCrl = new Set(crl.revoked.map((entry) => entry.serialHex));
    for (const report of reports) assert.ok(onCrl.has(report.serialHex), `serial ${report.serialHex} reported revoked but missing from the CRL`);
    assert.equal(crl.crlNumber, numberBefore + BigInt(names.length));
    assert.deepEqual(reports.map((r) => r.crlNumber).sort((a, b) => Number(a - b)), names.map((_, i) => numberBefore + BigInt(i + 1)));
    for (const name of names) assert.match(verifyClient(dir, `${name}.pem`).out, /certificate revoked/);
    assert.deepEqual((await readdir(dir)).filter((name) => name.endsWith('.lock') || name.endsWith('.tmp')), []);
  });

  test('a CRL lock left by a process that no longer runs is named, with what to do, instead of waiting', async () => {
    const gone = spawn(process.execPath, ['-e', ''], { stdio: 'ignore' });
    await once(gone, 'exit');
    const lock = join(dir, `${CERT_FILES.clientCaCrl}.lock`);
    await writeFile(lock, `${gone.pid}\n`);
    try {
      await assert.rejects(certsRenewCrl({ dir }), configError(new RegExp(`client_cert_ca\\.crl\\.lock was left by process ${gone.pid}, which no longer runs; remove it if no other certs command`)));
    } finally {
      await rm(lock);
    }
    await certsRenewCrl({ dir });
  });

  test('names the missing file when the certificate to revoke does not exist', async () => {
    await assert.rejects(certsRevoke({ dir, cert: 'nobody' }), configError(/--cert nobody: no such file/));
  });
});

describe('files from certs init in a Node TLS server', () => {
  test('the client is authorized and, once revoked, refused as CERT_REVOKED', async () => {
    const dir = freshDir();
    await certsInit({ dir });
    await certsClient({ dir, name: 'frank' });
    const read = (name: string) => readFile(join(dir, name), 'utf8');
    const serverOptions = async (): Promise<tls.TlsOptions> => ({
      key: await read(CERT_FILES.serverKey),
      cert: await read(CERT_FILES.serverCert),
      ca: await read(CERT_FILES.clientCaCert),
      crl: await read(CERT_FILES.clientCaCrl),
    });
    const server = tls.createServer({ ...(await serverOptions()), requestCert: true, rejectUnauthorized: false }, (socket) => {
      socket.end(socket.authorized ? 'authorized' : String(socket.authorizationError));
    });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    const ask = async (name: string): Promise<string> => {
      const socket = tls.connect({
        host: '127.0.0.1',
        port: (server.address() as AddressInfo).port,
        servername: 'localhost',
        ca: await read(CERT_FILES.serverCaCert),
        cert: await read(`${name}.pem`),
        key: await read(`${name}.key`),
      });
      let answer = '';
      socket.setEncoding('utf8').on('data', (chunk: string) => (answer += chunk));
      await once(socket, 'end');
      socket.destroy();
      return answer;
    };
    try {
      assert.equal(await ask('client'), 'authorized');
      assert.equal(await ask('frank'), 'authorized');
      await certsRevoke({ dir, cert: 'frank' });
      server.setSecureContext(await serverOptions());
      assert.equal(await ask('frank'), 'CERT_REVOKED');
      assert.equal(await ask('client'), 'authorized');
    } finally {
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  });
});
