/**
 * deploy/kubernetes/deployment.yaml run the way a cluster runs it, with real
 * processes and no cluster: the image's ENTRYPOINT (tini, then ovms-mtls)
 * with the manifest's args, the stand-in OVMS where the image has OVMS,
 * certificates in a directory laid out and updated the way the kubelet
 * mounts a Secret, the kubelet's HTTP probes, and SIGTERM to tini.
 * Differences that cannot be helped: free ports instead of the manifest's
 * (mapped one to one), the Secret's path and the OVMS binary given as options
 * (the image has them at /certs and /ovms/bin/ovms), and root stays root
 * (--mtls_ovms_user root; the pod runs as uid 5000, which changes nothing
 * here: started as a non-root user the entrypoint drops nothing).
 * deploy/systemd/ovms-mtls.service likewise, below: its ExecStart as the
 * unit's user, groups and capabilities would run it.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { chmod, chown, mkdir, mkdtemp, readFile, readlink, rename, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseAllDocuments } from 'yaml';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { FAKE_OVMS, makeFakeExecutable, startWrapper, type Wrapper } from './helpers/entrypoint.js';
import { FILE_NAMES, servedSerial, type SetContents, type TlsClient } from './helpers/reload.js';
import { eventually, httpGet } from './helpers/ops.js';
import { startCli } from './helpers/cli.js';
import { https1, startUpstream, type LogLine } from './helpers/harness.js';
import { freeLoopbackPorts } from '../src/ports.js';
import { issueServerCert, type Issued } from '../src/x509.js';
import { entrypointSettings } from '../src/entrypoint-config.js';
import { splitOvmsArgv } from '../src/ovms-args.js';

type Yaml = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

const MANIFEST = fileURLToPath(new URL('../../deploy/kubernetes/deployment.yaml', import.meta.url));
const UNIT = fileURLToPath(new URL('../../deploy/systemd/ovms-mtls.service', import.meta.url));
const TINI = '/usr/bin/tini';

let pki: TestPki;
let newServer: Issued;
let secretDir: string;

before(async () => {
  makeFakeExecutable();
  pki = await createTestPki();
  newServer = await issueServerCert({ issuer: pki.serverCa, commonName: 'localhost', dns: ['localhost'], ips: ['127.0.0.1'] });
  secretDir = await mkdtemp(join(tmpdir(), 'ovms-mtls-secret-'));
});
after(async () => {
  await pki.cleanup();
  await rm(secretDir, { recursive: true, force: true });
});

async function readManifest(): Promise<Yaml> {
  const docs = parseAllDocuments(await readFile(MANIFEST, 'utf8')).map((d) => d.toJSON() as Yaml);
  return docs.find((d) => d['kind'] === 'Deployment')!['spec']['template']['spec']['containers'][0] as Yaml;
}

let updates = 0;

/**
 * The kubelet's AtomicWriter: the files in a new `..<timestamp>` directory,
 * `..data_tmp` pointing at it renamed over `..data`, `NAME -> ..data/NAME`
 * links made once, then the previous directory removed.
 */
async function kubeletWrite(dir: string, contents: SetContents): Promise<void> {
  updates += 1;
  const version = `..2026_12_03_17_00_${String(updates).padStart(2, '0')}.000000000`;
  const previous = await readlink(join(dir, '..data')).catch(() => undefined);
  await mkdir(join(dir, version));
  for (const role of Object.keys(FILE_NAMES) as (keyof SetContents)[]) {
    await writeFile(join(dir, version, FILE_NAMES[role]), contents[role]);
    await chmod(join(dir, version, FILE_NAMES[role]), 0o440); // the manifest's defaultMode
  }
  await symlink(version, join(dir, '..data_tmp'));
  await rename(join(dir, '..data_tmp'), join(dir, '..data'));
  for (const name of Object.values(FILE_NAMES)) if (!existsSync(join(dir, name))) await symlink(join('..data', name), join(dir, name));
  if (previous) await rm(join(dir, previous), { recursive: true, force: true });
}

const originalSet = (): SetContents => ({ cert: pki.server.certPem, key: pki.server.keyPem, clientCa: pki.clientCa.certPem, crl: pki.crlPem });
const client = (): TlsClient => ({ ca: pki.serverCa.certPem, cert: pki.client.certPem, key: pki.client.keyPem });

interface Pod {
  wrapper: Wrapper;
  args: string[];
  /** containerPort -> the free port standing in for it. */
  port(containerPort: number | string): number;
}

