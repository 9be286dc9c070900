/**
 * Real C-core gRPC (Debian's python3-grpcio, the stack of OVMS itself and of most Python
 * and C++ clients) on both sides of the proxy, in both gRPC modes. grpc-js alone would not
 * catch what only C-core checks: it refuses a call without `te: trailers`, it sends its
 * chain and metadata its own way, and it retries a call refused by a bare GOAWAY until its
 * deadline (which is why a refused client's calls get an answer).
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { once } from 'node:events';
import { connect as connectH2 } from 'node:http2';
import { promisify } from 'node:util';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { startTestProxy, type LogLine, type StartedProxy } from './helpers/harness.js';
import { eventually } from './helpers/ops.js';
import { GRPCIO_SCRIPT, PYTHON, pythonStubs, startGrpcioServer, type GrpcioServer, type PythonStubs } from './helpers/grpcio.js';

const SERVICE = '/inference.GRPCInferenceService';
const XFCC_OF_CLIENT = /^Hash=[0-9a-f]{64};Subject="CN=client,OU=tests";URI=spiffe:\/\/test.local\/client$/;

/** 2.9 MB of zeros, gzipped, is ~3 KB: anything near the raw size means a side decompressed it. */
const COMPRESSED_MAX = 100_000;

const run = promisify(execFile);

let pki: TestPki;
let stubs: PythonStubs;
let upstream: GrpcioServer;
const fronts: Partial<Record<'terminate' | 'relay', StartedProxy>> = {};

type Result = Record<string, unknown> & { code: string };

/** Runs the grpcio client with a certificate of the test PKI by base name (`null`: none), one JSON result per case. */
async function grpcioClient(port: number, cert: string | null, cases: string[]): Promise<Record<string, Result>> {
  return (await grpcioClientRun(port, cert, cases)).results;
}

/** The same, with what C-core logged (errors only, as by default). */
async function grpcioClientRun(port: number, cert: string | null, cases: string[]): Promise<{ results: Record<string, Result>; stderr: string }> {
  const identity = cert ? [pki.paths[`${cert}.pem`]!, pki.paths[`${cert}.key`]!] : [];
  const { stdout, stderr } = await run(PYTHON, [GRPCIO_SCRIPT, 'client', `127.0.0.1:${port}`, pki.paths['server_ca.pem']!, ...identity, cases.join(',')],
    { env: { ...stubs.env(), GRPC_VERBOSITY: 'ERROR' }, timeout: 120_000 });
  return { results: JSON.parse(stdout) as Record<string, Result>, stderr };
}

/** A bare HTTP/2 gRPC call straight to the grpcio server: its grpc-status, or the stream error. */
async function directCallStatus(headers: Record<string, string>): Promise<string> {
  const session = connectH2(`http://127.0.0.1:${upstream.port}`);
  try {
    const stream = session.request({ ':method': 'POST', ':path': `${SERVICE}/ServerLive`, 'content-type': 'application/grpc', ...headers });
    let status = 'none';
    stream.on('response', (h) => { status = String(h['grpc-status'] ?? status); });
    stream.on('trailers', (h) => { status = String(h['grpc-status'] ?? status); });
    stream.resume();
    stream.end(Buffer.alloc(5));
    await once(stream, 'close');
    return status;
  } finally {
    session.close();
  }
}

before(async () => {
  pki = await createTestPki();
  stubs = await pythonStubs();
  upstream = await startGrpcioServer(stubs);
  // The chain CRL file: a client that sends its intermediate needs the intermediate's CRL too.
  const tls = { crl: pki.paths['client_cert_ca_chain.crl']! };
  for (const mode of ['terminate', 'relay'] as const) {
    fronts[mode] = await startTestProxy({ pki, tls, upstream: { grpcPort: upstream.port }, grpcMode: mode });
  }
});

after(async () => {
  for (const front of Object.values(fronts)) await front.proxy.shutdown(1000);
  await upstream.stop();
  await stubs.cleanup();
  await pki.cleanup();
});

