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
import { createCrl, type Issued } from '../src/x509.js';

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

  /**
   * A client of `client` and one of the plain CA connect; `change` rewrites a file and the
   * reload runs: the first connection must close, logged with `subject` and `reason`, and
   * the plain client must be served on.
   */
  async function closedByReload(files: Awaited<ReturnType<typeof startOnOwnFiles>>, client: Issued, change: () => Promise<void>, subject: RegExp, reason: string) {
    const { front, reloader } = files;
    const target = h2Session(front.restPort, pki, client);
    const plain = h2Session(front.restPort, pki);
    try {
      assert.equal(await ready(target), 200);
      assert.equal(await ready(plain), 200);
      const closed = once(target, 'close');
      await change();
      const outcome = await reloader.reload('api');
      assert.equal(outcome.ok && outcome.revokedConnections, 1);
      await closed;
      const line = await front.logs.waitFor((l) => l.event === 'connection_revoked');
      assert.match(String(line['subject']), subject);
      assert.equal(line['reason'], reason);
      assert.equal(await ready(plain), 200);
    } finally {
      reloader.close();
      target.destroy();
      plain.close();
      await front.proxy.shutdown(1000);
    }
  }

  test('a CA taken out of --mtls_client_ca: the live connections of its clients are closed, the other CA\'s client carries on', async () => {
    const files = await startOnOwnFiles(pki, upstream, pki.clientCa.certPem + pki.otherCa.certPem, undefined);
    await closedByReload(files, pki.foreignClient, () => writeFile(files.caFile, pki.clientCa.certPem), /CN=foreign client/, 'unknown_ca');
  });

  test('a CRL that revokes an intermediate CA held in --mtls_client_ca closes a client that sent only its leaf', async () => {
    const bundle = pki.clientCa.certPem + pki.intermediateCa.certPem;
    const files = await startOnOwnFiles(pki, upstream, bundle, pki.crlPem + pki.intermediateCrlPem);
    const leafOnly = { ...pki.chainedClient, certPem: pki.chainedClient.certPem.slice(0, pki.chainedClient.certPem.indexOf(pki.intermediateCa.certPem)) };
    const revokeIntermediate = async () => {
      const rootCrl = await createCrl({ issuer: pki.clientCa, revoked: [{ serialHex: pki.intermediateCa.serialHex }] });
      await writeFile(files.crlFile!, rootCrl + pki.intermediateCrlPem);
    };
    await closedByReload(files, leafOnly, revokeIntermediate, /CN=chained client/, 'revoked');
  });
});
