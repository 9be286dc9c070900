/**
 * Certificates that leave or enter their validity: OpenSSL's CERT_HAS_EXPIRED and
 * CERT_NOT_YET_VALID name no certificate, so the refusal must say which one of the chain it is,
 * its date, and when a clock may be off. One case waits, bounded, for a client CA to expire while
 * the proxy runs, in relay mode on both ports (terminate mode judges the same way), and one for
 * the server certificate to expire.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { Agent } from 'node:https';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import * as grpc from '@grpc/grpc-js';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { assertRefusedAnswer, assertRefusedCall, grpcClients, https1, startTestProxy, startUpstream, type ProxySetup, type StartedProxy } from './helpers/harness.js';
import { unary } from '../src/demo/grpc-client.js';
import type { ModelServer } from '../src/demo/model-server.js';
import { FORWARD_MODES } from '../src/config.js';
import { createCa, issueClientCert, issueServerCert, type Issued } from '../src/x509.js';
import { runCommand } from './helpers/cli.js';

const DAY_MS = 24 * 3600 * 1000;

let pki: TestPki;
let upstream: ModelServer;
let front: StartedProxy;
const started: StartedProxy[] = [];

/** A proxy in front of the file's model server, without a CRL unless given; stopped after the file's tests. */
async function proxyWith(setup: Omit<ProxySetup, 'pki'>): Promise<StartedProxy> {
  const proxy = await startTestProxy({ pki, upstream, ...setup, tls: { crl: undefined, ...setup.tls } });
  started.push(proxy);
  return proxy;
}

before(async () => {
  [pki, upstream] = await Promise.all([createTestPki(), startUpstream()]);
  front = await proxyWith({});
});

after(async () => {
  for (const proxy of started) await proxy.proxy.shutdown(1000);
  await upstream.close();
  await pki.cleanup();
});

/** Waits (bounded) until `pem` has expired: a wait for the moment, not a timed assertion. */
async function pastExpiry(pem: string): Promise<void> {
  await sleep(Math.max(0, Date.parse(new X509Certificate(pem).validTo) - Date.now()) + 1500);
}

/** What a refused REST client reads, after checking that it is refused for `reason`. */
async function refusalText(port: number, client: Issued, reason: string): Promise<string> {
  const answer = await https1(port, pki, { path: '/v2/health/ready', client });
  assertRefusedAnswer(answer, reason);
  return (JSON.parse(answer.body) as { error: string }).error;
}

async function refusedCallText(address: string, client: Issued, reason: string): Promise<string> {
  const c = grpcClients(address, pki, client);
  try {
    const err = await unary(c.kserve, 'ServerLive', {}).then(() => assert.fail('the call should be refused'), (e: grpc.ServiceError) => e);
    assertRefusedCall(err, reason);
    return err.details;
  } finally {
    c.close();
  }
}

