/**
 * Why two packages the product card names are not in the data path, and why CRLs are not
 * read by the X.509 library. Each test shows the behaviour that decided it; the README says
 * so in one sentence.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer as createHttpServer, request as httpRequest, type ServerResponse } from 'node:http';
import { createSecureServer } from 'node:http2';
import type { AddressInfo } from 'node:net';
import * as grpc from '@grpc/grpc-js';
import http2Proxy from 'http2-proxy';
import httpProxy from 'http-proxy';
import { createTestPki } from './helpers/pki.js';
import { clientCredentials, startUpstream } from './helpers/harness.js';
import { echoClient, unary } from '../src/demo/grpc-client.js';
import { x509 } from '../src/x509/peculiar.js';
import { createCrl, parseCrl } from '../src/x509.js';

test('http2-proxy cannot carry gRPC: it forwards over HTTP/1.1 and drops te, so a plain unary call fails', async () => {
  const pki = await createTestPki();
  const upstream = await startUpstream({ restPort: null });
  const server = createSecureServer({ key: pki.server.keyPem, cert: pki.server.certPem }, (req, res) => {
    http2Proxy.web(req, res, { hostname: '127.0.0.1', port: upstream.grpcPort! }, (err) => {
      if (err && !res.headersSent) res.writeHead(502).end();
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const client = echoClient(`localhost:${(server.address() as AddressInfo).port}`, clientCredentials(pki, null));
  try {
    const err = await unary(client, 'Unary', { payload: Buffer.from('x') }).then(() => assert.fail('the call went through'), (e: grpc.ServiceError) => e);
    assert.notEqual(err.code, grpc.status.OK);
  } finally {
    client.close();
    server.close();
    await upstream.close();
    await pki.cleanup();
  }
});

test('http-proxy 1.18 keeps the upstream SSE response running after the client is gone', async () => {
  // An SSE upstream written by hand, so the test sees exactly how its response ends.
  let upstreamRes: ServerResponse | undefined;
  let upstreamSawClose = false;
  let requestArrived!: () => void;
  const gotRequest = new Promise<void>((resolve) => (requestArrived = resolve));
  const upstreamServer = createHttpServer((_req, res) => {
    upstreamRes = res;
    res.writeHead(200, { 'content-type': 'text/event-stream' });
    res.write('data: first\n\n');
    res.on('close', () => (upstreamSawClose = !res.writableFinished));
    requestArrived();
  });
  upstreamServer.listen(0, '127.0.0.1');
  await once(upstreamServer, 'listening');
  const proxy = httpProxy.createProxyServer({ target: `http://127.0.0.1:${(upstreamServer.address() as AddressInfo).port}` });
  proxy.on('error', () => {});
  let proxySideClosed!: () => void;
  const clientGone = new Promise<void>((resolve) => (proxySideClosed = resolve));
  const front = createHttpServer((req, res) => {
    res.on('close', () => proxySideClosed());
    proxy.web(req, res);
  });
  front.listen(0, '127.0.0.1');
  await once(front, 'listening');
  try {
    const req = httpRequest({ host: '127.0.0.1', port: (front.address() as AddressInfo).port, path: '/v3/chat/completions' });
    req.on('error', () => {});
    req.end();
    const [res] = (await once(req, 'response')) as [import('node:http').IncomingMessage];
    await gotRequest;
    await once(res, 'data');
    req.destroy();
    await clientGone;
    // The client is gone and the proxy knows it, yet the upstream can still write and finish.
    const finished = once(upstreamRes!, 'finish');
    for (let i = 0; i < 100; i++) upstreamRes!.write(`data: ${i}\n\n`);
    upstreamRes!.end();
    await finished;
    assert.equal(upstreamSawClose, false);
  } finally {
    proxy.close();
    front.close();
    upstreamServer.close();
    upstreamServer.closeAllConnections();
  }
});

test('@peculiar/x509 cannot read a CRL of 10,000 entries (asn1js stops at 10,000 ASN.1 nodes), which our own DER reader does', async () => {
  const pki = await createTestPki();
  try {
    const revoked = Array.from({ length: 10_000 }, (_, i) => ({ serialHex: (0x100000 + i).toString(16) }));
    const crlPem = await createCrl({ issuer: pki.clientCa, revoked });
    assert.throws(() => new x509.X509Crl(x509.PemConverter.decodeFirst(crlPem)), /Maximum ASN\.1 node count/);
    assert.equal(parseCrl(crlPem).revoked.length, 10_000);
  } finally {
    await pki.cleanup();
  }
});
