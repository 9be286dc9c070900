import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { chmod, chown, mkdtemp, rm } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { https1 } from './helpers/harness.js';
import { fakeRuns, FAKE_OVMS, makeFakeExecutable, startWrapper, tlsArgs } from './helpers/entrypoint.js';
import { assertCanSwitchUsers, initGroups, lookupUser, missingSwitchCapabilities, ovmsEnvironment, parsePasswd, planPrivileges } from '../src/privileges.js';
import { ovmsIdentity, spawnCommand } from '../src/ovms-child.js';
import { ConfigError } from '../src/errors.js';
import { freeLoopbackPorts } from '../src/ports.js';

const PASSWD = ['root:x:0:0:root:/root:/bin/bash', '# comment', 'ovms:x:5000:5000::/home/ovms:/bin/sh', 'broken line', 'nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin'].join('\n');
const root = process.getuid?.() === 0;

describe('user lookup', () => {
  test('/etc/passwd entries are parsed and malformed lines skipped', () => {
    assert.deepEqual(parsePasswd(PASSWD).map((a) => a.name), ['root', 'ovms', 'nobody']);
  });

  test('a user is found by name or by uid; a bare uid without entry stands for itself', () => {
    assert.deepEqual(lookupUser('ovms', { flag: 'mtls_user', passwd: PASSWD }), { name: 'ovms', uid: 5000, gid: 5000, inPasswd: true, home: '/home/ovms' });
    assert.equal(lookupUser('65534', { flag: 'mtls_user', passwd: PASSWD }).name, 'nobody');
    assert.deepEqual(lookupUser('1234', { flag: 'mtls_user', passwd: PASSWD }), { name: '1234', uid: 1234, gid: 1234, inPasswd: false, home: '/' });
  });

  test('a user that does not exist is a ConfigError naming the flag and the fix', () => {
    assert.throws(
      () => lookupUser('model', { flag: 'mtls_ovms_user', passwd: PASSWD }),
      (err: unknown) => err instanceof ConfigError && /^--mtls_ovms_user: user 'model' does not exist \(create it/.test(err.message),
    );
  });

  test('started as non-root nothing changes, even for users that do not exist', () => {
    assert.deepEqual(planPrivileges({ ovmsUser: 'missing', proxyUser: 'missing', root: false, passwd: PASSWD }), {});
  });

  test('started as root both users are resolved; root means staying root', () => {
    const plan = planPrivileges({ ovmsUser: 'ovms', proxyUser: 'root', root: true, passwd: PASSWD });
    assert.equal(plan.ovms?.uid, 5000);
    assert.equal(plan.proxy, undefined);
  });
});

describe("OVMS's environment after a start as root", () => {
  const ovms = lookupUser('ovms', { flag: 'mtls_ovms_user', passwd: PASSWD });

  test("root's HOME (what docker and Kubernetes set) or none becomes the OVMS user's home; the rest of the environment stays", () => {
    assert.deepEqual(ovmsEnvironment(ovms, { HOME: '/root', GRPC_SERVERS: '2' }, PASSWD), { HOME: '/home/ovms', GRPC_SERVERS: '2' });
    assert.deepEqual(ovmsEnvironment(ovms, { HF_TOKEN: 't' }, PASSWD), { HF_TOKEN: 't', HOME: '/home/ovms' });
    assert.deepEqual(ovmsEnvironment(lookupUser('4321', { flag: 'mtls_ovms_user', passwd: PASSWD }), { HOME: '/root' }, PASSWD), { HOME: '/' });
  });

  test('a HOME set to anything else was set on purpose and stays; no user switch, no change', () => {
    assert.equal(ovmsEnvironment(ovms, { HOME: '/data' }, PASSWD), undefined);
    assert.equal(ovmsEnvironment(undefined, { HOME: '/root' }, PASSWD), undefined);
  });
});

describe('capabilities to switch users', () => {
  const status = (eff: string, bnd: string) => `Name:\tnode\nCapInh:\t0000000000000000\nCapPrm:\t${eff}\nCapEff:\t${eff}\nCapBnd:\t${bnd}\n`;
  const ALL = '000001ffffffffff';

  test('CAP_SETGID and CAP_SETUID are needed in the effective set (the proxy drops) and in the bounding set (setpriv runs OVMS)', () => {
    assert.deepEqual(missingSwitchCapabilities(status(ALL, ALL)), []);
    assert.deepEqual(missingSwitchCapabilities(status('0000000000000400', ALL)).map((c) => c.name), ['CAP_SETGID', 'CAP_SETUID']);
    assert.deepEqual(missingSwitchCapabilities(status(ALL, '000001ffffffff7f')).map((c) => c.name), ['CAP_SETUID']);
    assert.deepEqual(missingSwitchCapabilities(''), [], 'no /proc: nothing to tell');
  });

  test('root without them is refused in one line naming the user, what is missing and both ways out; staying root needs none', () => {
    const plan = planPrivileges({ ovmsUser: 'ovms', proxyUser: 'ovms', root: true, passwd: PASSWD });
    assert.throws(
      () => assertCanSwitchUsers(plan, status('0000000000000400', ALL)),
      (err: unknown) => err instanceof ConfigError && err.message === "--mtls_ovms_user: started as root without CAP_SETGID and CAP_SETUID (e.g. --cap-drop ALL), so it cannot switch to 'ovms' (uid 5000): give them back (docker --cap-add SETGID --cap-add SETUID, Kubernetes securityContext.capabilities.add), or start it as that user (docker --user 5000, Kubernetes runAsUser: 5000)",
    );
    assert.doesNotThrow(() => assertCanSwitchUsers({}, status('0000000000000400', ALL)));
    assert.doesNotThrow(() => assertCanSwitchUsers(plan, status(ALL, ALL)));
  });
});

describe('the OVMS spawn command', () => {
  test('setpriv changes the user first and sets the parent-death signal after, then runs OVMS with its argv', () => {
    const cmd = spawnCommand({ binary: '/ovms/bin/ovms', args: ['--plugin_config', '{"A": 1}'], runAs: { name: 'ovms', uid: 5000, gid: 5000, inPasswd: true, home: '/home/ovms' }, setpriv: '/usr/bin/setpriv' });
    assert.deepEqual(cmd, { file: '/usr/bin/setpriv', args: ['--reuid=5000', '--regid=5000', '--init-groups', '--pdeathsig=SIGKILL', '--', '/ovms/bin/ovms', '--plugin_config', '{"A": 1}'] });
  });

  test('without setpriv, Node switches the user', () => {
    assert.deepEqual(spawnCommand({ binary: '/x', args: [], runAs: { name: 'n', uid: 7, gid: 8, inPasswd: false, home: '/' } }), { file: '/x', args: [], uid: 7, gid: 8 });
  });
});

describe("the groups OVMS runs with, for judging its binary before it starts", () => {
  const GROUP = ['root:x:0:', 'video:x:44:ovms,other', 'render:x:105:ovms', 'ovms:x:5000:', 'staff:x:50:other'].join('\n');

  test("setpriv --init-groups: the --regid, and the gid and member groups of its uid's first passwd entry", () => {
    const ovms = lookupUser('ovms', { flag: 'mtls_ovms_user', passwd: PASSWD });
    assert.deepEqual(initGroups(ovms, { passwd: PASSWD, group: GROUP }), [5000, 44, 105]);
    // A second name for uid 5000: setpriv looks the uid up (getpwuid), which finds the first.
    const alias = { ...ovms, name: 'alias', gid: 50 };
    assert.deepEqual(initGroups(alias, { passwd: PASSWD, group: GROUP }), [50, 5000, 44, 105]);
  });

  // Compared with what the kernel then reports for each user of this system: the groups the child really gets.
  test('as each user of /etc/passwd and a bare uid, with and without setpriv, the groups are those `id -G` reports in the child', { skip: root ? false : 'needs root' }, () => {
    const users = [...parsePasswd(readFileSync('/etc/passwd', 'utf8')).filter((a) => a.uid !== 0), lookupUser('1000680000', { flag: 'mtls_ovms_user' })];
    for (const user of users) {
      for (const setpriv of ['/usr/bin/setpriv', undefined]) {
        const cmd = spawnCommand({ binary: '/usr/bin/id', args: ['-G'], runAs: user, setpriv });
        const run = spawnSync(cmd.file, [...cmd.args], { encoding: 'utf8', ...(cmd.uid !== undefined ? { uid: cmd.uid, gid: cmd.gid } : {}) });
        assert.equal(run.status, 0, run.stderr);
        const reported = run.stdout.trim().split(' ').map(Number).sort((a, b) => a - b);
        assert.deepEqual([...ovmsIdentity(user, setpriv).groups].sort((a, b) => a - b), reported, `${user.name} ${setpriv ?? 'without setpriv'}`);
      }
    }
  });
});

describe('privilege drop as root', { skip: root ? false : 'needs root' }, () => {
  let pki: TestPki;
  let dir: string;

  before(async () => {
    makeFakeExecutable();
    pki = await createTestPki();
    dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-priv-'));
    // The fake OVMS runs as nobody and records its argv here.
    await chmod(dir, 0o777);
  });

  after(async () => {
    await pki.cleanup();
    await rm(dir, { recursive: true, force: true });
  });

  // setpriv switches the user, not the environment: OVMS ran as nobody with HOME=/root (mode 0700), and whatever it cached under ~ failed.
  test("OVMS run as --mtls_ovms_user gets that user's HOME instead of root's: serving, a restart after the proxy's drop, and a one-shot run", async () => {
    const argvFile = join(dir, 'home.jsonl');
    const [rest] = await freeLoopbackPorts(1);
    const asRootStarts = { FAKE_OVMS_ARGV_FILE: argvFile, HOME: lookupUser('0', { flag: 'mtls_user' }).home };
    const users = ['--mtls_ovms_user', 'nobody', '--mtls_user', 'nobody'];
    const wrapper = startWrapper(
      ['--rest_port', String(rest), '--rest_bind_address', '127.0.0.1', ...tlsArgs(pki), '--mtls_ovms_binary', FAKE_OVMS, ...users, '--mtls_restart', 'on-failure', '--mtls_workers', '1'],
      { ...asRootStarts, FAKE_OVMS_EXIT_CODE: '5', FAKE_OVMS_FAIL_RUNS: '1' },
    );
    try {
      await wrapper.waitForEvent('ovms_ready');
      wrapper.child.kill('SIGTERM');
      assert.deepEqual(await wrapper.exited, { code: 0, signal: null });
    } finally {
      wrapper.child.kill('SIGKILL');
      await wrapper.exited;
    }
    const oneShot = startWrapper(['--list_models', '--mtls_ovms_binary', FAKE_OVMS, ...users], asRootStarts);
    assert.deepEqual(await oneShot.exited, { code: 0, signal: null });
    const nobodyHome = lookupUser('nobody', { flag: 'mtls_ovms_user' }).home;
    assert.deepEqual(fakeRuns(argvFile).map((r) => [r.uid, r.home]), [[65534, nobodyHome], [65534, nobodyHome], [65534, nobodyHome]]);
  });

  test('OVMS runs as --mtls_ovms_user and the proxy drops to --mtls_user after reading the root-only key', async () => {
    const argvFile = join(dir, 'argv.jsonl');
    const [rest] = await freeLoopbackPorts(1);
    const wrapper = startWrapper(
      ['--rest_port', String(rest), '--rest_bind_address', '127.0.0.1', ...tlsArgs(pki), '--mtls_ovms_binary', FAKE_OVMS, '--mtls_ovms_user', 'nobody', '--mtls_user', 'nobody'],
      { FAKE_OVMS_ARGV_FILE: argvFile },
    );
    try {
      const dropped = await wrapper.waitForEvent('privileges_dropped');
      assert.equal(dropped['uid'], 65534);
      await wrapper.waitForEvent('ovms_ready');
      const [run] = fakeRuns(argvFile);
      assert.equal(run!.uid, 65534);
      assert.equal(run!.gid, 65534);
      const status = readFileSync(`/proc/${wrapper.child.pid}/status`, 'utf8');
      assert.match(status, /^Uid:\s+65534\s+65534\s+65534\s+65534$/m);
      assert.equal((await https1(rest!, pki, { path: '/v2/health/ready' })).status, 200);
      wrapper.child.kill('SIGTERM');
      assert.deepEqual(await wrapper.exited, { code: 0, signal: null });
    } finally {
      wrapper.child.kill('SIGKILL');
      await wrapper.exited;
    }
  });

  /** The entrypoint as Kubernetes' runAsUser starts it: a uid that /etc/passwd does not know (os.userInfo() and os.homedir() throw for it), no HOME. */
  async function startAsUidWithoutPasswdEntry(name: string, extra: string[]) {
    const uid = uidWithoutPasswdEntry();
    const argvFile = join(dir, `${name}.jsonl`);
    const [rest] = await freeLoopbackPorts(1);
    await Promise.all([pki.dir, ...Object.values(pki.paths)].map((path) => chown(path, uid, uid)));
    const asThatUid = ['setpriv', `--reuid=${uid}`, `--regid=${uid}`, '--clear-groups', 'env', '-u', 'HOME'];
    const wrapper = startWrapper(['--rest_port', String(rest), '--rest_bind_address', '127.0.0.1', '--mtls_workers', '2', ...tlsArgs(pki), '--mtls_ovms_binary', FAKE_OVMS, ...extra], { FAKE_OVMS_ARGV_FILE: argvFile }, asThatUid);
    return { uid, argvFile, rest: rest!, wrapper };
  }

  test('started as a uid with no passwd entry and no HOME, the entrypoint serves and runs OVMS as that uid', async () => {
    const { uid, argvFile, rest, wrapper } = await startAsUidWithoutPasswdEntry('no-passwd', []);
    try {
      await wrapper.waitForEvent('ovms_ready');
      assert.equal((await https1(rest, pki, { path: '/v2/health/ready' })).status, 200);
      assert.deepEqual(fakeRuns(argvFile).map((r) => [r.uid, r.gid]), [[uid, uid]]);
      wrapper.child.kill('SIGTERM');
      assert.deepEqual(await wrapper.exited, { code: 0, signal: null });
      assert.equal(wrapper.stderr(), '');
      assert.deepEqual(wrapper.logs.filter((l) => ['warn', 'error', 'fatal'].includes(l.level)), []);
    } finally {
      wrapper.child.kill('SIGKILL');
      await wrapper.exited;
    }
  });

  // Not root, the entrypoint has nothing to switch from: OVMS ran as the starting uid without a word where --mtls_ovms_user named another.
  test('started as another uid than root, a --mtls_ovms_user naming someone else gets a warning that it is not taken; one naming that uid gets none', async () => {
    const { uid, argvFile, wrapper } = await startAsUidWithoutPasswdEntry('not-taken', ['--mtls_ovms_user', 'nobody', '--mtls_user', String(uidWithoutPasswdEntry())]);
    try {
      await wrapper.waitForEvent('ovms_ready');
      assert.deepEqual(fakeRuns(argvFile).map((r) => r.uid), [uid]);
      const warnings = wrapper.logs.filter((l) => l.level === 'warn');
      assert.deepEqual(warnings.map((l) => [l.event, l['option']]), [['option_ignored', 'mtls_ovms_user']]);
      assert.match(String(warnings[0]!.msg), new RegExp(`^--mtls_ovms_user 'nobody' is not taken: the entrypoint started as uid ${uid}, not root, so OVMS and the proxy both run as uid ${uid}`));
    } finally {
      wrapper.child.kill('SIGKILL');
      await wrapper.exited;
    }
  });

  test('a --mtls_ovms_user that does not exist is a one-line startup error and OVMS never starts', async () => {
    const argvFile = join(dir, 'missing.jsonl');
    const [rest] = await freeLoopbackPorts(1);
    const wrapper = startWrapper(['--rest_port', String(rest), ...tlsArgs(pki), '--mtls_ovms_binary', FAKE_OVMS, '--mtls_ovms_user', 'no-such-user-ovms-mtls'], { FAKE_OVMS_ARGV_FILE: argvFile });
    assert.deepEqual(await wrapper.exited, { code: 2, signal: null });
    assert.match(wrapper.stderr(), /^ovms-mtls: --mtls_ovms_user: user 'no-such-user-ovms-mtls' does not exist/);
    assert.deepEqual(fakeRuns(argvFile), []);
  });

  // docker run --user root --cap-drop ALL: setpriv could not switch, then the proxy's own drop threw an internal error with a stack (exit 70) after the listeners were up.
  for (const mode of ['serving', 'a one-shot run'] as const) {
    test(`root without CAP_SETUID and CAP_SETGID, ${mode} is a one-line startup error (exit 2) before anything listens or OVMS is run`, async () => {
      const argvFile = join(dir, `no-caps-${mode.length}.jsonl`);
      const [rest] = await freeLoopbackPorts(1);
      const ovmsArgs = mode === 'serving' ? ['--rest_port', String(rest), '--model_path', '/m'] : ['--list_models'];
      const withoutCaps = ['setpriv', '--bounding-set=-setuid,-setgid'];
      const wrapper = startWrapper([...ovmsArgs, ...tlsArgs(pki), '--mtls_ovms_binary', FAKE_OVMS, '--mtls_ovms_user', 'nobody'], { FAKE_OVMS_ARGV_FILE: argvFile }, withoutCaps);
      try {
        assert.deepEqual(await wrapper.exited, { code: 2, signal: null });
        assert.equal(
          wrapper.stderr(),
          "ovms-mtls: --mtls_ovms_user: started as root without CAP_SETGID and CAP_SETUID (e.g. --cap-drop ALL), so it cannot switch to 'nobody' (uid 65534): give them back (docker --cap-add SETGID --cap-add SETUID, Kubernetes securityContext.capabilities.add), or start it as that user (docker --user 65534, Kubernetes runAsUser: 65534)\n",
        );
        assert.deepEqual(wrapper.logs.map((l) => l.event), []);
        assert.deepEqual(fakeRuns(argvFile), []);
      } finally {
        wrapper.child.kill('SIGKILL');
        await wrapper.exited;
      }
    });
  }

  test('a proxy user other than the OVMS user is refused at startup: after the drop it could not signal OVMS, which outlived it', async () => {
    const argvFile = join(dir, 'two-users.jsonl');
    const [rest] = await freeLoopbackPorts(1);
    const wrapper = startWrapper(['--rest_port', String(rest), ...tlsArgs(pki), '--mtls_ovms_binary', FAKE_OVMS, '--mtls_ovms_user', 'root', '--mtls_user', 'nobody'], { FAKE_OVMS_ARGV_FILE: argvFile });
    try {
      // Without the check the wrapper serves: OVMS starting means the check is missing.
      const outcome = await Promise.race([wrapper.exited, wrapper.waitForEvent('ovms_started').then(() => 'OVMS started', () => wrapper.exited)]);
      assert.deepEqual(outcome, { code: 2, signal: null });
      assert.match(wrapper.stderr(), /^ovms-mtls: --mtls_user: OVMS runs as 'root' but the proxy would drop to 'nobody' and could then neither stop OVMS nor start it again/);
      assert.deepEqual(fakeRuns(argvFile), []);
    } finally {
      wrapper.child.kill('SIGKILL');
      await wrapper.exited;
    }
  });

  test('--mtls_restart on-failure with different OVMS and proxy users is refused at startup', async () => {
    const [rest] = await freeLoopbackPorts(1);
    const wrapper = startWrapper(['--rest_port', String(rest), ...tlsArgs(pki), '--mtls_ovms_binary', FAKE_OVMS, '--mtls_ovms_user', 'root', '--mtls_user', 'nobody', '--mtls_restart', 'on-failure']);
    assert.deepEqual(await wrapper.exited, { code: 2, signal: null });
    assert.match(wrapper.stderr(), /--mtls_user: .*could then neither stop OVMS nor start it again/);
  });
});

/** 5000 (the OVMS image's `ovms`) unless this machine has a user there: the next uid it does not know. */
function uidWithoutPasswdEntry(): number {
  const known = new Set(parsePasswd(readFileSync('/etc/passwd', 'utf8')).map((a) => a.uid));
  let uid = 5000;
  while (known.has(uid)) uid += 1;
  return uid;
}
