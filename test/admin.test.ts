import { test, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createServer as createHttpServer } from 'node:http';
import { createServer as createH2cServer } from 'node:http2';
import { connect as connectTcp, type AddressInfo } from 'node:net';
import { createInterface } from 'node:readline';
import { readFileSync } from 'node:fs';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { baseConfig, https1, startTestProxy, startUpstream } from './helpers/harness.js';
import { heldChatStream } from './helpers/sse.js';
import { countingUses, eventually, httpGet, sample } from './helpers/ops.js';
import { HTTP2_REFUSALS, framedH2cUpstream } from './helpers/scripted-upstream.js';
import { BIN, runCommand } from './helpers/cli.js';
import { freeLoopbackPorts } from '../src/ports.js';
import { startModelServer } from '../src/demo/model-server.js';
import { startAdminServer } from '../src/admin.js';
import { ProxyMetrics } from '../src/metrics.js';
import { DRAINING, certificatesCheck, listenersCheck, readinessReport, upstreamCheck, upstreamReadiness, type HealthReport } from '../src/health.js';
import { loadTlsMaterialSync, tlsMaterialFromTexts } from '../src/tls-material.js';
import { createCa, createCrl, issueServerCert } from '../src/x509.js';
import { X509Certificate } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { RunningProxy } from '../src/proxy.js';

const pkiPromise = createTestPki();
let pki: TestPki;
after(async () => (await pkiPromise).cleanup());