/** The container as the manifest says, each containerPort in the args replaced by a free one. */
async function startPod(container: Yaml): Promise<Pod> {
  const ports = container['ports'] as Yaml[];
  const free = await freeLoopbackPorts(ports.length);
  const byContainerPort = new Map(ports.map((p, i) => [Number(p['containerPort']), free[i]!]));
  const byName = new Map(ports.map((p, i) => [String(p['name']), free[i]!]));
  const port = (p: number | string) => (typeof p === 'number' ? byContainerPort.get(p)! : byName.get(p)!);
  const args = (container['args'] as string[]).map((arg) => {
    const m = /^(--(?:port|rest_port|mtls_admin_port))=(\d+)$/.exec(arg);
    return m ? `${m[1]}=${byContainerPort.get(Number(m[2]))}` : arg;
  });
  const mount = `${secretDir}/`;
  const certs = ['--mtls_cert', mount + FILE_NAMES.cert, '--mtls_key', mount + FILE_NAMES.key, '--mtls_client_ca', mount + FILE_NAMES.clientCa, '--mtls_crl', mount + FILE_NAMES.crl];
  const launcher = existsSync(TINI) ? [TINI, '-s', '--'] : [];
  const wrapper = startWrapper([...args, ...certs, '--mtls_ovms_binary', FAKE_OVMS, '--mtls_ovms_user', 'root'], {}, launcher);
  return { wrapper, args: container['args'] as string[], port };
}

describe('deploy/kubernetes/deployment.yaml run as written', () => {
  test('probes answer on the manifest paths, Secret updates (also a mismatched pair) are followed, SIGTERM to tini drains and exits 0', async () => {
    const container = await readManifest();
    await kubeletWrite(secretDir, originalSet());
    const pod = await startPod(container);
    try {
      await pod.wrapper.waitForEvent('ovms_ready');
      for (const kind of ['startupProbe', 'livenessProbe', 'readinessProbe']) {
        const { path, port } = container[kind]['httpGet'] as { path: string; port: string };
        // The kubelet's success: 200-399. /readyz turns 200 once OVMS's models answer.
        await eventually(async () => {
          const { status } = await httpGet(pod.port(port), path);
          return status >= 200 && status < 400;
        }, `${kind} GET ${path}`);
      }
      const restPort = pod.port('rest-tls');
      assert.equal(await servedSerial(restPort, client()), pki.server.serialHex);

      // A Secret update: certificate and key change together, the old directory goes.
      await kubeletWrite(secretDir, { ...originalSet(), cert: newServer.certPem, key: newServer.keyPem });
      await eventually(async () => (await servedSerial(restPort, client())) === newServer.serialHex, 'the new server certificate served');

      // Updated in two steps: for a while the certificate and key do not match.
      const failuresBefore = pod.wrapper.logs.filter((l) => l.event === 'reload_failed').length;
      await kubeletWrite(secretDir, { ...originalSet(), key: newServer.keyPem });
      await eventually(() => pod.wrapper.logs.filter((l) => l.event === 'reload_failed').length > failuresBefore, 'the mismatched pair refused');
      assert.match(String(pod.wrapper.logs.findLast((l) => l.event === 'reload_failed')!['reason']), /--mtls_key: .* does not match --mtls_cert/);
      assert.equal(await servedSerial(restPort, client()), newServer.serialHex);
      await kubeletWrite(secretDir, originalSet());
      await eventually(async () => (await servedSerial(restPort, client())) === pki.server.serialHex, 'the completed update served');

      // The kubelet's SIGTERM goes to PID 1, tini, which passes it on.
      pod.wrapper.child.kill('SIGTERM');
      assert.deepEqual(await pod.wrapper.exited, { code: 0, signal: null });
      const stopping = pod.wrapper.logs.find((l) => l.event === 'ovms_stopping');
      const shutdownMs = entrypointSettings(splitOvmsArgv(pod.args), {}).common.shutdownTimeoutMs;
      assert.ok(stopping && Number(stopping['killAfterMs']) <= shutdownMs, JSON.stringify(stopping));
      assert.equal(pod.wrapper.logs.find((l) => l.event === 'stopped')?.['exitCode'], 0);
    } finally {
      // SIGTERM, not SIGKILL: tini would die alone and leave ovms-mtls and OVMS running.
      if (pod.wrapper.child.exitCode === null && pod.wrapper.child.signalCode === null) pod.wrapper.child.kill('SIGTERM');
      await pod.wrapper.exited;
    }
  });
});

/** The unit's `Key=value` lines, continuation lines joined; a repeated key keeps its last value. */
function unitDirectives(text: string): Map<string, string> {
  const directives = new Map<string, string>();
  for (const line of text.replace(/\\\n\s*/g, ' ').split('\n')) {
    const m = /^([A-Za-z]+)=(.*)$/.exec(line);
    if (m) directives.set(m[1]!, m[2]!.trim());
  }
  return directives;
}

/** `CAP_NET_BIND_SERVICE CAP_X` -> setpriv's `+net_bind_service,+x`. */
const setprivCaps = (caps: string) => caps.split(/\s+/).map((c) => '+' + c.replace(/^CAP_/, '').toLowerCase()).join(',');

/**
 * What systemd does for the unit that can be done without systemd: a user of the DynamicUser range
 * with the SupplementaryGroups group only, NoNewPrivileges, the ambient and bounding capabilities,
 * the header's install modes and owners; ExecReload's SIGHUP to the main process, and KillSignal to
 * every process of the unit (KillMode=control-group, the default), the proxy's workers included.
 */
