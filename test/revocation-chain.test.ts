import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import type * as grpc from '@grpc/grpc-js';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createTestPki, type TestPki } from './helpers/pki.js';
import type { ModelServer } from '../src/demo/model-server.js';
import { once } from 'node:events';
import type { ClientHttp2Session } from 'node:http2';
import { assertRefusedAnswer, assertRefusedCall, grpcClients, h2Session, https1, readyStatus, startTestProxy, startUpstream } from './helpers/harness.js';
import { eventually } from './helpers/ops.js';
import { unary } from '../src/demo/grpc-client.js';
import { FORWARD_MODES } from '../src/config.js';
import { closedByReload, reloaderFor } from './helpers/reload.js';
import { createCa, createCrl, issueClientCert, type Issued } from '../src/x509.js';
import { X509Certificate, sign } from 'node:crypto';
import { encodeTlv, readSingleTlv, readTlvs, TAG_BIT_STRING, TAG_INTEGER, TAG_SEQUENCE } from '../src/x509/der.js';
import { toPem } from '../src/x509/keys.js';
import { runCommand } from './helpers/cli.js';

test('a CRL reload that revokes an intermediate CA closes the live connection of a client chained through it', async () => {
  const pki = await createTestPki();
  const upstream = await startUpstream({ grpcPort: null });
  // A CRL file of our own, so the test can replace it.
  const crl = join(pki.dir, 'chain-under-test.crl');
  await copyFile(pki.paths['client_cert_ca_chain.crl']!, crl);
  const front = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, tls: { crl } });
  const files = { cert: pki.paths['server.pem']!, key: pki.paths['server.key']!, clientCa: pki.paths['client_cert_ca.pem']!, crl };
  try {
    // The leaf itself stays unrevoked: only its issuing intermediate CA is.
    const revokeIntermediate = async () => {
      const rootCrl = await createCrl({ issuer: pki.clientCa, revoked: [{ serialHex: pki.intermediateCa.serialHex }, { serialHex: pki.revokedClient.serialHex }] });
      await writeFile(crl, rootCrl + pki.intermediateCrlPem);
    };
    await closedByReload(pki, { front, reloader: reloaderFor(front, files, { revokedGraceMs: 3_600_000 }) }, pki.chainedClient, revokeIntermediate, /CN=chained client/, 'revoked');
  } finally {
    await upstream.close();
    await pki.cleanup();
  }
});

/** A proxy on a CA bundle and CRL file of the test's own, with a reloader, for one REST listener. */
async function startOnOwnFiles(pki: TestPki, upstream: ModelServer, clientCa: string, crl: string | undefined) {
  const caFile = join(pki.dir, `own-${Math.random().toString(36).slice(2)}.pem`);
  const crlFile = crl === undefined ? undefined : `${caFile}.crl`;
  await writeFile(caFile, clientCa);
  if (crlFile) await writeFile(crlFile, crl!);
  const front = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, tls: { clientCa: caFile, crl: crlFile } });
  const files = { cert: pki.paths['server.pem']!, key: pki.paths['server.key']!, clientCa: caFile, crl: crlFile };
  const reloader = reloaderFor(front, files, { revokedGraceMs: 3_600_000 });
  return { front, reloader, caFile, crlFile };
}

