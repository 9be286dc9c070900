import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { availableParallelism, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
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

/** A cgroup hierarchy in a temporary directory: file path -> its content. */
async function cgroupFiles(t: TestContext, files: Record<string, string>): Promise<string> {
  const root = await mkdtemp(join(tmpdir(), 'ovms-mtls-cgroup-'));
  t.after(() => rm(root, { recursive: true, force: true }));
  for (const [path, value] of Object.entries(files)) {
    await mkdir(dirname(join(root, path)), { recursive: true });
    await writeFile(join(root, path), value + '\n');
  }
  return root;
}

/** A cgroup v2 hierarchy: cgroup path -> its cpu.max (none for a cgroup without one). */
function cgroupTree(t: TestContext, cpuMax: Record<string, string>): Promise<string> {
  return cgroupFiles(t, Object.fromEntries(Object.entries(cpuMax).map(([path, value]) => [join(path, 'cpu.max'), value])));
}

/** A cgroup v1 cpu controller mounted at <root>/cpu: cgroup path -> its cpu.cfs_quota_us, with a period of 100 ms. */
function cgroupV1Tree(t: TestContext, quotaUs: Record<string, string>): Promise<string> {
  const files = Object.entries(quotaUs).flatMap(([path, quota]) => [[join('cpu', path, 'cpu.cfs_quota_us'), quota], [join('cpu', path, 'cpu.cfs_period_us'), '100000']]);
  return cgroupFiles(t, Object.fromEntries(files));
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

// 0x10, 1e3 and Infinity passed (Number()), where whole-number options refuse 0x10 and 1e1.
test('a number of seconds is plain decimal digits, with a fraction if need be: hexadecimal, an exponent or Infinity is refused in the usual line', () => {
  const accepted: [string, number][] = [['5', 5_000], ['2.5', 2_500], ['.5', 500], ['5.', 5_000], [' 5 ', 5_000]];
  for (const [given, ms] of accepted) assert.equal(parseLimits({ mtls_idle_timeout: given }).idleTimeoutMs, ms, given);
  for (const given of ['0x10', '1e3', '1E1', 'Infinity', '+5', '-1', '', '1_000', '5,5']) {
    assert.throws(() => parseLimits({ mtls_idle_timeout: given }), { message: `--mtls_idle_timeout: '${given}' is not a number of seconds >= 0` }, given);
  }
});

// `--mtls_idle_timeout 5m`, as Go, nginx and Kubernetes write durations, was refused without the number that works.
test('a timeout written with a unit is refused naming the plain number of seconds it means', () => {
  const cases: [string, string][] = [['5m', '300'], ['500ms', '0.5'], ['90S', '90'], ['1.5h', '5400'], ['3ms', '0.003']];
  for (const [given, seconds] of cases) {
    assert.throws(() => parseLimits({ mtls_idle_timeout: given }), { message: `--mtls_idle_timeout: '${given}' is not a number of seconds >= 0: give ${seconds} for ${given}` });
  }
  assert.throws(() => parseLimits({ mtls_idle_timeout: 'soon' }), { message: "--mtls_idle_timeout: 'soon' is not a number of seconds >= 0" });
});

test('an upstream named as Docker Compose names a service (model_server) or with the root dot of a fully qualified name is host:port; a name with a space or an empty label is not', () => {
  assert.deepEqual(parseHostPort('mtls_rest_upstream', 'model_server:8000'), { host: 'model_server', port: 8000 });
  assert.deepEqual(parseHostPort('mtls_grpc_upstream', 'ovms.default.svc.cluster.local.:9000'), { host: 'ovms.default.svc.cluster.local.', port: 9000 });
  for (const bad of ['model server:8000', 'a..b:8000', '.a:8000', '-a:8000']) {
    assert.throws(() => parseHostPort('mtls_rest_upstream', bad), { message: `--mtls_rest_upstream: '${bad}' is not host:port (example: 127.0.0.1:9000 or [::1]:9000)` });
  }
});

// Only cgroup v2's cpu.max was read: on a host booted with cgroup v1 (RHEL 8, Amazon Linux 2), a container's
// CPU limit of 2 (docker run --cpus 2, a Kubernetes limit) left one worker per CPU of the whole node.
test('a cgroup v1 CPU quota caps the workers too: a container (its host path shown, its own cgroup mounted), a systemd unit, cpu,cpuacct', async (t) => {
  const container = await cgroupV1Tree(t, { '.': '200000' });
  assert.equal(cgroupCpuQuota('12:memory:/kubepods/pod1/c1\n4:cpu,cpuacct:/kubepods/pod1/c1\n0::/\n', container), 2);
  assert.equal(cgroupCpuQuota('1:cpu:/docker/abc\n2:cpuacct:/docker/abc\n3:cpuset:/docker/abc\n', container), 2);
  const unit = await cgroupV1Tree(t, { '.': '-1', 'system.slice': '-1', 'system.slice/ovms-mtls.service': '150000' });
  assert.equal(cgroupCpuQuota('5:cpuacct,cpu:/system.slice/ovms-mtls.service\n', unit), 2);
  // No quota (-1), and only controllers other than cpu (cpuset, cpuacct) on the line.
  assert.equal(cgroupCpuQuota('4:cpu,cpuacct:/\n', await cgroupV1Tree(t, { '.': '-1' })), undefined);
  assert.equal(cgroupCpuQuota('3:cpuset:/x\n2:cpuacct:/x\n', container), undefined);
  // The tighter of v1 and v2 where both hold one.
  const both = await cgroupFiles(t, { 'cpu.max': '300000 100000', 'cpu/cpu.cfs_quota_us': '100000', 'cpu/cpu.cfs_period_us': '100000' });
  assert.equal(cgroupCpuQuota('1:cpu:/\n0::/\n', both), 1);
});
