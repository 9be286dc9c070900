/**
 * TLS files the process may not read, as deployments hand them over: a key only root may read
 * while the proxy runs as another uid (the image's `ovms`, OpenShift's arbitrary uid with group 0),
 * a readable file in a directory it may not enter (also a Kubernetes secret mount's hidden
 * version directory), and the entrypoint started as root that drops to its user after reading
 * a root-only key. Each run here is a child process as that uid, through setpriv.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { chmod, chown, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { runCli } from './helpers/cli.js';
import { FAKE_OVMS, makeFakeExecutable, startWrapper } from './helpers/entrypoint.js';
import { kubernetesCertDir, openToAll, plainCertDir, type CertDir, type SetContents } from './helpers/reload.js';
import { freeLoopbackPorts } from '../src/ports.js';
import { lookupUser } from '../src/privileges.js';

/** OpenShift's way: an arbitrary uid from the namespace's range, no passwd entry, group 0. */
const UID = 1000680000;
const AS_UID = ['setpriv', `--reuid=${UID}`, '--regid=0', '--clear-groups'];
const SKIP = !(process.getuid?.() === 0 && existsSync('/usr/bin/setpriv')) && 'needs root and util-linux setpriv';

let pki: TestPki;
const dirs: string[] = [];

before(async () => {
  makeFakeExecutable();
  pki = await createTestPki();
});
after(async () => {
  await pki.cleanup();
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })));
});

const serverSet = (): SetContents => ({ cert: pki.server.certPem, key: pki.server.keyPem, clientCa: pki.clientCa.certPem, crl: pki.crlPem });

/** A certificate directory anybody may enter and read, but for what a test then takes away. */
async function openCertDir(make: (contents: SetContents) => Promise<CertDir>): Promise<CertDir> {
  const certs = await make(serverSet());
  dirs.push(certs.dir);
  return openToAll(certs);
}

function tlsFlags(certs: CertDir): string[] {
  const { cert, key, clientCa, crl } = certs.files;
  return ['--mtls_cert', cert, '--mtls_key', key, '--mtls_client_ca', clientCa, '--mtls_crl', crl!];
}

/** The proxy started as UID: exit 2 and its one line on stderr. */
async function proxyRefusal(certs: CertDir): Promise<string> {
  const res = await runCli(['proxy', '--port', '1', '--mtls_grpc_upstream', '127.0.0.1:9', ...tlsFlags(certs)], { wrap: AS_UID, cwd: '/' });
  assert.equal(res.code, 2, res.stderr);
  assert.equal(res.stdout, '');
  const lines = res.stderr.trim().split('\n');
  assert.equal(lines.length, 1, res.stderr);
  return lines[0]!;
}

const escape = (text: string) => text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

