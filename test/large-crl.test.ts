/**
 * CRLs the size real PKIs publish (10,000 revoked certificates). asn1js, under the x509 library,
 * refuses more than 10,000 ASN.1 nodes (about 2,400 entries): the proxy and `check` called such a
 * CRL "not a valid CRL" and would not start, and `certs revoke` could neither read nor write one.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { assertRefusedAnswer, https1, startTestProxy, startUpstream } from './helpers/harness.js';
import { closedByReload, reloaderFor } from './helpers/reload.js';
import type { ModelServer } from '../src/demo/model-server.js';
import { CERT_FILES, certsClient, certsInit, certsRevoke } from '../src/certs-command.js';
import { createCrl, issueClientCert, parseCrl, parseCrlSerials, type Issued } from '../src/x509.js';

const ENTRIES = 10_000;
/** Where the serial under test sits in the list: deep, not first or last. */
const DEPTH = 7_000;

/** A serial as the CRL reader returns it: whole bytes in hex, no leading zero byte. */
const canonicalSerial = (value: bigint) => {
  const hex = value.toString(16);
  return hex.length % 2 === 1 ? `0${hex}` : hex;
};
const plusOne = (serialHex: string, delta: bigint) => canonicalSerial(BigInt(`0x${serialHex}`) + delta);

/** ENTRIES serials: filler, with `deep` at DEPTH and the numeric neighbours of each of `spared` (but not `spared` itself). */
function largeRevocationList(deep: string, spared: readonly string[]): { serialHex: string }[] {
  const serials = Array.from({ length: ENTRIES - 1 - 2 * spared.length }, (_, i) => ({ serialHex: canonicalSerial(0x7e57_0000_0000n + BigInt(i)) }));
  serials.splice(DEPTH, 0, { serialHex: deep });
  for (const serial of spared) serials.push({ serialHex: plusOne(serial, -1n) }, { serialHex: plusOne(serial, 1n) });
  return serials;
}

describe('a CRL with 10,000 revoked certificates', () => {
  let pki: TestPki;
  let upstream: ModelServer;
  let bigCrl: string;
  before(async () => {
    [pki, upstream] = await Promise.all([createTestPki(), startUpstream({ grpcPort: null })]);
    bigCrl = join(pki.dir, 'big.crl');
    await writeFile(bigCrl, await createCrl({ issuer: pki.clientCa, revoked: largeRevocationList(pki.revokedClient.serialHex, [pki.client.serialHex]) }));
  });
  after(async () => {
    await upstream.close();
    await pki.cleanup();
  });

  test('the proxy starts with it, refuses the client revoked at entry 7,000 and admits the client whose neighbouring serials are revoked', async () => {
    assert.equal(parseCrlSerials(await readFile(bigCrl, 'utf8')).length, ENTRIES);
    const front = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, tls: { crl: bigCrl } });
    try {
      assert.equal((await https1(front.restPort, pki, { path: '/v2/health/ready' })).status, 200);
      assertRefusedAnswer(await https1(front.restPort, pki, { path: '/v2/health/ready', client: pki.revokedClient }), 'revoked');
      await front.logs.waitFor((l) => l.event === 'client_refused' && l.reason === 'revoked');
    } finally {
      await front.proxy.shutdown(1000);
    }
  });

  test('a reload onto it closes the live connection of a client revoked deep in the list; the spared client keeps its connection', async () => {
    const victim = await issueClientCert({ issuer: pki.clientCa, commonName: 'victim' });
    const crl = join(pki.dir, 'reloaded.crl');
    await writeFile(crl, pki.crlPem);
    const front = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, tls: { crl } });
    const files = { cert: pki.paths['server.pem']!, key: pki.paths['server.key']!, clientCa: pki.paths['client_cert_ca.pem']!, crl };
    const reloader = reloaderFor(front, files, { revokedGraceMs: 0 });
    const revokeDeep = async () => writeFile(crl, await createCrl({ issuer: pki.clientCa, revoked: largeRevocationList(victim.serialHex, [pki.client.serialHex]), crlNumber: 2 }));
    await closedByReload(pki, { front, reloader }, victim, revokeDeep, /CN=victim/, 'revoked');
  });
});

test('certs revoke adds to a CRL that already holds 10,000 entries, keeping them all; openssl then refuses the revoked client only', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-big-crl-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await certsInit({ dir });
  await certsClient({ dir, name: 'alice' });
  await certsClient({ dir, name: 'bob' });
  const read = (name: string) => readFile(join(dir, name), 'utf8');
  const clientCa: Issued = { certPem: await read(CERT_FILES.clientCaCert), keyPem: await read(CERT_FILES.clientCaKey), serialHex: '' };
  const serial = async (name: string) => new X509Certificate(await read(name)).serialNumber.toLowerCase();
  const earlier = largeRevocationList(await serial('bob.pem'), [await serial('alice.pem')]);
  await writeFile(join(dir, CERT_FILES.clientCaCrl), await createCrl({ issuer: clientCa, revoked: earlier, crlNumber: 41 }));

  const alice = await certsRevoke({ dir, cert: 'alice' });
  const crlPem = await read(CERT_FILES.clientCaCrl);
  const crl = parseCrl(crlPem);
  assert.equal(crl.crlNumber, 42n);
  assert.deepEqual(new Set(crl.revoked.map((entry) => entry.serialHex)), new Set([...earlier.map((entry) => entry.serialHex), alice.serialHex]));
  const verify = (cert: string) => spawnSync('openssl', ['verify', '-crl_check', '-CAfile', CERT_FILES.clientCaCert, '-CRLfile', CERT_FILES.clientCaCrl, cert], { cwd: dir, encoding: 'utf8' });
  assert.match(verify('alice.pem').stdout + verify('alice.pem').stderr, /certificate revoked/);
  assert.match(verify('bob.pem').stdout + verify('bob.pem').stderr, /certificate revoked/);
  assert.equal(verify(CERT_FILES.clientCert).status, 0, verify(CERT_FILES.clientCert).stderr);
});
