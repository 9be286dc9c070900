import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { once } from 'node:events';
import { writeFile } from 'node:fs/promises';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import tls from 'node:tls';
import { isUserError } from '../src/errors.js';
import { readSingleTlv, readTlvs, TAG_SEQUENCE } from '../src/x509/der.js';
import { createCa, createCrl, issueClientCert, issueServerCert, normaliseSerial, parseCrl, parseCrlSerials, type Issued } from '../src/x509.js';
import { createTestPki, type TestPki } from './helpers/pki.js';

/** Runs the openssl CLI (tests only: the product never shells out to it). */
function openssl(args: string[], cwd: string): { status: number | null; out: string } {
  const result = spawnSync('openssl', args, { cwd, encoding: 'utf8' });
  return { status: result.status, out: `${result.stdout}${result.stderr}` };
}

function textOf(path: string, cwd: string): string {
  const { status, out } = openssl(['x509', '-noout', '-text', '-in', path], cwd);
  assert.equal(status, 0, out);
  return out;
}

/** Colon-free upper-case hex, as `openssl crl -text` prints serials. */
function upper(serialHex: string): string {
  return serialHex.toUpperCase();
}

let pki: TestPki;
before(async () => {
  pki = await createTestPki();
});
after(async () => {
  await pki.cleanup();
});