describe('grpcio (C-core) clients and server through the proxy', () => {
  test('the grpcio stand-in refuses a call without te: trailers, as OVMS does', async () => {
    assert.equal(await directCallStatus({ te: 'trailers' }), '0');
    assert.equal(await directCallStatus({}), '2');
  });

  for (const mode of ['terminate', 'relay'] as const) {
    describe(`${mode} mode`, () => {
      test('unary infer with text and -bin metadata, NOT_FOUND with its details and -bin trailer, a 2.9 MB request, a bidi stream, a deadline', async () => {
        const front = fronts[mode]!;
        const leftBefore = upstream.clientsLeft();
        const results = await grpcioClient(front.grpcPort, 'client', ['live', 'infer', 'not_found', 'large', 'stream', 'deadline']);
        assert.deepEqual(results.live, { code: 'OK', live: true });

        const infer = results.infer!;
        assert.equal(infer.code, 'OK');
        assert.deepEqual(infer.fp32, [2, 3, 4]);
        assert.equal(infer.raw, `base64:${Buffer.from(Array.from({ length: 256 }, (_, i) => i)).toString('base64')}`);
        assert.equal((infer.initial as Record<string, string>)['x-echo-request-id'], 'req-7');
        assert.deepEqual(infer.trailing, { 'x-echo-trace-bin': 'base64:AAH+/w==' });
        // Terminate mode names the client to the model server; the relay passes frames as they are.
        if (mode === 'terminate') assert.match(String(infer.xfcc), XFCC_OF_CLIENT);
        else assert.equal(infer.xfcc, '');

        const notFound = results.not_found!;
        assert.equal(notFound.code, 'NOT_FOUND');
        assert.equal(notFound.details, 'Model with requested name is not found');
        assert.equal((notFound.trailing as Record<string, string>)['x-detail-bin'], `base64:${Buffer.from('\x00\xffnot-found', 'latin1').toString('base64')}`);

        assert.deepEqual(results.large, { code: 'OK', received_bytes: 2_900_000 });
        assert.deepEqual(results.stream, { code: 'OK', ids: ['s0', 's1', 's2'] });
        assert.equal(results.deadline!.code, 'DEADLINE_EXCEEDED');
        // The expired call ended at the model server as well, not only at the client.
        await eventually(() => upstream.clientsLeft() > leftBefore, `the grpcio server to see the ${mode} call end at its deadline`);
        const access = front.logs.lines.filter((l) => l.event === (mode === 'terminate' ? 'access' : 'relay_access'));
        assert.ok(access.some((l) => l.subject === 'CN=client,OU=tests'), 'an access line names the grpcio client');
      });

      test('gzip-compressed messages each way (the call\'s compression, the server\'s for its reply) pass as they are: 2.9 MB of zeros crosses as a few KB', { timeout: 180_000 }, async () => {
        const front = fronts[mode]!;
        const before = front.logs.lines.length;
        const results = await grpcioClient(front.grpcPort, 'client', ['gzip']);
        assert.deepEqual(results.gzip, { code: 'OK', received_bytes: 2_900_000, returned_bytes: 2_900_000 });
        // Counted as they crossed the proxy: still compressed, so neither side's messages were opened or rewritten.
        // Not the line of the last test's last call (its deadline's), written as it ended: an OK call, a connection of one call.
        const ours = (l: LogLine) => mode === 'terminate' ? l.event === 'access' && l.path === `${SERVICE}/ModelInfer` && l.grpcStatus === '0' : l.event === 'relay_access' && l.calls === 1;
        const line = await front.logs.waitFor(ours, before);
        assert.ok(Number(line.bytesIn) < COMPRESSED_MAX && Number(line.bytesOut) < COMPRESSED_MAX, `bytes in ${line.bytesIn}, out ${line.bytesOut}: the messages crossed uncompressed`);
      });

      test('a grpcio client that sends its leaf and intermediate is served', async () => {
        const results = await grpcioClient(fronts[mode]!.grpcPort, 'chained_client', ['live']);
        assert.deepEqual(results.live, { code: 'OK', live: true });
      });

      for (const [cert, reason] of [[null, 'no_certificate'], ['foreign_client', 'unknown_ca'], ['revoked_client', 'revoked'], ['expired_client', 'expired']] as const) {
        test(`a grpcio client with ${cert ?? 'no certificate'} gets UNAUTHENTICATED naming ${reason}, as the proxy's log does`, async () => {
          const front = fronts[mode]!;
          const before = front.logs.lines.length;
          const results = await grpcioClient(front.grpcPort, cert, ['live']);
          assert.equal(results.live!.code, 'UNAUTHENTICATED');
          assert.match(String(results.live!.details), new RegExp(`^client certificate refused \\(${reason}\\): `));
          await eventually(() => front.logs.lines.slice(before).some((l) => l.event === 'client_refused' && l.reason === reason),
            `a client_refused line with reason ${reason}`);
        });
      }
    });
  }
});

