/**
 * Certificates and keys as users bring them: made by the openssl CLI (as cert-manager,
 * Vault, step-ca and Windows exports lay them out), not by our `certs` command.
 * Everything is generated per run into a temporary directory.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { once } from 'node:events';
import { request as httpsRequest } from 'node:https';
import { connect as tlsConnect, createSecureContext, createServer as createTlsServer, type TLSSocket } from 'node:tls';
import { runCommand } from './helpers/cli.js';
import { baseConfig, LogCapture, startUpstream } from './helpers/harness.js';
import type { ModelServer } from '../src/demo/model-server.js';
import type { TestPki } from './helpers/pki.js';
import { checkTlsFiles } from '../src/check.js';
import { loadTlsMaterialSync, secureContextOptions } from '../src/tls-material.js';
import { TlsMaterialError } from '../src/errors.js';
import { startProxy, type RunningProxy } from '../src/proxy.js';
import { createLogger } from '../src/log.js';
import type { TlsFiles } from '../src/config.js';

const EXTENSIONS = `[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
[client]
basicConstraints = CA:FALSE
extendedKeyUsage = clientAuth
[client_private_critical]
basicConstraints = CA:FALSE
extendedKeyUsage = clientAuth
1.3.6.1.4.1.55555.1 = critical,ASN1:UTF8String:internal
`;

let dir: string;

async function openssl(...args: string[]): Promise<void> {
  const { code, stdout, stderr } = await runCommand('openssl', args, { cwd: dir });
  assert.equal(code, 0, `openssl ${args.join(' ')}: ${stdout}${stderr}`);
}

function path(name: string): string {
  return join(dir, name);
}

async function makeCa(name: string, cn: string): Promise<void> {
  await openssl('ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', `${name}.key`);
  await openssl('req', '-new', '-x509', '-key', `${name}.key`, '-subj', `/CN=${cn}`, '-days', '2', '-config', 'ext.cnf', '-extensions', 'ca', '-out', `${name}.pem`);
}

/** `name.pem` for the key `keyFile`, signed by the CA `ca` with the extension section `section`. */
async function issue(name: string, keyFile: string, ca: string, section: string): Promise<void> {
  await openssl('req', '-new', '-key', keyFile, '-subj', `/CN=${name}`, '-config', 'ext.cnf', '-out', `${name}.csr`);
  await openssl('x509', '-req', '-in', `${name}.csr`, '-CA', `${ca}.pem`, '-CAkey', `${ca}.key`, '-CAcreateserial', '-days', '1', '-extfile', 'ext.cnf', '-extensions', section, '-out', `${name}.pem`);
}

/** The CRL of `clientca`, full or delta, revoking what its little database says. */
async function makeCrl(out: string, delta: boolean): Promise<void> {
  await writeFile(path('crl.cnf'), `[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\ncrlnumber = crlnumber\ndefault_md = sha256\ndefault_crl_days = 1\ncrl_extensions = ext\n[ext]\nauthorityKeyIdentifier = keyid\n${delta ? 'deltaCRL = critical,DER:02:01:01\n' : ''}`);
  await openssl('ca', '-config', 'crl.cnf', '-gencrl', '-keyfile', 'clientca.key', '-cert', 'clientca.pem', '-out', out);
}

function files(cert: string, key: string, clientCa = 'clientca.pem', crl?: string): TlsFiles {
  return { cert: path(cert), key: path(key), clientCa: path(clientCa), crl: crl === undefined ? undefined : path(crl) };
}

function refusalOf(tls: TlsFiles): string | undefined {
  try {
    loadTlsMaterialSync(tls);
  } catch (err) {
    assert.ok(err instanceof TlsMaterialError, `a user error, not ${String(err)}`);
    return err.message;
  }
  return undefined;
}

