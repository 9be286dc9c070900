import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import { connect as tcpConnect, type Socket } from 'node:net';
import * as grpc from '@grpc/grpc-js';
import { casWithNamesOf, type TestPki } from './helpers/pki.js';
import { CA_NAMES_LIMIT } from '../src/ca-names.js';
import { assertRefusedAnswer, assertRefusedCall, baseConfig, grpcClients, grpcFrame, h2Request, h2Session, https1, negotiatedVersion, startProxyFixture, startTestProxy, tlsClientOptions, type LogCapture, type LogLine, type StartedProxy } from './helpers/harness.js';
import { unary } from '../src/demo/grpc-client.js';
import type { ModelServer } from '../src/demo/model-server.js';
import { createCa, issueClientCert, type Issued } from '../src/x509.js';
import { ProxyMetrics } from '../src/metrics.js';
import { eventually, sample } from './helpers/ops.js';
import { runCommand } from './helpers/cli.js';
import { loadTlsMaterialSync } from '../src/tls-material.js';

let pki: TestPki;
let upstream: ModelServer;
let front: StartedProxy;
let closeAll: () => Promise<void>;

// The default handshake timeout: a file-wide 300 ms one failed any handshake here that a loaded machine held up that long.
before(async () => ({ pki, upstream, front, close: closeAll } = await startProxyFixture()));
after(() => closeAll());

const refusedCases: [string, () => Issued | null, string][] = [
  ['no certificate', () => null, 'no_certificate'],
  ['a certificate from another CA', () => pki.foreignClient, 'unknown_ca'],
  ['an expired certificate', () => pki.expiredClient, 'expired'],
  ['a certificate not valid yet', () => pki.notYetValidClient, 'not_yet_valid'],
  ['a certificate revoked by the CRL', () => pki.revokedClient, 'revoked'],
  ['a certificate whose EKU forbids client use', () => pki.serverOnlyEkuClient, 'wrong_purpose'],
];