describe('certificates as openssl sees them', () => {
  test('the server certificate verifies for TLS server use against the server CA', () => {
    const { status, out } = openssl(['verify', '-purpose', 'sslserver', '-CAfile', 'server_ca.pem', 'server.pem'], pki.dir);
    assert.equal(status, 0, out);
    assert.match(out, /server\.pem: OK/);
  });

  test('the client certificate verifies for TLS client use against the client CA', () => {
    const { status, out } = openssl(['verify', '-purpose', 'sslclient', '-CAfile', 'client_cert_ca.pem', 'client.pem'], pki.dir);
    assert.equal(status, 0, out);
  });

  test('a client issued by an intermediate verifies through that intermediate', () => {
    const args = ['verify', '-purpose', 'sslclient', '-CAfile', 'client_cert_ca.pem', '-untrusted', 'intermediate_ca.pem', 'chained_client.pem'];
    const { status, out } = openssl(args, pki.dir);
    assert.equal(status, 0, out);
  });

  test('the server certificate is v3, not a CA, for server auth, with DNS and IP names', () => {
    const text = textOf('server.pem', pki.dir);
    assert.match(text, /Version: 3 \(0x2\)/);
    assert.match(text, /Basic Constraints: critical\s+CA:FALSE/);
    assert.match(text, /Key Usage: critical\s+Digital Signature\n/);
    assert.match(text, /Extended Key Usage: \s*\n\s+TLS Web Server Authentication\n/);
    assert.match(text, /DNS:localhost, IP Address:127\.0\.0\.1, IP Address:0:0:0:0:0:0:0:1/);
    assert.match(text, /Subject Key Identifier/);
    assert.match(text, /Authority Key Identifier/);
  });

  test('the client certificate is v3, not a CA, for client auth, with its OU and URI name', () => {
    const text = textOf('client.pem', pki.dir);
    assert.match(text, /Version: 3 \(0x2\)/);
    assert.match(text, /CA:FALSE/);
    assert.match(text, /TLS Web Client Authentication/);
    assert.doesNotMatch(text, /TLS Web Server Authentication/);
    assert.match(text, /Subject: OU = tests, CN = client/);
    assert.match(text, /URI:spiffe:\/\/test\.local\/client/);
  });

  test('a CA certificate is v3 with a critical CA:TRUE and may only sign certificates and CRLs', () => {
    const text = textOf('client_cert_ca.pem', pki.dir);
    assert.match(text, /Version: 3 \(0x2\)/);
    assert.match(text, /Basic Constraints: critical\s+CA:TRUE\n/);
    assert.match(text, /Key Usage: critical\s+Certificate Sign, CRL Sign\n/);
  });

  test('an intermediate CA names its issuer and carries the requested path length', () => {
    const text = textOf('intermediate_ca.pem', pki.dir);
    assert.match(text, /Issuer: CN = ovms-mtls test client CA/);
    assert.match(text, /CA:TRUE, pathlen:0/);
    const { status, out } = openssl(['verify', '-CAfile', 'client_cert_ca.pem', 'intermediate_ca.pem'], pki.dir);
    assert.equal(status, 0, out);
  });

  test('every PEM ends with a newline so that a concatenated bundle loads all its certificates', async () => {
    const all = [pki.serverCa, pki.server, pki.clientCa, pki.client, pki.chainedClient];
    for (const issued of all) {
      assert.ok(issued.certPem.endsWith('-----\n'));
      assert.ok(issued.keyPem.endsWith('-----END PRIVATE KEY-----\n'));
    }
    assert.ok(pki.crlPem.endsWith('-----END X509 CRL-----\n'));
    // The client CA is second in the bundle: it is found only if the first PEM ended cleanly.
    await writeFile(join(pki.dir, 'bundle.pem'), pki.otherCa.certPem + pki.clientCa.certPem);
    const { status, out } = openssl(['verify', '-purpose', 'sslclient', '-CAfile', 'bundle.pem', 'client.pem'], pki.dir);
    assert.equal(status, 0, out);
  });

  test('serials are positive 16-byte values reported in lower-case hex', () => {
    for (const issued of [pki.server, pki.client, pki.clientCa]) {
      assert.match(issued.serialHex, /^[1-7][0-9a-f]{31}$|^0[1-9a-f][0-9a-f]{30}$/);
      assert.equal(new X509Certificate(issued.certPem).serialNumber.toLowerCase(), issued.serialHex);
    }
  });

  test('an RSA server certificate also allows key encipherment, and an RSA CA signs verifiable CRLs', async () => {
    const ca = await createCa({ commonName: 'ovms-mtls test RSA CA', key: 'rsa2048' });
    const server = await issueServerCert({ issuer: ca, commonName: 'rsa.test', dns: ['rsa.test'], key: 'rsa2048' });
    await writeFile(join(pki.dir, 'rsa_ca.pem'), ca.certPem);
    await writeFile(join(pki.dir, 'rsa_server.pem'), server.certPem);
    await writeFile(join(pki.dir, 'rsa_ca.crl'), await createCrl({ issuer: ca, revoked: [{ serialHex: server.serialHex }] }));
    assert.match(textOf('rsa_server.pem', pki.dir), /Digital Signature, Key Encipherment/);
    const verified = openssl(['verify', '-purpose', 'sslserver', '-CAfile', 'rsa_ca.pem', 'rsa_server.pem'], pki.dir);
    assert.equal(verified.status, 0, verified.out);
    const crl = openssl(['crl', '-noout', '-CAfile', 'rsa_ca.pem', '-in', 'rsa_ca.crl'], pki.dir);
    assert.equal(crl.status, 0, crl.out);
    assert.match(crl.out, /verify OK/);
  });

  test('validity defaults to one day starting five minutes in the past', async () => {
    const before = Date.now();
    const issued = await issueClientCert({ issuer: pki.clientCa, commonName: 'default validity' });
    const cert = new X509Certificate(issued.certPem);
    const notBefore = Date.parse(cert.validFrom);
    const notAfter = Date.parse(cert.validTo);
    // Second precision in the certificate, hence the 1 s margins.
    assert.ok(notBefore <= before - 5 * 60_000 + 1000 && notBefore >= before - 5 * 60_000 - 60_000);
    assert.ok(notAfter >= before + 86_400_000 - 1000 && notAfter <= Date.now() + 86_400_000);
  });

  test('signing with a key that does not belong to the CA certificate fails with a clear message', async () => {
    const mismatched: Issued = { ...pki.clientCa, keyPem: pki.otherCa.keyPem };
    await assert.rejects(issueClientCert({ issuer: mismatched, commonName: 'x' }), (err: unknown) => {
      assert.ok(isUserError(err));
      assert.match(err.message, /private key does not belong to certificate/);
      return true;
    });
  });

  test('a leaf certificate cannot be used as an issuer', async () => {
    await assert.rejects(issueClientCert({ issuer: pki.client, commonName: 'x' }), /is not a CA certificate/);
  });
});

