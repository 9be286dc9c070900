import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { cgroupCpuQuota, cpusFromCgroupQuota, defaultWorkerCount, parseHostPort, parseLimits } from '../src/config.js';

test('the default worker count follows a cgroup CPU quota and never exceeds the CPUs', () => {
  assert.equal(cpusFromCgroupQuota('max 100000'), undefined);
  assert.equal(cpusFromCgroupQuota('200000 100000'), 2);
  assert.equal(cpusFromCgroupQuota('150000 100000'), 2);
  assert.equal(cpusFromCgroupQuota('50000 100000'), 1);
  assert.equal(cpusFromCgroupQuota(undefined), undefined);
  assert.equal(defaultWorkerCount(cpusFromCgroupQuota('100000 100000')), 1);
  assert.equal(defaultWorkerCount(cpusFromCgroupQuota('max 100000')), availableParallelism());
  assert.equal(defaultWorkerCount(cpusFromCgroupQuota('6400000 100000')), availableParallelism());
});

/** A cgroup v2 hierarchy in a temporary directory: cgroup path -> its cpu.max (none for a cgroup without one). */
async function cgroupTree(t: TestContext, cpuMax: Record<string, string>): Promise<string> {
  const root = await mkdtemp(join(tmpdir(), 'ovms-mtls-cgroup-'));
  t.after(() => rm(root, { recursive: true, force: true }));
  for (const [path, value] of Object.entries(cpuMax)) {
    await mkdir(join(root, path), { recursive: true });
    await writeFile(join(root, path, 'cpu.max'), value + '\n');
  }
  return root;
}

// Only <root>/cpu.max was read: under systemd the root of the hierarchy has none, and a CPUQuota=
// of the unit (system.slice/NAME.service/cpu.max) left one worker per CPU of the machine.
test('the CPU quota is the tightest of the process\'s own cgroup and those above it: systemd CPUQuota=, a slice, a container', async (t) => {
  const service = '0::/system.slice/ovms-mtls.service\n';
  const unitQuota = await cgroupTree(t, { 'system.slice': 'max 100000', 'system.slice/ovms-mtls.service': '200000 100000' });
  assert.equal(cgroupCpuQuota(service, unitQuota), 2);
  const sliceQuota = await cgroupTree(t, { 'system.slice': '100000 100000', 'system.slice/ovms-mtls.service': 'max 100000' });
  assert.equal(cgroupCpuQuota(service, sliceQuota), 1);
  // A container with a cgroup namespace of its own sees its cgroup as the root.
  const container = await cgroupTree(t, { '.': '300000 100000' });
  assert.equal(cgroupCpuQuota('0::/\n', container), 3);
  // cgroup v1 lines (a hybrid host) and no quota anywhere.
  assert.equal(cgroupCpuQuota('4:memory:/x\n1:cpu:/\n0::/\n', await cgroupTree(t, {})), undefined);
  assert.equal(cgroupCpuQuota(service, await cgroupTree(t, { 'system.slice/ovms-mtls.service': 'max 100000' })), undefined);
});

test('--mtls_idle_timeout is seconds (65 by default); a bad value names the option', () => {
  assert.equal(parseLimits({}).idleTimeoutMs, 65_000);
  assert.equal(parseLimits({ mtls_idle_timeout: '2.5' }).idleTimeoutMs, 2_500);
  assert.throws(() => parseLimits({ mtls_idle_timeout: 'soon' }), /--mtls_idle_timeout/);
});

test('an upstream named as Docker Compose names a service (model_server) or with the root dot of a fully qualified name is host:port; a name with a space or an empty label is not', () => {
  assert.deepEqual(parseHostPort('mtls_rest_upstream', 'model_server:8000'), { host: 'model_server', port: 8000 });
  assert.deepEqual(parseHostPort('mtls_grpc_upstream', 'ovms.default.svc.cluster.local.:9000'), { host: 'ovms.default.svc.cluster.local.', port: 9000 });
  for (const bad of ['model server:8000', 'a..b:8000', '.a:8000', '-a:8000']) {
    assert.throws(() => parseHostPort('mtls_rest_upstream', bad), { message: `--mtls_rest_upstream: '${bad}' is not host:port (example: 127.0.0.1:9000 or [::1]:9000)` });
  }
});
