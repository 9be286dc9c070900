import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { PassThrough } from 'node:stream';
import { createPrivateKey, X509Certificate } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { connect as netConnect, createServer as createNetServer } from 'node:net';
import { tmpdir } from 'node:os';
import { createServer as createTlsServer, type Server as TlsServer, type TlsOptions } from 'node:tls';
import { createSecureServer } from 'node:http2';
import { createServer as createHttpsServer } from 'node:https';
import { join } from 'node:path';
import type { TestPki } from './helpers/pki.js';
import { startProxyFixture, startTestProxy, startUpstream, type StartedProxy } from './helpers/harness.js';
import { BIN, cleanEnv, runCli } from './helpers/cli.js';
import { eventually } from './helpers/ops.js';
import { freeLoopbackPorts } from '../src/ports.js';
import { issueServerCert } from '../src/x509.js';
import type { ModelServer } from '../src/demo/model-server.js';
import { run } from '../src/cli/main.js';
import * as grpc from '@grpc/grpc-js';
import { KSERVE_SERVICE, serviceConstructor } from '../src/demo/protocol.js';


let pki: TestPki;
let upstream: ModelServer;
let front: StartedProxy;
let closeAll: () => Promise<void>;

before(async () => ({ pki, upstream, front, close: closeAll } = await startProxyFixture()));
after(() => closeAll());

function clientFlags(client = 'client', ca = 'server_ca'): string[] {
  return ['--mtls_cert', pki.paths[`${client}.pem`]!, '--mtls_key', pki.paths[`${client}.key`]!, '--mtls_ca', pki.paths[`${ca}.pem`]!];
}

/** Runs `ovms-mtls probe` in this process; returns exit code and printed lines. */
async function probe(args: string[]): Promise<{ code: number; out: string }> {
  const stdout = new PassThrough();
  const chunks: Buffer[] = [];
  stdout.on('data', (c: Buffer) => chunks.push(c));
  const code = await run(['probe', '--host', '127.0.0.1', '--timeout', '20', ...args], { stdout, stderr: stdout, env: {} });
  return { code, out: Buffer.concat(chunks).toString('utf8') };
}

/** `running`'s result, or a failed test if it has not settled within 20 s (a bounded wait, not a timing assertion). */
async function settledWithin<T>(running: Promise<T>, what: string): Promise<T> {
  let settled = false;
  void running.finally(() => (settled = true)).catch(() => undefined);
  await eventually(() => settled, `${what} to end`);
  return running;
}

/** A gRPC server with mTLS offering KServe with only `handlers` (the other methods answer UNIMPLEMENTED). */
async function kserveServer(handlers: grpc.UntypedServiceImplementation): Promise<{ port: number; stop(): void }> {
  const server = new grpc.Server();
  server.addService(serviceConstructor(KSERVE_SERVICE).service, handlers);
  const credentials = grpc.ServerCredentials.createSsl(Buffer.from(pki.clientCa.certPem), [{ cert_chain: Buffer.from(pki.server.certPem), private_key: Buffer.from(pki.server.keyPem) }], true);
  const port = await new Promise<number>((resolve, reject) => server.bindAsync('127.0.0.1:0', credentials, (err, bound) => (err ? reject(err) : resolve(bound))));
  return { port, stop: () => server.forceShutdown() };
}

/** A bare TLS server on 127.0.0.1 serving the test server certificate; `onSecure` gets each accepted connection. */
async function bareTlsServer(options: TlsOptions, onSecure: (socket: import('node:tls').TLSSocket) => void = () => undefined): Promise<{ server: TlsServer; port: number }> {
  const server = createTlsServer({ cert: pki.server.certPem, key: pki.server.keyPem, ...options }, onSecure);
  server.on('tlsClientError', () => undefined);
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return { server, port: (server.address() as import('node:net').AddressInfo).port };
}

/** nginx as the OVMS example runs it: ssl_verify_client on, a bad client certificate answered with a 400 page. */
async function startNginx(): Promise<{ port: number; stop(): Promise<void> }> {
  const binary = ['/usr/sbin/nginx', ...(process.env['PATH'] ?? '').split(':').map((dir) => join(dir, 'nginx'))].find((path) => existsSync(path));
  assert.ok(binary, 'nginx is needed for this test (apt-get install nginx-light)');
  const [port] = await freeLoopbackPorts(1);
  const dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-probe-nginx-'));
  const conf = join(dir, 'nginx.conf');
  await writeFile(conf, [
    `pid ${join(dir, 'nginx.pid')}; error_log ${join(dir, 'error.log')}; worker_processes 1;`,
    'events {}',
    `http { access_log off; client_body_temp_path ${dir}; proxy_temp_path ${dir}; fastcgi_temp_path ${dir}; uwsgi_temp_path ${dir}; scgi_temp_path ${dir};`,
    `  server { listen 127.0.0.1:${port} ssl http2; ssl_certificate ${pki.paths['server.pem']}; ssl_certificate_key ${pki.paths['server.key']};`,
    `    ssl_client_certificate ${pki.paths['client_cert_ca.pem']}; ssl_verify_client on; ssl_crl ${pki.paths['client_cert_ca.crl']};`,
    '    location / { return 200 "ready\\n"; } } }',
  ].join('\n'));
  const nginx = spawn(binary, ['-e', join(dir, 'error.log'), '-p', dir, '-c', conf, '-g', 'daemon off;'], { stdio: 'ignore' });
  const listening = () => new Promise<boolean>((resolve) => {
    const socket = netConnect(port!, '127.0.0.1', () => resolve(true)).on('error', () => resolve(false));
    socket.on('connect', () => socket.destroy());
  });
  await eventually(listening, `nginx listening on ${port}`);
  return {
    port: port!,
    async stop() {
      nginx.kill();
      await once(nginx, 'exit');
      await rm(dir, { recursive: true, force: true });
    },
  };
}