describe('a TLS file the proxy may not read', { skip: SKIP }, () => {
  test('a key only root may read: the line names the uid and its groups, the key\'s mode and owner, and what to change; check, probe and certs say the same', async () => {
    const certs = await openCertDir(plainCertDir);
    const key = certs.files.key;
    await chmod(key, 0o600);
    const refused = `cannot be read by uid ${UID} \\(groups 0\\): the file is mode 0600, owner uid 0, group 0 \\(give that uid or one of its groups read permission: chown, chgrp or chmod; in Kubernetes, the pod's fsGroup and the volume's defaultMode\\)`;
    assert.match(await proxyRefusal(certs), new RegExp(`^ovms-mtls: --mtls_key: ${escape(key)} ${refused}$`));

    const check = await runCli(['check', ...tlsFlags(certs)], { wrap: AS_UID, cwd: '/' });
    assert.equal(check.code, 1, check.stdout + check.stderr);
    assert.match(check.stdout, new RegExp(`^FAIL +--mtls_key: ${escape(key)} ${refused}$`, 'm'));

    const probe = await runCli(['probe', '--host', '127.0.0.1', '--port', '1', '--mtls_cert', certs.files.cert, '--mtls_key', key, '--mtls_ca', certs.files.clientCa], { wrap: AS_UID, cwd: '/' });
    assert.equal(probe.code, 2, probe.stdout + probe.stderr);
    assert.match(probe.stderr, new RegExp(`^ovms-mtls: --mtls_key: ${escape(key)} ${refused}\\n$`));

    // `certs revoke` reads the client CA's key: a directory of `certs init` whose CA key is root's.
    const caKey = join(certs.dir, 'client_cert_ca.key');
    await runCli(['certs', 'init', '--dir', certs.dir, '--force']);
    const revoke = await runCli(['certs', 'revoke', '--dir', certs.dir, '--cert', join(certs.dir, 'client.pem')], { wrap: AS_UID, cwd: '/' });
    assert.equal(revoke.code, 2, revoke.stdout + revoke.stderr);
    assert.match(revoke.stderr, new RegExp(`^ovms-mtls: ${escape(caKey)} ${refused}\\n$`));
  });

  test('a readable file in a directory the uid may not enter: the line names that directory, not the file, also a secret mount\'s version directory behind ..data', async () => {
    const plain = await openCertDir(plainCertDir);
    // Group 1, not the uid's group 0: neither owner nor group lets it in.
    await chown(plain.dir, 0, 1);
    await chmod(plain.dir, 0o750);
    assert.match(
      await proxyRefusal(plain),
      new RegExp(`^ovms-mtls: --mtls_cert: ${escape(plain.files.cert)} cannot be read by uid ${UID} \\(groups 0\\): the directory ${escape(plain.dir)} \\(mode 0750, owner uid 0, group 1\\) does not let it in \\(every directory on the way needs x permission for it\\)$`),
    );

    const mounted = await openCertDir(kubernetesCertDir);
    const version = join(mounted.dir, '..v1');
    await chmod(version, 0o700);
    assert.match(
      await proxyRefusal(mounted),
      new RegExp(`^ovms-mtls: --mtls_cert: ${escape(mounted.files.cert)} cannot be read by uid ${UID} \\(groups 0\\): the directory ${escape(version)} \\(mode 0700, owner uid 0, group 0\\) does not let it in`),
    );
  });

  test('the entrypoint started as root that drops to its user after reading a root-only key warns at start that reloads will fail, and they do until the key is readable', async () => {
    const certs = await openCertDir(plainCertDir);
    await chmod(certs.files.key, 0o600);
    const [rest] = await freeLoopbackPorts(1);
    const wrapper = startWrapper(['--rest_port', String(rest), '--rest_bind_address', '127.0.0.1', ...tlsFlags(certs), '--mtls_ovms_binary', FAKE_OVMS, '--mtls_ovms_user', 'nobody']);
    try {
      const nobody = lookupUser('nobody', { flag: 'mtls_ovms_user' });
      // OVMS answers after the drop, and the warning comes with the drop.
      await wrapper.waitForEvent('ovms_ready');
      const warning = wrapper.logs.find((l) => l['event'] === 'tls_files_unreadable');
      assert.ok(warning, 'a warning at start that reloads will fail');
      const reason = `--mtls_key: ${certs.files.key} cannot be read by uid ${nobody.uid} (groups ${nobody.gid}): the file is mode 0600, owner uid 0, group 0`;
      assert.ok(String(warning['reason']).startsWith(reason), String(warning['reason']));
      assert.match(String(warning['msg']), /^reloads read the certificates as nobody, and --mtls_key: .* every reload \(a certificate rotation, SIGHUP\) fails until it can$/);
      assert.equal(wrapper.logs.filter((l) => l['event'] === 'tls_files_unreadable').length, 1, 'only the key is named');

      wrapper.child.kill('SIGHUP');
      const failed = await wrapper.waitForEvent('reload_failed');
      assert.equal(failed['reason'], warning['reason']);
      await chown(certs.files.key, nobody.uid, nobody.gid);
      wrapper.child.kill('SIGHUP');
      // A worker's own `reloaded` line (trigger `primary`) may come first.
      await wrapper.waitForLog((l) => l.event === 'reloaded' && l['trigger'] === 'signal');
      wrapper.child.kill('SIGTERM');
      assert.deepEqual(await wrapper.exited, { code: 0, signal: null });
    } finally {
      wrapper.child.kill('SIGKILL');
      await wrapper.exited;
    }
  });
});