describe('admin listener', () => {
  test('/healthz answers 200 with JSON, /metrics serves Prometheus text, and unknown paths and methods are refused', async () => {
    const metrics = new ProxyMetrics();
    const admin = await startAdminServer({ hosts: ['127.0.0.1'], port: 0, metrics, health: () => ({ ready: true, checks: {} }) });
    try {
      const health = await httpGet(admin.port, '/healthz');
      assert.equal(health.status, 200);
      assert.equal(JSON.parse(health.body).status, 'alive');
      const text = await httpGet(admin.port, '/metrics');
      assert.equal(text.status, 200);
      assert.match(String(text.headers['content-type']), /^text\/plain; version=0\.0\.4/);
      assert.equal(sample(text.body, 'ovms_mtls_ovms_restarts_total'), 0);
      assert.equal((await httpGet(admin.port, '/nope')).status, 404);
      assert.equal((await httpGet(admin.port, '/metrics', 'POST')).status, 405);
    } finally {
      await admin.close();
    }
  });

  test('the upstream check asks REST and gRPC at once: a model server whose REST answer waits on its gRPC one is ready, not a REST timeout', async () => {
    pki = await pkiPromise;
    let grpcAsked!: () => void;
    const grpcWasAsked = new Promise<void>((resolve) => (grpcAsked = resolve));
    const rest = createHttpServer((req, res) => {
      req.resume();
      void grpcWasAsked.then(() => res.end('ready'));
    });
    const grpc = createH2cServer();
    grpc.on('stream', (stream) => {
      grpcAsked();
      stream.resume();
      stream.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
      stream.on('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
      // ServerReadyResponse{ready: true} in one gRPC message.
      stream.end(Buffer.from([0, 0, 0, 0, 2, 0x08, 0x01]));
    });
    rest.listen(0, '127.0.0.1');
    grpc.listen(0, '127.0.0.1');
    await Promise.all([once(rest, 'listening'), once(grpc, 'listening')]);
    try {
      const config = baseConfig({ pki, upstream: { restPort: (rest.address() as AddressInfo).port, grpcPort: (grpc.address() as AddressInfo).port } });
      const result = await upstreamCheck(config, 1000)();
      assert.equal(result.ok, true, result.detail);
    } finally {
      rest.close();
      grpc.close();
    }
  });

  // Before: "REST 127.0.0.1:G: HPE_INVALID_CONSTANT; gRPC 127.0.0.1:R: ERR_HTTP2_ERROR", which named neither port's mistake.
  test('with the model server\'s ports swapped, the detail says which port each upstream should be; each port counts as answering', async () => {
    pki = await pkiPromise;
    const model = await startModelServer({ grpcPort: 0, restPort: 0 });
    try {
      const config = baseConfig({ pki, upstream: { restPort: model.grpcPort!, grpcPort: model.restPort! } });
      const result = await upstreamReadiness(config, 1000)();
      assert.equal(result.ok, false);
      // Each port answered, as the detail says: not a silent model server to the hang watchdog.
      assert.equal(result.unanswered, false);
      assert.equal(result.detail, [
        `REST 127.0.0.1:${model.grpcPort}: answered, but not in HTTP/1.1 (HPE_INVALID_CONSTANT): is it the model server's REST port (OVMS --rest_port)?`,
        `gRPC 127.0.0.1:${model.restPort}: answered, but not in HTTP/2 (ERR_HTTP2_ERROR): is it the model server's gRPC port (OVMS --port)?`,
      ].join('; '));
    } finally {
      await model.close();
    }
  });

  // Before: "answered, but not in HTTP/2 (ERR_HTTP2_ERROR): is it the model server's gRPC port", for a port that was.
  for (const [what, answer, refused] of HTTP2_REFUSALS) {
    test(`an h2c model server that sends its SETTINGS, then ${what}: the detail says what the proxy refused, not to check the port, and it counts as an answer`, async () => {
      const h2c = await framedH2cUpstream(answer);
      try {
        const result = await upstreamReadiness(baseConfig({ pki: await pkiPromise, upstream: { grpcPort: h2c.port } }), 1000)();
        assert.equal(result.ok, false);
        assert.equal(result.detail, `gRPC 127.0.0.1:${h2c.port}: speaks HTTP/2, but sent ${refused}`);
        // It answered (the hang watchdog's "any answer counts"): was `answered: false`, as for a port that said nothing.
        assert.equal(result.unanswered, false);
      } finally {
        h2c.close();
      }
    });
  }

  test('/readyz requests that come while the model server is being asked share that check: a burst opens one connection to it, not one per request', async () => {
    pki = await pkiPromise;
    const burst = 20;
    let asked = 0;
    let released = false;
    const held: (() => void)[] = [];
    const rest = createHttpServer((req, res) => {
      asked += 1;
      req.resume();
      const answer = () => res.end('ready');
      if (released) answer();
      else held.push(answer);
    });
    rest.listen(0, '127.0.0.1');
    await once(rest, 'listening');
    const config = baseConfig({ pki, upstream: { restPort: (rest.address() as AddressInfo).port } });
    const check = upstreamCheck(config);
    let arrived!: () => void;
    const allArrived = new Promise<void>((resolve) => (arrived = resolve));
    let requests = 0;
    const health = () => {
      if (++requests === burst) arrived();
      return readinessReport({ upstream: check });
    };
    const admin = await startAdminServer({ hosts: ['127.0.0.1'], port: 0, metrics: new ProxyMetrics(), health });
    try {
      const answers = Array.from({ length: burst }, () => httpGet(admin.port, '/readyz'));
      // Every request has reached readinessReport (and started or joined a check) before the model server answers.
      await allArrived;
      released = true;
      for (const answer of held.splice(0)) answer();
      for (const answer of await Promise.all(answers)) assert.equal(answer.status, 200, answer.body);
      assert.equal(asked, 1, 'the model server was asked once for the whole burst');
    } finally {
      await admin.close();
      rest.close();
    }
  });

  test('scrapes that come while the metrics are being rendered share that rendering: a burst asks the workers once, not once per scrape', async () => {
    const burst = 20;
    let renderings = 0;
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    const metrics = { contentType: 'text/plain; version=0.0.4; charset=utf-8', text: async () => {
      renderings += 1;
      await released;
      return 'ovms_mtls_ovms_up 1\n';
    } };
    const admin = await startAdminServer({ hosts: ['127.0.0.1'], port: 0, metrics, health: () => ({ ready: true, checks: {} }) });
    try {
      const sockets = await Promise.all(Array.from({ length: burst }, async () => {
        const socket = connectTcp(admin.port, '127.0.0.1');
        await once(socket, 'connect');
        return socket;
      }));
      const answers = sockets.map(async (socket) => {
        const chunks: Buffer[] = [];
        socket.on('data', (chunk: Buffer) => chunks.push(chunk));
        socket.write('GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n');
        await once(socket, 'close');
        return Buffer.concat(chunks).toString('latin1');
      });
      // Sent after every scrape, on a connection of its own: once it is answered, the scrapes have been read.
      assert.equal((await httpGet(admin.port, '/healthz')).status, 200);
      release();
      for (const answer of await Promise.all(answers)) assert.match(answer, /^HTTP\/1\.1 200 [^]*\r\novms_mtls_ovms_up 1\n\r\n0\r\n\r\n$/);
      assert.equal(renderings, 1, 'the metrics were rendered once for the whole burst');
    } finally {
      await admin.close();
    }
  });

  test('/readyz is 503 while the model server starts and 200 once it answers', async () => {
    pki = await pkiPromise;
    // In one call: the model server's ports stay free until it starts, and a port the proxy or the admin
    // listener took from the system could otherwise be one of them (the proxy then answered for the model server).
    const [grpcPort, restPort, frontGrpc, frontRest, adminPort] = (await freeLoopbackPorts(5)) as [number, number, number, number, number];
    const front = await startTestProxy({ pki, upstream: { grpcPort, restPort }, listen: { grpcPort: frontGrpc, restPort: frontRest } });
    const config = baseConfig({ pki, upstream: { grpcPort, restPort } });
    const material = loadTlsMaterialSync(config.tls);
    let proxy: RunningProxy | undefined = front.proxy;
    const checks = { listeners: listenersCheck(() => proxy), upstream: upstreamCheck(config), certificates: certificatesCheck(() => material) };
    const admin = await startAdminServer({ hosts: ['127.0.0.1'], port: adminPort, metrics: new ProxyMetrics(), health: () => readinessReport(checks) });
    let upstream: Awaited<ReturnType<typeof startModelServer>> | undefined;
    try {
      const starting = await httpGet(admin.port, '/readyz');
      assert.equal(starting.status, 503);
      const report = JSON.parse(starting.body) as HealthReport;
      assert.equal(report.ready, false);
      assert.equal(report.checks['upstream']?.ok, false);
      assert.equal(report.checks['upstream']?.detail, `REST 127.0.0.1:${restPort}: ECONNREFUSED; gRPC 127.0.0.1:${grpcPort}: ECONNREFUSED`);
      assert.equal(report.checks['listeners']?.ok, true);
      assert.equal(report.checks['certificates']?.ok, true);

      upstream = await startModelServer({ grpcPort, restPort });
      await eventually(async () => (await httpGet(admin.port, '/readyz')).status === 200, '/readyz to turn 200');
      const ready = JSON.parse((await httpGet(admin.port, '/readyz')).body) as HealthReport;
      assert.equal(ready.ready, true);
      assert.match(ready.checks['upstream']!.detail, /ServerReady: ready/);

      await front.proxy.shutdown(1000);
      proxy = undefined;
      assert.equal((await httpGet(admin.port, '/readyz')).status, 503);
    } finally {
      await admin.close();
      await upstream?.close();
    }
  });

  test('/readyz while the proxy drains says draining, not that a port is not listening, until the call in flight has finished', async () => {
    pki = await pkiPromise;
    const held = await startUpstream({ sseGate: () => new Promise(() => {}) });
    const local = await startTestProxy({ pki, upstream: { restPort: held.restPort! } });
    const check = listenersCheck(() => local.proxy);
    const client = await heldChatStream(local.restPort, pki, held);
    try {
      assert.deepEqual(await check(), { ok: true, detail: 'listening' });
      const drained = local.proxy.shutdown(60_000);
      assert.deepEqual(await check(), { ok: false, detail: DRAINING });
      // The model server goes: the stream ends, and with it the drain.
      await held.close();
      await drained;
      assert.deepEqual(await check(), { ok: false, detail: DRAINING });
    } finally {
      client.destroy();
      await held.close();
    }
  });

  test('the certificate check fails once the server certificate or the CRL has expired', async () => {
    pki = await pkiPromise;
    const config = baseConfig({ pki });
    const material = loadTlsMaterialSync(config.tls);
    const inTwoDays = () => new Date(Date.now() + 2 * 24 * 3600 * 1000);
    assert.equal((await certificatesCheck(() => material)()).ok, true);
    const late = await certificatesCheck(() => material, inTwoDays)();
    assert.equal(late.ok, false);
    assert.match(late.detail, /CRL expired/);
    const muchLater = await certificatesCheck(() => material, () => new Date(Date.now() + 5000 * 24 * 3600 * 1000))();
    assert.match(muchLater.detail, /server certificate localhost expired/);
  });

  // Each probe proved every link's signature and parsed every intermediate again: 0.4 s a probe for a
  // bundle of 600 intermediate CAs, during which every request of the process waited.
  test('a certificate check on a bundle of intermediate CAs with their CRLs proves no signature and reads no key again at the next probe', async () => {
    pki = await pkiPromise;
    const intermediates = await Promise.all(Array.from({ length: 12 }, (_, i) => createCa({ commonName: `ovms-mtls test issuing CA ${i}`, issuer: pki.clientCa })));
    const bundle = join(pki.dir, 'intermediates_bundle.pem');
    const crl = join(pki.dir, 'intermediates_bundle.crl');
    await writeFile(bundle, pki.clientCa.certPem + intermediates.map((ca) => ca.certPem).join(''));
    await writeFile(crl, pki.crlPem + (await Promise.all(intermediates.map((issuer) => createCrl({ issuer })))).join(''));
    const material = loadTlsMaterialSync({ ...baseConfig({ pki }).tls, clientCa: bundle, crl });
    const check = certificatesCheck(() => material);
    assert.equal((await check()).ok, true);
    const keyReads = countingUses(X509Certificate.prototype, 'publicKey');
    try {
      const again = await check();
      assert.equal(again.ok, true, again.detail);
    } finally {
      keyReads.stop();
    }
    assert.equal(keyReads.count, 0, 'each signature proof and each key check reads a certificate\'s public key');
  });

  // A bundle holding a rotation's leftover CA (or the next CA) next to the one in use starts and
  // serves, as `check` says; /readyz said 503 for as long as that CA stayed, on every replica at once.
  test('a client CA expired or not valid yet next to the one in use keeps the replica ready; a bundle that admits no client does not', async () => {
    pki = await pkiPromise;
    const day = 24 * 3600 * 1000;
    const [old, next] = await Promise.all([
      createCa({ commonName: 'ovms-mtls test rotated-out CA', notBefore: new Date(Date.now() - 10 * day), days: 5 }),
      createCa({ commonName: 'ovms-mtls test next CA', notBefore: new Date(Date.now() + day / 2), days: 30 }),
    ]);
    const bundle = join(pki.dir, 'rotation_bundle.pem');
    await writeFile(bundle, old.certPem + pki.clientCa.certPem + next.certPem);
    const material = loadTlsMaterialSync({ ...baseConfig({ pki }).tls, clientCa: bundle, crl: undefined });
    const now = await certificatesCheck(() => material)();
    assert.equal(now.ok, true, now.detail);
    assert.match(now.detail, /client CA ovms-mtls test rotated-out CA expired .*client CA ovms-mtls test next CA is not valid before/);
    const allOut = await certificatesCheck(() => material, () => new Date(Date.now() + 40 * day))();
    assert.equal(allOut.ok, false);
    assert.match(allOut.detail, /no client can be admitted/);
  });

  // OpenSSL verifies a client chain up to a self-signed CA of the bundle: judged one CA at a time, /readyz said 200 while every client was refused.
  test('a bundle whose CAs admit no client is refused at load (an intermediate without its root, a key too weak for OpenSSL) and fails the certificate check once its root expires', async () => {
    pki = await pkiPromise;
    const day = 24 * 3600 * 1000;
    const files = baseConfig({ pki }).tls;
    const check = (ca: string, at = new Date()) => certificatesCheck(() => tlsMaterialFromTexts({ ...files, crl: undefined }, { key: pki.server.keyPem, cert: pki.server.certPem, ca, validatedAt: Date.now() }), () => at)();
    const root = await createCa({ commonName: 'ovms-mtls test one-day root' });
    const intermediate = await createCa({ commonName: 'ovms-mtls test ten-day intermediate', issuer: root, pathLen: 0, days: 10 });

    // A bundle that admits nobody from the start is refused at load (start, reload), by the same rule.
    assert.throws(() => check(intermediate.certPem), /no CA of the bundle can admit a client, so every client would be refused: client CA ovms-mtls test ten-day intermediate leads to no root CA of the bundle/);

    const chained = root.certPem + intermediate.certPem;
    assert.equal((await check(chained)).ok, true);
    const rootGone = await check(chained, new Date(Date.now() + 2 * day));
    assert.equal(rootGone.ok, false);
    assert.match(rootGone.detail, /client CA ovms-mtls test one-day root \(issuer of client CA ovms-mtls test ten-day intermediate\) expired/);

    const weakCa = join(pki.dir, 'weak_ca.pem');
    const made = await runCommand('openssl', ['req', '-x509', '-newkey', 'rsa:512', '-nodes', '-keyout', join(pki.dir, 'weak_ca.key'), '-subj', '/CN=weak CA', '-days', '2',
      '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign', '-out', weakCa]);
    assert.equal(made.code, 0, made.stderr);
    assert.throws(() => check(readFileSync(weakCa, 'utf8')), /client CA weak CA has a 512-bit RSA key, which OpenSSL refuses at its security level \(its clients are refused; reissue it with a key of 2048 bits or more\)/);
    const besideGood = await check(pki.clientCa.certPem + readFileSync(weakCa, 'utf8'));
    assert.equal(besideGood.ok, true, besideGood.detail);
  });

  // Every client refuses the server once a CA sent with its certificate has expired; /readyz said ready.
  test('the certificate check fails once an intermediate CA sent with the server certificate has expired', async () => {
    pki = await pkiPromise;
    const day = 24 * 3600 * 1000;
    const intermediate = await createCa({ commonName: 'ovms-mtls test short server intermediate', issuer: pki.serverCa, days: 0.5 });
    const leaf = await issueServerCert({ issuer: intermediate, commonName: 'localhost', dns: ['localhost'], days: 1 });
    const [cert, key] = [join(pki.dir, 'chained_server.pem'), join(pki.dir, 'chained_server.key')];
    await Promise.all([writeFile(cert, leaf.certPem + intermediate.certPem), writeFile(key, leaf.keyPem, { mode: 0o600 })]);
    const material = loadTlsMaterialSync({ ...baseConfig({ pki }).tls, cert, key });
    assert.equal((await certificatesCheck(() => material)()).ok, true);
    const later = await certificatesCheck(() => material, () => new Date(Date.now() + 0.75 * day))();
    assert.equal(later.ok, false, later.detail);
    assert.match(later.detail, /^CA certificate sent with the server certificate, ovms-mtls test short server intermediate expired /);
  });

  test('--mtls_admin_bind_address 127.0.0.1,:: serves on both (:: bound IPv6-only next to an IPv4 address)', async () => {
    const admin = await startAdminServer({ hosts: ['127.0.0.1', '::'], port: 0, metrics: new ProxyMetrics(), health: () => ({ ready: true, checks: {} }) });
    try {
      assert.equal((await httpGet(admin.port, '/healthz')).status, 200);
      assert.equal((await httpGet(admin.port, '/healthz', 'GET', '::1')).status, 200);
    } finally {
      await admin.close();
    }
  });

  test('a busy admin port is a one-line ListenError naming the flag', async () => {
    const first = await startAdminServer({ hosts: ['127.0.0.1'], port: 0, metrics: new ProxyMetrics(), health: () => ({ ready: true, checks: {} }) });
    try {
      await assert.rejects(
        startAdminServer({ hosts: ['127.0.0.1'], port: first.port, metrics: new ProxyMetrics(), health: () => ({ ready: true, checks: {} }) }),
        (err: Error & { code?: string }) => err.code === 'ERR_LISTEN' && /--mtls_admin_port: 127\.0\.0\.1:\d+ is in use/.test(err.message),
      );
    } finally {
      await first.close();
    }
  });
});

describe('proxy command with --mtls_admin_port', () => {
  test('serves metrics that count the traffic it forwards and readiness of its upstream, with the load at start as the last successful TLS load, then exits 0 on SIGTERM', async () => {
    pki = await pkiPromise;
    const upstream = await startUpstream();
    const spawnedAt = Math.floor(Date.now() / 1000);
    const [restPort, adminPort] = (await freeLoopbackPorts(2)) as [number, number];
    const child = spawn(process.execPath, [BIN, 'proxy',
      '--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`,
      '--mtls_cert', pki.paths['server.pem']!, '--mtls_key', pki.paths['server.key']!,
      '--mtls_client_ca', pki.paths['client_cert_ca.pem']!, '--mtls_crl', pki.paths['client_cert_ca.crl']!,
      '--mtls_admin_port', String(adminPort), '--mtls_workers', '2'], { stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      const lines = createInterface({ input: child.stdout! });
      // With workers, the primary says when every one of them listens.
      for await (const line of lines) if (/"event":"workers_listening"/.test(line)) break;
      child.stdout!.resume();
      assert.equal((await httpGet(adminPort, '/readyz')).status, 200);
      assert.equal((await https1(restPort, pki, { path: '/v2/health/ready' })).status, 200);
      // The request is recorded when its response closes; no event reaches this process, so poll.
      await eventually(async () => sample((await httpGet(adminPort, '/metrics')).body, 'ovms_mtls_requests_total', { route: '/v2/health/ready', status: '200' }) === 1, 'the request to be counted');
      const text = (await httpGet(adminPort, '/metrics')).body;
      assert.ok(sample(text, 'ovms_mtls_certificate_expiry_timestamp_seconds', { role: 'server' })! > Date.now() / 1000);
      assert.equal(sample(text, 'ovms_mtls_ovms_up'), 1);
      assert.equal(sample(text, 'ovms_mtls_tls_reloads_total', { result: 'success' }), 0);
      const loadedAt = sample(text, 'ovms_mtls_tls_last_reload_success_timestamp_seconds')!;
      assert.ok(loadedAt >= spawnedAt && loadedAt <= Date.now() / 1000, `the material was loaded at start, not at ${loadedAt}`);
      child.kill('SIGTERM');
      const [code] = await once(child, 'exit');
      assert.equal(code, 0);
    } finally {
      child.kill('SIGKILL');
      await upstream.close();
    }
  });

  test('ovms_up follows the upstream on each scrape, with nothing probing /readyz (Prometheus alone)', async () => {
    pki = await pkiPromise;
    const upstream = await startUpstream();
    const [restPort, adminPort] = (await freeLoopbackPorts(2)) as [number, number];
    const child = spawn(process.execPath, [BIN, 'proxy', '--mtls_workers', '1',
      '--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`,
      '--mtls_cert', pki.paths['server.pem']!, '--mtls_key', pki.paths['server.key']!, '--mtls_client_ca', pki.paths['client_cert_ca.pem']!,
      '--mtls_admin_port', String(adminPort)], { stdio: ['ignore', 'pipe', 'inherit'] });
    let upstreamOpen = true;
    try {
      for await (const line of createInterface({ input: child.stdout! })) if (/"event":"listening","listener":"rest"/.test(line)) break;
      child.stdout!.resume();
      assert.equal(sample((await httpGet(adminPort, '/metrics')).body, 'ovms_mtls_ovms_up'), 1, 'the upstream answers');
      await upstream.close();
      upstreamOpen = false;
      assert.equal(sample((await httpGet(adminPort, '/metrics')).body, 'ovms_mtls_ovms_up'), 0, 'the upstream is gone');
      child.kill('SIGTERM');
      const [code] = await once(child, 'exit');
      assert.equal(code, 0);
    } finally {
      child.kill('SIGKILL');
      if (upstreamOpen) await upstream.close();
    }
  });
});