/** A TLS server built as the proxy builds its contexts, one handshake by a client of `clientca`; resolves whether the server verified it. */
async function handshake(tls: TlsFiles, maxVersion: 'TLSv1.2' | 'TLSv1.3'): Promise<boolean> {
  const server = createTlsServer({ ...secureContextOptions(loadTlsMaterialSync(tls)), requestCert: true, rejectUnauthorized: false });
  const verdict = once(server, 'secureConnection').then(([socket]) => (socket as TLSSocket).authorized);
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as { port: number };
  const [ca, cert, key] = await Promise.all([readFile(path('serverca.pem')), readFile(path('client.pem')), readFile(path('client.key'))]);
  const client = tlsConnect({ host: '127.0.0.1', port, servername: 'localhost', ca, cert, key, maxVersion });
  client.on('error', () => {});
  await once(client, 'secureConnect');
  try {
    return await verdict;
  } finally {
    client.destroy();
    server.close();
  }
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-material-'));
  await writeFile(path('ext.cnf'), EXTENSIONS);
  await writeFile(path('index.txt'), '');
  await writeFile(path('crlnumber'), '01\n');
  await makeCa('serverca', 'Material Server CA');
  await makeCa('clientca', 'Material Client CA');
  await openssl('ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', 'server.key');
  await issue('server', 'server.key', 'serverca', 'server');
  await openssl('ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', 'client.key');
  await issue('client', 'client.key', 'clientca', 'client');
  await makeCrl('clientca.crl', false);
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('server keys in every form openssl writes', () => {
  const forms: [string, string[][]][] = [
    ['RSA PKCS#1 (BEGIN RSA PRIVATE KEY)', [['genrsa', '-traditional', '-out', 'KEY', '2048']]],
    ['PKCS#8 (BEGIN PRIVATE KEY)', [['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', 'KEY']]],
    ['EC SEC1 (BEGIN EC PRIVATE KEY)', [['ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', 'KEY']]],
    ['EC SEC1 after an EC PARAMETERS block', [['ecparam', '-name', 'prime256v1', '-genkey', '-out', 'KEY']]],
    ['Ed25519', [['genpkey', '-algorithm', 'ed25519', '-out', 'KEY']]],
    ['P-384', [['ecparam', '-name', 'secp384r1', '-genkey', '-noout', '-out', 'KEY']]],
    ['P-521', [['ecparam', '-name', 'secp521r1', '-genkey', '-noout', '-out', 'KEY']]],
    ['RSA-PSS', [['genpkey', '-algorithm', 'RSA-PSS', '-pkeyopt', 'rsa_keygen_bits:2048', '-out', 'KEY']]],
  ];
  forms.forEach(([form, commands], i) => {
    test(`${form}: loads, and clients complete TLS 1.3 and 1.2 handshakes`, async () => {
      for (const command of commands) await openssl(...command.map((arg) => (arg === 'KEY' ? `form${i}.key` : arg)));
      await issue(`form${i}`, `form${i}.key`, 'serverca', 'server');
      const tls = files(`form${i}.pem`, `form${i}.key`, 'clientca.pem', 'clientca.crl');
      assert.equal(refusalOf(tls), undefined);
      assert.equal(await handshake(tls, 'TLSv1.3'), true);
      assert.equal(await handshake(tls, 'TLSv1.2'), true);
    });
  });
});

describe('PEM files as editors and tools leave them', () => {
  test('CRLF line endings, a UTF-8 BOM, openssl -text output above the PEM and text after the key all load and serve', async () => {
    const shapes: Record<string, (text: string) => string> = {
      crlf: (text) => text.replace(/\n/g, '\r\n'),
      bom: (text) => '\ufeff' + text,
      noise: (text) => `Certificate:\n    Data: (what openssl -text prints)\n${text}# trailing comment\n`,
    };
    for (const [shape, reshape] of Object.entries(shapes)) {
      for (const name of ['server.pem', 'server.key', 'clientca.pem', 'clientca.crl']) {
        await writeFile(path(`${shape}-${name}`), reshape(await readFile(path(name), 'utf8')));
      }
      const tls = files(`${shape}-server.pem`, `${shape}-server.key`, `${shape}-clientca.pem`, `${shape}-clientca.crl`);
      assert.equal(refusalOf(tls), undefined, shape);
      assert.equal(await handshake(tls, 'TLSv1.3'), true, shape);
    }
  });
});

describe('files that are not what the flag wants get one line naming the file and the fix', () => {
  before(async () => {
    await openssl('x509', '-in', 'server.pem', '-outform', 'DER', '-out', 'server.der');
    await openssl('x509', '-in', 'clientca.pem', '-outform', 'DER', '-out', 'clientca.der');
    await openssl('pkey', '-in', 'server.key', '-outform', 'DER', '-out', 'server-key.der');
    await openssl('pkcs12', '-export', '-in', 'server.pem', '-inkey', 'server.key', '-passout', 'pass:', '-out', 'server.p12');
    await openssl('pkcs12', '-export', '-in', 'server.pem', '-inkey', 'server.key', '-passout', 'pass:secret', '-out', 'server.pfx');
    await openssl('genrsa', '-traditional', '-out', 'rsa.key', '2048');
    await openssl('rsa', '-in', 'rsa.key', '-traditional', '-aes256', '-passout', 'pass:secret', '-out', 'rsa-encrypted.key');
    await openssl('pkcs8', '-topk8', '-in', 'server.key', '-passout', 'pass:secret', '-out', 'pkcs8-encrypted.key');
    await writeFile(path('empty'), '');
    const cut = async (from: string, to: string, keep: number, before = '') => writeFile(path(to), before + (await readFile(path(from), 'latin1')).slice(0, keep));
    await cut('server.pem', 'server-cut.pem', 300);
    await cut('server.key', 'server-cut.key', 100);
    await cut('serverca.pem', 'bundle-cut.pem', 300, await readFile(path('clientca.pem'), 'latin1'));
    await cut('clientca.crl', 'crl-cut.crl', 200);
  });

  const cases: [string, () => TlsFiles, RegExp][] = [
    ['a DER certificate', () => files('server.der', 'server.key'), /^--mtls_cert: \S+server\.der holds a DER \(binary\) certificate, not PEM \(convert it: `openssl x509 -inform DER -in \S+server\.der -out \S+server\.der\.pem`\)$/],
    ['a DER client CA', () => files('server.pem', 'server.key', 'clientca.der'), /^--mtls_client_ca: \S+clientca\.der holds a DER \(binary\) certificate.*openssl x509 -inform DER/],
    ['a DER key', () => files('server.pem', 'server-key.der'), /^--mtls_key: \S+server-key\.der holds a DER \(binary\) key, not PEM \(convert it: `openssl pkey -inform DER -in \S+server-key\.der -out \S+`\)$/],
    ['a PKCS#12 bundle as the certificate', () => files('server.p12', 'server.key'), /^--mtls_cert: \S+server\.p12 is a PKCS#12 bundle \(\.pfx\/\.p12\), not PEM \(split it: `openssl pkcs12 -in \S+server\.p12 -nokeys .*-nocerts -nodes/],
    ['a password-protected PKCS#12 bundle as the key', () => files('server.pem', 'server.pfx'), /^--mtls_key: \S+server\.pfx is a PKCS#12 bundle/],
    ['an empty certificate file', () => files('empty', 'server.key'), /^--mtls_cert: \S+empty is empty \(expected a PEM certificate/],
    ['an empty key file', () => files('server.pem', 'empty'), /^--mtls_key: \S+empty is empty \(expected a PEM private key/],
    ['an empty CRL file', () => files('server.pem', 'server.key', 'clientca.pem', 'empty'), /^--mtls_crl: \S+empty is empty .*leave --mtls_crl out/],
    ['the certificate given as the key', () => files('server.pem', 'server.pem'), /^--mtls_key: \S+server\.pem holds a certificate, not a private key \(--mtls_cert and --mtls_key swapped\?\)$/],
    ['a DER certificate given as the key', () => files('server.pem', 'server.der'), /^--mtls_key: \S+server\.der holds a DER \(binary\) certificate, not a private key \(--mtls_cert and --mtls_key swapped\?\)$/],
    ['a PKCS#1 key with Proc-Type: 4,ENCRYPTED', () => files('server.pem', 'rsa-encrypted.key'), /^--mtls_key: \S+rsa-encrypted\.key is encrypted, and the proxy takes no passphrase \(decrypt it: `openssl pkey -in \S+rsa-encrypted\.key -out \S+rsa-encrypted\.key\.plain` asks for the passphrase once\)$/],
    // A BEGIN line without its END: said to hold no certificate (expected that very BEGIN line), a CRL "for no CA", or a bundle's last CA dropped unsaid.
    ['a certificate cut short', () => files('server-cut.pem', 'server.key'), /^--mtls_cert: \S+server-cut\.pem is cut short: a -----BEGIN CERTIFICATE----- block has no -----END CERTIFICATE----- line \(copy the whole file again\)$/],
    ['a key cut short', () => files('server.pem', 'server-cut.key'), /^--mtls_key: \S+server-cut\.key is cut short: a -----BEGIN (EC )?PRIVATE KEY----- block has no -----END/],
    ['a client CA bundle whose last CA is cut short', () => files('server.pem', 'server.key', 'bundle-cut.pem'), /^--mtls_client_ca: \S+bundle-cut\.pem is cut short: a -----BEGIN CERTIFICATE----- block/],
    ['a CRL cut short', () => files('server.pem', 'server.key', 'clientca.pem', 'crl-cut.crl'), /^--mtls_crl: \S+crl-cut\.crl is cut short: a -----BEGIN X509 CRL----- block has no -----END X509 CRL----- line/],
    ['an encrypted PKCS#8 key', () => files('server.pem', 'pkcs8-encrypted.key'), /^--mtls_key: \S+pkcs8-encrypted\.key is encrypted, and the proxy takes no passphrase \(decrypt it: `openssl pkey -in \S+pkcs8-encrypted\.key /],
  ];
  for (const [what, tls, message] of cases) {
    test(`${what}: startup and check refuse it with the same line`, () => {
      const refused = refusalOf(tls());
      assert.ok(refused, 'refused');
      assert.match(refused, message);
      assert.doesNotMatch(refused, /\n/);
      const report = checkTlsFiles(tls());
      assert.equal(report.ok, false);
      assert.deepEqual(report.findings.map((f) => f.text), [refused]);
    });
  }
});

describe('CRLs', () => {
  test('a delta CRL is refused: OpenSSL would ignore its revocations (after its base) or the base CRL\'s (alone or first)', async () => {
    await writeFile(path('index.txt'), '');
    await openssl('ca', '-config', 'crl.cnf', '-revoke', 'client.pem', '-keyfile', 'clientca.key', '-cert', 'clientca.pem');
    await makeCrl('delta.crl', true);
    await writeFile(path('base-and-delta.crl'), (await readFile(path('clientca.crl'), 'utf8')) + (await readFile(path('delta.crl'), 'utf8')));
    for (const crl of ['base-and-delta.crl', 'delta.crl']) {
      const refused = refusalOf(files('server.pem', 'server.key', 'clientca.pem', crl));
      assert.match(refused ?? '', /^--mtls_crl: \S+: CRL #\d is a delta CRL \(Delta CRL Indicator\), .*give only the CA's full CRL/, crl);
    }
    await writeFile(path('index.txt'), '');
  });
});

describe('client certificates from other tools, over a real proxy', () => {
  let proxy: RunningProxy;
  let upstream: ModelServer;
  const logs = new LogCapture();
  before(async () => {
    upstream = await startUpstream();
    // baseConfig reads the default paths from a TestPki; every one of them is overridden here.
    const config = baseConfig({ pki: { paths: {} } as unknown as TestPki, upstream: { restPort: upstream.restPort }, tls: files('server.pem', 'server.key', 'clientca.pem', 'clientca.crl') });
    proxy = await startProxy({ config, material: loadTlsMaterialSync(config.tls), logger: createLogger({ level: 'debug', destination: logs }) });
  });
  after(async () => {
    await proxy.shutdown(1000);
    await upstream.close();
  });

  test('a client certificate with an unknown critical extension is refused, and the log names the extension instead of only UNSPECIFIED', async () => {
    await openssl('ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', 'private-critical.key');
    await issue('private-critical', 'private-critical.key', 'clientca', 'client_private_critical');
    const port = proxy.port('rest')!;
    assert.equal(await restStatus(port, 'client'), 200);
    assert.equal(await restStatus(port, 'private-critical'), 403);
    const line = await logs.waitFor((l) => l.event === 'client_refused' && l.subject === 'CN=private-critical');
    assert.equal(line.reason, 'verify_failed');
    assert.match(line.msg, /CN=private-critical marks extension 1\.3\.6\.1\.4\.1\.55555\.1 critical, which OpenSSL cannot process: reissue it with that extension non-critical or without it/);
  });

  test('a client certificate signed with SHA-1 or with an RSA key under 1024 bits is refused naming the certificate and what to reissue, not only UNSPECIFIED', async () => {
    await openssl('genrsa', '-out', 'sha1-signed.key', '2048');
    await openssl('req', '-new', '-key', 'sha1-signed.key', '-subj', '/CN=sha1-signed', '-config', 'ext.cnf', '-out', 'sha1-signed.csr');
    await openssl('x509', '-req', '-sha1', '-in', 'sha1-signed.csr', '-CA', 'clientca.pem', '-CAkey', 'clientca.key', '-CAcreateserial', '-days', '1', '-extfile', 'ext.cnf', '-extensions', 'client', '-out', 'sha1-signed.pem');
    await openssl('genrsa', '-out', 'rsa768.key', '768');
    await issue('rsa768', 'rsa768.key', 'clientca', 'client');
    const port = proxy.port('rest')!;
    // Node's own client, as curl and Python's, refuses to send either; Go, Java and grpcio send them.
    for (const client of ['sha1-signed', 'rsa768']) assert.equal(await restStatus(port, client, 'DEFAULT@SECLEVEL=0'), 403, client);
    const sha1 = await logs.waitFor((l) => l.event === 'client_refused' && l.subject === 'CN=sha1-signed');
    assert.equal(sha1.reason, 'verify_failed');
    assert.match(sha1.msg, /\(UNSPECIFIED; CN=sha1-signed is signed with SHA-1, which OpenSSL refuses at its security level: reissue it signed with SHA-256\)$/);
    const small = await logs.waitFor((l) => l.event === 'client_refused' && l.subject === 'CN=rsa768');
    assert.match(small.msg, /\(UNSPECIFIED; CN=rsa768 has a 768-bit RSA key, which OpenSSL refuses at its security level: reissue it with a key of 2048 bits or more\)$/);
  });

  test('a client certificate with a 1536-bit RSA key: served where this Node\'s OpenSSL takes it (security level 1, Node 20 and 22); where it does not (level 2, Node 24), refused with the log naming the key, not only UNSPECIFIED', async () => {
    await openssl('genrsa', '-out', 'rsa1536.key', '1536');
    await issue('rsa1536', 'rsa1536.key', 'clientca', 'client');
    const pem = await readFile(path('rsa1536.pem'));
    const status = await restStatus(proxy.port('rest')!, 'rsa1536', 'DEFAULT@SECLEVEL=0');
    if (opensslTakesCertificate(pem)) {
      assert.equal(status, 200);
      return;
    }
    assert.equal(status, 403);
    const refused = await logs.waitFor((l) => l.event === 'client_refused' && l.subject === 'CN=rsa1536');
    assert.equal(refused.reason, 'verify_failed');
    assert.match(refused.msg, /\(UNSPECIFIED; CN=rsa1536 has a 1536-bit RSA key, which OpenSSL refuses at its security level: reissue it with a key of 2048 bits or more\)$/);
  });

  test('a client of a CA outside --mtls_client_ca is refused as unknown_ca, with its issuer, even when it sends that CA along (not as crl_missing)', async () => {
    await makeCa('otherca', 'Material Other CA');
    for (const [client, ca] of [['server-ca-client', 'serverca'], ['other-ca-client', 'otherca']] as const) {
      await openssl('ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', `${client}.key`);
      await issue(client, `${client}.key`, ca, 'client');
    }
    // The first client trusts its own issuer (it verifies the server with it), so OpenSSL sends that root
    // with its certificate; verification then ends on "no CRL" for that root.
    assert.equal(await restStatus(proxy.port('rest')!, 'server-ca-client'), 403);
    const sentRoot = await logs.waitFor((l) => l.event === 'client_refused' && l.subject === 'CN=server-ca-client');
    assert.equal(sentRoot.reason, 'unknown_ca', sentRoot.msg);
    assert.match(sentRoot.msg, /^client certificate is not issued by a trusted client CA \(no trusted CA in its chain, OpenSSL's last error UNABLE_TO_GET_CRL; issued by CN=Material Server CA\)$/);
    assert.equal(await restStatus(proxy.port('rest')!, 'other-ca-client'), 403);
    const leafOnly = await logs.waitFor((l) => l.event === 'client_refused' && l.subject === 'CN=other-ca-client');
    assert.equal(leafOnly.reason, 'unknown_ca');
    assert.match(leafOnly.msg, /\(UNABLE_TO_VERIFY_LEAF_SIGNATURE; issued by CN=Material Other CA\)$/);
  });
});

describe('check: what loads but bites later', () => {
  before(async () => {
    await openssl('ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', 'server-intermediate.key');
    await openssl('req', '-new', '-key', 'server-intermediate.key', '-subj', '/CN=Material Server Intermediate', '-config', 'ext.cnf', '-out', 'server-intermediate.csr');
    await openssl('x509', '-req', '-in', 'server-intermediate.csr', '-CA', 'serverca.pem', '-CAkey', 'serverca.key', '-CAcreateserial', '-days', '1', '-extfile', 'ext.cnf', '-extensions', 'ca', '-out', 'server-intermediate.pem');
    await issue('leaf', 'server.key', 'server-intermediate', 'server');
    await writeFile(path('leaf-chain.pem'), (await readFile(path('leaf.pem'), 'utf8')) + (await readFile(path('server-intermediate.pem'), 'utf8')));
  });

  const texts = (tls: TlsFiles) => checkTlsFiles(tls).findings.map((f) => `${f.level} ${f.text}`);

  test('a server certificate file without the intermediate that issued it names the CA clients must then trust', () => {
    const leafOnly = texts(files('leaf.pem', 'server.key'));
    assert.ok(leafOnly.some((t) => /^info server certificate file \S+leaf\.pem holds no CA certificate: clients must trust Material Server Intermediate itself; if that is an intermediate CA, append it/.test(t)), leafOnly.join('\n'));
    assert.ok(!texts(files('leaf-chain.pem', 'server.key')).some((t) => t.includes('holds no CA certificate')));
  });

  test('a client CA signed with SHA-1 in the bundle: check warns that its clients are refused and says what to reissue', async () => {
    await openssl('req', '-new', '-key', 'clientca.key', '-subj', '/CN=Material SHA-1 CA', '-config', 'ext.cnf', '-out', 'sha1-ca.csr');
    await openssl('x509', '-req', '-sha1', '-in', 'sha1-ca.csr', '-CA', 'clientca.pem', '-CAkey', 'clientca.key', '-days', '1', '-extfile', 'ext.cnf', '-extensions', 'ca', '-out', 'sha1-ca.pem');
    await writeFile(path('with-sha1-ca.pem'), (await readFile(path('clientca.pem'), 'utf8')) + (await readFile(path('sha1-ca.pem'), 'utf8')));
    const found = texts(files('server.pem', 'server.key', 'with-sha1-ca.pem'));
    assert.ok(found.some((t) => /^warn client CA Material SHA-1 CA in \S+with-sha1-ca\.pem is signed with SHA-1, which OpenSSL refuses at its security level: every client whose chain runs through it is refused \(verify_failed\); reissue it signed with SHA-256$/.test(t)), found.join('\n'));
    assert.ok(!texts(files('server.pem', 'server.key')).some((t) => t.includes('security level')));
  });

  test('cert-manager\'s ca.crt of the server secret as --mtls_client_ca: check says clients of another CA will be refused', () => {
    const root = texts(files('leaf-chain.pem', 'server.key', 'serverca.pem'));
    assert.ok(root.some((t) => /^info client CA Material Server CA also issued the server certificate or its chain: .*clients are refused as unknown_ca/.test(t)), root.join('\n'));
    // An intermediate issuer's ca.crt alone admits nobody at all: the proxy would not start with it.
    const intermediate = texts(files('leaf-chain.pem', 'server.key', 'server-intermediate.pem'));
    assert.ok(intermediate.some((t) => /^fail --mtls_client_ca: \S+server-intermediate\.pem: no CA of the bundle can admit a client, .*append its root, Material Server CA\)$/.test(t)), intermediate.join('\n'));
    assert.ok(!texts(files('leaf-chain.pem', 'server.key')).some((t) => t.includes('also issued the server certificate')));
  });
});

/**
 * One HTTPS/1.1 request to /v2/health/live presenting `client`: the status (403 when the proxy refuses the certificate), or 'failed'.
 * `ciphers` lowers the client's own OpenSSL security level, for clients (Go, Java) that send what OpenSSL would not.
 */
/** Whether this Node's OpenSSL, at its default security level, takes the certificate's key. */
function opensslTakesCertificate(cert: Buffer): boolean {
  try {
    createSecureContext({ cert });
    return true;
  } catch {
    return false;
  }
}

async function restStatus(port: number, client: string, ciphers?: string): Promise<number | 'failed'> {
  const [ca, cert, key] = await Promise.all([readFile(path('serverca.pem')), readFile(path(`${client}.pem`)), readFile(path(`${client}.key`))]);
  return new Promise((resolve) => {
    const req = httpsRequest({ host: '127.0.0.1', port, servername: 'localhost', path: '/v2/health/live', ca, cert, key, agent: false, ...(ciphers ? { ciphers } : {}) }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode ?? 0));
    });
    req.on('error', () => resolve('failed'));
    req.end();
  });
}