describe('CRLs as openssl sees them', () => {
  test('the CRL verifies against its CA and lists the revoked serial with crlNumber and AKI', () => {
    const { status, out } = openssl(['crl', '-noout', '-text', '-CAfile', 'client_cert_ca.pem', '-in', 'client_cert_ca.crl'], pki.dir);
    assert.equal(status, 0, out);
    assert.match(out, /verify OK/);
    assert.match(out, /Version 2 \(0x1\)/);
    assert.match(out, /CRL Number: \s*\n\s+1\n/);
    assert.match(out, /Authority Key Identifier/);
    assert.ok(out.includes(`Serial Number: ${upper(pki.revokedClient.serialHex)}`), out);
  });

  test('verification with -crl_check rejects the revoked client and accepts the good one', () => {
    const check = (cert: string) =>
      openssl(['verify', '-crl_check', '-purpose', 'sslclient', '-CAfile', 'client_cert_ca.pem', '-CRLfile', 'client_cert_ca.crl', cert], pki.dir);
    const revoked = check('revoked_client.pem');
    assert.notEqual(revoked.status, 0);
    assert.match(revoked.out, /certificate revoked/);
    assert.equal(check('client.pem').status, 0);
  });

  test('revoked entries carry no empty extension list, which strict DER parsers reject', () => {
    const der = Buffer.from(pki.crlPem.replace(/-----[^-]+-----|\s/g, ''), 'base64');
    const [tbs] = readTlvs(readSingleTlv(der).value);
    const revokedList = readTlvs(tbs!.value).find((field, index) => index > 2 && field.tag === TAG_SEQUENCE);
    assert.ok(revokedList);
    for (const entry of readTlvs(revokedList.value)) {
      const emptyLists = readTlvs(entry.value).filter((part) => part.tag === TAG_SEQUENCE && part.value.length === 0);
      assert.equal(emptyLists.length, 0);
    }
  });

  test('parseCrlSerials returns revoked serials in the same lower-case hex as Issued.serialHex', () => {
    assert.deepEqual(parseCrlSerials(pki.crlPem), [pki.revokedClient.serialHex]);
  });

  test('a CRL keeps each serial once, records its number and the requested lifetime', async () => {
    const thisUpdate = new Date(Date.now() - 60_000);
    const nextUpdate = new Date(thisUpdate.getTime() + 7 * 86_400_000);
    const serialHex = pki.revokedClient.serialHex;
    const crl = await createCrl({ issuer: pki.clientCa, revoked: [{ serialHex }, { serialHex }], thisUpdate, nextUpdate, crlNumber: 300 });
    const parsed = parseCrl(crl);
    assert.deepEqual(parsed.revoked.map((r) => r.serialHex), [serialHex]);
    assert.equal(parsed.crlNumber, 300n);
    assert.equal(parsed.nextUpdate?.getTime(), Math.floor(nextUpdate.getTime() / 1000) * 1000);
  });

  test('one serial spelled with or without a leading zero digit, a zero byte, colons or capitals is one entry, read back in whole bytes', async () => {
    const spellings = ['8b86c', '08b86c', '08:B8:6C', '8B86C', '0008b86c'];
    const crl = await createCrl({ issuer: pki.clientCa, revoked: spellings.map((serialHex) => ({ serialHex })) });
    assert.deepEqual(parseCrlSerials(crl), ['08b86c']);
    assert.deepEqual(spellings.map(normaliseSerial), spellings.map(() => '08b86c'));
  });
});

interface Verdict {
  authorized: boolean;
  error: string | null;
}

/**
 * A Node TLS server that asks for a client certificate but lets every handshake finish, and
 * tells each client how it judged its certificate. This is how the proxy learns the reason for
 * a rejection: with rejectUnauthorized the reason is never reported.
 */
