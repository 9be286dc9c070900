import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import type { AddressInfo } from 'node:net';
import { connect as tlsConnect, createSecureContext, createServer as createTlsServer } from 'node:tls';
import { join } from 'node:path';
import { casWithNamesOf, createTestPki, type TestPki } from './helpers/pki.js';
import { CA_NAMES_LIMIT, JAVA_CA_NAMES_LIMIT } from '../src/ca-names.js';
import { runCli, runCommand } from './helpers/cli.js';
import { createCa, createCrl } from '../src/x509.js';
import { checkTlsFiles } from '../src/check.js';
import { loadTlsMaterialSync } from '../src/tls-material.js';
import { TlsMaterialError } from '../src/errors.js';
import { ProxyMetrics } from '../src/metrics.js';
import { sample } from './helpers/ops.js';
import type { TlsFiles } from '../src/config.js';
import { entrypointSettings } from '../src/entrypoint-config.js';
import { splitOvmsArgv } from '../src/ovms-args.js';

let pki: TestPki;
before(async () => {
  pki = await createTestPki();
});
after(async () => {
  await pki.cleanup();
});

const DAY_MS = 86_400_000;

function goodFiles(): TlsFiles {
  return { cert: pki.paths['server.pem']!, key: pki.paths['server.key']!, clientCa: pki.paths['client_cert_ca.pem']!, crl: pki.paths['client_cert_ca.crl']! };
}

function flags(files: TlsFiles): string[] {
  return ['--mtls_cert', files.cert, '--mtls_key', files.key, '--mtls_client_ca', files.clientCa, ...(files.crl ? ['--mtls_crl', files.crl] : [])];
}

async function write(name: string, contents: string): Promise<string> {
  const path = join(pki.dir, name);
  await writeFile(path, contents);
  return path;
}

/** Asserts `check` fails with `pattern`, and that loading for startup throws the very same message. */
async function assertRefused(files: TlsFiles, pattern: RegExp): Promise<void> {
  const result = await runCli(['check', ...flags(files)]);
  assert.equal(result.code, 1, result.stdout + result.stderr);
  assert.match(result.stdout, pattern);
  assert.match(result.stdout, /Result: FAILED/);
  const startup = (() => {
    try {
      loadTlsMaterialSync(files);
    } catch (err) {
      return err;
    }
    return undefined;
  })();
  assert.ok(startup instanceof TlsMaterialError, 'startup must refuse the same material');
  assert.match(startup.message, pattern);
  assert.ok(result.stdout.includes(startup.message), 'check prints the startup message verbatim');
}

/** Runs the openssl CLI; returns its output (stdout and stderr), which must exit 0 unless `mayFail`. */
async function openssl(args: string[], mayFail = false): Promise<string> {
  const { code, stdout, stderr } = await runCommand('openssl', args);
  const out = stdout + stderr;
  if (!mayFail) assert.equal(code, 0, `openssl ${args.join(' ')}: ${out}`);
  return out;
}

/** The error code a Node TLS client trusting `files.clientCa` gets from a plain TLS server serving `files.cert`. */
async function nodeClientErrorAgainst(files: TlsFiles): Promise<string | undefined> {
  const server = createTlsServer({ cert: await readFile(files.cert), key: await readFile(files.key) }, (socket) => socket.end());
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  try {
    const { port } = server.address() as AddressInfo;
    return await new Promise((resolve) => {
      const socket = tlsConnect({ host: '127.0.0.1', port, ca: readFileSync(files.clientCa), checkServerIdentity: () => undefined });
      socket.once('secureConnect', () => { socket.destroy(); resolve(undefined); });
      socket.once('error', (err: NodeJS.ErrnoException) => resolve(err.code));
    });
  } finally {
    server.close();
  }
}