describe('a reload closes what a new handshake would refuse', () => {
  let pki: TestPki;
  let upstream: ModelServer;
  before(async () => {
    [pki, upstream] = await Promise.all([createTestPki(), startUpstream()]);
  });
  after(async () => {
    await upstream.close();
    await pki.cleanup();
  });

  test('a CA taken out of --mtls_client_ca: the live connections of its clients are closed, the other CA\'s client carries on', async () => {
    const files = await startOnOwnFiles(pki, upstream, pki.clientCa.certPem + pki.otherCa.certPem, undefined);
    await closedByReload(pki, files, pki.foreignClient, () => writeFile(files.caFile, pki.clientCa.certPem), /CN=foreign client/, 'unknown_ca');
  });

  test('a CRL that revokes an intermediate CA held in --mtls_client_ca closes a client that sent only its leaf', async () => {
    const bundle = pki.clientCa.certPem + pki.intermediateCa.certPem;
    const files = await startOnOwnFiles(pki, upstream, bundle, pki.crlPem + pki.intermediateCrlPem);
    const revokeIntermediate = async () => {
      const rootCrl = await createCrl({ issuer: pki.clientCa, revoked: [{ serialHex: pki.intermediateCa.serialHex }] });
      await writeFile(files.crlFile!, rootCrl + pki.intermediateCrlPem);
    };
    await closedByReload(pki, files, pki.chainedLeafOnly, revokeIntermediate, /CN=chained client/, 'revoked');
  });

  test('a CRL that revokes a client whose serial is negative (high bit set, no leading zero) closes its live connection, as OpenSSL refuses it', async () => {
    // RFC 5280 asks for positive serials and for users to cope with CAs that encode random bytes
    // without clearing the top bit. OpenSSL revokes such a client by its DER value; Node spells it "-1234".
    const negative = await opensslClient(pki, 'negative', '/CN=negative serial client', 'client_cert_ca', '-0x1234');
    const files = await startOnOwnFiles(pki, upstream, pki.clientCa.certPem, pki.crlPem);
    const revokeNegative = async () => writeFile(files.crlFile!, await opensslCrl(pki, 'client_cert_ca', negative));
    await closedByReload(pki, files, negative, revokeNegative, /CN=negative serial client/, 'revoked');
  });

  test('a CRL that revokes a client whose issuer name is spelled otherwise than its CA\'s subject (PrintableString, UTF8String) closes its live connection, as OpenSSL refuses it', async () => {
    const client = await clientOfRespelledCa(pki);
    const files = await startOnOwnFiles(pki, upstream, pki.clientCa.certPem + (await readFile(join(pki.dir, 'canon_new.pem'), 'utf8')), pki.crlPem + (await opensslCrl(pki, 'canon_new')));
    const revokeClient = async () => writeFile(files.crlFile!, pki.crlPem + (await opensslCrl(pki, 'canon_new', client)));
    await closedByReload(pki, files, client, revokeClient, /CN=client of the respelled CA/, 'revoked');
  });

  test('a client whose certificate is BER-encoded (OpenSSL takes it; the CRL index reads DER only) is closed by a CRL reload instead of ending the process, is let in again, and the proxy reloads on', async () => {
    const ber = withBerSerialLength(pki.client, pki.clientCa);
    const { front, reloader } = await startOnOwnFiles(pki, upstream, pki.clientCa.certPem, pki.crlPem);
    const target = h2Session(front.restPort, pki, ber);
    let again: ClientHttp2Session | undefined;
    try {
      assert.equal(await readyStatus(target), 200);
      const closed = once(target, 'close');
      const outcome = await reloader.reload('api');
      assert.equal(outcome.ok && outcome.revokedConnections, 1);
      await closed;
      const line = await front.logs.waitFor((l) => l.event === 'connection_revoked');
      assert.equal(line['reason'], 'unreadable');
      assert.match(String(line['error']), /DER/);
      // Its next handshake is OpenSSL's to judge under the new set, which lets it in.
      again = h2Session(front.restPort, pki, ber);
      assert.equal(await readyStatus(again), 200);
      assert.equal((await reloader.reload('api')).ok, true);
    } finally {
      reloader.close();
      target.destroy();
      again?.destroy();
      await front.proxy.shutdown(1000);
    }
  });

  test('a CA bundle cut down to an intermediate CA without its root closes the live connections of that intermediate\'s clients, which OpenSSL no longer verifies', async () => {
    const { front, reloader, caFile } = await startOnOwnFiles(pki, upstream, pki.clientCa.certPem + pki.intermediateCa.certPem, undefined);
    const target = h2Session(front.restPort, pki, pki.chainedLeafOnly);
    try {
      assert.equal(await readyStatus(target), 200);
      const closed = once(target, 'close');
      // Beside another root, so that the bundle still admits someone: one that admits nobody fails the reload and keeps the old set.
      await writeFile(caFile, pki.otherCa.certPem + pki.intermediateCa.certPem);
      const outcome = await reloader.reload('api');
      assert.equal(outcome.ok && outcome.revokedConnections, 1);
      await closed;
      // OpenSSL's verdict at the next handshake: a chain must end in a self-signed CA of the bundle (Node sets no partial-chain flag).
      assertRefusedAnswer(await https1(front.restPort, pki, { path: '/v2/health/live', client: pki.chainedLeafOnly }), 'unknown_ca');
    } finally {
      reloader.close();
      target.destroy();
      await front.proxy.shutdown(1000);
    }
  });

  test('a client CA renewed with a new key under the same name, each key with its CRL: both CAs\' clients are admitted, each one\'s revocations apply to its own clients only', async () => {
    // The usual rotation: the new CA keeps the old one's name, and the bundle holds both until every client has moved.
    const [oldCa, newCa] = await Promise.all([createCa({ commonName: 'ovms-mtls test renewed CA' }), createCa({ commonName: 'ovms-mtls test renewed CA' })]);
    const [oldClient, newClient, newRevoked] = await Promise.all([
      issueClientCert({ issuer: oldCa, commonName: 'client of the old key' }),
      issueClientCert({ issuer: newCa, commonName: 'client of the new key' }),
      issueClientCert({ issuer: newCa, commonName: 'revoked client of the new key' }),
    ]);
    const newCrl = await createCrl({ issuer: newCa, revoked: [{ serialHex: newRevoked.serialHex }] });
    const { front, reloader, crlFile } = await startOnOwnFiles(pki, upstream, oldCa.certPem + newCa.certPem, (await createCrl({ issuer: oldCa })) + newCrl);
    const sessions = [h2Session(front.restPort, pki, oldClient), h2Session(front.restPort, pki, newClient)];
    try {
      for (const session of sessions) assert.equal(await readyStatus(session), 200);
      assertRefusedAnswer(await https1(front.restPort, pki, { path: '/v2/health/live', client: newRevoked }), 'revoked');
      // The old key revokes its client, and a serial that is the new client's too (CAs numbering their certificates alike share serials).
      const closed = once(sessions[0]!, 'close');
      await writeFile(crlFile!, (await createCrl({ issuer: oldCa, revoked: [{ serialHex: oldClient.serialHex }, { serialHex: newClient.serialHex }], crlNumber: 2 })) + newCrl);
      const outcome = await reloader.reload('api');
      assert.equal(outcome.ok && outcome.revokedConnections, 1, outcome.ok ? '' : outcome.reason);
      await closed;
      assert.match(String((await front.logs.waitFor((l) => l.event === 'connection_revoked'))['subject']), /CN=client of the old key/);
      // OpenSSL's verdict agrees: the new key's client is admitted on its live connection and on a new one.
      assert.equal(await readyStatus(sessions[1]!), 200);
      assert.equal((await https1(front.restPort, pki, { path: '/v2/health/live', client: newClient })).status, 200);
    } finally {
      reloader.close();
      for (const session of sessions) session.destroy();
      await front.proxy.shutdown(1000);
    }
  });

  for (const grpcMode of FORWARD_MODES) {
    test(`--mtls_grpc_mode ${grpcMode}: the idle connection closes without waiting for the grace period, and the next call is refused revoked`, async () => {
      const crl = join(pki.dir, `grpc-${grpcMode}.crl`);
      await writeFile(crl, pki.crlPem);
      const front = await startTestProxy({ pki, upstream: { grpcPort: upstream.grpcPort! }, tls: { crl }, grpcMode });
      const files = { cert: pki.paths['server.pem']!, key: pki.paths['server.key']!, clientCa: pki.paths['client_cert_ca.pem']!, crl };
      const reloader = reloaderFor(front, files, { revokedGraceMs: 3_600_000 });
      const c = grpcClients(front.grpcAddress, pki, pki.client);
      try {
        await unary(c.echo, 'Unary', { payload: Buffer.from('x') });
        await writeFile(crl, await createCrl({ issuer: pki.clientCa, revoked: [{ serialHex: pki.client.serialHex }] }));
        const outcome = await reloader.reload('api');
        assert.equal(outcome.ok && outcome.revokedConnections, 1);
        await front.logs.waitFor((l) => l.event === 'connection_revoked' && l.reason === 'revoked');
        await eventually(() => front.proxy.listeners().every((listener) => listener.connections.size === 0), 'the revoked connection closes');
        const err = await unary(c.echo, 'Unary', { payload: Buffer.from('x') }).then(() => assert.fail('the revoked client must be refused'), (e: grpc.ServiceError) => e);
        assertRefusedCall(err, 'revoked');
      } finally {
        c.close();
        reloader.close();
        await front.proxy.shutdown(1000);
      }
    });
  }
});

