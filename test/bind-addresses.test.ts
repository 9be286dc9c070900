/**
 * Bind addresses: which public and admin binds clash, and host names given as
 * bind addresses (every address they resolve to is bound, as OVMS and nginx do).
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { https1, startUpstream } from './helpers/harness.js';
import { httpGet } from './helpers/ops.js';
import { startCli } from './helpers/cli.js';
import { checkAdminPort, parseBindAddresses } from '../src/config.js';
import { freeLoopbackPorts } from '../src/ports.js';
import type { ModelServer } from '../src/demo/model-server.js';

let pki: TestPki;
let upstream: ModelServer;
const SAFETY = { timeout: 120_000 };

before(async () => {
  [pki, upstream] = await Promise.all([createTestPki(), startUpstream()]);
});
after(() => Promise.all([upstream.close(), pki.cleanup()]));

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

  test('ovms-mtls proxy with the admin port on 0.0.0.0 and the REST port on ::1, the same number, starts and serves both', async () => {
    const [port] = (await freeLoopbackPorts(1, '::1')) as [number];
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
