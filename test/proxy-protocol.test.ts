import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { BlockList, connect as netConnect, createServer as createTcpServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { connect as tlsConnect } from 'node:tls';
import { request as httpsRequest } from 'node:https';
import { createHash, randomBytes } from 'node:crypto';
import fc from 'fast-check';
import { headerExpected, parseProxyHeader, proxyHeader } from '../src/proxy-protocol.js';
import { parseSubnet } from '../src/addresses.js';
import { parseCommonConfig, FORWARD_MODES } from '../src/config.js';
import { ConfigError } from '../src/errors.js';
import { freeLoopbackPorts } from '../src/ports.js';
import type { ModelServer } from '../src/demo/model-server.js';
import type { TestPki } from './helpers/pki.js';
import { grpcClients, https1, startTestProxy, startUpstreamFixture, tlsClientOptions, type StartedProxy } from './helpers/harness.js';
import { checkLargeMessage, checkModelInfer } from './helpers/grpc-calls.js';
import { startCli } from './helpers/cli.js';
import { httpGet, sample } from './helpers/ops.js';

// Headers as a load balancer writes them (HAProxy's PROXY protocol specification).
const V2_SIGNATURE = Buffer.from('0d0a0d0a000d0a515549540a', 'hex');

function v1(source: string, family = source.includes(':') ? 'TCP6' : 'TCP4'): Buffer {
  const destination = family === 'TCP6' ? '::1' : '127.0.0.1';
  return Buffer.from(`PROXY ${family} ${source} ${destination} 51234 443\r\n`, 'latin1');
}

function ipv4Bytes(address: string): Buffer {
  return Buffer.from(address.split('.').map(Number));
}

function ipv6Bytes(address: string): Buffer {
  const [head, tail] = address.split('::') as [string, string | undefined];
  const groups = (text: string | undefined) => (text ? text.split(':') : []);
  const missing = 8 - groups(head).length - groups(tail).length;
  const all = tail === undefined ? groups(head) : [...groups(head), ...Array<string>(missing).fill('0'), ...groups(tail)];
  const out = Buffer.alloc(16);
  all.forEach((group, i) => out.writeUInt16BE(parseInt(group, 16), i * 2));
  return out;
}

/** A version 2 header: PROXY over TCP from `source` (IPv4 or IPv6), or LOCAL; `tlvs` appended to the address block. */
function v2(source: string | 'local', tlvs: Buffer = Buffer.alloc(0)): Buffer {
  if (source === 'local') return Buffer.concat([V2_SIGNATURE, Buffer.from([0x20, 0x00, 0, 0])]);
  const ipv6 = source.includes(':');
  const addresses = ipv6 ? Buffer.concat([ipv6Bytes(source), ipv6Bytes('::1')]) : Buffer.concat([ipv4Bytes(source), ipv4Bytes('127.0.0.1')]);
  const ports = Buffer.from([0xc8, 0x22, 0x01, 0xbb]);
  const body = Buffer.concat([addresses, ports, tlvs]);
  const fixed = Buffer.from([0x21, ipv6 ? 0x21 : 0x11, 0, 0]);
  fixed.writeUInt16BE(body.length, 2);
  return Buffer.concat([V2_SIGNATURE, fixed, body]);
}

/** A version 2 header with its byte 12 (version, command), byte 13 (family, transport) and address block as given. */
function v2Raw(versionCommand: number, familyTransport: number, block: Buffer): Buffer {
  const fixed = Buffer.from([versionCommand, familyTransport, 0, 0]);
  fixed.writeUInt16BE(block.length, 2);
  return Buffer.concat([V2_SIGNATURE, fixed, block]);
}

describe('reading the header', () => {
  const parsed = (bytes: Buffer | string) => parseProxyHeader(typeof bytes === 'string' ? Buffer.from(bytes, 'latin1') : bytes);

  test('version 1: TCP4 and TCP6 name the client, IPv6 written canonically and IPv4-mapped as IPv4; UNKNOWN keeps the connection\'s own', () => {
    assert.deepEqual(parsed(Buffer.concat([v1('203.0.113.9'), Buffer.from('\x16\x03\x01')])), { length: v1('203.0.113.9').length, source: '203.0.113.9' });
    assert.deepEqual(parsed('PROXY TCP6 2001:0db8:0000::0007 ::1 51234 443\r\n'), { length: 47, source: '2001:db8::7' });
    assert.deepEqual(parsed('PROXY TCP6 ::ffff:198.51.100.4 ::1 1 443\r\n'), { length: 42, source: '198.51.100.4' });
    assert.deepEqual(parsed('PROXY UNKNOWN\r\n'), { length: 15, source: undefined });
    assert.deepEqual(parsed('PROXY UNKNOWN ffff:f...f:ffff 1 2\r\n'), { length: 35, source: undefined });
  });

  test('version 2: PROXY over TCP names the client, its extensions (TLVs) skipped; LOCAL, UNSPEC and AF_UNIX keep the connection\'s own', () => {
    const tlvs = Buffer.from([0x05, 0x00, 0x03, 0x61, 0x62, 0x63, 0xea, 0x00, 0x01, 0x00]);
    assert.deepEqual(parsed(v2('192.0.2.1')), { length: 28, source: '192.0.2.1' });
    assert.deepEqual(parsed(Buffer.concat([v2('2001:db8::7', tlvs), Buffer.from('after')])), { length: 52 + tlvs.length, source: '2001:db8::7' });
    assert.deepEqual(parsed(v2('local')), { length: 16, source: undefined, local: true });
    assert.deepEqual(parsed(v2Raw(0x21, 0x00, Buffer.alloc(0))), { length: 16, source: undefined });
    assert.deepEqual(parsed(v2Raw(0x21, 0x31, Buffer.alloc(216))), { length: 232, source: undefined });
  });

  test('every cut of a whole header asks for more bytes', () => {
    for (const header of [v1('203.0.113.9'), v1('2001:db8::7'), v2('192.0.2.1'), v2('2001:db8::7', Buffer.alloc(40)), v2('local')]) {
      for (let cut = 1; cut < header.length; cut++) assert.equal(parsed(header.subarray(0, cut)), undefined, `${header.toString('hex')} cut at ${cut}`);
    }
  });

  test('a connection that begins with anything else has no header, and the reason says what it began with', () => {
    assert.deepEqual(parsed(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00])), { failure: 'proxy_protocol_missing', why: 'the connection began with a TLS handshake, not a PROXY header' });
    assert.deepEqual(parsed('GET / HTTP/1.1\r\n'), { failure: 'proxy_protocol_missing', why: 'the connection began with "GET / HT", not a PROXY header' });
    assert.deepEqual(parsed('proxy TCP4'), { failure: 'proxy_protocol_missing', why: 'the connection began with "proxy TC", not a PROXY header' });
    assert.equal((parsed(Buffer.from('0d0a0d0a000d0a5155495400', 'hex')) as { failure: string }).failure, 'proxy_protocol_missing');
  });

  test('a malformed header is refused naming its fault', () => {
    const fault = (bytes: Buffer | string) => {
      const result = parsed(bytes);
      assert.ok(result !== undefined && 'failure' in result && result.failure === 'proxy_protocol_invalid', `${String(bytes)}: ${JSON.stringify(result)}`);
      return result.why;
    };
    assert.equal(fault(`PROXY TCP6 ${'f'.repeat(120)}`), 'a version 1 header has no CRLF within 107 bytes');
    assert.equal(fault('PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n'), 'a version 1 header needs 6 fields: "PROXY TCP4 1.2.3.4 5.6.7.8 1"');
    assert.equal(fault('PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n'), 'version 1 protocol "UDP4" (TCP4, TCP6 or UNKNOWN)');
    assert.equal(fault('PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n'), '"2001:db8::1" is not an IPv4 address');
    assert.equal(fault('PROXY TCP6 1.2.3.4 ::1 1 2\r\n'), '"1.2.3.4" is not an IPv6 address');
    assert.equal(fault('PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n'), '"fe80::1%eth0" is not an IPv6 address');
    assert.equal(fault('PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n'), '"65536" is not a port');
    assert.equal(fault('PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n'), '"080" is not a port');
    assert.equal(fault('PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n'), '"-2" is not a port');
    assert.equal(fault(v2Raw(0x11, 0x11, Buffer.alloc(12))), 'version 1 after the version 2 signature');
    assert.equal(fault(v2Raw(0x22, 0x11, Buffer.alloc(12))), 'version 2 command 2 (0 LOCAL or 1 PROXY)');
    assert.equal(fault(v2Raw(0x21, 0x41, Buffer.alloc(12))), 'version 2 address family 4');
    assert.equal(fault(v2Raw(0x21, 0x12, Buffer.alloc(12))), 'version 2 transport 2, not STREAM (TCP)');
    assert.equal(fault(v2Raw(0x21, 0x11, Buffer.alloc(8))), 'a version 2 IPv4 address block of 8 bytes (12 needed)');
    assert.equal(fault(v2Raw(0x21, 0x21, Buffer.alloc(12))), 'a version 2 IPv6 address block of 12 bytes (36 needed)');
    // Known from its first 16 bytes, before the rest is waited for.
    assert.equal(fault(v2Raw(0x21, 0x11, Buffer.alloc(4081)).subarray(0, 16)), 'a version 2 header of 4097 bytes, over the 4096 read');
    assert.deepEqual(parsed(v2Raw(0x21, 0x11, Buffer.alloc(4080))), { length: 4096, source: '0.0.0.0' });
  });

  test('any header, with any extensions and whatever follows, names its client and ends where it ends', () => {
    const client = fc.oneof(fc.ipV4(), fc.ipV6().filter((a) => !a.includes('.')));
    fc.assert(fc.property(client, fc.uint8Array({ maxLength: 1000 }), fc.uint8Array({ maxLength: 64 }), fc.boolean(), (address, tlvs, rest, textual) => {
      const header = textual ? v1(address) : v2(address, Buffer.from(tlvs));
      const result = parseProxyHeader(Buffer.concat([header, Buffer.from(rest)]));
      assert.ok(result !== undefined && !('failure' in result));
      assert.equal(result.length, header.length);
      assert.ok(sameAddress(result.source!, address), `${address} read as ${result.source}`);
    }));
  });

  test('the header probe --proxy_protocol writes, version 1 or 2, reads back as the address and length it was written with, any address in any spelling', () => {
    const port = fc.integer({ min: 0, max: 65535 });
    fc.assert(fc.property(fc.oneof(fc.ipV4(), fc.ipV6()), port, port, fc.constantFrom(1 as const, 2 as const), (address, from, to, version) => {
      // A connection's two ends share a family: an IPv4-mapped end is an IPv4 connection.
      const ipv4 = !address.includes(':') || /^::ffff:\d+\.\d+\.\d+\.\d+$/i.test(address);
      const header = proxyHeader(version, { address, port: from }, { address: ipv4 ? '127.0.0.1' : '::1', port: to });
      const result = parseProxyHeader(Buffer.concat([header, Buffer.from([0x16, 0x03, 0x01])]));
      assert.ok(result !== undefined && !('failure' in result), `${address}: ${JSON.stringify(result)}`);
      assert.equal(result.length, header.length);
      assert.ok(sameAddress(result.source!, address), `${address} read as ${result.source}`);
    }));
    assert.equal(proxyHeader(1, { address: '::ffff:10.1.2.3', port: 5 }, { address: '::ffff:127.0.0.1', port: 443 }).toString('latin1'), 'PROXY TCP4 10.1.2.3 127.0.0.1 5 443\r\n');
    assert.equal(proxyHeader(1, { address: 'fe80::1%eth0', port: 5 }, { address: 'fe80::2%eth0', port: 443 }).toString('latin1'), 'PROXY TCP6 fe80::1 fe80::2 5 443\r\n');
    assert.equal(proxyHeader(2, { address: '2001:db8::7', port: 51234 }, { address: '::1', port: 443 }).toString('hex'),
      `0d0a0d0a000d0a515549540a 21 21 0024 20010db8000000000000000000000007 ${'0'.repeat(30)}01 c822 01bb`.replaceAll(' ', ''));
  });
});