/** Runs openssl in pki.dir and fails the test on a non-zero exit. */
async function openssl(pki: TestPki, ...args: string[]): Promise<void> {
  const run = await runCommand('openssl', args, { cwd: pki.dir });
  assert.equal(run.code, 0, run.stderr);
}

/** A client certificate the openssl CLI makes as NAME.pem / NAME.key, signed by `ca` (a base name in pki.dir) with `serial`. */
async function opensslClient(pki: TestPki, name: string, subject: string, ca: string, serial: string): Promise<Issued> {
  await writeFile(join(pki.dir, `${name}.cnf`), '[req]\ndistinguished_name=dn\n[dn]\n[ext]\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n');
  await openssl(pki, 'ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', `${name}.key`);
  await openssl(pki, 'req', '-new', '-key', `${name}.key`, '-subj', subject, '-config', `${name}.cnf`, '-out', `${name}.csr`);
  await openssl(pki, 'x509', '-req', '-in', `${name}.csr`, '-CA', `${ca}.pem`, '-CAkey', `${ca}.key`, '-set_serial', serial, '-days', '1', '-extfile', `${name}.cnf`, '-extensions', 'ext', '-out', `${name}.pem`);
  return { certPem: await readFile(join(pki.dir, `${name}.pem`), 'utf8'), keyPem: await readFile(join(pki.dir, `${name}.key`), 'utf8'), serialHex: '' };
}

