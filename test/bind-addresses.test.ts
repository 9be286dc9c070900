/**
 * Bind addresses: which public and admin binds clash, and host names given as
 * bind addresses (every address they resolve to is bound, as OVMS and nginx do).
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer as createTcpServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { grpcClients, https1, startUpstream, type LogLine } from './helpers/harness.js';
import { unary } from '../src/demo/grpc-client.js';
import { status, type ServiceError } from '@grpc/grpc-js';
import { httpGet } from './helpers/ops.js';
import { runCli, startCli, type LongRunningCli } from './helpers/cli.js';
import { checkAdminPort, parseBindAddresses, type BindSpec } from '../src/config.js';
import { startAdminServer } from '../src/admin.js';
import { ProxyMetrics } from '../src/metrics.js';
import { resolveBindAddresses, resolveListenAddresses, type Lookup } from '../src/bind-addresses.js';
import { hostAndPort } from '../src/addresses.js';
import { FAKE_OVMS, makeFakeExecutable, startWrapper, tlsArgs } from './helpers/entrypoint.js';
import { freeLoopbackPorts, isPortTaken } from '../src/ports.js';
import type { ModelServer } from '../src/demo/model-server.js';

let pki: TestPki;
let upstream: ModelServer;
const SAFETY = { timeout: 120_000 };

before(async () => {
  [pki, upstream] = await Promise.all([createTestPki(), startUpstream()]);
});
const dirs: string[] = [];
after(() => Promise.all([upstream.close(), pki.cleanup(), ...dirs.map((d) => rm(d, { recursive: true, force: true }))]));

function tlsFlags(): string[] {
  return ['--mtls_cert', pki.paths['server.pem']!, '--mtls_key', pki.paths['server.key']!, '--mtls_client_ca', pki.paths['client_cert_ca.pem']!];
}

const clash = (port: number, name: string) => ({ message: `--mtls_admin_port and --${name} are both ${port} on the same address: the admin listener needs a port of its own` });

describe('the admin port and a public port with the same number', SAFETY, () => {
  const admin = (...hosts: string[]) => ({ port: 9100, hosts });
  const rest = (...hosts: string[]) => ({ rest: { port: 9100, hosts } });

  test('an IPv4 address or wildcard and an IPv6 one never clash: 0.0.0.0 next to ::1, ::1 next to 0.0.0.0; nor does an IPv6-only :: take an IPv4 address', () => {
    assert.doesNotThrow(() => checkAdminPort(admin('0.0.0.0'), rest('::1')));
    assert.doesNotThrow(() => checkAdminPort(admin('::1'), rest('0.0.0.0')));
    // `::` is IPv6-only next to the admin's own 127.0.0.1: 127.0.0.2 is not its to take.
    assert.doesNotThrow(() => checkAdminPort(admin('127.0.0.1', '::'), rest('127.0.0.2')));
    assert.doesNotThrow(() => checkAdminPort(admin('127.0.0.1'), rest('127.0.0.2', '::1')));
  });

  test('the true clashes are still refused, with the same message: the same address in two spellings, a wildcard of the same family, a dual-stack :: with an IPv4 address', () => {
    assert.throws(() => checkAdminPort(admin('127.0.0.1'), rest('127.0.0.1')), clash(9100, 'rest_port'));
    assert.throws(() => checkAdminPort(admin('0:0::1'), rest('::1')), clash(9100, 'rest_port'));
    assert.throws(() => checkAdminPort(admin('0.0.0.0'), rest('::1', '127.0.0.1')), clash(9100, 'rest_port'));
    assert.throws(() => checkAdminPort(admin('::1'), rest('0.0.0.0', '::')), clash(9100, 'rest_port'));
    // The admin's `::` alone is dual-stack (admin.ts decides from its own list): it takes 127.0.0.1 too.
    assert.throws(() => checkAdminPort(admin('::'), rest('127.0.0.1')), clash(9100, 'rest_port'));
    assert.throws(() => checkAdminPort(admin('127.0.0.1'), rest('::')), clash(9100, 'rest_port'));
    assert.throws(() => checkAdminPort(admin('127.0.0.1', '::'), { grpc: { port: 9100, hosts: ['0.0.0.0'] } }), clash(9100, 'port'));
  });

  test('one IPv6 address written two ways is bound once', () => {
    assert.deepEqual(parseBindAddresses('rest_bind_address', '::1,0:0::1,[0:0:0:0:0:0:0:1]', '0.0.0.0'), ['::1']);
  });

  test('an IPv4-mapped address is its IPv4 address: bound once next to it, covered by 0.0.0.0, a clash with an admin port on it', () => {
    // Bound as given, the second bind of the pair failed as "the port is already in use".
    assert.deepEqual(parseBindAddresses('rest_bind_address', '::ffff:127.0.0.1,127.0.0.1,[::FFFF:7f00:1]', '0.0.0.0'), ['127.0.0.1']);
    assert.throws(() => parseBindAddresses('rest_bind_address', '0.0.0.0,::ffff:127.0.0.1', '0.0.0.0'), /--rest_bind_address: 0\.0\.0\.0 already covers 127\.0\.0\.1 \(list one or the other\)/);
    assert.throws(() => checkAdminPort(admin('::ffff:127.0.0.1'), rest('127.0.0.1')), clash(9100, 'rest_port'));
  });

  test('ovms-mtls proxy with the admin port on 0.0.0.0 and the REST port on ::1, the same number, starts and serves both', async () => {
    const [port] = (await freeOnBothLoopbacks(1)) as [number];
    const cli = startCli(['proxy', '--rest_port', String(port), '--rest_bind_address', '::1', '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`,
      '--mtls_admin_port', String(port), '--mtls_admin_bind_address', '0.0.0.0', '--mtls_workers', '1', ...tlsFlags()]);
    try {
      const exited = cli.exited.then((code) => Promise.reject(new Error(`the proxy exited with ${code}: ${cli.stderr()}`)));
      exited.catch(() => {});
      await Promise.race([cli.logs.waitFor((l) => l.event === 'listening' && l.listener === 'rest'), exited]);
      assert.equal((await httpGet(port, '/healthz')).status, 200);
      assert.equal((await https1(port, pki, { host: '::1', path: '/v2/health/live' })).status, 200);
    } finally {
      cli.child.kill('SIGTERM');
      assert.equal(await cli.exited, 0);
    }
  });
});

/**
 * `count` ports free on ::1 and on 127.0.0.1 alike, for a proxy that binds both (localhost, or :: and 0.0.0.0 beside ::1).
 * Ports free on ::1 alone could be in use on 127.0.0.1, by this file's model server among others.
 */
