/**
 * IPv6 end to end: public ports bound to `::` (dual-stack, IPv4 clients arriving as
 * IPv4-mapped addresses) and `::1`, a model server on [::1], and every place an
 * address is shown to a user or the model server.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { lookup } from 'node:dns/promises';
import { once } from 'node:events';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect as connectH2, type ClientHttp2Session } from 'node:http2';
import { createServer as createTcpServer, type AddressInfo } from 'node:net';
import { connect as tlsConnect } from 'node:tls';
import { PassThrough } from 'node:stream';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { LogCapture, baseConfig, grpcFrame, h2Request, https1, startTestProxy, startUpstream, tlsClientOptions, type ProxySetup } from './helpers/harness.js';
import { ECHO_UNARY_HEADERS } from './helpers/grpc-calls.js';
import { END_HEADERS, END_STREAM, H2, h2Frame, headerBlock, rawH2Client } from './helpers/raw-h2.js';
import { plainCertDir, reloaderFor } from './helpers/reload.js';
import { runCli, startCli } from './helpers/cli.js';
import { FAKE_OVMS, makeFakeExecutable, tlsArgs } from './helpers/entrypoint.js';
import { eventually } from './helpers/ops.js';
import { startProxy, type RunningProxy } from '../src/proxy.js';
import { createLogger } from '../src/log.js';
import { loadTlsMaterialSync } from '../src/tls-material.js';
import { FORWARD_MODES, parseBindAddresses, parseHostPort, type Config, type ForwardMode } from '../src/config.js';
import { upstreamCheck } from '../src/health.js';
import { describeListenError } from '../src/listeners.js';
import { adminBindProblem } from '../src/admin.js';
import { freeLoopbackPorts } from '../src/ports.js';
import { hostAndPort } from '../src/addresses.js';
import { createCrl, issueClientCert, type Issued } from '../src/x509.js';
import { run } from '../src/cli/main.js';
import type { ModelServer } from '../src/demo/model-server.js';

let pki: TestPki;
/** The stand-in model server, on [::1] only. */
let upstream: ModelServer;
const dirs: string[] = [];
/** A hang guard, not a timing assertion. */
const SAFETY = { timeout: 120_000 };

before(async () => {
  pki = await createTestPki();
  upstream = await startUpstream({ host: '::1' });
});
after(async () => {
  await upstream.close();
  await pki.cleanup();
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })));
});

interface Front {
  proxy: RunningProxy;
  logs: LogCapture;
  grpcPort: number;
  restPort: number;
}

/** The proxy in front of the stand-in on [::1], both public ports bound to `hosts`. */
async function startOn(hosts: string[], setup: Omit<ProxySetup, 'pki' | 'upstream'> = {}): Promise<Front> {
  const base = baseConfig({ pki, upstream: { grpcPort: upstream.grpcPort!, restPort: upstream.restPort!, host: '::1' }, ...setup });
  const config: Config = { ...base, grpc: { ...base.grpc!, hosts }, rest: { ...base.rest!, hosts } };
  const logs = new LogCapture();
  const proxy = await startProxy({ config, material: loadTlsMaterialSync(config.tls), logger: createLogger({ level: 'debug', destination: logs }) });
  return { proxy, logs, grpcPort: proxy.port('grpc')!, restPort: proxy.port('rest')! };
}

const url = (host: string, port: number) => `https://${host.includes(':') ? `[${host}]` : host}:${port}`;

function h2Over(host: string, port: number, client: Issued = pki.client): ClientHttp2Session {
  const session = connectH2(url(host, port), tlsClientOptions(pki, client));
  session.on('error', () => {});
  return session;
}

const lastSeen = (protocol: 'grpc' | 'rest', path: string) => upstream.received.filter((r) => r.protocol === protocol && r.path === path).at(-1)!;

/** One Echo/Unary call over `host`, marked with `x-test` so the stand-in's record of it is found. */
async function echoOver(host: string, port: number, mark: string): Promise<void> {
  const session = h2Over(host, port);
  try {
    const res = await h2Request(session, { ...ECHO_UNARY_HEADERS, 'x-test': mark }, grpcFrame(Buffer.alloc(0)));
    assert.equal(res.trailers?.['grpc-status'] ?? res.headers['grpc-status'], '0');
  } finally {
    session.close();
  }
}