describe('deploy/systemd/ovms-mtls.service run as written', { skip: !(process.getuid?.() === 0 && existsSync('/usr/bin/setpriv') && existsSync('/usr/bin/setsid')) && 'needs root and util-linux setpriv/setsid' }, () => {
  const DYNAMIC_UID = 65001; // in systemd's DynamicUser range (61184-65519)
  const GROUP_GID = 65002;

  test('the dynamic user reads the installed files through the group, serves, reloads on ExecReload, and drains on SIGTERM to the whole unit', async () => {
    const text = await readFile(UNIT, 'utf8');
    const unit = unitDirectives(text);
    const group = unit.get('SupplementaryGroups')!;
    const dirs = /^#\s+install -d -m (\d+) -o root -g (\S+) \/etc\/ovms-mtls \/etc\/ovms-mtls\/certs$/m.exec(text);
    const files = /^#\s+install -m (\d+) -g (\S+) certs\/server\.pem certs\/server\.key certs\/client_cert_ca\.pem certs\/client_cert_ca\.crl \/etc\/ovms-mtls\/certs\/$/m.exec(text);
    assert.ok(dirs && files, 'the install steps in the unit header changed: update this test');
    assert.deepEqual([dirs[2], files[2]], [group, group], 'the files are installed for another group than SupplementaryGroups=');
    assert.equal(unit.get('DynamicUser'), 'yes');
    assert.equal(unit.get('KillMode') ?? 'control-group', 'control-group');

    const root = await mkdtemp(join(tmpdir(), 'ovms-mtls-systemd-'));
    await chmod(root, 0o755);
    const etc = join(root, 'etc/ovms-mtls');
    const upstream = await startUpstream();
    try {
      for (const dir of [etc, join(etc, 'certs')]) {
        await mkdir(dir, { recursive: true });
        await chown(dir, 0, GROUP_GID);
        await chmod(dir, parseInt(dirs[1]!, 8));
      }
      const contents = { 'server.pem': pki.server.certPem, 'server.key': pki.server.keyPem, 'client_cert_ca.pem': pki.clientCa.certPem, 'client_cert_ca.crl': pki.crlPem };
      for (const [name, pem] of Object.entries(contents)) {
        const path = join(etc, 'certs', name);
        await writeFile(path, pem);
        await chown(path, 0, GROUP_GID);
        await chmod(path, parseInt(files[1]!, 8));
      }

      const [program, ...execArgs] = unit.get('ExecStart')!.split(/\s+/);
      assert.equal(program, '/usr/local/bin/ovms-mtls');
      const [grpcPort, restPort, adminPort] = (await freeLoopbackPorts(3)) as [number, number, number];
      const replacements: Record<string, string> = {
        '--port': String(grpcPort), '--rest_port': String(restPort), '--mtls_admin_port': String(adminPort),
        '--mtls_grpc_upstream': `127.0.0.1:${upstream.grpcPort}`, '--mtls_rest_upstream': `127.0.0.1:${upstream.restPort}`,
      };
      const args = execArgs.map((arg, i) => replacements[execArgs[i - 1]!] ?? arg.replace(/^\/etc\/ovms-mtls\//, etc + '/'));
      const caps = setprivCaps(unit.get('AmbientCapabilities')!);
      const user = ['/usr/bin/setsid', '/usr/bin/setpriv', '--reuid', String(DYNAMIC_UID), '--regid', String(DYNAMIC_UID), '--groups', String(GROUP_GID),
        ...(unit.get('NoNewPrivileges') === 'yes' ? ['--no-new-privs'] : []),
        '--inh-caps', caps, '--ambient-caps', caps, '--bounding-set', `-all,${setprivCaps(unit.get('CapabilityBoundingSet')!)}`];
      const service = startCli(args, { wrap: user });
      const mainPid = service.child.pid!;
      /** Bounded, and over at once if the service exits (a file it cannot read: exit 2). */
      const logged = async (what: string, match: (l: LogLine) => boolean) => {
        await eventually(() => service.logs.lines.some(match) || service.child.exitCode !== null, what);
        assert.ok(service.logs.lines.some(match), `${what}: the service exited with ${service.child.exitCode}: ${service.stderr()}`);
      };
      try {
        await logged('listening', (l) => l.event === 'workers_listening');
        assert.equal((await https1(restPort, pki, { path: '/v2/health/ready' })).status, 200);
        assert.equal((await httpGet(adminPort, '/readyz')).status, 200);

        assert.equal(unit.get('ExecReload'), '/bin/kill -HUP $MAINPID');
        process.kill(mainPid, 'SIGHUP');
        await logged('reloaded on SIGHUP', (l) => l.event === 'reloaded' && l['trigger'] === 'signal');

        process.kill(-mainPid, unit.get('KillSignal') as NodeJS.Signals);
        assert.equal(await service.exited, 0, service.stderr());
        assert.ok(service.logs.lines.some((l) => l.event === 'stopped'));
      } finally {
        if (service.child.exitCode === null && service.child.signalCode === null) process.kill(-mainPid, 'SIGKILL');
        await service.exited;
      }
    } finally {
      await upstream.close();
      await rm(root, { recursive: true, force: true });
    }
  });
});