async function startJudgingServer(options: tls.TlsOptions): Promise<{ port: number; close(): Promise<void> }> {
  const server = tls.createServer({ ...options, requestCert: true, rejectUnauthorized: false }, (socket) => {
    const verdict: Verdict = { authorized: socket.authorized, error: socket.authorizationError?.toString() ?? null };
    socket.end(JSON.stringify(verdict));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: (server.address() as AddressInfo).port,
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}

async function verdictFor(port: number, client: Issued | undefined): Promise<Verdict> {
  const socket = tls.connect({
    host: '127.0.0.1',
    port,
    servername: 'localhost',
    ca: pki.serverCa.certPem,
    ...(client ? { cert: client.certPem, key: client.keyPem } : {}),
  });
  let body = '';
  socket.setEncoding('utf8');
  socket.on('data', (chunk: string) => (body += chunk));
  await once(socket, 'end');
  socket.destroy();
  return JSON.parse(body) as Verdict;
}

describe('Node TLS judging client certificates against the client CA and its CRLs', () => {
  let server: Awaited<ReturnType<typeof startJudgingServer>>;
  before(async () => {
    server = await startJudgingServer({
      key: pki.server.keyPem,
      cert: pki.server.certPem,
      ca: pki.clientCa.certPem,
      crl: [pki.crlPem, pki.intermediateCrlPem],
    });
  });
  after(() => server.close());

  test('the good client is authorized', async () => {
    assert.deepEqual(await verdictFor(server.port, pki.client), { authorized: true, error: null });
  });

  test('a client from a CA the server does not trust is refused as UNABLE_TO_VERIFY_LEAF_SIGNATURE', async () => {
    assert.deepEqual(await verdictFor(server.port, pki.foreignClient), { authorized: false, error: 'UNABLE_TO_VERIFY_LEAF_SIGNATURE' });
  });

  test('an expired client is refused as CERT_HAS_EXPIRED', async () => {
    assert.deepEqual(await verdictFor(server.port, pki.expiredClient), { authorized: false, error: 'CERT_HAS_EXPIRED' });
  });

  test('a client whose certificate is not valid yet is refused as CERT_NOT_YET_VALID', async () => {
    assert.deepEqual(await verdictFor(server.port, pki.notYetValidClient), { authorized: false, error: 'CERT_NOT_YET_VALID' });
  });

  test('a revoked client is refused as CERT_REVOKED', async () => {
    assert.deepEqual(await verdictFor(server.port, pki.revokedClient), { authorized: false, error: 'CERT_REVOKED' });
  });

  test('a client certificate made for server auth only is refused as INVALID_PURPOSE', async () => {
    assert.deepEqual(await verdictFor(server.port, pki.serverOnlyEkuClient), { authorized: false, error: 'INVALID_PURPOSE' });
  });

  test('a client sending its leaf and intermediate is authorized by a server trusting only the root', async () => {
    assert.deepEqual(await verdictFor(server.port, pki.chainedClient), { authorized: true, error: null });
  });

  test('a client without any certificate is refused as UNABLE_TO_GET_ISSUER_CERT', async () => {
    // Misleading name, but it is what Node reports for "no certificate sent".
    assert.deepEqual(await verdictFor(server.port, undefined), { authorized: false, error: 'UNABLE_TO_GET_ISSUER_CERT' });
  });
});

describe('Node TLS and the CRL of every CA in the chain', () => {
  test('with only the root CRL loaded, a chained client is refused as UNABLE_TO_GET_CRL', async () => {
    const server = await startJudgingServer({ key: pki.server.keyPem, cert: pki.server.certPem, ca: pki.clientCa.certPem, crl: pki.crlPem });
    try {
      assert.deepEqual(await verdictFor(server.port, pki.chainedClient), { authorized: false, error: 'UNABLE_TO_GET_CRL' });
      assert.deepEqual(await verdictFor(server.port, pki.client), { authorized: true, error: null });
    } finally {
      await server.close();
    }
  });

  test('a PEM buffer holding two CRLs loads only the first, while an array of CRLs loads both', async () => {
    const base = { key: pki.server.keyPem, cert: pki.server.certPem, ca: pki.clientCa.certPem };
    const bundled = await startJudgingServer({ ...base, crl: Buffer.from(pki.crlPem + pki.intermediateCrlPem) });
    const listed = await startJudgingServer({ ...base, crl: [pki.crlPem, pki.intermediateCrlPem] });
    try {
      assert.deepEqual(await verdictFor(bundled.port, pki.chainedClient), { authorized: false, error: 'UNABLE_TO_GET_CRL' });
      assert.deepEqual(await verdictFor(listed.port, pki.chainedClient), { authorized: true, error: null });
    } finally {
      await Promise.all([bundled.close(), listed.close()]);
    }
  });
});