describe('refused clients', () => {
  for (const [label, client, reason] of refusedCases) {
    test(`a client with ${label} is refused on both ports before anything reaches the upstream, told ${reason}, as the log says with its serial`, async () => {
      const receivedBefore = upstream.received.length;
      const refusalsBefore = front.logs.lines.filter((l) => l.event === 'client_refused' && l.reason === reason).length;
      const c = grpcClients(front.grpcAddress, pki, client());
      try {
        const err = await unary(c.echo, 'Unary', { payload: Buffer.from('x') }).then(() => assert.fail('call should be refused'), (e: grpc.ServiceError) => e);
        assertRefusedCall(err, reason);
      } finally {
        c.close();
      }
      assertRefusedAnswer(await https1(front.restPort, pki, { path: '/v2/health/ready', client: client() }), reason);
      await front.logs.waitFor((l) => l.event === 'client_refused' && l.reason === reason && front.logs.lines.filter((m) => m.event === 'client_refused' && m.reason === reason).length >= refusalsBefore + 2);
      const line = front.logs.lines.find((l) => l.event === 'client_refused' && l.reason === reason)!;
      assert.equal(line.level, 'warn');
      // Which of a client's certificates was refused: a revoked one still in use, or its successor.
      assert.equal(line['serial'], client()?.serialHex);
      assert.equal(upstream.received.length, receivedBefore);
    });
  }

  test('a refused client cannot make its log line long: its self-made names of 20000 characters are cut, saying how much, and the line stays under PIPE_BUF', async () => {
    const stranger = await issueClientCert({ issuer: await createCa({ commonName: 'I'.repeat(20_000) }), commonName: 'S'.repeat(20_000) });
    const before = front.logs.lines.length;
    assertRefusedAnswer(await https1(front.restPort, pki, { path: '/v2/health/ready', client: stranger }), 'unknown_ca');
    const line = await front.logs.waitFor((l) => l.event === 'client_refused' && front.logs.lines.indexOf(l) >= before);
    assert.match(String(line['subject']), /^CN=S{253}\.\.\. \(19747 more characters\)$/);
    assert.match(String(line.msg), /^client certificate is not issued by a trusted client CA \(UNABLE_TO_VERIFY_LEAF_SIGNATURE; issued by CN=I+\.\.\. \(\d+ more characters\)$/);
    assert.ok(Buffer.byteLength(JSON.stringify(line)) < 4096, `a line of ${Buffer.byteLength(JSON.stringify(line))} bytes`);
  });

  test('a refused client cannot make its log line long with a self-made serial number of 30,000 bytes either: it is cut like its names', async () => {
    const [key, cert] = [`${pki.dir}/long-serial.key`, `${pki.dir}/long-serial.pem`];
    const serial = `0x7${'f'.repeat(59_999)}`;
    const made = await runCommand('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', key, '-out', cert,
      '-subj', '/CN=long serial', '-set_serial', serial, '-days', '1', '-addext', 'extendedKeyUsage=clientAuth']);
    assert.equal(made.code, 0, made.stderr);
    const before = front.logs.lines.length;
    const stranger = { certPem: await readFile(cert, 'utf8'), keyPem: await readFile(key, 'utf8'), serialHex: serial.slice(2) };
    assertRefusedAnswer(await https1(front.restPort, pki, { path: '/v2/health/ready', client: stranger }), 'unknown_ca');
    const line = await front.logs.waitFor((l) => l.event === 'client_refused' && front.logs.lines.indexOf(l) >= before);
    assert.match(String(line['serial']), /^7f{63}\.\.\. \(59936 more characters\)$/);
    assert.ok(Buffer.byteLength(JSON.stringify(line)) < 4096, `a line of ${Buffer.byteLength(JSON.stringify(line))} bytes`);
  });

  test('a client presenting a valid certificate is accepted on both ports', async () => {
    const c = grpcClients(front.grpcAddress, pki);
    try {
      assert.equal((await unary(c.kserve, 'ServerLive', {})).response.live, true);
    } finally {
      c.close();
    }
    assert.equal((await https1(front.restPort, pki, { path: '/v2/health/live' })).status, 200);
  });
});

