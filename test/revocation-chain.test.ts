import { test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { copyFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createTestPki } from './helpers/pki.js';
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
