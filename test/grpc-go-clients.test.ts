/**
 * A real grpc-go client (Debian's golang-google-grpc-dev, built here from
 * test/fixtures/kserve-go-client) through the proxy in both gRPC modes, to the grpcio (C-core)
 * server that stands in for OVMS and to the grpc-js stand-in. grpc-go is a third HTTP/2 and gRPC
 * implementation with its own strictness: it checks the server name against the certificate's
 * SANs only, requires ALPN h2, validates every header and reads Trailers-Only responses itself.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer as createH2cServer } from 'node:http2';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { baseConfig, countingRelay, refusedWording, startTestProxy, startUpstream, type LogLine, type StartedProxy } from './helpers/harness.js';
import { eventually } from './helpers/ops.js';
import { buildKserveGoClient } from './helpers/go-build.js';
import { goAwayOnFirstConnection } from './helpers/scripted-upstream.js';
import { pythonStubs, startGrpcioServer, type GrpcioServer, type PythonStubs } from './helpers/grpcio.js';
import type { ModelServer } from '../src/demo/model-server.js';
import { FAILURE_TRAILER_BIN, failureMessage } from '../src/demo/echo-grpc.js';
import { loadTlsMaterialSync } from '../src/tls-material.js';

const KSERVE = '/inference.GRPCInferenceService';
const ECHO = '/ovmsmtls.test.Echo';
const XFCC_OF_CLIENT = /^Hash=[0-9a-f]{64};Subject="CN=client,OU=tests";URI=spiffe:\/\/test.local\/client$/;
const LARGE_BYTES = 2_900_000;
/** The stand-in's dummy model takes [1, 10] and adds 1. */
const TEN_VALUES = Array.from({ length: 10 }, (_, i) => i);
const BYTES_0_TO_255 = Buffer.from(Array.from({ length: 256 }, (_, i) => i)).toString('base64');

type Mode = 'terminate' | 'relay';

interface GoCall {
  method: string;
  requests: unknown[];
  stream?: boolean;
  metadata?: Record<string, string[]>;
  timeout_ms?: number;
  raw_bytes?: number;
  pause_ms?: number;
  gzip?: boolean;
  parallel?: number;
  /** Stream calls: made once the first reply has come, while the stream is open. */
  during?: GoCall;
  /** Stream calls: read to the end before closing the client's side. */
  keep_open?: boolean;
}

interface GoResult {
  code: string;
  message: string;
  header: Record<string, string[]>;
  trailer: Record<string, string[]>;
  replies: Record<string, unknown>[] | null;
  during?: GoResult;
}

let pki: TestPki;
let workDir: string;
let clientBinary: string;
let descriptors: string;
let stubs: PythonStubs;
let grpcio: GrpcioServer;
let standIn: ModelServer;
const toGrpcio: Partial<Record<Mode, StartedProxy>> = {};
const toStandIn: Partial<Record<Mode, StartedProxy>> = {};
/** In front of a port where nothing listens. */
const toNowhere: Partial<Record<Mode, StartedProxy>> = {};
/** Close connections idle for 300 ms. */
const idleFronts: Partial<Record<Mode, StartedProxy>> = {};

interface ClientOptions {
  /** Base name of a certificate of the test PKI; null: none. */
  cert?: string | null;
  serverName?: string;
}

/** Runs the Go client over TLS to 127.0.0.1:port, one result per call. */
async function goClient(port: number, calls: GoCall[], { cert = 'client', serverName = 'localhost' }: ClientOptions = {}): Promise<GoResult[]> {
  const identity = cert ? ['-cert', pki.paths[`${cert}.pem`]!, '-key', pki.paths[`${cert}.key`]!] : [];
  const args = ['-addr', `127.0.0.1:${port}`, '-ca', pki.paths['server_ca.pem']!, ...identity, '-server-name', serverName, '-descriptors', descriptors];
  // No proxy variables: grpc-go honours HTTPS_PROXY.
  const child = spawn(clientBinary, args, { env: { PATH: process.env.PATH }, timeout: 120_000 });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (chunk: Buffer) => { stdout += chunk.toString(); });
  child.stderr.on('data', (chunk: Buffer) => { stderr += chunk.toString(); });
  child.stdin.end(JSON.stringify(calls));
  const code = await new Promise<number | null>((resolve) => child.once('close', resolve));
  assert.equal(code, 0, `the Go client failed: ${stderr}`);
  return JSON.parse(stdout) as GoResult[];
}