describe('a refusal for a certificate out of its validity names it', () => {
  test('an expired client certificate: its date', async () => {
    const text = await refusalText(front.restPort, pki.expiredClient, 'expired');
    assert.match(text, /client certificate expired on \d{4}-\d\d-\d\dT\S+Z \(CERT_HAS_EXPIRED\): the client needs a renewed certificate$/);
  });

  test('a client certificate valid from a minute ahead: its notBefore and the clock', async () => {
    const early = await issueClientCert({ issuer: pki.clientCa, commonName: 'early', notBefore: new Date(Date.now() + 60_000) });
    const text = await refusalText(front.restPort, early, 'not_yet_valid');
    assert.match(text, /client certificate is not valid before \S+Z \(CERT_NOT_YET_VALID\), \d+ s ahead of this machine's clock: the clock of the machine that issued it, or of this one, is off/);
  });

  test('an intermediate CA the client sends that expired: that CA, not the client certificate', async () => {
    const intermediate = await createCa({ commonName: 'ovms-mtls test lapsed intermediate', issuer: pki.clientCa, notBefore: new Date(Date.now() - 3 * DAY_MS), days: 1 });
    const leaf = await issueClientCert({ issuer: intermediate, commonName: 'behind lapsed', notBefore: new Date(Date.now() - 3 * DAY_MS), days: 30 });
    const text = await refusalText(front.restPort, { ...leaf, certPem: leaf.certPem + intermediate.certPem }, 'expired');
    assert.match(text, /CA CN=ovms-mtls test lapsed intermediate, sent by the client, expired on \S+Z \(CERT_HAS_EXPIRED\): the client must send that CA's renewed certificate/);
  });
});

describe('a client CA that expires while the proxy runs (relay mode on both ports)', () => {
  test('its clients are refused naming the CA and its date, not their own certificates, which are valid', async () => {
    const lifetimeMs = 6000;
    const shortCa = await createCa({ commonName: 'ovms-mtls test short-lived client CA', days: lifetimeMs / DAY_MS });
    const client = await issueClientCert({ issuer: shortCa, commonName: 'outlives its CA', days: 30 });
    const bundle = join(pki.dir, 'short_lived_ca.pem');
    await writeFile(bundle, shortCa.certPem);
    const relay = await proxyWith({ tls: { clientCa: bundle }, grpcMode: 'relay', restMode: 'relay' });
    await pastExpiry(shortCa.certPem);
    const named = /client CA CN=ovms-mtls test short-lived client CA of --mtls_client_ca expired on \S+Z \(CERT_HAS_EXPIRED\): every client certificate it issued is refused/;
    assert.match(await refusalText(relay.restPort, client, 'expired'), named);
    assert.match(await refusedCallText(relay.grpcAddress, client, 'expired'), named);
    const line = await relay.logs.waitFor((l) => l.event === 'client_refused' && l.reason === 'expired');
    assert.match(line.msg, named);
  });
});

describe('the server certificate expiring while the proxy runs', () => {
  test('every client refuses it: each failed handshake says our certificate expired, at error, whether the client sends an alert (curl) or closes (grpc-js)', async () => {
    const shortServer = await issueServerCert({ issuer: pki.serverCa, commonName: 'localhost', dns: ['localhost'], ips: ['127.0.0.1'], days: 6000 / DAY_MS });
    const cert = join(pki.dir, 'short_lived_server.pem');
    const key = join(pki.dir, 'short_lived_server.key');
    await Promise.all([writeFile(cert, shortServer.certPem), writeFile(key, shortServer.keyPem, { mode: 0o600 })]);
    const expiring = await proxyWith({ tls: { cert, key } });
    await pastExpiry(shortServer.certPem);
    const curl = await runCommand('curl', ['-s', '--http1.1', '--cacert', pki.paths['server_ca.pem']!, '--cert', pki.paths['client.pem']!,
      '--key', pki.paths['client.key']!, `https://localhost:${expiring.restPort}/v2/health/live`]);
    assert.equal(curl.code, 60, 'curl: certificate has expired');
    const c = grpcClients(expiring.grpcAddress, pki);
    try {
      await assert.rejects(unary(c.kserve, 'ServerLive', {}, new grpc.Metadata(), { deadline: Date.now() + 5000 }), /certificate has expired/);
    } finally {
      c.close();
    }
    const failures = (listener: string) => expiring.logs.waitFor((l) => l.event === 'handshake_failed' && l.listener === listener);
    for (const line of [await failures('rest'), await failures('grpc')]) {
      assert.equal(line.reason, 'server_certificate_expired', line.msg);
      assert.equal(line.level, 'error');
      assert.match(line.msg, /^our server certificate \(--mtls_cert\), or a CA certificate the file sends with it, has expired, so every client refuses it: renew it/);
    }
  });
});

describe('a connection whose client certificate expires while it is open (README: time is judged at the handshake only)', () => {
  for (const mode of FORWARD_MODES) {
    test(`goes on, in ${mode} mode on both ports, while a new connection of that client is refused`, async () => {
      const proxy = mode === 'terminate' ? front : await proxyWith({ grpcMode: mode, restMode: mode });
      const brief = await issueClientCert({ issuer: pki.clientCa, commonName: `brief ${mode}`, days: 6000 / DAY_MS });
      const agent = new Agent({ keepAlive: true, maxSockets: 1 });
      const c = grpcClients(proxy.grpcAddress, pki, brief);
      try {
        // Used every second, as a busy client does: an idle relayed connection closes with its upstream one (the model server's keep-alive timeout).
        const end = Date.parse(new X509Certificate(brief.certPem).validTo) + 1500;
        for (;;) {
          const past = Date.now() >= end;
          assert.equal((await https1(proxy.restPort, pki, { path: '/v2/health/ready', client: brief, agent })).status, 200);
          assert.equal((await unary(c.kserve, 'ServerLive', {})).response.live, true);
          if (past) break;
          await sleep(1000);
        }
        assert.match(await refusalText(proxy.restPort, brief, 'expired'), /client certificate expired on/);
      } finally {
        c.close();
        agent.destroy();
      }
    });
  }
});
