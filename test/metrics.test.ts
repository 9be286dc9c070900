import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { connect as tlsConnect } from 'node:tls';
import { once } from 'node:events';
import { createServer as createH2cServer } from 'node:http2';
import type { AddressInfo } from 'node:net';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { grpcClients, grpcFrame, h2Request, h2Session, https1, startTestProxy, startUpstream, tlsClientOptions, type StartedProxy } from './helpers/harness.js';
import { eventually, requestEvents, sample, sumOf } from './helpers/ops.js';
import { unary } from '../src/demo/grpc-client.js';
import type { ModelServer } from '../src/demo/model-server.js';
import { ProxyMetrics } from '../src/metrics.js';
import { aggregatedMetrics, monotonicPart, sumMonotonic, type MetricsJson } from '../src/metrics-aggregate.js';
import type { AccessRecord } from '../src/observer.js';
import { grpcRoute, restRoute, OTHER_ROUTE } from '../src/metric-routes.js';
import { combineObservers, NOOP_OBSERVER } from '../src/observer.js';
import { loadTlsMaterialSync, validTo } from '../src/tls-material.js';
import { createCa, createCrl, issueServerCert } from '../src/x509.js';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { request as httpsRequest } from 'node:https';
import type { IncomingMessage } from 'node:http';
import { GateBoard } from './helpers/sse.js';
import { openRaw, readToClose } from './helpers/raw-http1.js';
import { scriptedUpstream } from './helpers/scripted-upstream.js';

let pki: TestPki;
let upstream: ModelServer;
let front: StartedProxy;
let metrics: ProxyMetrics;
let requests: ReturnType<typeof requestEvents>;

before(async () => {
  pki = await createTestPki();
  upstream = await startUpstream();
  metrics = new ProxyMetrics();
  requests = requestEvents();
  front = await startTestProxy({
    pki,
    upstream,
    observer: combineObservers(metrics, requests.observer),
  });
});

let frontStopped = false;

after(async () => {
  if (!frontStopped) await front.proxy.shutdown(1000);
  await upstream.close();
  await pki.cleanup();
});

/** Opens a TLS connection with `client` and resolves once the proxy has closed it. */
async function refusedConnection(port: number, client: TestPki['client']): Promise<void> {
  const socket = tlsConnect({ host: '127.0.0.1', port, ...tlsClientOptions(pki, client) });
  socket.on('error', () => {});
  // Read the refusal's answer: a paused socket would never see the close behind it.
  socket.resume();
  await once(socket, 'close');
}

/** The body of a whole HTTP/1.1 response as read off the wire, its chunked framing taken off. */
function responseBody(response: string): string {
  const headEnd = response.indexOf('\r\n\r\n');
  const rest = response.slice(headEnd + 4);
  if (!/^transfer-encoding: chunked$/im.test(response.slice(0, headEnd))) return rest;
  let body = '';
  for (let at = 0; ;) {
    const sizeEnd = rest.indexOf('\r\n', at);
    const size = parseInt(rest.slice(at, sizeEnd), 16);
    if (!size) return body;
    body += rest.slice(sizeEnd + 2, sizeEnd + 2 + size);
    at = sizeEnd + 2 + size + 2;
  }
}