describe('spoofed identity headers', () => {
  test('x-forwarded-client-cert sent by a REST client is removed in any casing and count, then set from the certificate', async () => {
    // Written by hand: Node's client would merge the duplicate headers.
    const socket = tlsConnect({ host: '127.0.0.1', port: front.restPort, ...tlsClientOptions(pki), ALPNProtocols: ['http/1.1'] });
    await once(socket, 'secureConnect');
    socket.write('GET /v2/health/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n' +
      'X-Forwarded-Client-Cert: Hash=evil\r\nx-forwarded-client-cert: Subject="CN=admin"\r\nX-FORWARDED-CLIENT-CERT: URI=spiffe://evil\r\n\r\n');
    let answer = '';
    for await (const chunk of socket) answer += String(chunk);
    assert.match(answer, /^HTTP\/1\.1 200 /);
    const seen = upstream.received.filter((r) => r.protocol === 'rest' && r.path === '/v2/health/ready').at(-1)!;
    const xfcc = seen.headers['x-forwarded-client-cert'];
    assert.equal(typeof xfcc, 'string');
    assert.doesNotMatch(String(xfcc), /evil|admin/);
    assert.match(String(xfcc), /^Hash=[0-9a-f]{64};Subject="CN=client,OU=tests"/);
  });

  /** Our three fields with underscores for hyphens: one name to a CGI-style server (WSGI, PHP), which would take it for ours. */
  const DISGUISED = 'X_Forwarded_Client_Cert: Hash=evil\r\nx-forwarded_for: 6.6.6.6\r\nX_FORWARDED_PROTO: http\r\n';
  const disguisedNames = (headers: Record<string, unknown>) => Object.keys(headers).filter((name) => name.includes('_'));

  for (const restMode of ['terminate', 'relay'] as const) {
    test(`--mtls_rest_mode ${restMode}: our fields spelled with underscores never reach the model server; ours do`, async () => {
      const local = restMode === 'terminate' ? front : await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, restMode });
      try {
        const socket = tlsConnect({ host: '127.0.0.1', port: local.restPort, ...tlsClientOptions(pki), ALPNProtocols: ['http/1.1'] });
        await once(socket, 'secureConnect');
        socket.write(`GET /v2/health/ready?underscores=${restMode} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nx_other_field: kept\r\n${DISGUISED}\r\n`);
        let answer = '';
        for await (const chunk of socket) answer += String(chunk);
        assert.match(answer, /^HTTP\/1\.1 200 /);
        const seen = upstream.received.filter((r) => r.protocol === 'rest' && r.path === `/v2/health/ready?underscores=${restMode}`).at(-1)!;
        assert.deepEqual(disguisedNames(seen.headers), ['x_other_field']);
        assert.match(String(seen.headers['x-forwarded-client-cert']), /^Hash=[0-9a-f]{64};Subject="CN=client,OU=tests"/);
        assert.equal(seen.headers['x-forwarded-proto'], 'https');
      } finally {
        if (local !== front) await local.proxy.shutdown(1000);
      }
    });
  }

  test('gRPC metadata naming our fields with underscores never reaches the model server', async () => {
    const session = h2Session(front.grpcPort, pki);
    try {
      const disguised = { x_forwarded_client_cert: 'Hash=evil', 'x-forwarded_for': '6.6.6.6', x_forwarded_proto: 'http', x_other_field: 'kept' };
      await h2Request(session, { ':method': 'POST', ':path': '/ovmsmtls.test.Echo/Unary', 'content-type': 'application/grpc', te: 'trailers', ...disguised }, grpcFrame(Buffer.alloc(0)));
    } finally {
      session.close();
    }
    const seen = upstream.received.filter((r) => r.protocol === 'grpc' && r.path === '/ovmsmtls.test.Echo/Unary').at(-1)!;
    assert.deepEqual(disguisedNames(seen.headers), ['x_other_field']);
    assert.match(String(seen.headers['x-forwarded-client-cert']), /^Hash=[0-9a-f]{64};Subject="CN=client,OU=tests"/);
  });

  test('a subject outside ASCII (CN=Jürgen 日本) works on both ports, escaped in XFCC as RFC 4514 UTF-8 bytes', async () => {
    // Such a value in a header once made Node throw ERR_INVALID_CHAR and took the whole process down.
    const client = await issueClientCert({ issuer: pki.clientCa, commonName: 'Jürgen 日本' });
    const escaped = /;Subject="CN=J\\\\C3\\\\BCrgen \\\\E6\\\\97\\\\A5\\\\E6\\\\9C\\\\AC"$/;
    assert.equal((await https1(front.restPort, pki, { path: '/v2/health/live', client })).status, 200);
    assert.match(String(upstream.received.filter((r) => r.protocol === 'rest').at(-1)!.headers['x-forwarded-client-cert']), escaped);
    const c = grpcClients(front.grpcAddress, pki, client);
    try {
      assert.equal((await unary(c.kserve, 'ServerLive', {})).response.live, true);
    } finally {
      c.close();
    }
    assert.match(String(upstream.received.filter((r) => r.protocol === 'grpc').at(-1)!.headers['x-forwarded-client-cert']), escaped);
  });

  test('x-forwarded-client-cert sent as gRPC metadata is replaced, whatever the count', async () => {
    const session = h2Session(front.grpcPort, pki);
    try {
      await h2Request(session, { ':method': 'POST', ':path': '/ovmsmtls.test.Echo/Unary', 'content-type': 'application/grpc', te: 'trailers', 'x-forwarded-client-cert': ['Hash=evil', 'Subject="CN=admin"'] }, grpcFrame(Buffer.alloc(0)));
    } finally {
      session.close();
    }
    const seen = upstream.received.filter((r) => r.protocol === 'grpc' && r.path === '/ovmsmtls.test.Echo/Unary').at(-1)!;
    assert.doesNotMatch(String(seen.headers['x-forwarded-client-cert']), /evil|admin/);
    assert.match(String(seen.headers['x-forwarded-client-cert']), /^Hash=[0-9a-f]{64};Subject="CN=client,OU=tests"/);
  });
});