/** The CRL of CA `ca` (a base name in pki.dir: BASE.pem, BASE.key) as `openssl ca` writes it, revoking `revoked` (each entry keeps its serial's sign). */
async function opensslCrl(pki: TestPki, ca: string, ...revoked: Issued[]): Promise<string> {
  const at = (suffix: string) => `${ca}-crl${suffix}`;
  const config = `[ca]\ndefault_ca=d\n[d]\ndatabase=${at('.index')}\ncrlnumber=${at('.number')}\ndefault_md=sha256\ndefault_crl_days=1\ncertificate=${ca}.pem\nprivate_key=${ca}.key\n`;
  await Promise.all([writeFile(join(pki.dir, at('.cnf')), config), writeFile(join(pki.dir, at('.index')), ''), writeFile(join(pki.dir, at('.number')), '01\n')]);
  for (const client of revoked) {
    await writeFile(join(pki.dir, at('-revoke.pem')), client.certPem);
    await openssl(pki, 'ca', '-config', at('.cnf'), '-revoke', at('-revoke.pem'));
  }
  await openssl(pki, 'ca', '-config', at('.cnf'), '-gencrl', '-out', at('.pem'));
  return readFile(join(pki.dir, at('.pem')), 'utf8');
}

/**
 * One CA key under the name CN=Canon CA, certified twice: with the name as a PrintableString
 * (`string_mask=default`, OpenSSL's default before 1.0) and as a UTF8String (`utf8only`, since).
 * RFC 5280 and OpenSSL take both for the same name. Returns the client issued under the old spelling.
 */
async function clientOfRespelledCa(pki: TestPki): Promise<Issued> {
  const extensions = '[e]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n';
  await openssl(pki, 'ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', 'canon_old.key');
  for (const [name, mask] of [['canon_old', 'default'], ['canon_new', 'utf8only']] as const) {
    await writeFile(join(pki.dir, `${name}.cnf`), `[req]\ndistinguished_name=dn\nstring_mask=${mask}\n[dn]\n${extensions}`);
    await openssl(pki, 'req', '-x509', '-key', 'canon_old.key', '-subj', '/CN=Canon CA', '-config', `${name}.cnf`, '-extensions', 'e', '-days', '1', '-out', `${name}.pem`);
  }
  await copyFile(join(pki.dir, 'canon_old.key'), join(pki.dir, 'canon_new.key'));
  return opensslClient(pki, 'respelled', '/CN=client of the respelled CA', 'canon_old', '0x42');
}

/**
 * `client` re-signed by `issuer` with its serial's length in five octets where one does: BER, which
 * OpenSSL accepts at the handshake (it keeps the bytes the signature covers), as some CAs issue.
 */
function withBerSerialLength(client: Issued, issuer: Issued): Issued {
  const [tbs, algorithm] = readTlvs(readSingleTlv(new X509Certificate(client.certPem).raw).value);
  const [version, serial, ...rest] = readTlvs(tbs!.value);
  const der = (field: { tag: number; value: Buffer }) => encodeTlv(field.tag, field.value);
  const berSerial = Buffer.concat([Buffer.from([TAG_INTEGER, 0x85, 0, 0, 0, 0, serial!.value.length]), serial!.value]);
  const berTbs = encodeTlv(TAG_SEQUENCE, Buffer.concat([der(version!), berSerial, ...rest.map(der)]));
  const signature = sign('sha256', berTbs, { key: issuer.keyPem, dsaEncoding: 'der' });
  const signed = encodeTlv(TAG_SEQUENCE, Buffer.concat([berTbs, der(algorithm!), encodeTlv(TAG_BIT_STRING, Buffer.concat([Buffer.from([0]), signature]))]));
  return { ...client, certPem: toPem(signed, 'CERTIFICATE') };
}