function inferRequest(model: string, extra: Record<string, unknown> = {}, values = [1, 2, 3]): Record<string, unknown> {
  return {
    model_name: model,
    inputs: [{ name: 'b', datatype: 'FP32', shape: ['1', String(values.length)], contents: { fp32_contents: values } }],
    ...extra,
  };
}

const live: GoCall = { method: `${KSERVE}/ServerLive`, requests: [{}] };

function onlyReply(result: GoResult): Record<string, unknown> {
  assert.equal(result.code, 'OK', `${result.code}: ${result.message}`);
  assert.equal(result.replies?.length, 1);
  return result.replies[0]!;
}

const param = (reply: Record<string, unknown>, name: string) => (reply.parameters as Record<string, Record<string, unknown>>)[name];

/**
 * The discard port, which nothing here serves: connections to it are refused. A port freed
 * by the test could be handed out again by the system to one of the other servers bound after it.
 */
const DISCARD_PORT = 9;

/** Runs a Go call that must be refused; the proxy's client_refused line for it. */
async function refusedGoClient(front: StartedProxy, cert: string | null): Promise<LogLine> {
  const before = front.logs.lines.length;
  const [result] = await goClient(front.grpcPort, [live], { cert });
  const line = await front.logs.waitFor((l) => front.logs.lines.indexOf(l) >= before && l.event === 'client_refused');
  // The call is answered with the reason the log names, not cut.
  assert.equal(result!.code, 'UNAUTHENTICATED', result!.message);
  assert.match(result!.message, refusedWording(String(line.reason)));
  return line;
}

before(async () => {
  pki = await createTestPki();
  workDir = await mkdtemp(join(tmpdir(), 'ovms-mtls-go-'));
  ({ binary: clientBinary, descriptors } = await buildKserveGoClient(workDir));
  stubs = await pythonStubs();
  grpcio = await startGrpcioServer(stubs);
  standIn = await startUpstream();
  // The chain CRL file: a client that sends its intermediate needs the intermediate's CRL too.
  const tls = { crl: pki.paths['client_cert_ca_chain.crl']! };
  for (const mode of ['terminate', 'relay'] as const) {
    toGrpcio[mode] = await startTestProxy({ pki, tls, upstream: { grpcPort: grpcio.port }, grpcMode: mode });
    toStandIn[mode] = await startTestProxy({ pki, tls, upstream: { grpcPort: standIn.grpcPort! }, grpcMode: mode });
    toNowhere[mode] = await startTestProxy({ pki, tls, upstream: { grpcPort: DISCARD_PORT }, grpcMode: mode });
    idleFronts[mode] = await startTestProxy({ pki, tls, upstream: { grpcPort: grpcio.port }, grpcMode: mode, limits: { idleTimeoutMs: 300 } });
  }
});

after(async () => {
  for (const front of [...Object.values(toGrpcio), ...Object.values(toStandIn), ...Object.values(idleFronts), ...Object.values(toNowhere)]) await front.proxy.shutdown(1000);
  await grpcio?.stop();
  await standIn?.close();
  await stubs?.cleanup();
  if (workDir) await rm(workDir, { recursive: true, force: true });
  await pki.cleanup();
});