const seenWithMark = (mark: string) => upstream.received.find((r) => r.protocol === 'grpc' && r.headers['x-test'] === mark);

describe('public ports bound to :: alone (dual-stack)', SAFETY, () => {
  for (const mode of FORWARD_MODES) {
    test(`${mode} mode: an IPv4 client is 127.0.0.1 in X-Forwarded-For and the access lines, not the IPv4-mapped ::ffff:127.0.0.1; an IPv6 client is ::1`, async () => {
      const front = await startOn(['::'], { grpcMode: mode, restMode: mode });
      try {
        for (const host of ['127.0.0.1', '::1']) {
          const path = `/v2/health/live?from=${host}`;
          assert.equal((await https1(front.restPort, pki, { host, path })).status, 200);
          assert.equal(lastSeen('rest', path).headers['x-forwarded-for'], host);
          const line = await front.logs.waitFor((l) => l.event === 'access' && l.listener === 'rest' && l.path === path);
          assert.equal(line.remote, host);
          const mark = `${mode} ${host}`;
          await echoOver(host, front.grpcPort, mark);
          if (mode === 'terminate') {
            assert.equal(seenWithMark(mark)!.headers['x-forwarded-for'], host);
            const grpcLine = await front.logs.waitFor((l) => l.event === 'access' && l.listener === 'grpc' && l.remote === host);
            assert.equal(grpcLine.path, '/ovmsmtls.test.Echo/Unary');
          } else {
            // Relay mode sets no headers on gRPC (README); its per-connection line names the client.
            await front.logs.waitFor((l) => l.event === 'relay_access' && l.listener === 'grpc' && l.remote === host);
          }
        }
        assert.equal(front.logs.lines.some((l) => String(l.remote).startsWith('::ffff:')), false);
      } finally {
        await front.proxy.shutdown(1000);
      }
    });
  }

  test('a refused IPv4 client is logged as 127.0.0.1: no client certificate, and one over --mtls_max_connections', async () => {
    const front = await startOn(['::'], { limits: { maxConnections: 1 } });
    const connect = (port: number, client: Issued | null) => {
      const socket = tlsConnect({ host: '127.0.0.1', port, ...tlsClientOptions(pki, client), ALPNProtocols: ['h2'] });
      socket.on('error', () => {});
      return socket;
    };
    // Each listener counts its own connections: the gRPC one takes the refused handshake.
    connect(front.grpcPort, null);
    const held = connect(front.restPort, pki.client);
    const secured = once(held, 'secureConnect');
    try {
      const noCert = await front.logs.waitFor((l) => l.event === 'client_refused' && l.reason === 'no_certificate');
      assert.equal(noCert.remote, '127.0.0.1');
      await secured;
      connect(front.restPort, pki.client);
      const tooMany = await front.logs.waitFor((l) => l.event === 'client_refused' && l.reason === 'too_many_connections');
      assert.equal(tooMany.remote, '127.0.0.1');
    } finally {
      held.destroy();
      await front.proxy.shutdown(1000);
    }
  });

  test('a live IPv4 connection closed by a CRL reload is logged as 127.0.0.1', async () => {
    const bob = await issueClientCert({ issuer: pki.clientCa, commonName: 'bob' });
    const certs = await plainCertDir({ cert: pki.server.certPem, key: pki.server.keyPem, clientCa: pki.clientCa.certPem, crl: pki.crlPem });
    dirs.push(certs.dir);
    const front = await startOn(['::'], { tls: certs.files });
    const reloader = reloaderFor(front, certs.files, { revokedGraceMs: 1000, debounceMs: 20 });
    const session = h2Over('127.0.0.1', front.restPort, bob);
    try {
      assert.equal((await h2Request(session, { ':path': '/v2/health/live' })).headers[':status'], 200);
      await writeFile(certs.files.crl!, await createCrl({ issuer: pki.clientCa, revoked: [{ serialHex: bob.serialHex }], crlNumber: 2 }));
      const outcome = await reloader.reload('signal');
      assert.equal(outcome.ok && outcome.revokedConnections, 1);
      const line = await front.logs.waitFor((l) => l.event === 'connection_revoked');
      assert.equal(line.remote, '127.0.0.1');
    } finally {
      session.destroy();
      reloader.close();
      await front.proxy.shutdown(1000);
    }
  });

  test('the listening lines write the addresses with brackets: [::]:port', async () => {
    const front = await startOn(['::']);
    try {
      const rest = await front.logs.waitFor((l) => l.event === 'listening' && l.listener === 'rest');
      assert.deepEqual(rest['addresses'], [`[::]:${front.restPort}`]);
    } finally {
      await front.proxy.shutdown(1000);
    }
  });
});