/**
 * The first handshake_failed line with `reason` logged after `from` lines. Others may come between: a TLS 1.3
 * client that hangs up right after its handshake is logged client_closed, its side of the handshake ending before ours.
 */
async function handshakeFailure(logs: LogCapture, reason: string, from = 0): Promise<LogLine> {
  const matches = (l: LogLine) => l.event === 'handshake_failed' && l.reason === reason;
  await eventually(() => logs.lines.slice(from).some(matches), `a handshake_failed line with reason ${reason}`);
  return logs.lines.slice(from).find(matches)!;
}

describe('TLS settings', () => {
  test('TLS 1.3 is negotiated by a modern client', async () => {
    const socket = tlsConnect({ host: '127.0.0.1', port: front.restPort, ...tlsClientOptions(pki), ALPNProtocols: ['http/1.1'] });
    await once(socket, 'secureConnect');
    assert.equal(socket.getProtocol(), 'TLSv1.3');
    socket.destroy();
  });

  test('TLS 1.1 is refused, the line naming the versions taken', async () => {
    const from = front.logs.lines.length;
    const socket = tlsConnect({ host: '127.0.0.1', port: front.restPort, ...tlsClientOptions(pki), minVersion: 'TLSv1.1', maxVersion: 'TLSv1.1', ciphers: 'DEFAULT@SECLEVEL=0' });
    const [err] = (await once(socket, 'error').catch((e: unknown) => [e])) as [NodeJS.ErrnoException];
    assert.match(String(err.code ?? err.message), /VERSION|PROTOCOL|ALERT|ECONNRESET/i);
    assert.equal((await handshakeFailure(front.logs, 'unsupported_protocol', from)).msg, 'the client offers no TLS version we accept (TLS 1.2 and 1.3)');
  });

  test('a TLS 1.2 client offering only CBC suites finds no shared cipher', async () => {
    const socket = tlsConnect({ host: '127.0.0.1', port: front.restPort, ...tlsClientOptions(pki), maxVersion: 'TLSv1.2', ciphers: 'ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA' });
    const [err] = (await once(socket, 'error').catch((e: unknown) => [e])) as [NodeJS.ErrnoException];
    assert.match(String(err.code ?? err.message), /HANDSHAKE_FAILURE|NO_SHARED_CIPHER|ALERT/i);
  });

  test('a TLS 1.2 client offering an ECDHE AEAD suite is served', async () => {
    const socket = tlsConnect({ host: '127.0.0.1', port: front.restPort, ...tlsClientOptions(pki), maxVersion: 'TLSv1.2', ciphers: 'ECDHE-ECDSA-AES128-GCM-SHA256' });
    await once(socket, 'secureConnect');
    assert.equal(socket.getProtocol(), 'TLSv1.2');
    socket.destroy();
  });

  for (const version of ['TLSv1.2', 'TLSv1.3'] as const) {
    test(`no ${version} session is resumed: every connection gets a full handshake and a fresh certificate check`, async () => {
      const options = { host: '127.0.0.1', port: front.restPort, ...tlsClientOptions(pki), maxVersion: version, ALPNProtocols: ['http/1.1'] };
      const first = tlsConnect(options);
      let ticket: Buffer | undefined;
      first.on('session', (s: Buffer) => (ticket = s));
      await once(first, 'secureConnect');
      // Any ticket arrives before the response to a first request; read until the server closes.
      first.end('GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n');
      first.resume();
      await once(first, 'close');
      const second = tlsConnect({ ...options, session: ticket ?? first.getSession() });
      await once(second, 'secureConnect');
      assert.equal(second.isSessionReused(), false);
      second.destroy();
    });
  }

  /** A TLS 1.2 client asks for a new handshake on a live connection: 'renegotiated', or the error it got. */
  async function renegotiation(port: number, alpn: string): Promise<string> {
    const socket = tlsConnect({ host: '127.0.0.1', port, ...tlsClientOptions(pki), maxVersion: 'TLSv1.2', ALPNProtocols: [alpn] });
    try {
      await once(socket, 'secureConnect');
      return await new Promise<string>((resolve) => {
        socket.once('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? err.message));
        socket.once('close', () => resolve('closed'));
        socket.renegotiate({}, (err) => resolve(err ? ((err as NodeJS.ErrnoException).code ?? err.message) : 'renegotiated'));
      });
    } finally {
      socket.destroy();
    }
  }

  test('a client-initiated TLS 1.2 renegotiation is refused by the protocol on every port and in every mode (nginx and Envoy do not take it either)', async () => {
    const relay = await startTestProxy({ pki, upstream, grpcMode: 'relay', restMode: 'relay' });
    try {
      for (const [mode, proxy] of [['terminate', front], ['relay', relay]] as const) {
        assert.equal(await renegotiation(proxy.restPort, 'http/1.1'), 'ERR_SSL_NO_RENEGOTIATION', `${mode} REST over HTTP/1.1`);
        assert.equal(await renegotiation(proxy.grpcPort, 'h2'), 'ERR_SSL_NO_RENEGOTIATION', `${mode} gRPC over HTTP/2`);
      }
    } finally {
      await relay.proxy.shutdown(1000);
    }
  });

  test('a connection that never completes its handshake is closed by the handshake timeout', async () => {
    const impatient = await startTestProxy({ pki, upstream, limits: { handshakeTimeoutMs: 300 } });
    try {
      const socket = tcpConnect(impatient.restPort, '127.0.0.1');
      socket.on('error', () => {});
      await once(socket, 'connect');
      await once(socket, 'close');
      await impatient.logs.waitFor((l) => l.event === 'handshake_failed' && l.reason === 'handshake_timeout');
    } finally {
      await impatient.proxy.shutdown(1000);
    }
  });

  /** Material a client brings from other tools, made by the openssl CLI. */
  async function openssl(...args: string[]): Promise<void> {
    const made = await runCommand('openssl', args);
    assert.equal(made.code, 0, `openssl ${args[0]}: ${made.stderr}`);
  }

  /** The first handshake_failed line logged after `from` lines. */
  async function failureAfter(from: number) {
    await eventually(() => front.logs.lines.slice(from).some((l) => l.event === 'handshake_failed'), 'a handshake_failed line');
    return front.logs.lines.slice(from).find((l) => l.event === 'handshake_failed')!;
  }

  test('a client that distrusts our certificate and hangs up is named, and told where the fix usually is', async () => {
    const from = front.logs.lines.length;
    // Node (like grpc-js and grpcio) closes without an alert: the server sees only the reset, after which the socket has no address.
    const socket = tlsConnect({ port: front.grpcPort, host: '127.0.0.1', servername: 'localhost', ca: pki.clientCa.certPem, ALPNProtocols: ['h2'] });
    const [err] = await once(socket, 'error') as [NodeJS.ErrnoException];
    assert.equal(err.code, 'UNABLE_TO_VERIFY_LEAF_SIGNATURE');
    const line = await failureAfter(from);
    assert.equal(line.reason, 'client_closed');
    assert.equal(line.remote, '127.0.0.1');
    assert.match(line.msg, /closed the connection before the TLS handshake finished.*does not trust our server certificate/);
  });

  test('a client that refuses our certificate with a TLS alert (curl) is told to trust the CA of --mtls_cert', async () => {
    const from = front.logs.lines.length;
    const curl = await runCommand('curl', ['-s', '--http1.1', '--cacert', pki.paths['client_cert_ca.pem']!, '--cert', pki.paths['client.pem']!,
      '--key', pki.paths['client.key']!, `https://localhost:${front.restPort}/v2/health/live`]);
    assert.equal(curl.code, 60, 'curl: peer certificate cannot be authenticated with the given CA');
    const line = await failureAfter(from);
    assert.equal(line.reason, 'tlsv1_alert_unknown_ca');
    assert.equal(line.remote, '127.0.0.1');
    assert.match(line.msg, /refused our server certificate: give it the CA that signed --mtls_cert.*\(TLS alert unknown_ca\)$/);
  });

  test('a client certificate chain over OpenSSL\'s 100 KiB limit fails the handshake with a line saying so, not only excessive_message_size', async () => {
    const filler = { key: `${pki.dir}/filler.key`, pem: `${pki.dir}/filler.pem` };
    await openssl('ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', filler.key);
    // One certificate carrying 110 KB, as a CA bundle of some hundred certificates appended to the client's would.
    await openssl('req', '-new', '-x509', '-key', filler.key, '-subj', '/CN=filler', '-days', '1', '-addext', `nsComment=${'x'.repeat(110_000)}`, '-out', filler.pem);
    const from = front.logs.lines.length;
    const socket = tlsConnect({ host: '127.0.0.1', port: front.restPort, ...tlsClientOptions(pki), cert: pki.client.certPem + (await readFile(filler.pem, 'utf8')) });
    socket.on('error', () => {});
    const line = await failureAfter(from);
    socket.destroy();
    assert.equal(line.reason, 'excessive_message_size');
    assert.match(line.msg, /certificate chain over OpenSSL's 100 KiB limit .*: it should send its own certificate and intermediates only$/);
  });

  test('a TLS 1.3 client taking no signature our EC server key can make is told to serve a key type it supports', async () => {
    const from = front.logs.lines.length;
    const socket = tlsConnect({ host: '127.0.0.1', port: front.restPort, ...tlsClientOptions(pki), sigalgs: 'rsa_pss_rsae_sha256:rsa_pkcs1_sha256' });
    socket.on('error', () => {});
    const line = await failureAfter(from);
    socket.destroy();
    assert.equal(line.reason, 'no_suitable_signature_algorithm');
    assert.match(line.msg, /^the client accepts no signature algorithm the key of --mtls_cert can make .*: serve a certificate with a key type the client supports$/);
  });

  test('a TLS 1.2 client whose certificate key is on a curve we do not take (brainpool) is told to use P-256 or P-384', async () => {
    const brainpool = { key: `${pki.dir}/brainpool.key`, csr: `${pki.dir}/brainpool.csr`, pem: `${pki.dir}/brainpool.pem` };
    await openssl('ecparam', '-name', 'brainpoolP256r1', '-genkey', '-noout', '-out', brainpool.key);
    await openssl('req', '-new', '-key', brainpool.key, '-subj', '/CN=brainpool client', '-out', brainpool.csr);
    await openssl('x509', '-req', '-in', brainpool.csr, '-CA', pki.paths['client_cert_ca.pem']!, '-CAkey', pki.paths['client_cert_ca.key']!, '-days', '1', '-out', brainpool.pem);
    const from = front.logs.lines.length;
    const socket = tlsConnect({ host: '127.0.0.1', port: front.restPort, ...tlsClientOptions(pki), maxVersion: 'TLSv1.2', cert: await readFile(brainpool.pem), key: await readFile(brainpool.key) });
    socket.on('error', () => {});
    const line = await failureAfter(from);
    socket.destroy();
    assert.equal(line.reason, 'wrong_curve');
    assert.match(line.msg, /^the client certificate has an EC key on a curve we do not take .*: issue it with a P-256 or P-384 key$/);
  });

  test('a plaintext client on a TLS port is told so', async () => {
    const from = front.logs.lines.length;
    const socket = tcpConnect(front.restPort, '127.0.0.1');
    socket.on('error', () => {});
    socket.end('GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n\r\n');
    socket.resume();
    const line = await failureAfter(from);
    assert.equal(line.reason, 'not_tls');
    assert.match(line.msg, /did not start TLS: a plaintext client/);
  });

  test('HTTP/2 clients are told the bounded stream count and the larger flow-control window', async () => {
    const session = h2Session(front.grpcPort, pki);
    try {
      await once(session, 'remoteSettings');
      assert.equal(session.remoteSettings.maxConcurrentStreams, 128);
      assert.equal(session.remoteSettings.initialWindowSize, 1024 * 1024);
      assert.equal(session.remoteSettings.maxHeaderListSize, 64 * 1024);
    } finally {
      session.close();
    }
  });
});

// A policy of TLS 1.3 only could not be met: the listeners set TLS 1.2 as their minimum, over Node's --tls-min-v1.3 too.
describe('--mtls_min_tls_version=1.3', () => {
  test('TLS 1.2 clients fail their handshake on both ports and in both modes, also after a reload, logged naming the option; TLS 1.3 clients are served', async () => {
    for (const mode of ['terminate', 'relay'] as const) {
      const strict = await startTestProxy({ pki, upstream, grpcMode: mode, restMode: mode, limits: { minTlsVersion: '1.3' } });
      try {
        for (const [port, alpn] of [[strict.grpcPort, 'h2'], [strict.restPort, 'http/1.1']] as const) {
          assert.equal(await negotiatedVersion(port, pki, 'TLSv1.3', alpn), 'TLSv1.3', `${mode} ${alpn}`);
          assert.equal(await negotiatedVersion(port, pki, 'TLSv1.2', alpn), 'ERR_SSL_TLSV1_ALERT_PROTOCOL_VERSION', `${mode} ${alpn}`);
        }
        assert.equal((await handshakeFailure(strict.logs, 'unsupported_protocol')).msg, 'the client offers no TLS version we accept (TLS 1.3 only, --mtls_min_tls_version)');
        assert.equal((await https1(strict.restPort, pki, { path: '/v2/health/ready' })).status, 200);
        strict.proxy.reloadTls(loadTlsMaterialSync(baseConfig({ pki }).tls));
        assert.equal(await negotiatedVersion(strict.restPort, pki, 'TLSv1.2', 'http/1.1'), 'ERR_SSL_TLSV1_ALERT_PROTOCOL_VERSION', `${mode}, after a reload`);
        assert.equal(await negotiatedVersion(strict.restPort, pki, 'TLSv1.3', 'http/1.1'), 'TLSv1.3', `${mode}, after a reload`);
      } finally {
        await strict.proxy.shutdown(1000);
      }
    }
  });
});

describe('a client CA bundle of many CAs', () => {
  test('names taking the most the proxy accepts still let TLS 1.3 and TLS 1.2 clients through (Node sends every CA\'s name when it asks for a client certificate)', async () => {
    const clientCa = join(pki.dir, 'largest_accepted_bundle.pem');
    await writeFile(clientCa, await casWithNamesOf(CA_NAMES_LIMIT, pki.clientCa));
    const large = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, tls: { clientCa, crl: undefined } });
    try {
      for (const maxVersion of ['TLSv1.3', 'TLSv1.2'] as const) {
        const answer = await https1(large.restPort, pki, { path: '/v2/health/ready', maxVersion });
        assert.equal(answer.status, 200, `${maxVersion}: ${answer.body}`);
      }
    } finally {
      await large.proxy.shutdown(1000);
    }
  });
});

