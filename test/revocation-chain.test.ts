import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { copyFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createTestPki, type TestPki } from './helpers/pki.js';
import type { ClientHttp2Session } from 'node:http2';
import type { ModelServer } from '../src/demo/model-server.js';
import { h2Request, h2Session, startTestProxy, startUpstream } from './helpers/harness.js';
import { TlsReloader } from '../src/tls-reload.js';
import { loadTlsMaterialSync } from '../src/tls-material.js';
import { createLogger } from '../src/log.js';
import { createCrl } from '../src/x509.js';

test('a CRL reload that revokes an intermediate CA closes the live connection of a client chained through it', async () => {
  const pki = await createTestPki();
  const upstream = await startUpstream({ grpcPort: null });
  // A CRL file of our own, so the test can replace it.
  const crl = join(pki.dir, 'chain-under-test.crl');
  await copyFile(pki.paths['client_cert_ca_chain.crl']!, crl);
  const front = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, tls: { crl } });
  const files = { cert: pki.paths['server.pem']!, key: pki.paths['server.key']!, clientCa: pki.paths['client_cert_ca.pem']!, crl };
  const reloader = new TlsReloader({
    files, current: loadTlsMaterialSync(files), proxy: front.proxy,
    logger: createLogger({ level: 'debug', destination: front.logs }), revokedGraceMs: 3_600_000,
  });
  const chained = h2Session(front.restPort, pki, pki.chainedClient);
  const plain = h2Session(front.restPort, pki);
  try {
    assert.equal((await h2Request(chained, { ':method': 'GET', ':path': '/v2/health/ready' })).headers[':status'], 200);
    assert.equal((await h2Request(plain, { ':method': 'GET', ':path': '/v2/health/ready' })).headers[':status'], 200);
    const closed = once(chained, 'close');
    // The leaf itself stays unrevoked: only its issuing intermediate CA is.
    const rootCrl = await createCrl({ issuer: pki.clientCa, revoked: [{ serialHex: pki.intermediateCa.serialHex }, { serialHex: pki.revokedClient.serialHex }] });
    await writeFile(crl, rootCrl + pki.intermediateCrlPem);
    const outcome = await reloader.reload('api');
    assert.equal(outcome.ok, true);
    await closed;
    const line = await front.logs.waitFor((l) => l.event === 'connection_revoked');
    assert.match(String(line['subject']), /CN=chained client/);
    assert.equal((await h2Request(plain, { ':method': 'GET', ':path': '/v2/health/ready' })).headers[':status'], 200);
  } finally {
    reloader.close();
    chained.destroy();
    plain.close();
    await front.proxy.shutdown(1000);
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
  const reloader = new TlsReloader({
    files, current: loadTlsMaterialSync(files), proxy: front.proxy,
    logger: createLogger({ level: 'debug', destination: front.logs }), revokedGraceMs: 3_600_000,
  });
  return { front, reloader, caFile, crlFile };
}

const ready = async (session: ClientHttp2Session) => (await h2Request(session, { ':method': 'GET', ':path': '/v2/health/ready' })).headers[':status'];

describe('a reload closes what a new handshake would refuse', () => {
  let pki: TestPki;
  let upstream: ModelServer;
  before(async () => {
    [pki, upstream] = await Promise.all([createTestPki(), startUpstream({ grpcPort: null })]);
  });
  after(async () => {
    await upstream.close();
    await pki.cleanup();
  });

  test('a CA taken out of --mtls_client_ca: the live connections of its clients are closed, the other CA\'s client carries on', async () => {
    const { front, reloader, caFile } = await startOnOwnFiles(pki, upstream, pki.clientCa.certPem + pki.otherCa.certPem, undefined);
    const foreign = h2Session(front.restPort, pki, pki.foreignClient);
    const plain = h2Session(front.restPort, pki);
    try {
      assert.equal(await ready(foreign), 200);
      assert.equal(await ready(plain), 200);
      const closed = once(foreign, 'close');
      await writeFile(caFile, pki.clientCa.certPem);
      const outcome = await reloader.reload('api');
      assert.equal(outcome.ok && outcome.revokedConnections, 1);
      await closed;
      const line = await front.logs.waitFor((l) => l.event === 'connection_revoked');
      assert.match(String(line['subject']), /CN=foreign client/);
      assert.equal(line['reason'], 'unknown_ca');
      assert.equal(await ready(plain), 200);
    } finally {
      reloader.close();
      foreign.destroy();
      plain.close();
      await front.proxy.shutdown(1000);
    }
  });

  test('a CRL that revokes an intermediate CA held in --mtls_client_ca closes a client that sent only its leaf', async () => {
    const bundle = pki.clientCa.certPem + pki.intermediateCa.certPem;
    const { front, reloader, crlFile } = await startOnOwnFiles(pki, upstream, bundle, pki.crlPem + pki.intermediateCrlPem);
    const leafOnly = { ...pki.chainedClient, certPem: pki.chainedClient.certPem.slice(0, pki.chainedClient.certPem.indexOf(pki.intermediateCa.certPem)) };
    const chained = h2Session(front.restPort, pki, leafOnly);
    const plain = h2Session(front.restPort, pki);
    try {
      assert.equal(await ready(chained), 200);
      assert.equal(await ready(plain), 200);
      const closed = once(chained, 'close');
      const rootCrl = await createCrl({ issuer: pki.clientCa, revoked: [{ serialHex: pki.intermediateCa.serialHex }] });
      await writeFile(crlFile!, rootCrl + pki.intermediateCrlPem);
      const outcome = await reloader.reload('api');
      assert.equal(outcome.ok && outcome.revokedConnections, 1);
      await closed;
      const line = await front.logs.waitFor((l) => l.event === 'connection_revoked');
      assert.match(String(line['subject']), /CN=chained client/);
      assert.equal(line['reason'], 'revoked');
      assert.equal(await ready(plain), 200);
    } finally {
      reloader.close();
      chained.destroy();
      plain.close();
      await front.proxy.shutdown(1000);
    }
  });
});