describe('a grpcio (C-core) model server answering with more metadata than the proxy takes, terminate mode', () => {
  test('fails that call alone, RESOURCE_EXHAUSTED naming the limit: another client\'s call held on the shared upstream connection goes on to its own end', async () => {
    const front = fronts.terminate!;
    const heldBefore = upstream.held();
    const held = grpcioClient(front.grpcPort, 'client', ['long_deadline']);
    await eventually(() => upstream.held() > heldBefore, 'the grpcio server to hold the call');
    const { big_metadata: big } = await grpcioClient(front.grpcPort, 'client', ['big_metadata']);
    assert.equal(big!.code, 'RESOURCE_EXHAUSTED');
    assert.match(String(big!.details), /^the call was reset \(ENHANCE_YOUR_CALM\), most likely by this proxy's HTTP\/2 client because upstream \S+ answered with metadata over the 131072 bytes this proxy takes \(twice --mtls_max_header_size\)/);
    // Not UNAVAILABLE: nghttp2 ended the whole connection on a header block of more than 8 CONTINUATION frames.
    assert.equal((await held).long_deadline!.code, 'DEADLINE_EXCEEDED');
  });
});

describe('a grpcio (C-core) model server that polices keepalive PINGs, relay mode', () => {
  // In relay mode the client's PINGs reach the model server (terminate mode answers them in the proxy).
  test('a grpcio client pinging each second with no call open gets the server\'s GOAWAY ENHANCE_YOUR_CALM "too_many_pings" as sent; relay_access carries it and an upstream_goaway warn line says what to change', async () => {
    const strict = await startGrpcioServer(stubs, ['strict-pings']);
    const front = await startTestProxy({ pki, upstream: { grpcPort: strict.port }, grpcMode: 'relay' });
    try {
      const { results, stderr } = await grpcioClientRun(front.grpcPort, 'client', ['keepalive']);
      assert.deepEqual(results.keepalive, { code: 'OK', connection_ended: true });
      // C-core names the code and debug data it read, and doubles its keepalive time on this one.
      assert.match(stderr, /GOAWAY with error code ENHANCE_YOUR_CALM and debug data equal to "too_many_pings"/);
      await eventually(() => front.logs.lines.some((l) => l.event === 'relay_access'), 'the relay_access line');
      const line = front.logs.lines.find((l) => l.event === 'relay_access')!;
      assert.deepEqual([line.subject, line.upstreamGoAway, line.upstreamGoAwayDebug, line.error], ['CN=client,OU=tests', 'ENHANCE_YOUR_CALM', 'too_many_pings', undefined]);
      const warn = front.logs.lines.find((l) => l.event === 'upstream_goaway');
      assert.deepEqual([warn?.level, warn?.listener, warn?.subject, warn?.code, warn?.debug], ['warn', 'grpc', 'CN=client,OU=tests', 'ENHANCE_YOUR_CALM', 'too_many_pings']);
      assert.match(String(warn?.msg), /too_many_pings\): the client sends keepalive PINGs more often than the model server allows/);
    } finally {
      await front.proxy.shutdown(1000);
      await strict.stop();
    }
  });
});