describe('probe', () => {
  test('passes every step against the proxied stand-in model server and exits 0', async () => {
    const { code, out } = await probe(['--port', String(front.grpcPort), '--rest_port', String(front.restPort), '--model', 'dummy', ...clientFlags()]);
    assert.equal(code, 0, out);
    for (const step of ['TLS handshake', 'gRPC ServerLive: live', 'gRPC ServerReady: ready', 'gRPC ModelMetadata dummy', 'REST GET /v2/health/ready: HTTP 200', 'REST GET /v2/models/dummy: HTTP 200']) {
      assert.match(out, new RegExp(`^ok .*${step.replace(/[/.]/g, '\\$&')}`, 'm'));
    }
    assert.match(out, /^ok .*TLS handshake with .*: TLSv1\.3, h2, server certificate "localhost" valid until \d{4}-\d\d-\d\d$/m);
    assert.match(out, /^probe: all 7 steps passed$/m);
  });

  test('a client certificate from a foreign CA fails the first call on each port, naming the client certificate layer and the proxy\'s reason', async () => {
    const { code, out } = await probe(['--port', String(front.grpcPort), '--rest_port', String(front.restPort), ...clientFlags('foreign_client')]);
    assert.equal(code, 1);
    assert.match(out, /^FAIL +grpc +gRPC ServerLive: UNAUTHENTICATED: client certificate refused \(unknown_ca\)/m);
    assert.match(out, /^FAIL +rest +REST GET \/v2\/health\/ready: HTTP 403/m);
    assert.equal(out.match(/-> client certificate layer: the server refused the client certificate and says why: client certificate refused \(unknown_ca\): client certificate is not issued by a trusted client CA/g)?.length, 2, out);
    assert.doesNotMatch(out, /ServerReady/);
  });

  test('a stopped model server fails ServerLive and /v2/health/ready and names the upstream layer', async () => {
    const gone = await startUpstream();
    const ports = { grpcPort: gone.grpcPort!, restPort: gone.restPort! };
    await gone.close();
    const orphan = await startTestProxy({ pki, upstream: ports });
    try {
      const { code, out } = await probe(['--port', String(orphan.grpcPort), '--rest_port', String(orphan.restPort), ...clientFlags()]);
      assert.equal(code, 1);
      assert.match(out, /^ok .*TLS handshake/m);
      assert.match(out, /^FAIL .*gRPC ServerLive: UNAVAILABLE.*\n.*-> upstream layer:/m);
      assert.match(out, /^FAIL .*REST GET \/v2\/health\/ready: HTTP 50\d\n.*-> upstream layer:/m);
    } finally {
      await orphan.proxy.shutdown(1000);
    }
  });

  test('a server certificate the given CA did not issue is reported as the server certificate layer', async () => {
    const { code, out } = await probe(['--rest_port', String(front.restPort), ...clientFlags('client', 'other_ca')]);
    assert.equal(code, 1);
    assert.match(out, /-> server certificate layer: the server certificate is not trusted by --mtls_ca/);
  });

  test('NODE_TLS_REJECT_UNAUTHORIZED=0 in the environment does not make it trust a server certificate the given CA did not issue', async () => {
    const res = await runCli(['probe', '--host', '127.0.0.1', '--port', String(front.grpcPort), '--rest_port', String(front.restPort), ...clientFlags('client', 'other_ca')],
      { env: { NODE_TLS_REJECT_UNAUTHORIZED: '0' } });
    assert.equal(res.code, 1, res.stdout);
    assert.match(res.stdout, /^FAIL +grpc +TLS handshake/m);
    assert.match(res.stdout, /^FAIL +rest +TLS handshake/m);
    assert.equal(res.stdout.match(/-> server certificate layer: the server certificate is not trusted by --mtls_ca/g)?.length, 2, res.stdout);
    assert.doesNotMatch(res.stdout, /^ok|upstream layer/m);
  });

  test('a server that leaves out the intermediate CA of its certificate is told apart from nothing: the advice names the intermediate', async () => {
    const leaf = await issueServerCert({ issuer: pki.intermediateCa, commonName: 'localhost', dns: ['localhost'], ips: ['127.0.0.1'] });
    const { server, port } = await bareTlsServer({ cert: leaf.certPem, key: leaf.keyPem });
    try {
      // The client CA is the intermediate's root: trusted, yet the chain cannot be built without the intermediate.
      const { code, out } = await probe(['--rest_port', String(port), ...clientFlags('client', 'client_cert_ca')]);
      assert.equal(code, 1);
      assert.match(out, /UNABLE_TO_VERIFY_LEAF_SIGNATURE\n {6}-> server certificate layer: .*if that is an intermediate CA, pass its root and have the server send the intermediate after its own certificate/);
    } finally {
      server.close();
    }
  });

  test('a server serving a client certificate is the server certificate layer, not the network', async () => {
    const { server, port } = await bareTlsServer({ cert: pki.client.certPem, key: pki.client.keyPem });
    try {
      const { code, out } = await probe(['--rest_port', String(port), ...clientFlags('client', 'client_cert_ca')]);
      assert.equal(code, 1);
      assert.match(out, /FAIL {2}rest {2}TLS handshake with 127\.0\.0\.1:\d+: INVALID_PURPOSE\n {6}-> server certificate layer: the server certificate is not for servers \(its extended key usage lacks serverAuth/);
    } finally {
      server.close();
    }
  });

  test('ports mixed up are reported as the protocol layer: REST on the gRPC port, TLS on a plain port, gRPC on the REST port', async () => {
    const restOnGrpc = await probe(['--rest_port', String(front.grpcPort), ...clientFlags()]);
    assert.match(restOnGrpc.out, /-> protocol layer: this is the gRPC port/);
    const tlsOnPlain = await probe(['--rest_port', String(upstream.restPort), ...clientFlags()]);
    assert.match(tlsOnPlain.out, /-> protocol layer: .* does not speak TLS/);
    const grpcOnRest = await probe(['--port', String(front.restPort), ...clientFlags()]);
    assert.match(grpcOnRest.out, /-> protocol layer: /);
    assert.equal(restOnGrpc.code + tlsOnPlain.code + grpcOnRest.code, 3);
  });

  test('a server that refuses the client certificate with a TLS alert (openssl s_server, as nginx-style OpenSSL servers do) is named on one line with the alert', async () => {
    const [port] = await freeLoopbackPorts(1);
    // -Verify makes the client certificate mandatory; -verify_return_error refuses a foreign one with an alert.
    const server = spawn('openssl', ['s_server', '-accept', `127.0.0.1:${port}`, '-cert', pki.paths['server.pem']!, '-key', pki.paths['server.key']!,
      '-CAfile', pki.paths['client_cert_ca.pem']!, '-Verify', '2', '-verify_return_error', '-www'], { stdio: ['ignore', 'pipe', 'ignore'] });
    try {
      let banner = '';
      server.stdout.setEncoding('utf8').on('data', (chunk: string) => (banner += chunk));
      await eventually(() => banner.includes('ACCEPT'), 'openssl s_server accepting');
      const { code, out } = await probe(['--rest_port', String(port), ...clientFlags('foreign_client')]);
      assert.equal(code, 1);
      // Before: 'refused the client certificate (alert number 48\n): check...': the alert's name lost, the line broken.
      assert.match(out, /^ {6}-> client certificate layer: the server refused the client certificate \(TLS alert "unknown ca"\): check it was issued by the server's client CA.*$/m);
      assert.equal(out.split('\n').length, 4, out);
    } finally {
      server.kill();
    }
  });

  // Before: 'ok    rest  REST GET /v2/models/dummy: HTTP 200 <html>...' and 'probe: all 3 steps passed', exit 0, for a web server.
  test('a REST port answering the model step with a web page (200 for any path) fails it as the protocol layer instead of passing', async () => {
    const web = createHttpsServer({ cert: pki.server.certPem, key: pki.server.keyPem }, (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/html' });
      res.end('<!DOCTYPE html><html><body>Welcome to nginx!</body></html>');
    });
    web.listen(0, '127.0.0.1');
    await once(web, 'listening');
    try {
      const { code, out } = await probe(['--rest_port', String((web.address() as import('node:net').AddressInfo).port), '--model', 'dummy', ...clientFlags()]);
      assert.equal(code, 1, out);
      assert.match(out, /^FAIL +rest +REST GET \/v2\/models\/dummy: HTTP 200 <!DOCTYPE html>.*\n {6}-> protocol layer: the port answered HTTP 200, but not with KServe model metadata \(a JSON object\)/m);
    } finally {
      web.close();
    }
  });

  // Before: 'FAIL  grpc  gRPC ServerLive: not live' and no line naming a layer.
  test('a model server answering ServerLive with live false fails the step naming the upstream layer', async () => {
    const kserve = await kserveServer({ ServerLive: (_call: unknown, done: (err: null, res: { live: boolean }) => void) => done(null, { live: false }) });
    try {
      const { code, out } = await probe(['--port', String(kserve.port), ...clientFlags()]);
      assert.equal(code, 1);
      assert.match(out, /^FAIL +grpc +gRPC ServerLive: not live\n {6}-> upstream layer: the model server answers but says it is not live/m);
    } finally {
      kserve.stop();
    }
  });

  // Before: 'upstream layer: the proxy accepted the client but could not reach a ready model server: Model with requested version is not loaded yet'.
  test('a ready model server answering ModelMetadata UNAVAILABLE (the model not loaded) is the model layer, not an unreachable upstream', async () => {
    type Done = (err: grpc.ServiceError | null, res?: object) => void;
    const kserve = await kserveServer({
      ServerLive: (_call: unknown, done: Done) => done(null, { live: true }),
      ServerReady: (_call: unknown, done: Done) => done(null, { ready: true }),
      ModelMetadata: (_call: unknown, done: Done) => done(Object.assign(new Error('Model with requested version is not loaded yet'), { code: grpc.status.UNAVAILABLE, details: 'Model with requested version is not loaded yet', metadata: new grpc.Metadata() })),
    });
    try {
      const { code, out } = await probe(['--port', String(kserve.port), '--model', 'dummy', ...clientFlags()]);
      assert.equal(code, 1);
      assert.match(out, /^FAIL +grpc +gRPC ModelMetadata dummy: UNAVAILABLE: Model with requested version is not loaded yet\n {6}-> model layer: the model server is ready but model dummy is not available/m);
    } finally {
      kserve.stop();
    }
  });

  // Before: 'upstream layer: the call failed with RESOURCE_EXHAUSTED: Received message larger than max (1919246692 vs 1073741824)'
  // for a page reading "ready", and '... INTERNAL: Received RST_STREAM with code 0 (Call ended without gRPC status)' for an HTML page.
  test('an HTTP/2 server answering the gRPC call with a web page or JSON is the protocol layer naming the content type, not the upstream', async () => {
    for (const [contentType, body] of [['text/plain', 'ready\n'], ['text/html', '<!DOCTYPE html><html><body>Welcome to nginx!</body></html>'], ['application/json', '{"error":"no route"}']] as const) {
      const web = createSecureServer({ cert: pki.server.certPem, key: pki.server.keyPem }, (_req, res) => {
        res.writeHead(200, { 'content-type': contentType });
        res.end(body);
      });
      web.listen(0, '127.0.0.1');
      await once(web, 'listening');
      try {
        const { code, out } = await probe(['--port', String((web.address() as import('node:net').AddressInfo).port), ...clientFlags()]);
        assert.equal(code, 1);
        assert.match(out, new RegExp(`^FAIL +grpc +gRPC ServerLive: .*\n {6}-> protocol layer: the port answered HTTP/2 with ${contentType.replace('/', '\\/')}, not gRPC \\(application/grpc\\): is --port a web or REST port`, 'm'));
      } finally {
        web.close();
      }
    }
  });

  // Before: 'network layer: the connection failed before the TLS handshake finished (ERR_SSL_TLSV1_UNRECOGNIZED_NAME)' (nginx's
  // ssl_reject_handshake, an ingress routing by name), the same for an ALPN or TLS version refused, and a hello refused for want of
  // a common cipher was 'client certificate layer: the server refused the client certificate (TLS alert "handshake failure")'.
  test('a server that refuses the TLS hello, before it has seen the client certificate, is named by what it refused: the name, ALPN or cipher, not the network or the client certificate', async () => {
    const [namedPort] = await freeLoopbackPorts(1);
    const named = spawn('openssl', ['s_server', '-accept', `127.0.0.1:${namedPort}`, '-cert', pki.paths['server.pem']!, '-key', pki.paths['server.key']!,
      '-servername', 'ovms.example.com', '-servername_fatal', '-cert2', pki.paths['server.pem']!, '-key2', pki.paths['server.key']!, '-www'], { stdio: ['ignore', 'pipe', 'ignore'] });
    const otherAlpn = await bareTlsServer({ ALPNProtocols: ['postgresql'] });
    const noCommonCipher = await bareTlsServer({ maxVersion: 'TLSv1.2', ciphers: 'AES128-SHA' });
    try {
      let banner = '';
      named.stdout.setEncoding('utf8').on('data', (chunk: string) => (banner += chunk));
      await eventually(() => banner.includes('ACCEPT'), 'openssl s_server accepting');
      const cases: [string[], RegExp][] = [
        [['--port', String(namedPort), '--servername', 'localhost'],
          /-> server certificate layer: the server serves no certificate for the name localhost \(TLS alert "unrecognized name"\): give a name it serves with --servername$/m],
        [['--rest_port', String(otherAlpn.port)],
          /-> protocol layer: the server refused the TLS hello \(TLS alert "no application protocol"\) before sending its certificate, so not for the client certificate: it speaks neither h2 nor http\/1\.1 \(ALPN\): is it an HTTP port\?$/m],
        [['--rest_port', String(noCommonCipher.port)],
          /-> protocol layer: the server refused the TLS hello \(TLS alert "handshake failure"\) before sending its certificate, so not for the client certificate: no TLS version, cipher or ALPN protocol in common/m],
      ];
      for (const [args, cause] of cases) {
        const { code, out } = await probe([...args, ...clientFlags()]);
        assert.equal(code, 1, out);
        assert.match(out, cause);
      }
    } finally {
      named.kill();
      otherAlpn.server.close();
      noCommonCipher.server.close();
    }
  });

  // Before: 'network layer: no answer from 127.0.0.1:P within 1000 ms (firewall, or the wrong host)', for a connection the server had accepted.
  test('a server that accepts the connection but never answers the TLS hello (stopped or hung) is not blamed on a firewall', async () => {
    const held: import('node:net').Socket[] = [];
    const silent = createNetServer((socket) => held.push(socket.on('error', () => undefined)));
    silent.listen(0, '127.0.0.1');
    await once(silent, 'listening');
    try {
      const { code, out } = await probe(['--rest_port', String((silent.address() as import('node:net').AddressInfo).port), '--timeout', '1', ...clientFlags()]);
      assert.equal(code, 1);
      assert.match(out, /-> network layer: 127\.0\.0\.1:\d+ accepted the connection but did not answer the TLS handshake within 1000 ms: the server is hung or stopped/);
      assert.doesNotMatch(out, /firewall/);
    } finally {
      held.forEach((socket) => socket.destroy());
      silent.close();
    }
  });

  // Before: 'upstream layer: the proxy accepted the client but could not reach a ready model server: No connection established. Last error: Protocol error'.
  test('gRPC against a TLS server that does not pick HTTP/2 (an HTTP/1.1 server, or one without ALPN) is the protocol layer, not the upstream', async () => {
    const answer = (socket: import('node:tls').TLSSocket) => socket.once('data', () => socket.end('HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n'));
    for (const ALPNProtocols of [['http/1.1'], undefined]) {
      const { server, port } = await bareTlsServer({ ALPNProtocols }, answer);
      try {
        const { code, out } = await probe(['--port', String(port), ...clientFlags()]);
        assert.equal(code, 1);
        assert.match(out, /^ok +grpc +TLS handshake/m);
        const alpn = ALPNProtocols ? 'chose http/1[.]1' : 'chose nothing';
        assert.match(out, new RegExp(`^FAIL +grpc +gRPC over HTTP/2: ALPN \\S+\n {6}-> protocol layer: the server did not agree to HTTP/2 in the TLS handshake \\(ALPN ${alpn}\\), which gRPC needs: is --port an HTTP/1\\.1 or REST port\\?`, 'm'));
        assert.doesNotMatch(out, /upstream layer/);
      } finally {
        server.close();
      }
    }
  });

  test('a server that finishes the handshake and then says nothing is the protocol layer, not the network', async () => {
    const held: import('node:tls').TLSSocket[] = [];
    const { server, port } = await bareTlsServer({ ca: pki.clientCa.certPem, requestCert: true, rejectUnauthorized: true, ALPNProtocols: ['http/1.1'] }, (socket) => held.push(socket));
    try {
      const { code, out } = await probe(['--rest_port', String(port), '--timeout', '1', ...clientFlags()]);
      assert.equal(code, 1);
      assert.match(out, /-> protocol layer: the TLS handshake with 127\.0\.0\.1:\d+ finished but the server sent nothing within 1000 ms after it/);
      assert.doesNotMatch(out, /network layer|firewall/);
    } finally {
      held.forEach((socket) => socket.destroy());
      server.close();
    }
  });

  // Before: --timeout was the socket's idle time, so a byte every 100 ms held the probe for as long as the server kept
  // sending (a step "may take" --timeout seconds), and an endless body was buffered whole (2.6 GB and counting).
  test('a REST answer that never ends, trickled or endless, ends its step: the trickle fails within --timeout as the upstream layer, the endless body is read only as far as the report shows', async () => {
    const sending = new Set<ReturnType<typeof setInterval>>();
    const answerGet = (pace: number, chunk: Buffer) => (socket: import('node:tls').TLSSocket) => socket.once('data', (request: Buffer) => {
      socket.on('error', () => undefined);
      if (request.toString('latin1').startsWith('HEAD ')) return socket.end('HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n');
      socket.write('HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n');
      const timer = setInterval(() => socket.write(`${chunk.length.toString(16)}\r\n${chunk.toString('latin1')}\r\n`), pace);
      sending.add(timer);
      socket.on('close', () => clearInterval(timer));
    });
    const trickle = await bareTlsServer({ ALPNProtocols: ['http/1.1'] }, answerGet(100, Buffer.from('x')));
    const endless = await bareTlsServer({ ALPNProtocols: ['http/1.1'] }, answerGet(10, Buffer.alloc(16 * 1024, 'x')));
    try {
      const [slow, flood] = await Promise.all([
        settledWithin(probe(['--rest_port', String(trickle.port), '--timeout', '1', ...clientFlags()]), 'the probe of the trickling server'),
        settledWithin(probe(['--rest_port', String(endless.port), ...clientFlags()]), 'the probe of the endless body'),
      ]);
      assert.equal(slow.code, 1, slow.out);
      assert.match(slow.out, /^FAIL +rest +REST GET \/v2\/health\/ready: PROBE_TIMEOUT\n {6}-> upstream layer: no complete answer within 1000 ms: the model server may be overloaded or hung$/m);
      assert.equal(flood.code, 0, flood.out);
      assert.match(flood.out, /^ok +rest +REST GET \/v2\/health\/ready: HTTP 200$/m);
    } finally {
      sending.forEach((timer) => clearInterval(timer));
      trickle.server.close();
      endless.server.close();
    }
  });

  test('probing by IP address sends no IP as SNI (no Node deprecation warning on stderr) and still checks the IP against the certificate', async () => {
    const res = await runCli(['probe', '--host', '127.0.0.1', '--rest_port', String(front.restPort), ...clientFlags()]);
    assert.equal(res.code, 0, res.stdout);
    assert.equal(res.stderr, '');
    // grpc-js sends the IP as SNI whatever we pass: its DEP0123 warning must not reach the report either.
    const grpcPort = await runCli(['probe', '--host', '127.0.0.1', '--port', String(front.grpcPort), ...clientFlags()]);
    assert.equal(grpcPort.code, 0, grpcPort.stdout);
    assert.equal(grpcPort.stderr, '');
    const grpcWrongIp = await runCli(['probe', '--host', '127.0.0.1', '--servername', '10.9.8.7', '--port', String(front.grpcPort), ...clientFlags()]);
    assert.equal(grpcWrongIp.code, 1);
    assert.match(grpcWrongIp.stdout, /-> server certificate layer: the server certificate does not name 10\.9\.8\.7/);
    assert.equal(grpcWrongIp.stderr, '');
    const wrongIp = await runCli(['probe', '--host', '127.0.0.1', '--servername', '10.9.8.7', '--rest_port', String(front.restPort), ...clientFlags()]);
    assert.equal(wrongIp.code, 1);
    assert.match(wrongIp.stdout, /-> server certificate layer: the server certificate does not name 10\.9\.8\.7/);
    assert.equal(wrongIp.stderr, '');
  });

  test('nginx refusing the client certificate with its 400 page (REST) or a bare 400 (gRPC) is the client certificate layer, not the upstream or a wrong port', async () => {
    const nginx = await startNginx();
    try {
      const good = await probe(['--rest_port', String(nginx.port), ...clientFlags()]);
      assert.equal(good.code, 0, good.out);
      for (const client of ['foreign_client', 'revoked_client']) {
        const { code, out } = await probe(['--port', String(nginx.port), '--rest_port', String(nginx.port), ...clientFlags(client)]);
        assert.equal(code, 1);
        assert.match(out, /^FAIL .*REST GET \/v2\/health\/ready: HTTP 400\n {6}-> client certificate layer: the server finished the TLS handshake but refused the client certificate with HTTP 400 "The SSL certificate error"/m);
        assert.match(out, /^FAIL .*gRPC ServerLive: .*HTTP status code 400\n {6}-> client certificate layer: the server answered the gRPC call with plain HTTP 400, as nginx does when it refuses the client certificate/m);
      }
    } finally {
      await nginx.stop();
    }
  });

  test('control characters a server sends (CR, LF, escape sequences) are printed as \\u001b, so its answer cannot erase the FAIL line or print a pass of its own', async () => {
    const body = 'busy\x1b[1A\x1b[2K\rok    rest  REST GET /v2/health/ready: HTTP 200\nprobe: all 2 steps passed\x1b[8m\u009b2J';
    const { server, port } = await bareTlsServer({ ALPNProtocols: ['http/1.1'] }, (socket) => {
      socket.once('data', () => socket.end(`HTTP/1.1 503 Service Unavailable\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`));
    });
    try {
      const { code, out } = await probe(['--rest_port', String(port), ...clientFlags()]);
      assert.equal(code, 1);
      // Only the line ends formatStep writes itself.
      assert.deepEqual([...out].filter((char) => char !== '\n' && /\p{Cc}/u.test(char)), [], JSON.stringify(out));
      assert.doesNotMatch(out, /^probe: all/m);
      assert.match(out, /^FAIL .*REST GET \/v2\/health\/ready: HTTP 503\n {6}-> upstream layer: the model server is not ready yet \(busy\\u001b\[1A\\u001b\[2K\\u000dok .*\\u000aprobe: all 2 steps passed\\u001b\[8m\\u009b2J\)$/m);
    } finally {
      server.close();
    }
  });

  test('a proxy that wants a PROXY protocol header first (--mtls_proxy_protocol) closes on the probe\'s hello: the report says so, not a bare network failure', async () => {
    const behindBalancer = await startTestProxy({ pki, upstream: { grpcPort: upstream.grpcPort!, restPort: upstream.restPort! }, proxyProtocol: { from: [] } });
    try {
      const { code, out } = await probe(['--port', String(behindBalancer.grpcPort), '--rest_port', String(behindBalancer.restPort), ...clientFlags()]);
      assert.equal(code, 1);
      assert.match(out, /^FAIL .*TLS handshake.*\n.*-> network layer: the server closed the connection on the TLS hello without a TLS alert: a port that expects a PROXY protocol header first \(ovms-mtls --mtls_proxy_protocol/m);
    } finally {
      await behindBalancer.proxy.shutdown(1000);
    }
  });

  for (const version of ['v1', 'v2', '2']) {
    test(`--proxy_protocol ${version}: the probe begins each connection with the header a load balancer would send, and a proxy that wants one passes every step, gRPC and REST`, async () => {
      const behindBalancer = await startTestProxy({ pki, upstream: { grpcPort: upstream.grpcPort!, restPort: upstream.restPort! }, proxyProtocol: { from: [] } });
      try {
        const { code, out } = await probe(['--port', String(behindBalancer.grpcPort), '--rest_port', String(behindBalancer.restPort), '--model', 'dummy', '--proxy_protocol', version, ...clientFlags()]);
        assert.equal(code, 0, out);
        assert.match(out, /^ok {4}grpc {2}gRPC ModelMetadata dummy: /m);
        assert.match(out, /^ok {4}rest {2}REST GET \/v2\/models\/dummy: HTTP 200/m);
        assert.match(out, /probe: all 7 steps passed/);
        assert.equal(behindBalancer.logs.lines.filter((l) => l['msg'] === 'handshake_failed').length, 0);
      } finally {
        await behindBalancer.proxy.shutdown(1000);
      }
    });
  }

  test('--proxy_protocol sent to a port that takes none: the report names the header as what the port may have refused, not a missing one', async () => {
    const { code, out } = await probe(['--rest_port', String(front.restPort), '--proxy_protocol', 'v2', ...clientFlags()]);
    assert.equal(code, 1);
    assert.match(out, /^FAIL .*TLS handshake.*\n.*-> network layer: the server closed the connection on the PROXY protocol header and TLS hello without a TLS alert: a port that takes no PROXY header \(started without --mtls_proxy_protocol, or this address is not in its --mtls_proxy_protocol_from: probe without --proxy_protocol\)/m);
  });

  test('--proxy_protocol takes v1 or v2 (1, 2), anything else is a one-line usage error with exit 2', async () => {
    const res = await runCli(['probe', '--host', '127.0.0.1', '--rest_port', String(front.restPort), '--proxy_protocol', 'v3', ...clientFlags()]);
    assert.equal(res.code, 2, res.stderr);
    assert.equal(res.stderr, "ovms-mtls: --proxy_protocol: 'v3' is no PROXY protocol version: give v1 (text, HAProxy send-proxy) or v2 (binary, send-proxy-v2, an AWS NLB)\n");
    assert.equal(res.stdout, '');
  });

  test('nothing listening is reported as the network layer', async () => {
    const { code, out } = await probe(['--port', String((await freeLoopbackPorts(1))[0]), ...clientFlags()]);
    assert.equal(code, 1);
    assert.match(out, /-> network layer: nothing listens on 127\.0\.0\.1:\d+/);
  });

  test('a client key of another certificate, or a damaged block in the client chain, is a one-line usage error with exit 2, not a stack trace', async () => {
    const damagedChain = join(pki.dir, 'client_damaged_chain.pem');
    await writeFile(damagedChain, `${pki.client.certPem}-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n`);
    const cases: [string[], string][] = [
      [['--mtls_cert', pki.paths['client.pem']!, '--mtls_key', pki.paths['server.key']!],
        `ovms-mtls: --mtls_key: ${pki.paths['server.key']} does not match --mtls_cert ${pki.paths['client.pem']} (give the key of that client certificate)\n`],
      [['--mtls_cert', damagedChain, '--mtls_key', pki.paths['client.key']!],
        `ovms-mtls: --mtls_cert: ${damagedChain} holds a PEM block after the certificate that is not a valid certificate (a chain file holds the client certificate, then its CAs)\n`],
    ];
    for (const [files, message] of cases) {
      const res = await runCli(['probe', '--host', '127.0.0.1', '--rest_port', String(front.restPort), ...files, '--mtls_ca', pki.paths['server_ca.pem']!]);
      assert.equal(res.code, 2, res.stderr);
      assert.equal(res.stderr, message);
      assert.equal(res.stdout, '');
    }
  });

  test('a DER CA, a DER certificate or key, a key given as a certificate or an encrypted key is named as such in one line with exit 2; a DER CA was skipped and the probe blamed the server certificate', async () => {
    const derCa = join(pki.dir, 'server_ca.der');
    const derCert = join(pki.dir, 'client.der');
    const derKey = join(pki.dir, 'client.key.der');
    const encryptedKey = join(pki.dir, 'client.enc.key');
    await writeFile(derCa, new X509Certificate(pki.serverCa.certPem).raw);
    await writeFile(derCert, new X509Certificate(pki.client.certPem).raw);
    await writeFile(derKey, createPrivateKey(pki.client.keyPem).export({ format: 'der', type: 'pkcs8' }));
    await writeFile(encryptedKey, createPrivateKey(pki.client.keyPem).export({ format: 'pem', type: 'pkcs8', cipher: 'aes-256-cbc', passphrase: 'x' }));
    const [cert, key, ca] = [pki.paths['client.pem']!, pki.paths['client.key']!, pki.paths['server_ca.pem']!];
    const cases: [[string, string, string], RegExp][] = [
      [[cert, key, derCa], /^ovms-mtls: --mtls_ca: \S+server_ca\.der holds a DER \(binary\) certificate, not PEM \(convert it: `openssl x509 -inform DER /],
      [[derCert, key, ca], /^ovms-mtls: --mtls_cert: \S+client\.der holds a DER \(binary\) certificate, not PEM /],
      [[cert, derKey, ca], /^ovms-mtls: --mtls_key: \S+client\.key\.der holds a DER \(binary\) key, not PEM \(convert it: `openssl pkey -inform DER /],
      [[key, cert, ca], /^ovms-mtls: --mtls_cert: \S+client\.key holds a private key, not a certificate \(--mtls_cert and --mtls_key swapped\?\)$/],
      [[cert, encryptedKey, ca], /^ovms-mtls: --mtls_key: \S+client\.enc\.key is encrypted, and probe takes no passphrase /],
    ];
    for (const [[certFile, keyFile, caFile], message] of cases) {
      const res = await runCli(['probe', '--host', '127.0.0.1', '--rest_port', String(front.restPort), '--mtls_cert', certFile, '--mtls_key', keyFile, '--mtls_ca', caFile]);
      assert.equal(res.code, 2, res.stdout);
      assert.equal(res.stderr.trim().split('\n').length, 1, res.stderr);
      assert.match(res.stderr.trim(), message);
      assert.equal(res.stdout, '');
    }
  });

  // 1e3 and 0x10 passed, as Number() reads them, where the whole-number options refuse them.
  test('a --timeout too long for a Node timer, or not plain decimal (1e3, 0x10), is a one-line usage error with exit 2, not a step failing at once', async () => {
    for (const given of ['99999999999', '1e3', '0x10']) {
      const res = await runCli(['probe', '--host', '127.0.0.1', '--rest_port', String(front.restPort), ...clientFlags(), '--timeout', given]);
      assert.equal(res.code, 2, res.stdout);
      assert.equal(res.stderr, `ovms-mtls: --timeout: '${given}' is not a number of seconds > 0 and <= 2000000\n`);
    }
  });

  test('a URL or host:port given as --host (as clients are given the deployment) is a one-line usage error showing the split, not a name that does not resolve', async () => {
    const cases: [string, string][] = [
      ['https://ovms.example:8443/v2/health/ready', ', not a URL: for https://ovms.example:8443/v2/health/ready give --host ovms.example and --port 8443 (gRPC) or --rest_port 8443 (REST)'],
      ['localhost:9443', ' without a port: for localhost:9443 give --host localhost and --port 9443 (gRPC) or --rest_port 9443 (REST)'],
      ['[::1]:9443', ' without a port: for [::1]:9443 give --host [::1] and --port 9443 (gRPC) or --rest_port 9443 (REST)'],
    ];
    for (const [host, words] of cases) {
      const res = await runCli(['probe', '--host', host, '--rest_port', String(front.restPort), ...clientFlags()]);
      assert.equal(res.code, 2, res.stdout);
      assert.equal(res.stderr, `ovms-mtls: --host takes a host name or address${words}\n`);
    }
    // An IPv6 address, bracketed or not, is a host.
    assert.equal((await probe(['--host', '[::1]', '--rest_port', '1', ...clientFlags()])).code, 1);
  });

  // Before: `--host ' 127.0.0.1 '` (a value pasted with a space, as bind addresses and upstreams take it) failed
  // "ENOTFOUND -> host name  127.0.0.1  does not resolve", the spaces hard to see; `--host ' '` looked up a blank name.
  test('spaces around --host are dropped, as around a bind address or an upstream; a blank --host is the missing-option line', async () => {
    const res = await probe(['--host', ' 127.0.0.1 ', '--rest_port', String(front.restPort), ...clientFlags()]);
    assert.equal(res.code, 0, res.out);
    assert.match(res.out, new RegExp(`TLS handshake with 127\\.0\\.0\\.1:${front.restPort}: `));
    const blank = await runCli(['probe', '--host', ' ', '--rest_port', String(front.restPort), ...clientFlags()]);
    assert.equal(blank.code, 2, blank.stdout);
    assert.equal(blank.stderr, 'ovms-mtls: --host is required (the address clients use, e.g. --host localhost)\n');
  });

  test('in the container, where OVMS_MTLS_CERT names the server certificate, a missing --mtls_cert does not blame that variable, which probe never reads', async () => {
    const res = await runCli(['probe', '--host', '127.0.0.1', '--rest_port', '1', '--mtls_key', pki.paths['client.key']!, '--mtls_ca', pki.paths['server_ca.pem']!],
      { env: { ...cleanEnv(), OVMS_MTLS_CERT: pki.paths['server.pem']! } });
    assert.equal(res.code, 2);
    assert.equal(res.stderr, 'ovms-mtls: --mtls_cert is required (a PEM file; `ovms-mtls certs init` makes client.pem, client.key and server_ca.pem)\n');
  });

  // A container set up for Hugging Face downloads behind a corporate proxy has these; grpc-js alone
  // honoured them, so the gRPC steps went to the proxy and failed as "could not reach a ready model server".
  test('http(s)_proxy and grpc_proxy in the environment are not used: gRPC goes to the deployment directly, as REST always did', async () => {
    const [nothingListens] = await freeLoopbackPorts(1);
    const proxy = `http://127.0.0.1:${nothingListens}`;
    const res = await runCli(['probe', '--host', '127.0.0.1', '--port', String(front.grpcPort), '--rest_port', String(front.restPort), ...clientFlags()],
      { env: { https_proxy: proxy, http_proxy: proxy, grpc_proxy: proxy, HTTPS_PROXY: proxy, HTTP_PROXY: proxy } });
    assert.equal(res.code, 0, res.stdout + res.stderr);
    assert.match(res.stdout, /all \d+ steps passed/);
    assert.equal(res.stderr, '');
  });

  // `probe ... | grep -q FAIL` in a script: grep exits at its first match, and the probe's next line met a closed pipe.
  test('a reader of its output that is gone costs the output, not a stack trace: the exit code is still the result', async () => {
    const child = spawn(process.execPath, [BIN, 'probe', '--host', '127.0.0.1', '--port', String(front.grpcPort), '--rest_port', String(front.restPort), ...clientFlags()],
      { env: cleanEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
    child.stdout.destroy();
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    const [code] = await once(child, 'close');
    assert.equal(stderr, '');
    assert.equal(code, 0);
  });

  test('the built CLI exits 0 on success and a missing client key is a one-line usage error with exit 2', async () => {
    const ok = spawn(process.execPath, [BIN, 'probe', '--host', '127.0.0.1', '--rest_port', String(front.restPort), ...clientFlags()], { stdio: ['ignore', 'pipe', 'pipe'] });
    ok.stdout.resume();
    assert.equal((await once(ok, 'exit'))[0], 0);
    const bad = spawn(process.execPath, [BIN, 'probe', '--host', '127.0.0.1', '--rest_port', '1', '--mtls_cert', pki.paths['client.pem']!, '--mtls_ca', pki.paths['server_ca.pem']!], { stdio: ['ignore', 'ignore', 'pipe'] });
    const err: Buffer[] = [];
    bad.stderr.on('data', (c: Buffer) => err.push(c));
    assert.equal((await once(bad, 'exit'))[0], 2);
    assert.equal(Buffer.concat(err).toString(), 'ovms-mtls: --mtls_key is required (a PEM file; `ovms-mtls certs init` makes client.pem, client.key and server_ca.pem)\n');
  });
});
