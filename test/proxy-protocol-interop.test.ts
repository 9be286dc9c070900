/**
 * PROXY protocol with a real L4 load balancer: Debian's HAProxy 2.6 (send-proxy, send-proxy-v2, health checks
 * with check-send-proxy) in front of the proxy. Its connections come from 127.0.0.3, the clients from 127.0.0.1:
 * the client's address must be the one the header carries. First, what haproxy sends, read by a plain TCP server.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { once } from 'node:events';
import { connect as netConnect, createServer as createTcpServer, type AddressInfo, type Socket } from 'node:net';
import { HAPROXY_SOURCE, startHaproxy, type Haproxy, type HaproxyOptions } from './helpers/haproxy.js';
import { eventually } from './helpers/ops.js';
import { runClient } from './helpers/client-processes.js';
import { assertRefusedCall, grpcClients, startTestProxy, startUpstreamFixture, type LogCapture, type LogLine, type ProxySetup, type StartedProxy, type UpstreamFixture } from './helpers/harness.js';
import type { TestPki } from './helpers/pki.js';
import { unary } from '../src/demo/grpc-client.js';
import { FORWARD_MODES, type ForwardMode } from '../src/config.js';
import { proxyHeader } from '../src/proxy-protocol.js';

const V2_SIGNATURE = Buffer.from('\r\n\r\n\0\r\nQUIT\n', 'latin1');
const VERSIONS = [1, 2] as const;

/** A plain TCP server on 127.0.0.1 that keeps, per connection, its TCP peer and every byte it sent. */
async function recordingServer(): Promise<{ port: number; connections: { peer: string | undefined; data: Buffer }[]; close(): Promise<void> }> {
  const connections: { peer: string | undefined; data: Buffer }[] = [];
  const sockets = new Set<Socket>();
  const server = createTcpServer((socket) => {
    sockets.add(socket.once('close', () => sockets.delete(socket)));
    const connection = { peer: socket.remoteAddress, data: Buffer.alloc(0) };
    connections.push(connection);
    socket.on('data', (chunk: Buffer) => (connection.data = Buffer.concat([connection.data, chunk]))).on('error', () => undefined);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: (server.address() as AddressInfo).port,
    connections,
    close: () => new Promise((resolve) => {
      server.close(() => resolve());
      for (const socket of sockets) socket.destroy();
    }),
  };
}

/** haproxy for the test `use`, stopped after. */
async function withHaproxy(options: HaproxyOptions, use: (haproxy: Haproxy) => Promise<void>): Promise<void> {
  const haproxy = await startHaproxy(options);
  try {
    await use(haproxy);
  } finally {
    await haproxy.stop();
  }
}

/** haproxy in front of a recording server for the test `use`; both stopped after. */
async function withHaproxyInFrontOfRecorder(options: Omit<HaproxyOptions, 'server'>, use: (haproxy: Haproxy, recorder: Awaited<ReturnType<typeof recordingServer>>) => Promise<void>): Promise<void> {
  const recorder = await recordingServer();
  try {
    await withHaproxy({ ...options, server: { port: recorder.port } }, (haproxy) => use(haproxy, recorder));
  } finally {
    await recorder.close();
  }
}

/** Connects to haproxy from `host` (where it listens), sends `hello` (after `header`, if given); the client's port, once the recorder has all of it. */
async function helloThrough(haproxy: Haproxy, recorder: Awaited<ReturnType<typeof recordingServer>>, host = '127.0.0.1', header?: Buffer): Promise<{ clientPort: number; received: Buffer; peer: string | undefined }> {
  const client = netConnect({ port: haproxy.port, host, localAddress: host });
  await once(client, 'connect');
  try {
    client.write(header ? Buffer.concat([header, Buffer.from('hello')]) : 'hello');
    const carried = () => recorder.connections.find((c) => c.data.subarray(-5).toString() === 'hello');
    await eventually(() => carried() !== undefined, `the client's bytes through haproxy (${haproxy.output()})`);
    const { data, peer } = carried()!;
    return { clientPort: client.localPort!, received: data, peer };
  } finally {
    client.destroy();
  }
}

describe('haproxy as these tests run it, read by a plain TCP server', () => {
  test('send-proxy: the v1 line names the client (127.0.0.1 and its port) and the frontend, then the client\'s bytes; the TCP peer is 127.0.0.3', async () => {
    await withHaproxyInFrontOfRecorder({ proxyProtocol: 1 }, async (haproxy, recorder) => {
      const { clientPort, received, peer } = await helloThrough(haproxy, recorder);
      assert.equal(received.toString('latin1'), `PROXY TCP4 127.0.0.1 127.0.0.1 ${clientPort} ${haproxy.port}\r\nhello`);
      assert.equal(peer, HAPROXY_SOURCE);
    });
  });

  test('send-proxy-v2: signature, PROXY command over TCP4, 12 address bytes naming the client and the frontend, no TLV, then the client\'s bytes', async () => {
    await withHaproxyInFrontOfRecorder({ proxyProtocol: 2 }, async (haproxy, recorder) => {
      const { clientPort, received, peer } = await helloThrough(haproxy, recorder);
      const addresses = Buffer.alloc(12);
      addresses.set([127, 0, 0, 1, 127, 0, 0, 1]);
      addresses.writeUInt16BE(clientPort, 8);
      addresses.writeUInt16BE(haproxy.port, 10);
      assert.deepEqual(received, Buffer.concat([V2_SIGNATURE, Buffer.from([0x21, 0x11, 0, 12]), addresses, Buffer.from('hello')]));
      assert.equal(peer, HAPROXY_SOURCE);
    });
  });

  test('send-proxy-v2 with proxy-v2-options crc32c,unique-id: the TLVs follow the 12 address bytes (CRC32C, 4 bytes; UNIQUE_ID, the client\'s address:port)', async () => {
    await withHaproxyInFrontOfRecorder({ proxyProtocol: 2, v2Extensions: ['crc32c', 'unique-id'] }, async (haproxy, recorder) => {
      const { clientPort, received } = await helloThrough(haproxy, recorder);
      const uniqueId = Buffer.from(`127.0.0.1:${clientPort}`);
      const tlvs = 3 + 4 + 3 + uniqueId.length;
      assert.deepEqual(received.subarray(0, 16), Buffer.concat([V2_SIGNATURE, Buffer.from([0x21, 0x11, 0, 12 + tlvs])]));
      const after = received.subarray(16 + 12);
      assert.deepEqual([after[0], after.readUInt16BE(1)], [0x03, 4]);
      assert.deepEqual(after.subarray(7, 7 + 3 + uniqueId.length), Buffer.concat([Buffer.from([0x05, 0, uniqueId.length]), uniqueId]));
      assert.equal(after.subarray(tlvs).toString(), 'hello');
    });
  });

  test('an IPv6 client (haproxy listening on ::1): v1 sends a TCP6 line, v2 an INET6 block of 36 bytes (0x21)', async () => {
    for (const proxyProtocol of VERSIONS) {
      await withHaproxyInFrontOfRecorder({ proxyProtocol, listenHost: '::1' }, async (haproxy, recorder) => {
        const { clientPort, received } = await helloThrough(haproxy, recorder, '::1');
        if (proxyProtocol === 1) {
          assert.equal(received.toString('latin1'), `PROXY TCP6 ::1 ::1 ${clientPort} ${haproxy.port}\r\nhello`);
        } else {
          const addresses = Buffer.alloc(36);
          addresses[15] = addresses[31] = 1;
          addresses.writeUInt16BE(clientPort, 32);
          addresses.writeUInt16BE(haproxy.port, 34);
          assert.deepEqual(received, Buffer.concat([V2_SIGNATURE, Buffer.from([0x21, 0x21, 0, 36]), addresses, Buffer.from('hello')]));
        }
      });
    }
  });

  test('the headers probe --proxy_protocol writes, v1 and v2, IPv4 and IPv6, are read by haproxy (accept-proxy), which passes on the client and frontend they name', async () => {
    const connections = [{ client: '198.51.100.7', frontend: '192.0.2.1', family: 'TCP4' }, { client: '2001:db8::7', frontend: '2001:db8::1', family: 'TCP6' }];
    for (const version of VERSIONS) {
      for (const { client, frontend, family } of connections) {
        await withHaproxyInFrontOfRecorder({ proxyProtocol: 1, acceptProxy: true }, async (haproxy, recorder) => {
          const header = proxyHeader(version, { address: client, port: 4242 }, { address: frontend, port: 443 });
          const { received } = await helloThrough(haproxy, recorder, '127.0.0.1', header);
          assert.equal(received.toString('latin1'), `PROXY ${family} ${client} ${frontend} 4242 443\r\nhello`, `v${version}, ${client}`);
        });
      }
    }
  });

  test('health checks with check-send-proxy: v2 sends a LOCAL header with no address (0x20, AF_UNSPEC, length 0); v1 a TCP4 line naming the check\'s own connection, from 127.0.0.3', async () => {
    for (const proxyProtocol of [1, 2] as const) {
      await withHaproxyInFrontOfRecorder({ proxyProtocol, healthChecks: { intervalMs: 100 } }, async (haproxy, recorder) => {
        await eventually(() => recorder.connections.length >= 2 && recorder.connections.slice(0, 2).every((c) => c.data.length > 0), `two health checks (${haproxy.output()})`);
        for (const { data } of recorder.connections.slice(0, 2)) {
          if (proxyProtocol === 2) assert.deepEqual(data, Buffer.concat([V2_SIGNATURE, Buffer.from([0x20, 0x00, 0, 0])]));
          else assert.match(data.toString('latin1'), new RegExp(`^PROXY TCP4 ${HAPROXY_SOURCE.replaceAll('.', '\\.')} 127\\.0\\.0\\.1 \\d+ ${recorder.port}\\r\\n$`));
        }
      });
    }
  });
});


/** The lines `match` takes among those `logs` wrote after its first `from`, once there is one. */
async function linesAfter(logs: LogCapture, from: number, match: (line: LogLine) => boolean): Promise<LogLine[]> {
  const taken = () => logs.lines.slice(from).filter(match);
  await eventually(() => taken().length > 0, 'a log line');
  return taken();
}
const sendProxy = (version: 1 | 2) => (version === 2 ? 'send-proxy-v2' : 'send-proxy');

/** curl's arguments for `url`: the test PKI's client certificate (`withCertificate` false: none), trusting the server CA; prints the status last. */
function curlThrough(pki: TestPki, url: string, withCertificate = true): string[] {
  const cert = withCertificate ? ['--cert', pki.paths['client.pem']!, '--key', pki.paths['client.key']!] : [];
  return ['-sS', ...cert, '--cacert', pki.paths['server_ca.pem']!, '-w', '\n%{http_code}', url];
}

/** The proxy in front of the stand-in model server, one per forwarding mode (gRPC and REST in that mode). */
function frontsPerMode(setup: Partial<ProxySetup>): { fixture(): UpstreamFixture; front(mode: ForwardMode): StartedProxy } {
  let fixture: UpstreamFixture | undefined;
  const fronts = new Map<ForwardMode, StartedProxy>();
  before(async () => {
    fixture = await startUpstreamFixture();
    for (const mode of FORWARD_MODES) fronts.set(mode, await startTestProxy({ pki: fixture.pki, upstream: fixture.upstream, grpcMode: mode, restMode: mode, ...setup }));
  });
  after(async () => {
    for (const front of fronts.values()) await front.proxy.shutdown(1000);
    await fixture?.close();
  });
  return { fixture: () => fixture!, front: (mode) => fronts.get(mode)! };
}

describe('haproxy in front of the proxy with --mtls_proxy_protocol: the client is the address the header names', () => {
  const { fixture, front } = frontsPerMode({ proxyProtocol: { from: [] } });

  for (const version of VERSIONS) {
    for (const mode of FORWARD_MODES) {
      test(`${sendProxy(version)}, ${mode} mode: curl's REST request is answered 200; its access line and the model server's X-Forwarded-For name 127.0.0.1, not haproxy's ${HAPROXY_SOURCE}`, async () => {
        const { pki, upstream } = fixture();
        const proxy = front(mode);
        const path = `/v2/health/live?via=haproxy-v${version}-${mode}`;
        await withHaproxy({ server: { port: proxy.restPort }, proxyProtocol: version }, async (haproxy) => {
          const run = await runClient('curl', curlThrough(pki, `https://127.0.0.1:${haproxy.port}${path}`));
          assert.equal(run.code, 0, `${run.stderr}\n${haproxy.output()}`);
          assert.equal(run.stdout.split('\n').at(-1), '200', run.stdout);
        });
        const line = await proxy.logs.waitFor((l) => l.event === 'access' && l.listener === 'rest' && l.path === path);
        assert.equal(line.remote, '127.0.0.1');
        const seen = upstream.received.filter((r) => r.protocol === 'rest' && r.path === path);
        assert.equal(seen.length, 1);
        assert.equal(seen[0]!.headers['x-forwarded-for'], '127.0.0.1');
      });

      test(`${sendProxy(version)}, ${mode} mode: a grpc-js call through haproxy succeeds; its access line names 127.0.0.1`, async () => {
        const { pki, upstream } = fixture();
        const proxy = front(mode);
        const mark = `haproxy-v${version}-${mode}`;
        const logged = proxy.logs.lines.length;
        await withHaproxy({ server: { port: proxy.grpcPort }, proxyProtocol: version }, async (haproxy) => {
          const clients = grpcClients(`127.0.0.1:${haproxy.port}`, pki);
          try {
            const md = new grpc.Metadata();
            md.set('x-test', mark);
            await unary(clients.echo, 'Unary', { payload: Buffer.from(mark) }, md);
          } finally {
            clients.close();
          }
        });
        const seen = upstream.received.find((r) => r.protocol === 'grpc' && r.headers['x-test'] === mark);
        assert.ok(seen, 'the model server saw the call');
        // Relay mode sets no headers on gRPC and writes one line per connection, when it ends (at haproxy's stop()).
        if (mode === 'terminate') assert.equal(seen.headers['x-forwarded-for'], '127.0.0.1');
        const event = mode === 'terminate' ? 'access' : 'relay_access';
        const lines = await linesAfter(proxy.logs, logged, (l) => l.event === event && l.listener === 'grpc');
        assert.deepEqual(lines.map((l) => l.remote), ['127.0.0.1']);
      });
    }

    if (version === 2) {
      test('send-proxy-v2 with extensions (proxy-v2-options crc32c,unique-id): they are skipped; curl is answered 200 and named 127.0.0.1', async () => {
        const { pki, upstream } = fixture();
        const proxy = front('relay');
        const path = '/v2/health/live?via=haproxy-v2-tlvs';
        await withHaproxy({ server: { port: proxy.restPort }, proxyProtocol: 2, v2Extensions: ['crc32c', 'unique-id'] }, async (haproxy) => {
          const run = await runClient('curl', curlThrough(pki, `https://127.0.0.1:${haproxy.port}${path}`));
          assert.equal(run.stdout.split('\n').at(-1), '200', `${run.stdout}\n${run.stderr}`);
        });
        const line = await proxy.logs.waitFor((l) => l.event === 'access' && l.listener === 'rest' && l.path === path);
        assert.equal(line.remote, '127.0.0.1');
        assert.deepEqual(upstream.received.filter((r) => r.path === path).map((r) => r.headers['x-forwarded-for']), ['127.0.0.1']);
      });
    }

    test(`${sendProxy(version)}, an IPv6 client (haproxy on ::1, the proxy on 127.0.0.1): curl's request is answered 200; the access line and X-Forwarded-For name ::1`, async () => {
      const { pki, upstream } = fixture();
      const proxy = front('terminate');
      const path = `/v2/health/live?via=haproxy-v${version}-ipv6`;
      await withHaproxy({ server: { port: proxy.restPort }, proxyProtocol: version, listenHost: '::1' }, async (haproxy) => {
        const run = await runClient('curl', curlThrough(pki, `https://[::1]:${haproxy.port}${path}`));
        assert.equal(run.stdout.split('\n').at(-1), '200', `${run.stdout}\n${run.stderr}\n${haproxy.output()}`);
      });
      const line = await proxy.logs.waitFor((l) => l.event === 'access' && l.listener === 'rest' && l.path === path);
      assert.equal(line.remote, '::1');
      assert.deepEqual(upstream.received.filter((r) => r.path === path).map((r) => r.headers['x-forwarded-for']), ['::1']);
    });

    test(`${sendProxy(version)}: clients with no certificate are refused (curl on REST, grpc-js on gRPC); the client_refused lines name 127.0.0.1`, async () => {
      const { pki } = fixture();
      const proxy = front('terminate');
      const refusals = (listener: string) => proxy.logs.lines.filter((l) => l.event === 'client_refused' && l.listener === listener && l.reason === 'no_certificate');
      const [restBefore, grpcBefore] = [refusals('rest').length, refusals('grpc').length];
      await withHaproxy({ server: { port: proxy.restPort }, proxyProtocol: version }, async (haproxy) => {
        const run = await runClient('curl', curlThrough(pki, `https://127.0.0.1:${haproxy.port}/v2/models/dummy`, false));
        assert.equal(run.stdout.split('\n').at(-1), '403', `${run.stdout}\n${run.stderr}`);
      });
      await withHaproxy({ server: { port: proxy.grpcPort }, proxyProtocol: version }, async (haproxy) => {
        const clients = grpcClients(`127.0.0.1:${haproxy.port}`, pki, null);
        try {
          const err = await unary(clients.kserve, 'ServerLive', {}).then(() => assert.fail('a client with no certificate was served'), (e: grpc.ServiceError) => e);
          assertRefusedCall(err, 'no_certificate');
        } finally {
          clients.close();
        }
      });
      await eventually(() => refusals('rest').length > restBefore && refusals('grpc').length > grpcBefore, 'both client_refused lines');
      assert.deepEqual([...refusals('rest').slice(restBefore), ...refusals('grpc').slice(grpcBefore)].map((l) => l.remote), ['127.0.0.1', '127.0.0.1']);
    });
  }
});

describe('haproxy health checks (check-send-proxy) against the proxy with --mtls_proxy_protocol', () => {
  const { fixture, front } = frontsPerMode({ proxyProtocol: { from: [] } });

  /**
   * What a check is logged as. A v1 check's header names 127.0.0.3, and it is a client_closed failure like any other
   * (nothing tells it from a client). A v2 check's LOCAL header says what it is: load_balancer_check, at debug. Its
   * line mostly has no `remote`: haproxy resets the connection as soon as it has written the header, most often
   * before Node's accept callback runs, when the kernel has no peer to tell (getpeername: ENOTCONN) and uv_accept
   * has dropped the address accept() returned. A reset that came before the header was read leaves a bare client_closed,
   * in either version.
   */
  const isCheckLine = (version: 1 | 2) => (l: LogLine) => (version === 1
    ? l.reason === 'client_closed' && l.remote === HAPROXY_SOURCE && l.level === 'info'
    : l.reason === 'load_balancer_check' && l.level === 'debug' && [HAPROXY_SOURCE, undefined].includes(l.remote as string | undefined)) ||
    (l.reason === 'client_closed' && l.remote === undefined);

  for (const version of VERSIONS) {
    const header = version === 2 ? 'a v2 LOCAL header (no address)' : `a v1 line naming the check's own connection (${HAPROXY_SOURCE})`;
    test(`${sendProxy(version)}: each check, ${header} then a reset before TLS, is ${version === 2 ? 'a load_balancer_check logged at debug' : `a client_closed handshake failure from ${HAPROXY_SOURCE}`}, never an error; haproxy counts the server UP (L4OK) and a client is still served`, async () => {
      const { pki } = fixture();
      const proxy = front(version === 2 ? 'terminate' : 'relay');
      const logged = proxy.logs.lines.length;
      const failed = () => proxy.logs.lines.slice(logged).filter((l) => l.event === 'handshake_failed');
      await withHaproxy({ server: { port: proxy.restPort }, proxyProtocol: version, healthChecks: { intervalMs: 100 } }, async (haproxy) => {
        await eventually(() => failed().length >= 3, `three health checks (${haproxy.output()})`);
        assert.deepEqual(await haproxy.serverHealth(), { status: 'UP', checkStatus: 'L4OK' });
        const run = await runClient('curl', curlThrough(pki, `https://127.0.0.1:${haproxy.port}/v2/health/ready`));
        assert.equal(run.stdout.split('\n').at(-1), '200', `${run.stdout}\n${run.stderr}`);
      });
      const during = proxy.logs.lines.slice(logged);
      const unexpected = during.filter((l) => l.level === 'error' || l.level === 'fatal' || l.level === 'warn' || 'err' in l || 'stack' in l ||
        (l.event === 'handshake_failed' && !('suppressed' in l) && !isCheckLine(version)(l)));
      assert.deepEqual(unexpected, []);
      if (version === 2) assert.ok(failed().some((l) => l.reason === 'load_balancer_check'), JSON.stringify(failed()));
      else assert.ok(failed().some((l) => l.remote === HAPROXY_SOURCE), JSON.stringify(failed()));
      assert.ok(failed().every((l) => l.listener === 'rest'));
    });
  }
});

describe('haproxy sending PROXY headers to a proxy started without --mtls_proxy_protocol', () => {
  const { fixture, front } = frontsPerMode({});

  for (const version of VERSIONS) {
    test(`${sendProxy(version)}: the header where TLS should begin fails the handshake (not_tls), logged with haproxy's address, ${HAPROXY_SOURCE}; curl gets no answer (exit 35, SSL connect error)`, async () => {
      const { pki } = fixture();
      const proxy = front('terminate');
      const logged = proxy.logs.lines.length;
      await withHaproxy({ server: { port: proxy.restPort }, proxyProtocol: version }, async (haproxy) => {
        const run = await runClient('curl', curlThrough(pki, `https://127.0.0.1:${haproxy.port}/v2/health/ready`));
        assert.equal(run.code, 35, `curl: an SSL connect error (${run.stderr})`);
        assert.equal(run.stdout.split('\n').at(-1), '000');
      });
      const lines = await linesAfter(proxy.logs, logged, (l) => l.event === 'handshake_failed' || l.event === 'client_refused');
      assert.deepEqual(lines.map(({ event, listener, remote, reason }) => ({ event, listener, remote, reason })),
        [{ event: 'handshake_failed', listener: 'rest', remote: HAPROXY_SOURCE, reason: 'not_tls' }]);
    });
  }
});