/** Whether two spellings name one address (an IPv4-mapped IPv6 address is its IPv4 one). */
function sameAddress(read: string, sent: string): boolean {
  if (!sent.includes(':')) return read === sent;
  const list = new BlockList();
  list.addAddress(sent, 'ipv6');
  return list.check(read.includes(':') ? read : `::ffff:${read}`, 'ipv6');
}

interface Hop {
  /** What the load balancer writes before the client's first bytes. */
  readonly header: Buffer;
  /** The header alone, a byte per write, before any of the client's bytes. */
  readonly split?: boolean;
  /** The load balancer's own address, as the proxy sees it (127.0.0.1 unless given). */
  readonly from?: string;
}

/** The test's load balancer: takes TLS clients on 127.0.0.1 and passes each to `target`, its first bytes preceded by the header. */
async function proxyProtocolHop(target: number, { header, split = false, from = '127.0.0.1' }: Hop): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<Socket>();
  const server: Server = createTcpServer((client) => {
    const upstream = netConnect({ host: '127.0.0.1', port: target, noDelay: true, localAddress: from });
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('error', () => {}).on('close', () => sockets.delete(s));
    }
    client.on('close', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
    client.once('data', (first: Buffer) => {
      client.pause();
      void (async () => {
        if (split) {
          for (const byte of header) await new Promise<void>((resolve) => upstream.write(Buffer.from([byte]), () => setImmediate(resolve)));
          upstream.write(first);
        } else {
          upstream.write(Buffer.concat([header, first]));
        }
        client.pipe(upstream);
        upstream.pipe(client);
      })();
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: (server.address() as AddressInfo).port,
    close: async () => {
      for (const s of sockets) s.destroy();
      server.close();
      await once(server, 'close');
    },
  };
}

/** Runs `use` with a hop in front of `port`, closing it after; a bare header stands for a hop that sends it with the first bytes. */
async function throughHop<T>(port: number, hop: Hop | Buffer, use: (hopPort: number) => Promise<T>): Promise<T> {
  const running = await proxyProtocolHop(port, Buffer.isBuffer(hop) ? { header: hop } : hop);
  try {
    return await use(running.port);
  } finally {
    await running.close();
  }
}

/** How many body bytes a GET of `path` on `port` brought (a 200 whose body ended whole). */
function bytesDownloaded(port: number, path: string): Promise<number> {
  return new Promise((resolve, reject) => {
    httpsRequest({ host: '127.0.0.1', port, path, agent: false, ...tlsClientOptions(pki) }, (res) => {
      let count = 0;
      res.on('data', (chunk: Buffer) => (count += chunk.length));
      res.on('end', () => (res.statusCode === 200 && res.complete ? resolve(count) : reject(new Error(`${res.statusCode}, complete: ${res.complete}`))));
      res.on('error', reject);
    }).on('error', reject).end();
  });
}

/** A client that writes `bytes` to `port` (`end`: and closes its side at once) and waits for the proxy to close the connection. */
async function sendAndWaitForClose(port: number, bytes: Buffer, { end = false } = {}): Promise<void> {
  const socket = netConnect({ host: '127.0.0.1', port });
  socket.on('error', () => {});
  socket.resume();
  if (end) socket.end(bytes);
  else socket.write(bytes);
  await once(socket, 'close');
}

let pki: TestPki;
let upstream: ModelServer;
let closeAll: () => Promise<void>;
before(async () => ({ pki, upstream, close: closeAll } = await startUpstreamFixture()));
after(() => closeAll());

/** What the model server received last on `path` (with its query string). */
const lastSeen = (path: string) => upstream.received.filter((r) => r.path === path).at(-1)!;

for (const restMode of FORWARD_MODES) {
  describe(`--mtls_proxy_protocol, REST ${restMode} mode`, () => {
    let front: StartedProxy;
    before(async () => {
      front = await startTestProxy({ pki, upstream: { restPort: upstream.restPort, grpcPort: upstream.grpcPort }, restMode, proxyProtocol: { from: [] } });
    });
    after(() => front.proxy.shutdown(1000));

    test('a version 1 header arriving with the first TLS bytes: the client it names is the access line\'s remote and X-Forwarded-For\'s last entry', async () => {
      const path = `/v2/health/live?v1-${restMode}`;
      const answer = await throughHop(front.restPort, v1('203.0.113.9'), (port) => https1(port, pki, { path, headers: { 'x-forwarded-for': '198.51.100.1' } }));
      assert.equal(answer.status, 200);
      assert.equal(lastSeen(path).headers['x-forwarded-for'], '198.51.100.1, 203.0.113.9');
      const line = await front.logs.waitFor((l) => l.event === 'access' && l.path === path);
      assert.equal(line.remote, '203.0.113.9');
    });

    test('a version 2 header with an IPv6 client and extensions, written a byte at a time before the client\'s first byte', async () => {
      const path = `/v2/health/live?v2-${restMode}`;
      const tlvs = Buffer.from([0x05, 0x00, 0x04, 0x69, 0x64, 0x2d, 0x31]);
      const answer = await throughHop(front.restPort, { header: v2('2001:db8::7', tlvs), split: true }, (port) => https1(port, pki, { path }));
      assert.equal(answer.status, 200);
      assert.equal(lastSeen(path).headers['x-forwarded-for'], '2001:db8::7');
      assert.equal((await front.logs.waitFor((l) => l.event === 'access' && l.path === path)).remote, '2001:db8::7');
    });

    test('8 MB up and 8 MB down, with the header split off the first TLS bytes, arrive whole: the connection handed to TLS streams as any other', async () => {
      const body = randomBytes(8 * 1024 * 1024);
      const up = await throughHop(front.restPort, v2('192.0.2.80'), (port) => https1(port, pki, { method: 'POST', path: '/echo-body', body, headers: { 'content-type': 'application/octet-stream' } }));
      assert.equal(up.status, 200);
      assert.deepEqual(JSON.parse(up.body), { bytes: body.length, sha256: createHash('sha256').update(body).digest('hex') });
      const down = await throughHop(front.restPort, v1('192.0.2.81'), (port) => bytesDownloaded(port, `/stream-bytes?n=${8 * 1024 * 1024}`));
      assert.equal(down, 8 * 1024 * 1024);
    });

    test('a version 2 LOCAL header (a load balancer\'s health check) keeps the connection\'s own address', async () => {
      const path = `/v2/health/live?local-${restMode}`;
      assert.equal((await throughHop(front.restPort, v2('local'), (port) => https1(port, pki, { path }))).status, 200);
      assert.equal((await front.logs.waitFor((l) => l.event === 'access' && l.path === path)).remote, '127.0.0.1');
    });
  });
}

describe('--mtls_proxy_protocol on the gRPC port', () => {
  for (const grpcMode of FORWARD_MODES) {
    test(`${grpcMode} mode: a call through a load balancer is served, its client named by the header`, async () => {
      const front = await startTestProxy({ pki, upstream: { grpcPort: upstream.grpcPort }, grpcMode, proxyProtocol: { from: [] } });
      try {
        await throughHop(front.grpcPort, v2('198.51.100.23'), async (port) => {
          const clients = grpcClients(`127.0.0.1:${port}`, pki);
          try {
            await checkModelInfer(clients.kserve);
            await checkLargeMessage(clients.echo, 8 * 1024 * 1024);
          } finally {
            clients.close();
          }
        });
        const event = grpcMode === 'relay' ? 'relay_access' : 'access';
        assert.equal((await front.logs.waitFor((l) => l.event === event)).remote, '198.51.100.23');
        if (grpcMode === 'terminate') assert.equal(lastSeen('/inference.GRPCInferenceService/ModelInfer').headers['x-forwarded-for'], '198.51.100.23');
      } finally {
        await front.proxy.shutdown(1000);
      }
    });
  }
});

describe('--mtls_proxy_protocol: what is refused', () => {
  let front: StartedProxy;
  before(async () => {
    // The handshake timeout bounds the wait for the header too; short, for the header that stops partway. It is a
    // few seconds, not less: 'behind a good header' makes full TLS handshakes that a loaded machine can hold up.
    front = await startTestProxy({ pki, upstream: { restPort: upstream.restPort }, proxyProtocol: { from: [] }, limits: { handshakeTimeoutMs: 3000 } });
  });
  after(() => front.proxy.shutdown(1000));
  const failure = (reason: string) => front.logs.waitFor((l) => l.event === 'handshake_failed' && l.reason === reason);

  test('a client that connects past the load balancer: closed before TLS, logged proxy_protocol_missing, naming the TLS handshake it began with', async () => {
    const socket = tlsConnect({ host: '127.0.0.1', port: front.restPort, ...tlsClientOptions(pki) });
    socket.on('error', () => {});
    await new Promise((resolve) => socket.on('close', resolve));
    const line = await failure('proxy_protocol_missing');
    assert.equal(line.remote, '127.0.0.1');
    assert.match(line.msg, /did not begin with a PROXY protocol header, which --mtls_proxy_protocol requires .*: the connection began with a TLS handshake, not a PROXY header$/);
  });

  test('a malformed header: closed, logged proxy_protocol_invalid naming the fault', async () => {
    await sendAndWaitForClose(front.restPort, Buffer.from('PROXY TCP4 203.0.113.9 127.0.0.1 70000 443\r\n'));
    assert.match((await failure('proxy_protocol_invalid')).msg, /malformed: "70000" is not a port$/);
  });

  test('a connection that closes partway through its header, and one that stops sending it, are logged as any handshake that did so', async () => {
    await sendAndWaitForClose(front.restPort, Buffer.from('PROXY TCP4 203.0.'), { end: true });
    assert.equal((await failure('client_closed')).remote, '127.0.0.1');
    const socket = netConnect({ host: '127.0.0.1', port: front.restPort });
    socket.on('error', () => {});
    socket.write(v2('192.0.2.1').subarray(0, 20));
    await once(socket, 'close');
    assert.equal((await failure('handshake_timeout')).remote, '127.0.0.1');
  });

  test('a LOCAL header, then a close before TLS, is the load balancer checking the port: load_balancer_check, logged at debug', async () => {
    await sendAndWaitForClose(front.restPort, v2('local'), { end: true });
    const line = await failure('load_balancer_check');
    assert.deepEqual([line.level, line.remote], ['debug', '127.0.0.1']);
    assert.match(line.msg, /the load balancer checked the port/);
  });

  test('behind a good header, a client refused for its certificate, and one failing its handshake, are named by the header', async () => {
    const answer = await throughHop(front.restPort, v1('203.0.113.50'), (port) => https1(port, pki, { path: '/v2/health/live', client: null }));
    assert.equal(answer.status, 403);
    assert.equal((await front.logs.waitFor((l) => l.event === 'client_refused' && l.reason === 'no_certificate')).remote, '203.0.113.50');
    await sendAndWaitForClose(front.restPort, Buffer.concat([v1('203.0.113.51'), Buffer.from('GET / HTTP/1.1\r\n\r\n')]));
    assert.equal((await failure('not_tls')).remote, '203.0.113.51');
  });
});

test('a shutdown whose timeout runs out cuts a connection still waiting for its header (as it does a handshake) without logging a client that closed', async () => {
  const front = await startTestProxy({ pki, upstream: { restPort: upstream.restPort }, proxyProtocol: { from: [] } });
  const socket = netConnect({ host: '127.0.0.1', port: front.restPort });
  socket.on('error', () => {});
  socket.write('PROXY TCP4 203.0.');
  await once(socket, 'connect');
  // Connections are accepted in order: once a later one is served, this one is waiting for the rest of its header.
  assert.equal((await throughHop(front.restPort, v1('203.0.113.70'), (port) => https1(port, pki, { path: '/v2/health/live' }))).status, 200);
  // Shorter than the 10 s handshake timeout, which the shutdown waits for as it does for a handshake under way.
  await front.proxy.shutdown(1000);
  await new Promise((resolve) => socket.on('close', resolve));
  assert.deepEqual(front.logs.lines.filter((l) => l.event === 'handshake_failed'), []);
});

test('without --mtls_proxy_protocol a header is not taken: the connection fails as not TLS, its client the connection\'s own', async () => {
  const front = await startTestProxy({ pki, upstream: { restPort: upstream.restPort } });
  try {
    await throughHop(front.restPort, v1('203.0.113.9'), (port) => assert.rejects(https1(port, pki, { path: '/v2/health/live' })));
    const line = await front.logs.waitFor((l) => l.event === 'handshake_failed');
    assert.deepEqual([line.reason, line.remote], ['not_tls', '127.0.0.1']);
    assert.match(line.msg, /or a load balancer sending a PROXY protocol header \(then start the proxy with --mtls_proxy_protocol/);
  } finally {
    await front.proxy.shutdown(1000);
  }
});

test('the proxy command with two workers takes --mtls_proxy_protocol and _from from their OVMS_MTLS_* variables, and the metrics count the refusals', async () => {
  const [restPort, adminPort] = (await freeLoopbackPorts(2)) as [number, number];
  const files = ['--mtls_cert', pki.paths['server.pem']!, '--mtls_key', pki.paths['server.key']!, '--mtls_client_ca', pki.paths['client_cert_ca.pem']!];
  const cli = startCli(['proxy', '--mtls_workers', '2', '--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`, '--mtls_admin_port', String(adminPort), ...files], {
    env: { OVMS_MTLS_PROXY_PROTOCOL: 'true', OVMS_MTLS_PROXY_PROTOCOL_FROM: '127.0.0.1,192.0.2.0/24' },
  });
  try {
    await Promise.race([cli.logs.waitFor((l) => l.event === 'workers_listening'), cli.exited.then((code) => assert.fail(`the proxy exited (${code}): ${cli.stderr()}`))]);
    for (let i = 0; i < 4; i++) {
      const path = `/v2/health/live?cli-${i}`;
      assert.equal((await throughHop(restPort, v1(`192.0.2.${i + 10}`), (port) => https1(port, pki, { path }))).status, 200);
      assert.equal((await cli.logs.waitFor((l) => l.event === 'access' && l.path === path)).remote, `192.0.2.${i + 10}`);
    }
    assert.equal((await https1(restPort, pki, { path: '/v2/health/live?cli-direct', localAddress: '127.0.0.2' })).status, 200);
    assert.equal((await cli.logs.waitFor((l) => l.event === 'access' && l.path === '/v2/health/live?cli-direct')).remote, '127.0.0.2');
    await sendAndWaitForClose(restPort, Buffer.from([0x16, 0x03, 0x01, 0x00, 0x05]));
    await cli.logs.waitFor((l) => l.event === 'handshake_failed' && l.reason === 'proxy_protocol_missing');
    const metrics = (await httpGet(adminPort, '/metrics')).body;
    assert.equal(sample(metrics, 'ovms_mtls_handshakes_total', { listener: 'rest', result: 'failed', reason: 'proxy_protocol_missing' }), 1);
  } finally {
    if (cli.child.exitCode === null) cli.child.kill('SIGTERM');
    assert.equal(await cli.exited, 0, cli.stderr());
  }
});

describe('--mtls_proxy_protocol_from: only the load balancers\' connections carry a header', () => {
  let front: StartedProxy;
  before(async () => {
    const from = [parseSubnet('127.0.0.2')!, parseSubnet('2001:db8::/32')!];
    front = await startTestProxy({ pki, upstream: { restPort: upstream.restPort }, proxyProtocol: { from } });
  });
  after(() => front.proxy.shutdown(1000));

  test('through the load balancer (127.0.0.2), the header names the client', async () => {
    const path = '/v2/health/live?from-balancer';
    assert.equal((await throughHop(front.restPort, { header: v1('203.0.113.60'), from: '127.0.0.2' }, (port) => https1(port, pki, { path }))).status, 200);
    assert.equal((await front.logs.waitFor((l) => l.event === 'access' && l.path === path)).remote, '203.0.113.60');
  });

  test('a client reaching the port directly, from elsewhere, sends no header and is served under its own address', async () => {
    const path = '/v2/health/live?direct';
    assert.equal((await https1(front.restPort, pki, { path })).status, 200);
    assert.equal((await front.logs.waitFor((l) => l.event === 'access' && l.path === path)).remote, '127.0.0.1');
  });

  test('a header from elsewhere is not taken: it fails as not TLS, named by its own address', async () => {
    await throughHop(front.restPort, { header: v1('203.0.113.61'), from: '127.0.0.3' }, (port) => assert.rejects(https1(port, pki, { path: '/v2/health/live' })));
    const line = await front.logs.waitFor((l) => l.event === 'handshake_failed' && l.reason === 'not_tls');
    assert.equal(line.remote, '127.0.0.3');
  });

  test('a connection from the load balancer without a header is refused proxy_protocol_missing', async () => {
    const socket = tlsConnect({ socket: netConnect({ host: '127.0.0.1', port: front.restPort, localAddress: '127.0.0.2' }), ...tlsClientOptions(pki) });
    socket.on('error', () => {});
    await new Promise((resolve) => socket.on('close', resolve));
    assert.equal((await front.logs.waitFor((l) => l.event === 'handshake_failed' && l.reason === 'proxy_protocol_missing')).remote, '127.0.0.2');
  });
});

test('which connections must carry a header: all, or those of the ranges, an IPv4 client of a dual-stack listener (::ffff:a.b.c.d) by its IPv4 address', () => {
  assert.equal(headerExpected(undefined)('127.0.0.1'), false);
  assert.equal(headerExpected({ from: [] })('192.0.2.1'), true);
  const fromBalancers = headerExpected({ from: [parseSubnet('10.0.0.0/8')!, parseSubnet('2001:db8::/32')!] });
  assert.deepEqual(['10.1.2.3', '::ffff:10.1.2.3', '2001:db8::7', '11.0.0.1', '::ffff:11.0.0.1', '2001:db9::1', undefined].map(fromBalancers), [true, true, true, false, false, false, false]);
});

describe('options', () => {
  const base = { mtls_cert: 'a.pem', mtls_key: 'a.key', mtls_client_ca: 'ca.pem' };
  const refused = (message: string) => (err: unknown) => err instanceof ConfigError && err.message === message;

  test('off by default; on for every connection, or for those of the ranges given', () => {
    assert.equal(parseCommonConfig(base).proxyProtocol, undefined);
    assert.equal(parseCommonConfig({ ...base, mtls_proxy_protocol: 'false' }).proxyProtocol, undefined);
    assert.deepEqual(parseCommonConfig({ ...base, mtls_proxy_protocol: true }).proxyProtocol, { from: [] });
    assert.deepEqual(parseCommonConfig({ ...base, mtls_proxy_protocol: 'true', mtls_proxy_protocol_from: ['10.0.0.0/8, 192.0.2.7', '[2001:db8::]/32', '::ffff:198.51.100.0/120'] }).proxyProtocol, {
      from: [
        { address: '10.0.0.0', prefix: 8, family: 'ipv4' },
        { address: '192.0.2.7', prefix: 32, family: 'ipv4' },
        { address: '2001:db8::', prefix: 32, family: 'ipv6' },
        { address: '198.51.100.0', prefix: 24, family: 'ipv4' },
      ],
    });
  });

  test('bad values are refused naming the option and what to give', () => {
    assert.throws(() => parseCommonConfig({ ...base, mtls_proxy_protocol: 'v2' }), (err: unknown) => err instanceof ConfigError && /--mtls_proxy_protocol/.test(err.message));
    for (const range of ['10.0.0.0/33', '2001:db8::/129', 'lb.example', '10.0.0.0/', 'fe80::1%eth0', '10.0.0.0/8/8']) {
      assert.throws(() => parseCommonConfig({ ...base, mtls_proxy_protocol: true, mtls_proxy_protocol_from: range }), refused(`--mtls_proxy_protocol_from: '${range}' is not an IP address or a CIDR range (give e.g. 10.0.0.0/8, 192.0.2.7 or 2001:db8::/32)`), range);
    }
    assert.throws(() => parseCommonConfig({ ...base, mtls_proxy_protocol: true, mtls_proxy_protocol_from: '' }), /--mtls_proxy_protocol_from was given without a value/);
    assert.throws(() => parseCommonConfig({ ...base, mtls_proxy_protocol_from: '10.0.0.0/8' }), refused('--mtls_proxy_protocol_from applies only with --mtls_proxy_protocol: add --mtls_proxy_protocol, or drop --mtls_proxy_protocol_from'));
  });
});