describe('grpc-go clients through the proxy', () => {
  for (const mode of ['terminate', 'relay'] as const) {
    describe(`${mode} mode`, () => {
      test('to the grpcio server: unary infer with text and -bin metadata, NOT_FOUND with details and -bin trailer, a 2.9 MB request, a bidi stream, a deadline', async () => {
        const front = toGrpcio[mode]!;
        const leftBefore = grpcio.clientsLeft();
        const [liveResult, infer, notFound, large, stream, deadline] = await goClient(front.grpcPort, [
          live,
          {
            method: `${KSERVE}/ModelInfer`,
            requests: [inferRequest('dummy', { id: 'r1', raw_input_contents: [BYTES_0_TO_255], parameters: { echo_raw: { bool_param: true } } })],
            metadata: { 'x-request-id': ['req-7'], 'x-trace-bin': ['AAH+/w=='] },
          },
          { method: `${KSERVE}/ModelInfer`, requests: [inferRequest('missing')] },
          { method: `${KSERVE}/ModelInfer`, requests: [inferRequest('dummy', { parameters: { echo_raw: { bool_param: true } } })], raw_bytes: LARGE_BYTES, timeout_ms: 60_000 },
          { method: `${KSERVE}/ModelStreamInfer`, stream: true, requests: ['s0', 's1', 's2'].map((id) => inferRequest('dummy', { id })) },
          { method: `${KSERVE}/ModelInfer`, requests: [inferRequest('hold', { id: 'held' })], timeout_ms: 1000 },
        ]);
        assert.deepEqual(onlyReply(liveResult!), { live: true });

        const reply = onlyReply(infer!);
        assert.deepEqual((reply.outputs as { contents: { fp32_contents: number[] } }[])[0]!.contents.fp32_contents, [2, 3, 4]);
        assert.deepEqual(reply.raw_output_contents, [BYTES_0_TO_255]);
        assert.deepEqual(infer!.header['x-echo-request-id'], ['req-7']);
        assert.deepEqual(infer!.trailer['x-echo-trace-bin'], ['base64:AAH+/w==']);
        // Terminate mode names the client to the model server; the relay passes frames as they are.
        if (mode === 'terminate') assert.match(String(param(reply, 'xfcc')!.string_param), XFCC_OF_CLIENT);
        else assert.equal(param(reply, 'xfcc')!.string_param, '');

        assert.equal(notFound!.code, 'NOT_FOUND');
        assert.equal(notFound!.message, 'Model with requested name is not found');
        assert.deepEqual(notFound!.trailer['x-detail-bin'], [`base64:${Buffer.from('\x00\xffnot-found', 'latin1').toString('base64')}`]);

        const largeReply = onlyReply(large!);
        assert.equal(param(largeReply, 'received_bytes')!.int64_param, String(LARGE_BYTES));
        assert.equal(Buffer.from((largeReply.raw_output_contents as string[])[0]!, 'base64').length, LARGE_BYTES, 'the 2.9 MB came back');
        assert.equal(stream!.code, 'OK', stream!.message);
        assert.deepEqual(stream!.replies!.map((r) => (r.infer_response as { id: string }).id), ['s0', 's1', 's2']);
        assert.equal(deadline!.code, 'DEADLINE_EXCEEDED');
        // The expired call ended at the model server as well, not only at the client.
        await eventually(() => grpcio.clientsLeft() > leftBefore, `the grpcio server to see the ${mode} call end at its deadline`);
        const access = front.logs.lines.filter((l) => l.event === (mode === 'terminate' ? 'access' : 'relay_access'));
        assert.ok(access.some((l) => l.subject === 'CN=client,OU=tests'), 'an access line names the Go client');
      });

      test('to the grpc-js stand-in: the dummy model, echoed metadata (a repeated -bin key too) and trailers, a failure with a percent-encoded message and -bin trailer, a bidi failure before any reply', async () => {
        const [infer, echo, failed, bidiFailed] = await goClient(toStandIn[mode]!.grpcPort, [
          { method: `${KSERVE}/ModelInfer`, requests: [inferRequest('dummy', { id: 'r2' }, TEN_VALUES)] },
          { method: `${ECHO}/Unary`, requests: [{ payload: 'AAE=', count: 3 }], metadata: { 'x-echo-text': ['a b'], 'x-echo-data-bin': ['AP8=', 'AQ=='] } },
          { method: `${ECHO}/Unary`, requests: [{ fail_with_code: 5 }], metadata: { 'x-echo-text': ['kept'] } },
          { method: `${ECHO}/Bidi`, stream: true, requests: [{ fail_with_code: 9 }] },
        ]);
        const reply = onlyReply(infer!);
        assert.equal(reply.id, 'r2');
        assert.deepEqual((reply.outputs as { contents: { fp32_contents: number[] } }[])[0]!.contents.fp32_contents, TEN_VALUES.map((v) => v + 1));

        assert.deepEqual(onlyReply(echo!), { payload: 'AAE=', count: 3 });
        // A repeated -bin key stays two values (grpc-go sends them as unpadded base64). A repeated
        // text key is not checked here: grpc-js itself joins its values into one.
        assert.deepEqual(echo!.header['x-echo-text'], ['a b']);
        assert.deepEqual(echo!.header['x-echo-data-bin'], ['base64:AP8=', 'base64:AQ==']);
        assert.deepEqual(echo!.trailer['x-trailer-echo'], ['ok']);

        assert.equal(failed!.code, 'NOT_FOUND');
        assert.equal(failed!.message, failureMessage(5));
        assert.deepEqual(failed!.trailer['x-echo-text'], ['kept']);
        assert.deepEqual(failed!.trailer['x-trailer-bin'], [`base64:${FAILURE_TRAILER_BIN.toString('base64')}`]);

        assert.equal(bidiFailed!.code, 'FAILED_PRECONDITION');
        assert.equal(bidiFailed!.message, failureMessage(9));
        assert.deepEqual(bidiFailed!.replies, null);
      });

      test('gzip-compressed requests, and 100 calls at once on one connection', async () => {
        const echoRaw = { id: 'z', raw_input_contents: [BYTES_0_TO_255], parameters: { echo_raw: { bool_param: true } } };
        const [gzipped, gzippedStream, parallel] = await goClient(toGrpcio[mode]!.grpcPort, [
          { method: `${KSERVE}/ModelInfer`, requests: [inferRequest('dummy', echoRaw)], gzip: true },
          { method: `${KSERVE}/ModelStreamInfer`, stream: true, requests: ['g0', 'g1'].map((id) => inferRequest('dummy', { id })), gzip: true },
          { method: `${KSERVE}/ModelInfer`, requests: [inferRequest('dummy', echoRaw)], parallel: 100 },
        ]);
        assert.deepEqual(onlyReply(gzipped!).raw_output_contents, [BYTES_0_TO_255]);
        assert.equal(gzippedStream!.code, 'OK', gzippedStream!.message);
        assert.deepEqual(gzippedStream!.replies!.map((r) => (r.infer_response as { id: string }).id), ['g0', 'g1']);
        assert.deepEqual(onlyReply(parallel!).raw_output_contents, [BYTES_0_TO_255]);
      });

      test('metadata over the model server\'s header list limit fails that call alone: a stream open on the same upstream connection goes on', async () => {
        const oversized = { method: `${KSERVE}/ModelInfer`, requests: [inferRequest('dummy')], metadata: { 'x-big': ['a'.repeat(20_000)] } };
        const [stream, fits, after] = await goClient(toGrpcio[mode]!.grpcPort, [
          { method: `${KSERVE}/ModelStreamInfer`, stream: true, requests: ['s0', 's1'].map((id) => inferRequest('dummy', { id })), during: oversized },
          { ...oversized, metadata: { 'x-big': ['a'.repeat(4000)] } },
          live,
        ]);
        // The stream and the calls after it are untouched by the refused one.
        assert.equal(stream!.code, 'OK', stream!.message);
        assert.deepEqual(stream!.replies!.map((r) => (r.infer_response as { id: string }).id), ['s0', 's1']);
        assert.equal(fits!.code, 'OK', fits!.message);
        assert.equal(after!.code, 'OK', after!.message);
        const refused = stream!.during!;
        if (mode === 'terminate') {
          // The proxy refuses it as grpc-go itself does when it talks to the model server (relay).
          assert.equal(refused.code, 'RESOURCE_EXHAUSTED', refused.message);
          assert.match(refused.message, /request metadata of \d+ bytes is over the 8192 bytes the model server accepts/);
        } else {
          assert.equal(refused.code, 'INTERNAL');
          assert.match(refused.message, /header list size to send violates the maximum size \(8192 bytes\) set by server/);
        }
      });

      test('the upstream connection lost during a call whose response has begun: the call ends UNAVAILABLE, saying so', async () => {
        const cut = await countingRelay(standIn.grpcPort!);
        const front = await startTestProxy({ pki, upstream: { grpcPort: cut.port }, grpcMode: mode });
        try {
          const holds = () => standIn.received.filter((r) => r.path === `${ECHO}/Hold`).length;
          const holdsBefore = holds();
          const call = goClient(front.grpcPort, [{ method: `${ECHO}/Hold`, requests: [{}], metadata: { 'x-echo-a': ['1'] } }]);
          await eventually(() => holds() > holdsBefore, 'the held call to reach the stand-in');
          cut.server.close();
          const [held] = await call;
          assert.equal(held!.code, 'UNAVAILABLE', held!.message);
        } finally {
          await front.proxy.shutdown(1000);
        }
      });

      test('a server that fails a bidi stream while the client is still sending: the client gets the status and its -bin trailer', async () => {
        const [result] = await goClient(toStandIn[mode]!.grpcPort, [
          { method: `${ECHO}/Bidi`, stream: true, keep_open: true, requests: [{ payload: 'AA==', count: 1 }, { fail_with_code: 9 }] },
        ]);
        assert.equal(result!.code, 'FAILED_PRECONDITION', result!.message);
        assert.equal(result!.message, failureMessage(9));
        assert.deepEqual(result!.trailer['x-trailer-bin'], [`base64:${FAILURE_TRAILER_BIN.toString('base64')}`]);
        assert.deepEqual(result!.replies, [{ payload: 'AA==', count: 1 }]);
      });

      test('with the model server down, a call fails UNAVAILABLE', async () => {
        const [result] = await goClient(toNowhere[mode]!.grpcPort, [live]);
        assert.equal(result!.code, 'UNAVAILABLE', result!.message);
        assert.match(result!.message, /refused the connection \(is the model server running\?\)/);
      });

      test('calls the model server did not take before its GOAWAY (a restart) are retried by grpc-go on a new connection and succeed', async () => {
        // Its GOAWAY takes the first of the four calls only, once a second has arrived.
        const { onStream, connections } = goAwayOnFirstConnection(3);
        const server = createH2cServer().on('stream', onStream).listen(0, '127.0.0.1');
        await once(server, 'listening');
        const front = await startTestProxy({ pki, upstream: { grpcPort: (server.address() as AddressInfo).port }, grpcMode: mode });
        try {
          const [result] = await goClient(front.grpcPort, [{ method: `${ECHO}/Unary`, requests: [{}], parallel: 4 }]);
          assert.equal(result!.code, 'OK', result!.message);
          assert.equal(connections.length, 2);
        } finally {
          await front.proxy.shutdown(1000);
          server.close();
        }
      });

      test('after the proxy closes an idle connection (GOAWAY), the next call succeeds on a new one', async () => {
        // A plain TCP relay in front counts the Go client's connections.
        const counting = await countingRelay(idleFronts[mode]!.grpcPort);
        try {
          const results = await goClient(counting.port, [live, { ...live, pause_ms: 1500 }, { ...live, pause_ms: 1500 }]);
          assert.deepEqual(results.map((r) => `${r.code} ${r.message}`), ['OK ', 'OK ', 'OK ']);
          // grpc-go 1.33 dials again as soon as a connection closes (it has no idle mode), so an
          // idle spell of 1.5 s costs several connections; at least each call had a new one.
          assert.ok(counting.connections() >= 3, `the proxy closed idle connections (${counting.connections()} made)`);
        } finally {
          counting.server.close();
        }
      });

      test('a client CA added by a reload is named in the handshake, so a Go client of that CA is served', async () => {
        const front = await startTestProxy({ pki, tls: { crl: pki.paths['client_cert_ca_chain.crl']! }, upstream: { grpcPort: grpcio.port }, grpcMode: mode });
        try {
          assert.equal((await refusedGoClient(front, 'foreign_client')).reason, 'no_certificate');
          const clientCa = join(workDir, `${mode}-client-cas.pem`);
          const crl = join(workDir, `${mode}-crls.pem`);
          await writeFile(clientCa, pki.clientCa.certPem + pki.otherCa.certPem);
          await writeFile(crl, pki.crlPem + pki.intermediateCrlPem + pki.otherCaCrlPem);
          front.proxy.reloadTls(loadTlsMaterialSync({ ...baseConfig({ pki }).tls, clientCa, crl }));
          const [result] = await goClient(front.grpcPort, [live], { cert: 'foreign_client' });
          assert.equal(result!.code, 'OK', result!.message);
        } finally {
          await front.proxy.shutdown(1000);
        }
      });

      test('a Go client that sends its leaf and intermediate is served', async () => {
        const [result] = await goClient(toGrpcio[mode]!.grpcPort, [live], { cert: 'chained_client' });
        assert.deepEqual(onlyReply(result!), { live: true });
      });

      test('grpc-go checks the server name against the certificate: localhost is in its SANs, 127.0.0.2 is not', async () => {
        const [named] = await goClient(toGrpcio[mode]!.grpcPort, [live], { serverName: 'localhost' });
        assert.equal(named!.code, 'OK');
        const [wrong] = await goClient(toGrpcio[mode]!.grpcPort, [live], { serverName: '127.0.0.2' });
        assert.equal(wrong!.code, 'UNAVAILABLE');
        assert.match(wrong!.message, /x509: certificate is valid for .*not 127\.0\.0\.2/);
      });

      for (const [cert, reason] of [[null, 'no_certificate'], ['revoked_client', 'revoked'], ['expired_client', 'expired']] as const) {
        test(`a Go client with ${cert ?? 'no certificate'} gets UNAVAILABLE and the proxy logs ${reason}`, async () => {
          const refused = await refusedGoClient(toGrpcio[mode]!, cert);
          assert.equal(refused.reason, reason);
        });
      }

      test('a Go client whose certificate is from a foreign CA sends none: the proxy logs no_certificate and says why that may be', async () => {
        // Go (like Java) sends only a certificate issued by a CA the server's request names.
        const refused = await refusedGoClient(toGrpcio[mode]!, 'foreign_client');
        assert.equal(refused.reason, 'no_certificate');
        assert.match(refused.msg, /Go and Java clients send none when theirs is not issued by a CA of --mtls_client_ca/);
      });
    });
  }
});