describe('a model server on [::1]', SAFETY, () => {
  test('a gRPC call naming its authority by a Host line alone reaches it with that authority, not Node\'s bracketless ::1:port', async () => {
    const front = await startTestProxy({ pki, upstream: { grpcPort: upstream.grpcPort!, host: '::1' } });
    const client = await rawH2Client(front.grpcPort, pki);
    try {
      const fields = { ':method': 'POST', ':scheme': 'https', ':path': '/ovmsmtls.test.Echo/Unary', 'content-type': 'application/grpc', te: 'trailers', host: 'models.example', 'x-test': 'host-only' };
      client.socket.write(Buffer.concat([h2Frame(H2.HEADERS, END_HEADERS, 1, headerBlock(fields)), h2Frame(H2.DATA, END_STREAM, 1, grpcFrame(Buffer.alloc(0)))]));
      await eventually(() => seenWithMark('host-only') !== undefined, 'the call reached the model server');
      assert.equal(seenWithMark('host-only')!.headers[':authority'], 'models.example');
    } finally {
      client.socket.destroy();
      await front.proxy.shutdown(1000);
    }
  });

  test('the readiness check\'s ServerReady call carries the authority [::1]:port, and its detail names it so', async () => {
    const grpc = { hosts: ['127.0.0.1'], port: 0, upstream: { host: '::1', port: upstream.grpcPort! } };
    const result = await upstreamCheck({ grpc, rest: undefined })();
    assert.equal(result.ok, true);
    assert.equal(result.detail, `gRPC [::1]:${upstream.grpcPort} ServerReady: ready`);
    assert.equal(lastSeen('grpc', '/inference.GRPCInferenceService/ServerReady').headers[':authority'], `[::1]:${upstream.grpcPort}`);
  });

  test('one that is gone is named [::1]:port in what the clients get, in both modes', async () => {
    const [gone] = (await freeLoopbackPorts(1, '::1')) as [number];
    for (const mode of FORWARD_MODES) {
      const answers = await answersFromGone('::1', gone, mode);
      assert.equal(answers.rest, `upstream [::1]:${gone} refused the connection (is the model server running?)`);
      if (mode === 'terminate') assert.equal(answers.grpc, `upstream [::1]:${gone} refused the connection (is the model server running?)`);
    }
  });
});

/** What a REST request and a gRPC call get (502, UNAVAILABLE) through a proxy in front of a model server at `host`:`port` that is gone. */
async function answersFromGone(host: string, port: number, mode: ForwardMode): Promise<{ rest: string; grpc: string }> {
  const front = await startTestProxy({ pki, upstream: { grpcPort: port, restPort: port, host }, grpcMode: mode, restMode: mode });
  const session = h2Over('127.0.0.1', front.grpcPort);
  try {
    const res = await https1(front.restPort, pki, { path: '/v2/health/ready' });
    assert.equal(res.status, 502);
    const call = await h2Request(session, ECHO_UNARY_HEADERS, grpcFrame(Buffer.alloc(0)));
    assert.equal(call.headers['grpc-status'] ?? call.trailers?.['grpc-status'], '14');
    return { rest: JSON.parse(res.body).error, grpc: decodeURIComponent(String(call.headers['grpc-message'] ?? call.trailers?.['grpc-message'])) };
  } finally {
    session.destroy();
    await front.proxy.shutdown(1000);
  }
}