describe('connection limit', () => {
  test('a connection over --mtls_max_connections is closed before its handshake, logged client_refused too_many_connections and counted', async () => {
    const metrics = new ProxyMetrics({ processMetrics: false });
    const limited = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, limits: { maxConnections: 1 }, observer: metrics });
    const held = tlsConnect({ host: '127.0.0.1', port: limited.restPort, ...tlsClientOptions(pki), ALPNProtocols: ['http/1.1'] });
    try {
      await once(held, 'secureConnect');
      const over = tlsConnect({ host: '127.0.0.1', port: limited.restPort, ...tlsClientOptions(pki), ALPNProtocols: ['http/1.1'] });
      const [err] = (await once(over, 'error')) as [NodeJS.ErrnoException];
      assert.equal(err.code, 'ECONNRESET');
      // The refusal is logged before the socket is destroyed, so it is there by the time the client sees the reset.
      const line = limited.logs.lines.find((l) => l.event === 'client_refused' && l.reason === 'too_many_connections');
      assert.ok(line, 'the refusal is logged');
      assert.equal(line.level, 'warn');
      assert.equal(line.listener, 'rest');
      assert.equal(sample(await metrics.text(), 'ovms_mtls_handshakes_total', { listener: 'rest', result: 'refused', reason: 'too_many_connections' }), 1);
    } finally {
      held.destroy();
      await limited.proxy.shutdown(1000);
    }
  });
});