describe('metrics from real traffic', () => {
  test('a gRPC call counts one request with its method path, HTTP status and grpc-status', async () => {
    const clients = grpcClients(front.grpcAddress, pki);
    try {
      const seen = requests.next();
      await unary(clients.kserve, 'ServerReady', {});
      await seen;
    } finally {
      clients.close();
    }
    const text = await metrics.text();
    const labels = { listener: 'grpc', method: 'POST', route: '/inference.GRPCInferenceService/ServerReady', status: '200', grpc_status: '0' };
    assert.equal(sample(text, 'ovms_mtls_requests_total', labels), 1);
    assert.equal(sample(text, 'ovms_mtls_request_duration_seconds_count', { listener: 'grpc', route: labels.route }), 1);
    assert.ok(sample(text, 'ovms_mtls_sent_bytes_total', { listener: 'grpc' })! > 0);
    assert.ok(sample(text, 'ovms_mtls_handshakes_total', { listener: 'grpc', result: 'accepted' })! >= 1);
  });

  test('an HTTP/1.1 request on the gRPC port is counted with its own method and the 426 it got', async () => {
    const seen = requests.next();
    assert.equal((await https1(front.grpcPort, pki, { path: '/v2/health/ready' })).status, 426);
    await seen;
    const text = await metrics.text();
    assert.equal(sample(text, 'ovms_mtls_requests_total', { listener: 'grpc', method: 'GET', route: '{other}', status: '426' }), 1);
    assert.equal(sample(text, 'ovms_mtls_requests_total', { listener: 'grpc', method: 'POST', status: '426' }), undefined);
  });

  test('a REST call is counted under its normalised route, not the model name', async () => {
    const seen = requests.next();
    const res = await https1(front.restPort, pki, { path: '/v2/models/dummy/ready' });
    assert.equal(res.status, 200);
    await seen;
    const text = await metrics.text();
    assert.equal(sample(text, 'ovms_mtls_requests_total', { listener: 'rest', method: 'GET', route: '/v2/models/{model}/ready', status: '200' }), 1);
    assert.doesNotMatch(text, /route="\/v2\/models\/dummy/);
  });

  test('a refused client certificate increments the handshake counter for its reason', async () => {
    const before = sample(await metrics.text(), 'ovms_mtls_handshakes_total', { listener: 'rest', result: 'refused', reason: 'unknown_ca' }) ?? 0;
    await refusedConnection(front.restPort, pki.foreignClient);
    await refusedConnection(front.restPort, pki.revokedClient);
    const text = await metrics.text();
    assert.equal(sample(text, 'ovms_mtls_handshakes_total', { listener: 'rest', result: 'refused', reason: 'unknown_ca' }), before + 1);
    assert.equal(sample(text, 'ovms_mtls_handshakes_total', { listener: 'rest', result: 'refused', reason: 'revoked' }), 1);
  });

  test('an upstream that is down shows up as upstream errors and a 5xx request', async () => {
    const closed = await startUpstream();
    const restPort = closed.restPort!;
    await closed.close();
    const m = new ProxyMetrics({ processMetrics: false });
    const events = requestEvents();
    const broken = await startTestProxy({ pki, upstream: { restPort }, observer: combineObservers(m, events.observer) });
    try {
      const seen = events.next();
      const res = await https1(broken.restPort, pki, { path: '/v2/health/ready' });
      assert.ok(res.status >= 500);
      await seen;
      const text = await m.text();
      assert.ok(sample(text, 'ovms_mtls_upstream_errors_total', { listener: 'rest' })! >= 1);
      assert.equal(sample(text, 'ovms_mtls_requests_total', { listener: 'rest', route: '/v2/health/ready', status: String(res.status) }), 1);
    } finally {
      await broken.proxy.shutdown(1000);
    }
  });

  test("the proxy's own REST answers count their body in sent bytes, in both REST modes: 503 while the model server is not ready, 502 when it is down", async () => {
    const closed = await startUpstream({ grpcPort: null });
    const downPort = closed.restPort!;
    await closed.close();
    for (const restMode of ['terminate', 'relay'] as const) {
      for (const [why, setup] of [['not ready', { upstream: { restPort: upstream.restPort! }, notReady: { rest: () => 'the model server is loading its models' } }], ['down', { upstream: { restPort: downPort } }]] as const) {
        const m = new ProxyMetrics({ processMetrics: false });
        const events = requestEvents();
        const local = await startTestProxy({ pki, restMode, ...setup, observer: combineObservers(m, events.observer) });
        try {
          const seen = events.next();
          const res = await https1(local.restPort, pki, { path: '/v2/health/ready' });
          await seen;
          assert.ok(res.status === 503 || res.status === 502, `${restMode}, ${why}: ${res.status}`);
          assert.equal(sample(await m.text(), 'ovms_mtls_sent_bytes_total', { listener: 'rest' }), Buffer.byteLength(res.body), `${restMode}, model server ${why}: the ${res.status} body the client got`);
        } finally {
          await local.proxy.shutdown(1000);
        }
      }
    }
  });

  test("the proxy's own answers to a malformed head (400) and a stalled body (408) count their body in sent bytes, in both REST modes", async () => {
    const requestsFor = {
      'malformed head': 'GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n',
      'stalled body': 'POST /v2/models/dummy/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{',
    };
    for (const restMode of ['terminate', 'relay'] as const) {
      for (const [what, request] of Object.entries(requestsFor)) {
        const m = new ProxyMetrics({ processMetrics: false });
        const events = requestEvents();
        const local = await startTestProxy({ pki, restMode, upstream: { restPort: upstream.restPort! }, limits: { idleTimeoutMs: 300 }, observer: combineObservers(m, events.observer) });
        try {
          const seen = events.next();
          const socket = await openRaw(local.restPort, pki);
          socket.write(request);
          const answer = await readToClose(socket);
          await seen;
          const body = responseBody(answer);
          assert.match(answer, /^HTTP\/1\.1 40[08] /, `${restMode}, ${what}`);
          assert.equal(sample(await m.text(), 'ovms_mtls_sent_bytes_total', { listener: 'rest' }), Buffer.byteLength(body), `${restMode}, ${what}: the body the client got`);
        } finally {
          await local.proxy.shutdown(1000);
        }
      }
    }
  });

  test('a request whose chunked body is malformed is one request, answered 400 with bad_request_body, in both REST modes', async () => {
    for (const restMode of ['terminate', 'relay'] as const) {
      const m = new ProxyMetrics({ processMetrics: false });
      const records: AccessRecord[] = [];
      const local = await startTestProxy({ pki, restMode, upstream: { restPort: upstream.restPort! }, observer: combineObservers(m, { ...NOOP_OBSERVER, request: (r) => records.push(r) }) });
      try {
        const socket = await openRaw(local.restPort, pki);
        socket.write('POST /v2/models/dummy/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n');
        const answer = await readToClose(socket);
        assert.match(answer, /^HTTP\/1\.1 400 /, restMode);
        // Every line of the connection is in once the proxy has stopped.
        await local.proxy.shutdown(1000);
        assert.deepEqual(records.map((r) => [r.method, r.path, r.status, r.error]), [['POST', '/v2/models/dummy/infer', 400, 'bad_request_body']], restMode);
        const text = await m.text();
        assert.equal(sumOf(text, 'ovms_mtls_requests_total'), 1, restMode);
        assert.equal(sample(text, 'ovms_mtls_sent_bytes_total', { listener: 'rest' }), Buffer.byteLength(responseBody(answer)), restMode);
      } finally {
        await local.proxy.shutdown(1000);
      }
    }
  });

  test('open connection gauges go back to zero once clients disconnect', async () => {
    // Every client above used a fresh connection and has closed it; wait for the proxy to notice.
    frontStopped = true;
    await front.proxy.shutdown(1000);
    const text = await metrics.text();
    assert.equal(sample(text, 'ovms_mtls_open_connections', { listener: 'rest' }), 0);
    assert.equal(sample(text, 'ovms_mtls_open_connections', { listener: 'grpc' }), 0);
    assert.equal(sample(text, 'ovms_mtls_open_streams', { listener: 'grpc' }), 0);
    assert.ok(sample(text, 'ovms_mtls_connections_total', { listener: 'rest' })! >= 1);
  });
});

describe('upstream errors', () => {
  test('a model server that resets in the middle of a response counts one upstream error, in both REST modes, for HTTP/1.1 and HTTP/2 clients', async () => {
    // The head and a first event of a stream, then a reset: an LLM answer cut by a crash.
    const upstream = await scriptedUpstream((socket) => {
      socket.write('HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n');
      setTimeout(() => socket.resetAndDestroy(), 50);
    });
    try {
      for (const restMode of ['terminate', 'relay'] as const) {
        const m = new ProxyMetrics({ processMetrics: false });
        const events = requestEvents();
        const local = await startTestProxy({ pki, restMode, upstream: { restPort: upstream.port }, observer: combineObservers(m, events.observer) });
        try {
          let seen = events.next();
          const socket = await openRaw(local.restPort, pki);
          socket.write('POST /v3/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}');
          assert.match(await readToClose(socket), /hello\r\n$/, `${restMode}: the answer was cut after its first chunk`);
          await seen;
          assert.equal(sumOf(await m.text(), 'ovms_mtls_upstream_errors_total'), 1, `${restMode}, HTTP/1.1`);
          seen = events.next();
          const session = h2Session(local.restPort, pki);
          const stream = session.request({ ':method': 'POST', ':path': '/v3/chat/completions' });
          // Not once(stream, 'close'): it rejects on the 'error' a cut stream emits first.
          const closed = new Promise((resolve) => stream.once('close', resolve));
          stream.on('error', () => {});
          stream.resume();
          stream.end('{}');
          await closed;
          session.close();
          assert.equal(stream.rstCode, 2, `${restMode}: the HTTP/2 answer was cut (INTERNAL_ERROR)`);
          await seen;
          const text = await m.text();
          assert.equal(sample(text, 'ovms_mtls_requests_total', { listener: 'rest', status: '200' }), 2);
          assert.equal(sumOf(text, 'ovms_mtls_upstream_errors_total'), 2, `${restMode}, HTTP/2`);
        } finally {
          await local.proxy.shutdown(1000);
        }
      }
    } finally {
      upstream.close();
    }
  });
});

describe('open streams', () => {
  test('an HTTP/1.1 request in flight counts as an open stream until its response ends', async () => {
    const board = new GateBoard();
    const sse = await startUpstream({ sseGate: (i) => board.wait(i) });
    const m = new ProxyMetrics({ processMetrics: false });
    const local = await startTestProxy({ pki, upstream: { restPort: sse.restPort! }, observer: m });
    try {
      const req = httpsRequest({ host: '127.0.0.1', port: local.restPort, method: 'POST', path: '/v3/chat/completions', agent: false, ...tlsClientOptions(pki) });
      req.end(JSON.stringify({ stream: true }));
      const [res] = (await once(req, 'response')) as [IncomingMessage];
      assert.equal(sample(await m.text(), 'ovms_mtls_open_streams', { listener: 'rest' }), 1);
      board.openAll();
      for await (const _chunk of res) { /* drain to the end */ }
      await local.proxy.shutdown(1000);
      assert.equal(sample(await m.text(), 'ovms_mtls_open_streams', { listener: 'rest' }), 0);
    } finally {
      board.openAll();
      await local.proxy.shutdown(1000);
      await sse.close();
    }
  });
});

describe('metrics the data path does not see', () => {
  test('certificate expiry gauges hold the notAfter of the server certificate and each client CA', async () => {
    const m = new ProxyMetrics({ processMetrics: false });
    const material = loadTlsMaterialSync({ cert: pki.paths['server.pem']!, key: pki.paths['server.key']!, clientCa: pki.paths['client_cert_ca.pem']!, crl: pki.paths['client_cert_ca.crl'] });
    m.setCertificates(material);
    const text = await m.text();
    const expected = Math.floor(validTo(material.serverCert).getTime() / 1000);
    assert.equal(sample(text, 'ovms_mtls_certificate_expiry_timestamp_seconds', { role: 'server', subject: 'localhost' }), expected);
    assert.equal(sample(text, 'ovms_mtls_certificate_expiry_timestamp_seconds', { role: 'client_ca', subject: 'ovms-mtls test client CA' }), Math.floor(validTo(material.clientCas[0]!).getTime() / 1000));
    assert.ok(sample(text, 'ovms_mtls_crl_next_update_timestamp_seconds', { crl: '1' })! > Date.now() / 1000);
  });

  test('the expiry gauge holds the notAfter of a CA sent with the server certificate, as role server_chain', async () => {
    const intermediate = await createCa({ commonName: 'ovms-mtls test metrics server intermediate', issuer: pki.serverCa, days: 3 });
    const leaf = await issueServerCert({ issuer: intermediate, commonName: 'localhost', dns: ['localhost'], days: 1 });
    const [cert, key] = [join(pki.dir, 'metrics-chain.pem'), join(pki.dir, 'metrics-chain.key')];
    await Promise.all([writeFile(cert, leaf.certPem + intermediate.certPem), writeFile(key, leaf.keyPem, { mode: 0o600 })]);
    const m = new ProxyMetrics({ processMetrics: false });
    const material = loadTlsMaterialSync({ cert, key, clientCa: pki.paths['client_cert_ca.pem']! });
    m.setCertificates(material);
    const gauge = sample(await m.text(), 'ovms_mtls_certificate_expiry_timestamp_seconds', { role: 'server_chain', subject: 'ovms-mtls test metrics server intermediate' });
    assert.equal(gauge, Math.floor(validTo(material.serverChain[1]!).getTime() / 1000));
  });

  test('the CRL gauge follows the CRL loaded last', async () => {
    const nextUpdate = new Date(Date.now() + 3 * 24 * 3600 * 1000);
    const path = join(pki.dir, 'metrics-test.crl');
    await writeFile(path, await createCrl({ issuer: pki.clientCa, nextUpdate }));
    const m = new ProxyMetrics({ processMetrics: false });
    m.setCertificates(loadTlsMaterialSync({ cert: pki.paths['server.pem']!, key: pki.paths['server.key']!, clientCa: pki.paths['client_cert_ca.pem']!, crl: path }));
    assert.equal(sample(await m.text(), 'ovms_mtls_crl_next_update_timestamp_seconds', { crl: '1' }), Math.floor(nextUpdate.getTime() / 1000));
  });

  test('reloads, reload failures, OVMS up and restarts are counted', async () => {
    const m = new ProxyMetrics({ processMetrics: false });
    assert.equal(sample(await m.text(), 'ovms_mtls_tls_reloads_total', { result: 'failure' }), 0);
    assert.equal(sample(await m.text(), 'ovms_mtls_tls_reload_failing'), 0);
    m.reloaded({ ok: true });
    m.reloaded({ ok: false });
    m.reloaded({ ok: false });
    assert.equal(sample(await m.text(), 'ovms_mtls_tls_reload_failing'), 1);
    // The files put back as the set in use: nothing counted, the failure is over.
    m.reloaded({ ok: true, changed: false });
    m.setOvmsUp(true);
    m.ovmsRestarted();
    const text = await m.text();
    assert.equal(sample(text, 'ovms_mtls_tls_reload_failing'), 0);
    assert.equal(sample(text, 'ovms_mtls_tls_reloads_total', { result: 'success' }), 1);
    assert.equal(sample(text, 'ovms_mtls_tls_reloads_total', { result: 'failure' }), 2);
    assert.equal(sample(text, 'ovms_mtls_ovms_up'), 1);
    assert.equal(sample(text, 'ovms_mtls_ovms_restarts_total'), 1);
  });

  test('two registries in one process keep their numbers apart', async () => {
    const a = new ProxyMetrics();
    const b = new ProxyMetrics();
    a.ovmsRestarted();
    assert.equal(sample(await a.text(), 'ovms_mtls_ovms_restarts_total'), 1);
    assert.equal(sample(await b.text(), 'ovms_mtls_ovms_restarts_total'), 0);
    assert.ok(sample(await b.text(), 'ovms_mtls_process_cpu_seconds_total') !== undefined);
  });

  test('a scrape with no event-loop sample since the one before serves the delays of the last window that had some, not a minimum of 292 years and a mean of NaN', async () => {
    const metrics = new ProxyMetrics();
    const delays = (text: string) => Object.fromEntries(['min', 'max', 'mean', 'stddev', 'p50', 'p90', 'p99'].map((s) => [s, sample(text, `ovms_mtls_nodejs_eventloop_lag_${s}_seconds`)!]));
    await eventually(async () => delays(await metrics.text()).max! > 0, 'a window with event-loop samples');
    // Both renderings read the delays in the same turn of the event loop: no sample can come between them.
    const [first, second] = (await Promise.all([metrics.text(), metrics.text()])).map(delays);
    for (const [statistic, seconds] of Object.entries(second!)) assert.ok(Number.isFinite(seconds), `${statistic} is ${seconds}`);
    assert.ok(second!.min! <= second!.max!, `min ${second!.min} above max ${second!.max}`);
    assert.deepEqual(second, first);
  });
});

describe('metrics merged from several workers', () => {
  /** A worker's registry after it has served one REST request that took `durationMs`. */
  async function workerAfterOneRequest(durationMs: number): Promise<MetricsJson> {
    const worker = new ProxyMetrics({ processMetrics: false });
    const record: AccessRecord = { listener: 'rest', remote: '127.0.0.1', subject: 'client', serial: '01', protocol: 'http/1.1', method: 'GET', path: '/v2/health/ready', status: 200, bytesIn: 0, bytesOut: 0, durationMs };
    worker.request(record);
    return worker.registry.getMetricsAsJSON();
  }

  test('a worker that exits does not make a seconds total fall: the same durations added in another order round to a smaller float, which Prometheus reads as a counter reset', async () => {
    const primary = new ProxyMetrics({ processMetrics: false });
    const [first, second, third] = await Promise.all([100, 200, 300].map(workerAfterOneRequest));
    const replacement = await new ProxyMetrics({ processMetrics: false }).registry.getMetricsAsJSON();
    // As WorkerPool.collectMetrics() hands them over: the live workers, then the counts of those that exited.
    let workers: MetricsJson[] = [first!, second!, third!, []];
    const served = aggregatedMetrics(primary.registry, async () => workers);
    const labels = { listener: 'rest', route: '/v2/health/ready' };
    const before = await served.text();
    workers = [second!, third!, replacement, sumMonotonic([], monotonicPart(first!))];
    const after = await served.text();
    assert.equal(sample(after, 'ovms_mtls_request_duration_seconds_count', labels), 3);
    const [was, now] = [before, after].map((text) => sample(text, 'ovms_mtls_request_duration_seconds_sum', labels)!);
    assert.ok(now! >= was!, `the seconds total fell from ${was} to ${now}`);
  });

  test('event-loop delay percentiles with workers are the highest process\'s: one stalled worker is not averaged away with the idle primary', async () => {
    const primary = new ProxyMetrics();
    const stalled = (await new ProxyMetrics().registry.getMetricsAsJSON()).map((metric) =>
      /_eventloop_lag_p(50|90|99)_seconds$/.test(metric.name) ? { ...metric, values: [{ value: 0.5, labels: {} }] } : metric);
    const text = await aggregatedMetrics(primary.registry, async () => [stalled, []]).text();
    // Averaged with the primary's own (well under 0.5 s), each read about half of it.
    for (const p of [50, 90, 99]) assert.equal(sample(text, `ovms_mtls_nodejs_eventloop_lag_p${p}_seconds`), 0.5, `p${p}`);
  });

  test('open files with workers: process_max_fds is the per-process limit (ulimit -n), not a sum, and process_open_fds the fullest process, so their ratio warns before a worker reaches its limit', async () => {
    const limit = Number(/^Max open files\s+(\d+)/m.exec(await readFile('/proc/self/limits', 'utf8'))![1]);
    const primary = new ProxyMetrics();
    // Three workers, each holding as many descriptors as this process: the registries read /proc/self.
    const worker = await new ProxyMetrics().registry.getMetricsAsJSON();
    const held = worker.find((m) => m.name === 'ovms_mtls_process_open_fds')!.values[0]!.value;
    const text = await aggregatedMetrics(primary.registry, async () => [worker, worker, worker, []]).text();
    assert.equal(sample(text, 'ovms_mtls_process_max_fds'), limit);
    const open = sample(text, 'ovms_mtls_process_open_fds')!;
    // One process's count, give or take what this one opened meanwhile; summed, it was about four times as many.
    assert.ok(open >= held && open < 2 * held, `process_open_fds ${open} with ${held} in each worker`);
  });
});

describe('route labels stay bounded', () => {
  const cases: [string, string][] = [
    ['/v2/models/resnet/versions/3/infer?x=1', '/v2/models/{model}/versions/{version}/infer'],
    ['/v2/models/face-detection/infer', '/v2/models/{model}/infer'],
    ['/v2/models/dummy', '/v2/models/{model}'],
    ['/v2/health/ready', '/v2/health/ready'],
    ['/v3/chat/completions', '/v3/chat/completions'],
    ['/v3/v1/embeddings', '/v3/v1/embeddings'],
    ['/v1/models/resnet:predict', '/v1/models/{model}:predict'],
    ['/v1/config/reload', '/v1/config/reload'],
    // Absolute-form, which both REST modes forward to its path (RFC 9112 3.2.2).
    ['http://localhost:9000/v2/models/resnet/versions/3/infer?x=1', '/v2/models/{model}/versions/{version}/infer'],
    ['HTTPS://ovms/v2/health/ready', '/v2/health/ready'],
    ['/etc/passwd', OTHER_ROUTE],
    ['/v2/models/a/b/c/d', OTHER_ROUTE],
  ];
  for (const [path, route] of cases) {
    test(`REST ${path} is labelled ${route}`, () => assert.equal(restRoute(path), route));
  }

  test('gRPC methods of known services keep their path and anything else is {other}', () => {
    assert.equal(grpcRoute('/inference.GRPCInferenceService/ModelInfer'), '/inference.GRPCInferenceService/ModelInfer');
    assert.equal(grpcRoute('/tensorflow.serving.PredictionService/Predict'), '/tensorflow.serving.PredictionService/Predict');
    assert.equal(grpcRoute('/random.Service/Method'), OTHER_ROUTE);
    assert.equal(grpcRoute('/inference.GRPCInferenceService/../x'), OTHER_ROUTE);
  });

  test('a gRPC client calling made-up methods of a known service over real TLS adds one {other} series, not one per name', async () => {
    const pki = await createTestPki();
    const upstream = await startUpstream();
    const metrics = new ProxyMetrics({ processMetrics: false });
    const { proxy, grpcPort } = await startTestProxy({ pki, upstream: { grpcPort: upstream.grpcPort }, observer: metrics });
    const session = h2Session(grpcPort, pki);
    try {
      for (const name of ['JunkA', 'JunkB', 'JunkC']) {
        const res = await h2Request(session, { ':method': 'POST', ':path': `/inference.GRPCInferenceService/${name}`, 'content-type': 'application/grpc', te: 'trailers' }, grpcFrame(Buffer.alloc(0)));
        assert.equal(res.headers['grpc-status'] ?? res.trailers?.['grpc-status'], '12', 'the model server does not know the method');
      }
      await eventually(async () => sample(await metrics.text(), 'ovms_mtls_requests_total', { route: OTHER_ROUTE }) === 3, 'three calls counted');
      const routes = (await metrics.text()).split('\n').filter((l) => l.startsWith('ovms_mtls_requests_total{')).map((l) => /route="([^"]*)"/.exec(l)![1]);
      assert.deepEqual(routes, [OTHER_ROUTE]);
    } finally {
      session.close();
      await proxy.shutdown(1000);
      await upstream.close();
      await pki.cleanup();
    }
  });

  test('a model server answering with grpc-status values outside gRPC\'s codes adds one series for them, not one per value', async () => {
    const pki = await createTestPki();
    // A bare h2c server, as no gRPC library would send such a status: bogus-0, bogus-1, ... then 16 and 3.
    const statuses = ['bogus-0', 'bogus-1', 'bogus-2', '17', '16', '3'];
    let answered = 0;
    const upstream = createH2cServer();
    upstream.on('stream', (stream) => {
      stream.on('error', () => {});
      stream.resume();
      stream.respond({ ':status': 200, 'content-type': 'application/grpc', 'grpc-status': statuses[answered++]! }, { endStream: true });
    });
    upstream.listen(0, '127.0.0.1');
    await once(upstream, 'listening');
    const metrics = new ProxyMetrics({ processMetrics: false });
    const { proxy, grpcPort } = await startTestProxy({ pki, upstream: { grpcPort: (upstream.address() as AddressInfo).port }, observer: metrics });
    const session = h2Session(grpcPort, pki);
    try {
      for (let i = 0; i < statuses.length; i++) {
        await h2Request(session, { ':method': 'POST', ':path': '/inference.GRPCInferenceService/ModelInfer', 'content-type': 'application/grpc', te: 'trailers' }, grpcFrame(Buffer.alloc(0)));
      }
      await eventually(async () => sumOf(await metrics.text(), 'ovms_mtls_requests_total') === statuses.length, 'every call counted');
      const labels = (await metrics.text()).split('\n').filter((l) => l.startsWith('ovms_mtls_requests_total{')).map((l) => /grpc_status="([^"]*)"/.exec(l)![1]);
      assert.deepEqual(labels.sort(), ['16', '3', 'other']);
      assert.equal(sample(await metrics.text(), 'ovms_mtls_requests_total', { grpc_status: 'other' }), 4);
    } finally {
      session.close();
      await proxy.shutdown(1000);
      upstream.close();
      await pki.cleanup();
    }
  });
});