async function freeOnBothLoopbacks(count: number): Promise<number[]> {
  const takenOnIpv4 = new Set<number>();
  for (;;) {
    const ports = await freeLoopbackPorts(count, '::1', takenOnIpv4);
    for (const port of ports) if (await isPortTaken(port, '127.0.0.1')) takenOnIpv4.add(port);
    if (ports.every((port) => !takenOnIpv4.has(port))) return ports;
  }
}

/** A name service of our own: `names` maps each name to its addresses, in order; any other name is not found. */
function namesOf(names: Record<string, string[]>): Lookup {
  return async (name) => {
    const addresses = names[name];
    if (!addresses) throw Object.assign(new Error(`getaddrinfo ENOTFOUND ${name}`), { code: 'ENOTFOUND' });
    return addresses.map((address) => ({ address }));
  };
}

describe('host names as bind addresses, resolved at start', () => {
  const lookup = namesOf({ both: ['127.0.0.1', '::1'], v4: ['127.0.0.1'], long: ['0:0:0:0:0:0:0:1'] });

  test('each address of a name is bound, in the order the system gives them, a repeat once', async () => {
    assert.deepEqual(await resolveBindAddresses('rest_bind_address', ['both'], lookup), { hosts: ['127.0.0.1', '::1'], resolvedFrom: { '127.0.0.1': 'both', '::1': 'both' } });
    assert.deepEqual(await resolveBindAddresses('rest_bind_address', ['127.0.0.1', 'both', 'v4', 'long'], lookup), { hosts: ['127.0.0.1', '::1'], resolvedFrom: { '127.0.0.1': 'both', '::1': 'both' } });
    assert.deepEqual(await resolveBindAddresses('rest_bind_address', ['127.0.0.1', '::1'], lookup), { hosts: ['127.0.0.1', '::1'] });
  });

  test('the rules for addresses hold for a name\'s: a wildcard covering one is refused naming the name', async () => {
    await assert.rejects(resolveBindAddresses('grpc_bind_address', ['0.0.0.0', 'v4'], lookup), { message: '--grpc_bind_address: 0.0.0.0 already covers 127.0.0.1 from v4 (list one or the other)' });
    await assert.rejects(resolveBindAddresses('grpc_bind_address', ['::', 'both'], lookup), { message: '--grpc_bind_address: :: already covers ::1 from both (list one or the other)' });
  });

  test('a name that resolves to nothing is one line naming the flag', async () => {
    await assert.rejects(resolveBindAddresses('mtls_admin_bind_address', ['nowhere'], lookup), { message: "--mtls_admin_bind_address: 'nowhere' does not resolve to an address (ENOTFOUND); give an IP address, or a name /etc/hosts or DNS knows" });
    await assert.rejects(resolveBindAddresses('rest_bind_address', ['empty'], async () => []), { message: "--rest_bind_address: 'empty' does not resolve to an address; give an IP address, or a name /etc/hosts or DNS knows" });
  });

  test('the admin port is checked on the addresses: a name for 127.0.0.1 and 127.0.0.1 on one port clash; a name for ::1 and 0.0.0.0 do not', async () => {
    await assert.rejects(resolveListenAddresses({ rest: { port: 9100, hosts: ['127.0.0.1'] }, admin: { port: 9100, hosts: ['v4'] } }, lookup), clash(9100, 'rest_port'));
    const ipv6 = namesOf({ six: ['::1'] });
    const binds = await resolveListenAddresses({ grpc: { port: 9100, hosts: ['six'] }, admin: { port: 9100, hosts: ['0.0.0.0'] } }, ipv6);
    assert.deepEqual(binds.grpc, { port: 9100, hosts: ['::1'], resolvedFrom: { '::1': 'six' } });
  });
});