describe('a model server named by a host name', SAFETY, () => {
  // Before: "upstream localhost:PORT refused the connection (is the model server running?)", where localhost
  // was ::1 in /etc/hosts and the model server, up all along, listened on 127.0.0.1 alone: nothing said which address refused.
  test('that refuses: what the clients get names each address tried, in both modes, REST and gRPC', async () => {
    const [gone] = (await freeLoopbackPorts(1)) as [number];
    const tried = [...new Set((await lookup('localhost', { all: true })).map((a) => hostAndPort(a.address, gone)))].sort();
    const said = (message: string): string[] => {
      const match = /^upstream localhost:(\d+) refused the connection at (.+) \(is the model server running, and listening on (that address|one of them)\?\)$/.exec(message);
      assert.ok(match, message);
      assert.equal(match[1], String(gone));
      return match[2]!.split(' and ').sort();
    };
    for (const mode of FORWARD_MODES) {
      const answers = await answersFromGone('localhost', gone, mode);
      assert.deepEqual(said(answers.rest), tried);
      assert.deepEqual(said(answers.grpc), tried);
    }
  });
});

describe('IPv6 in options', SAFETY, () => {
  test('--mtls_rest_upstream ::1:8000 (no brackets) says where the brackets go', () => {
    assert.throws(() => parseHostPort('mtls_rest_upstream', '::1:8000'), {
      message: "--mtls_rest_upstream: '::1:8000' is not host:port (an IPv6 address goes in brackets: [::1]:8000)",
    });
    assert.deepEqual(parseHostPort('mtls_rest_upstream', '[::1]:8000'), { host: '::1', port: 8000 });
  });

  test('an upstream with an IPv6 zone is refused in one line, not with an internal error and a stack trace', async () => {
    const res = await runCli(['proxy', '--rest_port', '18443', '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', '[fe80::1%eth0]:8000',
      '--mtls_cert', pki.paths['server.pem']!, '--mtls_key', pki.paths['server.key']!, '--mtls_client_ca', pki.paths['client_cert_ca.pem']!]);
    assert.equal(res.code, 2);
    assert.equal(res.stderr, "ovms-mtls: --mtls_rest_upstream: '[fe80::1%eth0]:8000': an IPv6 address with a zone (%...) is not supported; give one without (a global or unique local address)\n");
  });

  test('bind addresses may be written with brackets, as nginx\'s listen writes them: [::] is ::', () => {
    assert.deepEqual(parseBindAddresses('rest_bind_address', '0.0.0.0,[::]', '0.0.0.0'), ['0.0.0.0', '::']);
    assert.deepEqual(parseBindAddresses('rest_bind_address', '[::1]', '0.0.0.0'), ['::1']);
  });

  test('a port taken on ::1 is reported as [::1]:port', async () => {
    const blocker = createTcpServer();
    blocker.listen(0, '::1');
    await once(blocker, 'listening');
    const busy = (blocker.address() as AddressInfo).port;
    const base = baseConfig({ pki, upstream: { restPort: upstream.restPort!, host: '::1' } });
    const config: Config = { ...base, rest: { ...base.rest!, hosts: ['::1'], port: busy } };
    try {
      await assert.rejects(startProxy({ config, material: loadTlsMaterialSync(config.tls), logger: createLogger({ level: 'silent' }) }),
        { message: `--rest_port ${busy}: cannot listen on [::1]:${busy}: the port is already in use (stop what uses it or pick another port)` });
    } finally {
      blocker.close();
    }
  });
});

describe('a machine without IPv6 (kernel booted with ipv6.disable=1)', () => {
  // Such a kernel cannot be had here: the error its bind() gives is built as Node builds it.
  const noIpv6 = Object.assign(new Error('listen EAFNOSUPPORT: address family not supported :::9443'), { code: 'EAFNOSUPPORT', syscall: 'listen' });

  test('binding :: says IPv6 is off and which flag to change, not the bare EAFNOSUPPORT', () => {
    assert.equal(describeListenError(noIpv6, '::', 9443, 'rest').message,
      '--rest_port 9443: cannot listen on [::]:9443: IPv6 is turned off on this machine (give --rest_bind_address an IPv4 address, e.g. 0.0.0.0)');
    assert.equal(adminBindProblem(noIpv6), 'cannot be bound: IPv6 is turned off on this machine (give --mtls_admin_bind_address an IPv4 address)');
  });
});