describe('a scanner on a public port', () => {
  /** Opens `count` connections one after the other and waits until each has closed; `open` starts one. */
  async function connectEach(count: number, open: () => Socket): Promise<void> {
    for (let i = 0; i < count; i++) {
      const socket = open();
      socket.on('error', () => {});
      socket.resume();
      await once(socket, 'close');
    }
  }

  test('failed and refused handshakes are logged in full a few times per reason, the rest in one line saying how many; the metric counts every one', async () => {
    const metrics = new ProxyMetrics({ processMetrics: false });
    // One window for the whole test: which lines are written in full does not depend on the machine's speed.
    const scanned = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, observer: metrics, handshakeLineLimit: { perWindow: 10, windowMs: 3_600_000 } });
    const handshakes = async (result: string, reason: string) => sample(await metrics.text(), 'ovms_mtls_handshakes_total', { listener: 'rest', result, reason });
    try {
      // A TCP check or port scan: connect, hang up before any TLS.
      await connectEach(30, () => {
        const socket = tcpConnect(scanned.restPort, '127.0.0.1');
        socket.once('connect', () => socket.end());
        return socket;
      });
      // A TLS scanner: a handshake with no certificate (one past the budget: the summary of one).
      await connectEach(11, () => tlsConnect({ host: '127.0.0.1', port: scanned.restPort, ...tlsClientOptions(pki, null), ALPNProtocols: ['http/1.1'] }));
      await eventually(async () => (await handshakes('failed', 'client_closed')) === 30 && (await handshakes('refused', 'no_certificate')) === 11, 'every handshake counted');
      const inFull = (event: string) => scanned.logs.lines.filter((l) => l.event === event && l.suppressed === undefined);
      assert.equal(inFull('handshake_failed').length, 10);
      assert.equal(inFull('client_refused').length, 10);
      assert.ok(inFull('handshake_failed').every((l) => l.reason === 'client_closed' && l.remote === '127.0.0.1'));
    } finally {
      await scanned.proxy.shutdown(1000);
    }
    // What the window held back is said at the latest when the proxy stops, one line per reason and listener.
    const summaries = scanned.logs.lines.filter((l) => l.suppressed !== undefined).map((l) => [l.event, l.level, l.listener, l.reason, l.suppressed]);
    assert.deepEqual(summaries, [['handshake_failed', 'info', 'rest', 'client_closed', 20], ['client_refused', 'warn', 'rest', 'no_certificate', 1]]);
    assert.match(scanned.logs.lines.find((l) => l.suppressed === 20)!.msg, /^20 more failed handshakes with this reason on this listener within the last 3600 s were not logged one by one \(at most 10 lines .*ovms_mtls_handshakes_total counts every one$/);
    assert.match(scanned.logs.lines.find((l) => l.suppressed === 1)!.msg, /^1 more refused client with this reason on this listener within the last 3600 s was not logged one by one /);
  });
});