describe('a host name\'s address that is not on this machine', () => {
  // 2001:db8::/32 is for documentation: never on a machine. Only a bind is tried, nothing is sent.
  const startAdmin = (spec: BindSpec) => startAdminServer({ ...spec, port: 0, metrics: new ProxyMetrics(), health: () => ({ ready: true, checks: {} }) });

  test('is skipped while another address of the name binds, also one listed as such too (127.0.0.1,localhost)', async () => {
    const admin = await startAdmin({ hosts: ['127.0.0.1', '2001:db8::1'], resolvedFrom: { '127.0.0.1': 'localhost', '2001:db8::1': 'localhost' } });
    try {
      assert.deepEqual(admin.skipped, [{ address: '2001:db8::1', name: 'localhost', reason: 'the address is not on this machine' }]);
      assert.deepEqual(admin.addresses.map((a) => a.address), ['127.0.0.1']);
      assert.equal((await httpGet(admin.port, '/healthz')).status, 200);
    } finally {
      await admin.close();
    }
  });

  test('is refused when given as an address, naming the flag to check, or when the name has no address here', async () => {
    await assert.rejects(startAdmin({ hosts: ['127.0.0.1', '2001:db8::1'], resolvedFrom: { '127.0.0.1': 'localhost' } }), { code: 'ERR_LISTEN', message: /^--mtls_admin_port: \[2001:db8::1\]:\d+ cannot be bound: the address is not on this machine \(check --mtls_admin_bind_address\)$/ });
    await assert.rejects(startAdmin({ hosts: ['127.0.0.1', '2001:db8::1'], resolvedFrom: { '2001:db8::1': 'elsewhere' } }), { code: 'ERR_LISTEN' });
  });
});