describe('ovms-mtls proxy bound to ::1, and probe', SAFETY, () => {
  test('the listening lines (admin too) read [::1]:port, and probe --host [::1] passes without --servername', async () => {
    const [grpcPort, restPort, adminPort] = (await freeLoopbackPorts(3, '::1')) as [number, number, number];
    const cli = startCli(['proxy', '--port', String(grpcPort), '--grpc_bind_address', '::1', '--mtls_grpc_upstream', `[::1]:${upstream.grpcPort}`,
      '--rest_port', String(restPort), '--rest_bind_address', '::1', '--mtls_rest_upstream', `[::1]:${upstream.restPort}`,
      '--mtls_admin_port', String(adminPort), '--mtls_admin_bind_address', '::1', '--mtls_workers', '1',
      '--mtls_cert', pki.paths['server.pem']!, '--mtls_key', pki.paths['server.key']!, '--mtls_client_ca', pki.paths['client_cert_ca.pem']!]);
    try {
      const exited = cli.exited.then((code) => Promise.reject(new Error(`the proxy exited with ${code}: ${cli.stderr()}`)));
      exited.catch(() => {});
      const listening = (name: string) => Promise.race([cli.logs.waitFor((l) => l.event === 'listening' && l.listener === name), exited]);
      assert.deepEqual((await listening('admin'))['addresses'], [`[::1]:${adminPort}`]);
      assert.deepEqual((await listening('grpc'))['addresses'], [`[::1]:${grpcPort}`]);
      assert.deepEqual((await listening('rest'))['addresses'], [`[::1]:${restPort}`]);
      const out = new PassThrough();
      const chunks: Buffer[] = [];
      out.on('data', (c: Buffer) => chunks.push(c));
      const code = await run(['probe', '--host', '[::1]', '--port', String(grpcPort), '--rest_port', String(restPort), '--timeout', '20',
        '--mtls_cert', pki.paths['client.pem']!, '--mtls_key', pki.paths['client.key']!, '--mtls_ca', pki.paths['server_ca.pem']!], { stdout: out, stderr: out, env: {} });
      const text = Buffer.concat(chunks).toString('utf8');
      assert.equal(code, 0, text);
      assert.match(text, new RegExp(`TLS handshake with \\[::1\\]:${grpcPort}: `));
    } finally {
      cli.child.kill('SIGTERM');
      assert.equal(await cli.exited, 0);
    }
  });
});

/** A network namespace of our own (root, or user namespaces allowed): its loopback interface can lose 127.0.0.1. */
const NET_NAMESPACE = spawnSync('unshare', ['--user', '--map-root-user', '--net', 'true']).status === 0;

describe('a loopback interface without 127.0.0.1 (a network namespace set up IPv6-only)', { ...SAFETY, skip: NET_NAMESPACE ? false : 'unshare --user --net is not available here' }, () => {
  // The entrypoint starts OVMS on 127.0.0.1 behind IPv6 public ports too; without that address it exited 70
  // with "internal error: Error: listen EADDRNOTAVAIL: address not available 127.0.0.1" and a stack trace.
  test('the entrypoint exits 2 with one line naming the address and how to add it, before OVMS starts', async () => {
    makeFakeExecutable();
    const dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-no-ipv4-loopback-'));
    dirs.push(dir);
    const argvFile = join(dir, 'ovms-runs.jsonl');
    const ipv6Only = 'ip link set lo up && ip addr del 127.0.0.1/8 dev lo && exec "$@"';
    const res = await runCli(['--model_name', 'm', '--model_path', '/models/m', '--rest_port', '8443', '--rest_bind_address', '::',
      '--mtls_ovms_binary', FAKE_OVMS, '--mtls_ovms_user', 'root', '--mtls_workers', '1', ...tlsArgs(pki)],
    { wrap: ['unshare', '--user', '--map-root-user', '--net', 'sh', '-c', ipv6Only, 'sh'], env: { FAKE_OVMS_ARGV_FILE: argvFile } });
    assert.equal(res.stderr, 'ovms-mtls: cannot pick a loopback port for the model server: 127.0.0.1 is not on this machine (the loopback interface has no such address); '
      + 'the model server listens on 127.0.0.1 whatever the public addresses are, as older OVMS releases refuse an IPv6 bind address: add it, e.g. ip addr add 127.0.0.1/8 dev lo\n');
    assert.equal(res.code, 2);
    assert.equal(existsSync(argvFile), false, 'OVMS was started');
  });
});