describe('ovms-mtls check', () => {
  test('a good set exits 0 and reports the server names, how long the certificate lives, the client CA and the CRL', async () => {
    const result = await runCli(['check', ...flags(goodFiles())]);
    assert.equal(result.code, 0, result.stdout + result.stderr);
    assert.match(result.stdout, /OK {4}server certificate .*server\.pem: localhost, issued by ovms-mtls test server CA, valid until \S+ \(\d+ h left\)/);
    assert.match(result.stdout, /server names \(SAN\): DNS:localhost, IP Address:127\.0\.0\.1/);
    assert.match(result.stdout, /client CA bundle .*: 1 CA\n/);
    assert.match(result.stdout, /CRL #1 of ovms-mtls test client CA: 1 revoked, next update .*signature ok/);
    assert.match(result.stdout, /Result: OK/);
  });

  test('the same options from OVMS_MTLS_* environment variables are checked too', async () => {
    const files = goodFiles();
    const env = { OVMS_MTLS_CERT: files.cert, OVMS_MTLS_KEY: files.key, OVMS_MTLS_CLIENT_CA: files.clientCa, OVMS_MTLS_CRL: files.crl };
    const result = await runCli(['check'], { env });
    assert.equal(result.code, 0, result.stdout + result.stderr);
  });

  // Go and ghostunnel take an intermediate CA as a trust anchor; OpenSSL in Node does not, so this set refused every client without a word.
  test('an intermediate CA given as the client CA without its root is reported: warned beside a CA in use, failed alone', async () => {
    const beside = await runCli(['check', ...flags({ ...goodFiles(), clientCa: await write('other_root_and_intermediate.pem', pki.otherCa.certPem + pki.intermediateCa.certPem), crl: undefined })]);
    assert.equal(beside.code, 0, beside.stdout + beside.stderr);
    assert.match(beside.stdout, /^WARN +client CA ovms-mtls test intermediate CA in \S+other_root_and_intermediate\.pem is an intermediate CA without its root \(ovms-mtls test client CA\) in the bundle: .*refused as unknown_ca; append the root CA/m);
    // Alone it admits nobody: the proxy refuses to start with it, and check says so.
    const alone = await runCli(['check', ...flags({ ...goodFiles(), clientCa: pki.paths['intermediate_ca.pem']!, crl: undefined })]);
    assert.notEqual(alone.code, 0, alone.stdout + alone.stderr);
    assert.match(alone.stdout, /^FAIL +--mtls_client_ca: \S+intermediate_ca\.pem: no CA of the bundle can admit a client, .*append its root, ovms-mtls test client CA\)$/m);
    const withRoot = await runCli(['check', ...flags({ ...goodFiles(), clientCa: await write('root_and_intermediate.pem', pki.clientCa.certPem + pki.intermediateCa.certPem), crl: undefined })]);
    assert.equal(withRoot.code, 0, withRoot.stdout + withRoot.stderr);
    assert.doesNotMatch(withRoot.stdout, /without its root/);
  });

  // OpenSSL refuses every client of a CA not valid yet, as CERT_NOT_YET_VALID; check said OK ("valid until ... left").
  test('a client CA not valid yet (made on a machine whose clock is ahead) is refused alone, and reported next to a valid one', async () => {
    const early = await createCa({ commonName: 'ovms-mtls test future CA', notBefore: new Date(Date.now() + DAY_MS), days: 30 });
    const alone = await write('future_ca.pem', early.certPem);
    await assertRefused(
      { ...goodFiles(), clientCa: alone, crl: undefined },
      /--mtls_client_ca: \S+future_ca\.pem: no CA is valid yet \(ovms-mtls test future CA is not valid before \S+\); every client is refused until then \(check the clock/,
    );
    const next = await write('current_and_future_ca.pem', pki.clientCa.certPem + early.certPem);
    const both = await runCli(['check', ...flags({ ...goodFiles(), clientCa: next, crl: undefined })]);
    assert.equal(both.code, 0, both.stdout + both.stderr);
    assert.match(both.stdout, /^WARN +client CA ovms-mtls test future CA is not valid before \S+: its clients are refused until then \(check the clock\)$/m);
  });

  test('an expired CRL is reported, since it would lock every client out', async () => {
    const expired = await createCrl({ issuer: pki.clientCa, thisUpdate: new Date(Date.now() - 3 * DAY_MS), nextUpdate: new Date(Date.now() - DAY_MS) });
    const crl = await write('expired.crl', expired);
    await assertRefused({ ...goodFiles(), crl }, /--mtls_crl: .*expired\.crl: CRL #1 expired on .*every client of its CA would be refused/);
  });

  test('a second trusted CA without a CRL is reported when CRLs are on', async () => {
    const clientCa = await write('two_cas.pem', pki.clientCa.certPem + pki.otherCa.certPem);
    await assertRefused({ ...goodFiles(), clientCa }, /--mtls_crl: .*client_cert_ca\.crl has no CRL for CA #2 \(ovms-mtls test other CA\)/);
  });

  test('two trusted CAs each with its CRL pass', async () => {
    const clientCa = await write('two_cas_ok.pem', pki.clientCa.certPem + pki.otherCa.certPem);
    const crl = await write('two_crls.crl', pki.crlPem + pki.otherCaCrlPem);
    const result = await runCli(['check', ...flags({ ...goodFiles(), clientCa, crl })]);
    assert.equal(result.code, 0, result.stdout);
    assert.match(result.stdout, /2 CRLs/);
  });

  test('a CRL bearing the client CA name but signed by another key is reported', async () => {
    const impostor = await createCa({ commonName: 'ovms-mtls test client CA' });
    const crl = await write('impostor.crl', await createCrl({ issuer: impostor }));
    await assertRefused({ ...goodFiles(), crl }, /CRL #1 names ovms-mtls test client CA as its issuer but is not signed by that CA's key/);
  });

  test('a client CA renewed with a new key under the same name, given only the new key\'s CRL, is named as the CA without a CRL', async () => {
    const renewed = await createCa({ commonName: 'ovms-mtls test client CA' });
    const clientCa = await write('renewed_ca.pem', pki.clientCa.certPem + renewed.certPem);
    await assertRefused(
      { ...goodFiles(), clientCa, crl: await write('renewed_only.crl', await createCrl({ issuer: renewed })) },
      /--mtls_crl: \S+renewed_only\.crl has no CRL for CA #1 \(ovms-mtls test client CA\) of --mtls_client_ca \S+renewed_ca\.pem: CRL #1 names it as its issuer but is signed by the key of CA #2, of the same name/,
    );
    const both = await runCli(['check', ...flags({ ...goodFiles(), clientCa, crl: await write('renewed_both.crl', pki.crlPem + (await createCrl({ issuer: renewed }))) })]);
    assert.equal(both.code, 0, both.stdout + both.stderr);
    assert.match(both.stdout, /CRL #2 of ovms-mtls test client CA: 0 revoked, .*signature ok/);
  });

  test('a client CA bundle whose names are more than the TLS request for a client certificate carries (a corporate trust store) is refused, as no handshake could complete', async () => {
    const clientCa = await write('too_many_cas.pem', await casWithNamesOf(CA_NAMES_LIMIT + 1, pki.clientCa));
    await assertRefused(
      { ...goodFiles(), clientCa, crl: undefined },
      /--mtls_client_ca: \S+too_many_cas\.pem: the names of its \d+ CAs take 65401 bytes in the TLS request for a client certificate, which carries at most 65400: handshakes would fail \(internal_error; .*keep only the CAs that issue your clients' certificates/,
    );
  });

  test('a client CA bundle whose names are over 32 KiB loads, with a warning that Java clients refuse the request', async () => {
    const clientCa = await write('many_cas.pem', await casWithNamesOf(JAVA_CA_NAMES_LIMIT + 1, pki.clientCa));
    const result = await runCli(['check', ...flags({ ...goodFiles(), clientCa, crl: undefined })]);
    assert.equal(result.code, 0, result.stdout + result.stderr);
    assert.match(result.stdout, /^WARN +client CA bundle \S+many_cas\.pem: the names of its \d+ CAs take 32701 bytes .*Java clients refuse a request over 32 KiB .*-Djdk\.tls\.maxHandshakeMessageSize=65536/m);
    const fewer = await runCli(['check', ...flags({ ...goodFiles(), clientCa: await write('fewer_cas.pem', await casWithNamesOf(JAVA_CA_NAMES_LIMIT, pki.clientCa)), crl: undefined })]);
    assert.doesNotMatch(fewer.stdout, /Java/);
  });

  test('a key that does not match the certificate is reported', async () => {
    await assertRefused({ ...goodFiles(), key: pki.paths['client.key']! }, /--mtls_key: .*client\.key does not match --mtls_cert .*server\.pem/);
  });

  test('a client certificate given as the server certificate is refused, as every OpenSSL client refuses it (Node included)', async () => {
    const files = { ...goodFiles(), cert: pki.paths['client.pem']!, key: pki.paths['client.key']! };
    assert.match(await openssl(['verify', '-purpose', 'sslserver', '-CAfile', files.clientCa, files.cert], true), /unsuitable certificate purpose/);
    assert.equal(await nodeClientErrorAgainst(files), 'INVALID_PURPOSE');
    await assertRefused(files, /--mtls_cert: .*client\.pem is not a server certificate \(its extended key usage lacks serverAuth/);
  });

  test('a server certificate file whose chain is in the wrong order or from the wrong CA is reported', async () => {
    const cert = await write('server_wrong_chain.pem', pki.server.certPem + pki.otherCa.certPem);
    await assertRefused({ ...goodFiles(), cert }, /--mtls_cert: .*server_wrong_chain\.pem: certificate #2 \(ovms-mtls test other CA\) did not issue certificate #1 \(localhost\)/);
  });

  test('a server certificate file with the CA first and the server certificate after it names the order, not a wrong key', async () => {
    const cert = await write('server_ca_first.pem', pki.serverCa.certPem + pki.server.certPem);
    await assertRefused(
      { ...goodFiles(), cert },
      /--mtls_cert: .*server_ca_first\.pem: the key .*server\.key belongs to certificate #2 \(localhost\), not to certificate #1 \(ovms-mtls test server CA\); put the server certificate first, then each CA in signing order/,
    );
  });

  /** A server certificate for localhost with an RSA key of `bits`, issued by the test server CA. */
  async function rsaServerCert(bits: number): Promise<{ cert: string; key: string }> {
    const [key, csr, cert] = ['key', 'csr', 'pem'].map((ext) => join(pki.dir, `rsa${bits}.${ext}`)) as [string, string, string];
    const ext = await write(`rsa${bits}.ext`, 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n');
    await openssl(['req', '-new', '-newkey', `rsa:${bits}`, '-nodes', '-keyout', key, '-subj', '/CN=localhost', '-out', csr]);
    await openssl(['x509', '-req', '-in', csr, '-CA', pki.paths['server_ca.pem']!, '-CAkey', pki.paths['server_ca.key']!, '-days', '2', '-extfile', ext, '-out', cert]);
    return { cert, key };
  }

  /** Whether this Node's OpenSSL serves the pair (its security level: 1 up to Node 22, 2 from Node 24). */
  function nodeServes(pair: { cert: string; key: string }): boolean {
    try {
      createSecureContext({ cert: readFileSync(pair.cert), key: readFileSync(pair.key) });
      return true;
    } catch {
      return false;
    }
  }

  test('an RSA key under 2048 bits: where this Node serves it, check passes with a warning that openssl at security level 2 refuses it; where it does not (Node 24), check fails naming the key as it is', async () => {
    const { cert, key } = await rsaServerCert(1024);
    const strict = await openssl(['verify', '-auth_level', '2', '-CAfile', pki.paths['server_ca.pem']!, cert], true);
    assert.match(strict, /key too weak/);
    const result = await runCli(['check', ...flags({ ...goodFiles(), cert, key })]);
    if (nodeServes({ cert, key })) {
      assert.equal(result.code, 0, result.stdout);
      assert.match(result.stdout, /^WARN {2}server certificate .*rsa1024\.pem has a 1024-bit RSA key: OpenSSL clients at security level 2 .* refuse it as "key too weak"; reissue it with 2048 bits or more/m);
    } else {
      assert.equal(result.code, 1, result.stdout);
      assert.match(result.stdout, /^FAIL {2}--mtls_cert: .*rsa1024\.pem: the server certificate's key \(a 1024-bit RSA key\) is smaller than this Node's OpenSSL accepts at its security level: reissue it with 2048 bits or more/m);
    }
    const good = await runCli(['check', ...flags(goodFiles())]);
    assert.doesNotMatch(good.stdout, /RSA key/);
  });

  test('an RSA key no Node serves (768 bits) fails check with a message naming the key as it is, not a size it is said to be under', async () => {
    const pair = await rsaServerCert(768);
    assert.equal(nodeServes(pair), false);
    const result = await runCli(['check', ...flags({ ...goodFiles(), ...pair })]);
    assert.equal(result.code, 1, result.stdout);
    assert.match(result.stdout, /^FAIL {2}--mtls_cert: .*rsa768\.pem: the server certificate's key \(a 768-bit RSA key\) is smaller than this Node's OpenSSL accepts at its security level: reissue it with 2048 bits or more \(`ovms-mtls certs init --key rsa2048`, or the default EC key\)$/m);
  });

  test('a server certificate followed by the CA that issued it passes', async () => {
    const cert = await write('server_with_chain.pem', pki.server.certPem + pki.serverCa.certPem);
    const report = checkTlsFiles({ ...goodFiles(), cert });
    assert.equal(report.ok, true, JSON.stringify(report.findings));
  });

  test('a server certificate that names its host in subjectAltName alone (an empty subject, no CN) passes check, and the proxy\'s expiry gauge takes it', async () => {
    // Node gives undefined, not '', for an empty name: check and the proxy's start (with an admin port) ended in "internal error: TypeError".
    const at = (file: string) => join(pki.dir, file);
    await writeFile(at('san_only_server.cnf'), '[req]\ndistinguished_name=dn\n[dn]\n[ext]\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=critical,DNS:localhost\n');
    await openssl(['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', at('san_only_server.key'), '-subj', '/', '-config', at('san_only_server.cnf'), '-out', at('san_only_server.csr')]);
    await openssl(['x509', '-req', '-in', at('san_only_server.csr'), '-CA', pki.paths['server_ca.pem']!, '-CAkey', pki.paths['server_ca.key']!, '-CAcreateserial', '-days', '1',
      '-extfile', at('san_only_server.cnf'), '-extensions', 'ext', '-out', at('san_only_server.pem')]);
    const files = { ...goodFiles(), cert: at('san_only_server.pem'), key: at('san_only_server.key') };
    const result = await runCli(['check', ...flags(files)]);
    assert.equal(result.code, 0, result.stdout + result.stderr);
    assert.match(result.stdout, /OK {4}server certificate .*san_only_server\.pem: \(empty name\), issued by ovms-mtls test server CA/);
    const metrics = new ProxyMetrics({ processMetrics: false });
    metrics.setCertificates(loadTlsMaterialSync(files));
    assert.ok(sample(await metrics.text(), 'ovms_mtls_certificate_expiry_timestamp_seconds', { role: 'server', subject: '(empty name)' })! > Date.now() / 1000);
  });

  test('a missing file is reported with the flag and the path', async () => {
    await assertRefused({ ...goodFiles(), crl: join(pki.dir, 'nope.crl') }, /--mtls_crl: .*nope\.crl does not exist/);
  });

  test('a CRL file holding the client CA and intermediate CRLs passes; the CRL for a CA outside the bundle is described, not refused', () => {
    const report = checkTlsFiles({ ...goodFiles(), crl: pki.paths['client_cert_ca_chain.crl']! });
    assert.equal(report.ok, true);
    assert.ok(report.findings.some((f) => /CRL #2: issuer not in the client CA bundle/.test(f.text)));
  });

  test('a bad allow-list option fails check as it would fail the proxy', async () => {
    const result = await runCli(['check', ...flags(goodFiles()), '--mtls_allow_fingerprint', 'abc']);
    assert.equal(result.code, 2);
    assert.match(result.stderr, /--mtls_allow_fingerprint: 'abc' is not a SHA-256 fingerprint/);
  });

  // Before: `check --mtls_log_level warning` (or OVMS_MTLS_GRPC_MODE=Relay in the container's environment) printed
  // "Result: OK - the proxy would start" and exited 0, while the proxy and the entrypoint refused to start.
  test('an option the proxy refuses (a log level, a worker count, a mode from the environment) fails check with the proxy\'s line and exit 2', async () => {
    const cases: [string[], NodeJS.ProcessEnv][] = [
      [['--mtls_log_level', 'warning'], {}],
      [['--mtls_workers', '0'], {}],
      [[], { OVMS_MTLS_GRPC_MODE: 'Relay' }],
    ];
    for (const [options, env] of cases) {
      const checked = await runCli(['check', ...flags(goodFiles()), ...options], { env });
      const started = await runCli(['proxy', '--rest_port', '1', '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', '127.0.0.1:9', ...flags(goodFiles()), ...options], { env });
      assert.equal(started.code, 2, started.stdout + started.stderr);
      assert.equal(checked.code, 2, checked.stdout + checked.stderr);
      assert.equal(checked.stderr, started.stderr);
      assert.equal(checked.stdout, '');
    }
  });

  // Before: `check --mtls_ovms_hang_timeout=60s` (or OVMS_MTLS_RESTART=always in the container's environment) printed
  // "Result: OK - the proxy would start" and exited 0, while the entrypoint exited 2 on it.
  test('an OVMS supervision option the entrypoint refuses (--mtls_restart, --mtls_ovms_hang_timeout) fails check with the entrypoint\'s line and exit 2', async () => {
    const cases: [string[], NodeJS.ProcessEnv][] = [
      [['--mtls_ovms_hang_timeout=60s'], {}],
      [['--mtls_restart=always'], {}],
      [[], { OVMS_MTLS_OVMS_HANG_TIMEOUT: '-1' }],
    ];
    for (const [options, env] of cases) {
      const checked = await runCli(['check', ...flags(goodFiles()), ...options], { env });
      assert.equal(checked.code, 2, checked.stdout + checked.stderr);
      assert.equal(checked.stdout, '');
      assert.throws(() => entrypointSettings(splitOvmsArgv(['--port', '9000', ...options]), env),
        (err: Error) => checked.stderr.startsWith(`ovms-mtls: ${err.message}`), checked.stderr);
    }
    const good = await runCli(['check', ...flags(goodFiles()), '--mtls_restart=on-failure', '--mtls_ovms_hang_timeout=60']);
    assert.equal(good.code, 0, good.stdout + good.stderr);
  });

  // Before: each of these printed "Result: OK - the proxy would start" and exited 0, while the proxy refused to start.
  test('a public bind address, an upstream or a port the proxy refuses fails check with the proxy\'s line and exit 2', async () => {
    const upstreams = ['--mtls_grpc_upstream', '127.0.0.1:9', '--mtls_rest_upstream', '127.0.0.1:9'];
    const cases: string[][] = [
      ['--rest_port', '1', '--rest_bind_address', '::,::1', ...upstreams],
      ['--port', '1', '--grpc_bind_address', '[::1]:9443', ...upstreams],
      ['--rest_port', '1', '--rest_bind_address', '::1', ...upstreams, '--mtls_rest_upstream', '::1:8000'],
      ['--port', '1', '--rest_port', '1', '--grpc_bind_address', '127.0.0.1', '--rest_bind_address', '127.0.0.1', ...upstreams],
      ['--rest_port', '1', '--rest_bind_address', '127.0.0.1', '--mtls_admin_port', '1', '--mtls_admin_bind_address', 'localhost,127.0.0.1', ...upstreams],
    ];
    for (const options of cases) {
      const checked = await runCli(['check', ...flags(goodFiles()), ...options]);
      const started = await runCli(['proxy', ...flags(goodFiles()), ...options]);
      assert.equal(started.code, 2, started.stdout + started.stderr);
      assert.equal(checked.code, 2, checked.stdout + checked.stderr);
      assert.equal(checked.stderr, started.stderr);
      assert.equal(checked.stdout, '');
    }
  });

  test('good listener options pass check: the entrypoint\'s (ports and addresses, no upstream) and the proxy\'s', async () => {
    for (const options of [['--port', '9000', '--rest_port', '8000', '--grpc_bind_address', '::', '--rest_bind_address', '0.0.0.0,[::]'],
      ['--rest_port', '8443', '--rest_bind_address', '::1', '--mtls_rest_upstream', '[::1]:8000', '--mtls_admin_port', '8443', '--mtls_admin_bind_address', '127.0.0.1']]) {
      const checked = await runCli(['check', ...flags(goodFiles()), ...options]);
      assert.equal(checked.code, 0, checked.stdout + checked.stderr);
    }
  });

  test('the proxy refuses to start on an expired CRL with the message check prints', async () => {
    const expired = await createCrl({ issuer: pki.clientCa, thisUpdate: new Date(Date.now() - 3 * DAY_MS), nextUpdate: new Date(Date.now() - DAY_MS) });
    const crl = await write('expired_for_proxy.crl', expired);
    const files = { ...goodFiles(), crl };
    const checked = await runCli(['check', ...flags(files)]);
    const started = await runCli(['proxy', '--rest_port', '1', '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', '127.0.0.1:9', ...flags(files)]);
    assert.equal(started.code, 2, started.stdout + started.stderr);
    const message = /^ovms-mtls: (.*)$/m.exec(started.stderr)?.[1];
    assert.ok(message, started.stderr);
    assert.match(message, /CRL #1 expired on/);
    assert.ok(checked.stdout.includes(message), `${checked.stdout} lacks ${message}`);
  });
});