/**
 * The CLI with an /etc/hosts of our own (and `hosts: files` alone, so no DNS server is asked),
 * in a mount namespace of its own: `localhost` can be 127.0.0.1 and ::1 whatever this machine's file says.
 */
const NAMESPACES = spawnSync('unshare', ['--user', '--map-root-user', '--mount', 'true']).status === 0;
const NEEDS_NAMESPACES = { ...SAFETY, skip: NAMESPACES ? false : 'unshare --user --mount is not available here' };

async function withHosts(hosts: string): Promise<string[]> {
  const dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-hosts-'));
  dirs.push(dir);
  await writeFile(join(dir, 'hosts'), hosts);
  await writeFile(join(dir, 'nsswitch.conf'), 'hosts: files\n');
  const script = 'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/nsswitch.conf && shift 2 && exec "$@"';
  return ['unshare', '--user', '--map-root-user', '--mount', 'sh', '-c', script, 'sh', join(dir, 'hosts'), join(dir, 'nsswitch.conf')];
}

const BOTH = '127.0.0.1 localhost\n::1 localhost\n';

/**
 * The proxy started under `wrap`; rejects with what it said if it exits instead of listening.
 * Once the REST port's `listening` line is in, so is every line logged before it: the other
 * listeners' and the bind_skipped warnings.
 */
async function started(args: string[], wrap: string[]): Promise<LongRunningCli> {
  const cli = startCli(['proxy', ...args, ...tlsFlags()], { wrap });
  const exited = cli.exited.then((code) => Promise.reject(new Error(`the proxy exited with ${code}: ${cli.stderr()}`)));
  exited.catch(() => {});
  await Promise.race([cli.logs.waitFor((l) => l.event === 'listening' && l.listener === 'rest'), exited]);
  return cli;
}

/** The line already logged that matches. */
function loggedOnce(cli: LongRunningCli, match: (line: LogLine) => boolean): LogLine {
  const line = cli.logs.lines.find(match);
  assert.ok(line, 'no such line was logged');
  return line;
}

async function stopped(cli: LongRunningCli): Promise<void> {
  cli.child.kill('SIGTERM');
  assert.equal(await cli.exited, 0);
}

describe('ovms-mtls proxy with its upstream named by a host name', () => {
  // docker-compose starts the proxy before the model server's service name exists: the proxy must serve, say so, and recover.
  test('one that does not resolve yet: the proxy starts, clients and /readyz are told, and once the name resolves it serves without a restart', NEEDS_NAMESPACES, async () => {
    const [grpc, rest, admin] = (await freeLoopbackPorts(3)) as [number, number, number];
    const wrap = await withHosts('127.0.0.1 localhost\n');
    const hostsFile = wrap.at(-2)!;
    const cli = await started(['--port', String(grpc), '--grpc_bind_address', '127.0.0.1', '--mtls_grpc_upstream', `model-server:${upstream.grpcPort}`,
      '--rest_port', String(rest), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', `model-server:${upstream.restPort}`,
      '--mtls_admin_port', String(admin), '--mtls_workers', '1'], wrap);
    const clients = grpcClients(`127.0.0.1:${grpc}`, pki);
    try {
      const refused = await https1(rest, pki, { path: '/v2/health/ready' });
      assert.deepEqual([refused.status, JSON.parse(refused.body)], [502, { error: `upstream model-server:${upstream.restPort}: host name does not resolve` }]);
      const err = await unary(clients.kserve, 'ServerLive', {}).then(() => assert.fail('should fail'), (e: ServiceError) => e);
      assert.deepEqual([err.code, err.details], [status.UNAVAILABLE, `upstream model-server:${upstream.grpcPort}: host name does not resolve`]);
      const notReady = await httpGet(admin, '/readyz');
      assert.equal(notReady.status, 503);
      assert.equal(JSON.parse(notReady.body).checks.upstream.detail,
        `REST model-server:${upstream.restPort}: host name does not resolve (ENOTFOUND); gRPC model-server:${upstream.grpcPort}: host name does not resolve (ENOTFOUND)`);
      // Written in place: the file bind-mounted over /etc/hosts is this inode.
      await writeFile(hostsFile, '127.0.0.1 localhost\n127.0.0.1 model-server\n');
      assert.equal((await https1(rest, pki, { path: '/v2/health/ready' })).status, 200);
      assert.equal((await unary(clients.kserve, 'ServerLive', {})).response.live, true);
      assert.equal((await httpGet(admin, '/readyz')).status, 200);
    } finally {
      clients.close();
      await stopped(cli);
    }
  });
});

describe('ovms-mtls proxy with host names as bind addresses', () => {
  test('localhost for 127.0.0.1 and ::1 listens on both, public and admin ports, with 2 workers; the listening lines name each address', NEEDS_NAMESPACES, async () => {
    const [grpc, rest, admin] = (await freeOnBothLoopbacks(3)) as [number, number, number];
    const cli = await started(['--port', String(grpc), '--grpc_bind_address', 'localhost', '--mtls_grpc_upstream', `127.0.0.1:${upstream.grpcPort}`,
      '--rest_port', String(rest), '--rest_bind_address', 'localhost', '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`,
      '--mtls_admin_port', String(admin), '--mtls_admin_bind_address', 'localhost', '--mtls_workers', '2'], await withHosts(BOTH));
    try {
      for (const [listener, port] of [['grpc', grpc], ['rest', rest], ['admin', admin]] as const) {
        const line = loggedOnce(cli, (l) => l.event === 'listening' && l.listener === listener);
        // In the order the system's resolver gives (glibc puts ::1 first).
        assert.deepEqual([...(line['addresses'] as string[])].sort(), [`127.0.0.1:${port}`, `[::1]:${port}`], listener);
      }
      for (const host of ['127.0.0.1', '::1']) {
        assert.equal((await https1(rest, pki, { host, path: '/v2/health/live' })).status, 200, host);
        const clients = grpcClients(hostAndPort(host, grpc), pki);
        try {
          assert.equal((await unary(clients.kserve, 'ServerLive', {})).response.live, true, host);
        } finally {
          clients.close();
        }
        assert.equal((await httpGet(admin, '/healthz', 'GET', host)).status, 200, host);
      }
    } finally {
      await stopped(cli);
    }
  });

  test(':: next to a name for an IPv4 address is bound IPv6-only, as next to the address itself: both serve', NEEDS_NAMESPACES, async () => {
    const [rest] = (await freeOnBothLoopbacks(1)) as [number];
    const cli = await started(['--rest_port', String(rest), '--rest_bind_address', '::,v4only', '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`, '--mtls_workers', '1'],
      await withHosts('127.0.0.1 v4only\n'));
    try {
      assert.deepEqual(loggedOnce(cli, (l) => l.event === 'listening' && l.listener === 'rest')['addresses'], [`[::]:${rest}`, `127.0.0.1:${rest}`]);
      for (const host of ['127.0.0.1', '::1']) assert.equal((await https1(rest, pki, { host, path: '/v2/health/live' })).status, 200, host);
    } finally {
      await stopped(cli);
    }
  });

  test('a name that resolves to nothing exits 2 with one line naming the flag', NEEDS_NAMESPACES, async () => {
    const res = await runCli(['proxy', '--rest_port', '18443', '--rest_bind_address', 'nowhere.test', '--mtls_rest_upstream', '127.0.0.1:9', ...tlsFlags()], { wrap: await withHosts(BOTH) });
    assert.equal(res.code, 2);
    assert.equal(res.stderr, "ovms-mtls: --rest_bind_address: 'nowhere.test' does not resolve to an address (ENOTFOUND); give an IP address, or a name /etc/hosts or DNS knows\n");
  });

  test('an address of the name that is not on this machine is skipped with a warning, the others serve; a name with no address here is refused', NEEDS_NAMESPACES, async () => {
    // 2001:db8::/32 is for documentation: never on a machine. Only a bind is tried, nothing is sent.
    const wrap = await withHosts('2001:db8::1 twohomed\n127.0.0.1 twohomed\n2001:db8::2 elsewhere\n');
    const [rest, admin] = (await freeLoopbackPorts(2)) as [number, number];
    const cli = await started(['--rest_port', String(rest), '--rest_bind_address', 'twohomed', '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`,
      '--mtls_admin_port', String(admin), '--mtls_admin_bind_address', 'twohomed', '--mtls_workers', '1'], wrap);
    try {
      const warning = loggedOnce(cli, (l) => l.event === 'bind_skipped' && l.listener === 'rest');
      assert.equal(warning['level'], 'warn');
      assert.equal(warning['msg'], `--rest_bind_address: twohomed also resolves to 2001:db8::1, not bound ([2001:db8::1]:${rest}: the address is not on this machine); rest serves twohomed on its other addresses`);
      assert.equal(loggedOnce(cli, (l) => l.event === 'bind_skipped' && l.listener === 'admin')['address'], `[2001:db8::1]:${admin}`);
      for (const [listener, port] of [['rest', rest], ['admin', admin]] as const) {
        assert.deepEqual(loggedOnce(cli, (l) => l.event === 'listening' && l.listener === listener)['addresses'], [`127.0.0.1:${port}`]);
      }
      assert.equal((await https1(rest, pki, { path: '/v2/health/live' })).status, 200);
      assert.equal((await httpGet(admin, '/healthz')).status, 200);
    } finally {
      await stopped(cli);
    }
    const refused = await runCli(['proxy', '--rest_port', String(rest), '--rest_bind_address', 'elsewhere', '--mtls_rest_upstream', '127.0.0.1:9', ...tlsFlags()], { wrap });
    assert.equal(refused.code, 2);
    assert.equal(refused.stderr, `ovms-mtls: --rest_port ${rest}: cannot listen on [2001:db8::2]:${rest}: the address is not on this machine (check --rest_bind_address)\n`);
  });

  test('the port taken on one of the name\'s addresses is refused as for any address: a client of the name could reach the other process', NEEDS_NAMESPACES, async () => {
    const blocker = createTcpServer().listen(0, '::1');
    await once(blocker, 'listening');
    const busy = (blocker.address() as { port: number }).port;
    const cli = startCli(['proxy', '--rest_port', String(busy), '--rest_bind_address', 'localhost', '--mtls_rest_upstream', '127.0.0.1:9', '--mtls_workers', '1', ...tlsFlags()], { wrap: await withHosts(BOTH) });
    try {
      const outcome = await Promise.race([cli.exited, cli.logs.waitFor((l) => l.event === 'listening').then(() => 'listening')]);
      assert.equal(outcome, 2, cli.stderr());
      assert.equal(cli.stderr(), `ovms-mtls: --rest_port ${busy}: cannot listen on [::1]:${busy}: the port is already in use (stop what uses it or pick another port)\n`);
    } finally {
      cli.child.kill('SIGTERM');
      await cli.exited;
      blocker.close();
    }
  });
});

describe('the OVMS entrypoint with a host name as bind address', () => {
  test('--rest_bind_address localhost (127.0.0.1 and ::1) serves OVMS on both', NEEDS_NAMESPACES, async () => {
    makeFakeExecutable();
    const [rest] = (await freeOnBothLoopbacks(1)) as [number];
    const wrapper = startWrapper(['--rest_port', String(rest), '--rest_bind_address', 'localhost', '--mtls_ovms_binary', FAKE_OVMS, '--mtls_ovms_user', 'root', '--mtls_workers', '1', ...tlsArgs(pki)],
      {}, await withHosts(BOTH));
    try {
      const listening = await wrapper.waitForLog((l) => l.event === 'listening' && l.listener === 'rest');
      assert.deepEqual([...(listening['addresses'] as string[])].sort(), [`127.0.0.1:${rest}`, `[::1]:${rest}`]);
      await wrapper.waitForEvent('ovms_ready');
      for (const host of ['127.0.0.1', '::1']) assert.equal((await https1(rest, pki, { host, path: '/v2/health/live' })).status, 200, host);
    } finally {
      wrapper.child.kill('SIGTERM');
      assert.equal((await wrapper.exited).code, 0);
    }
  });
});
