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
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readFile, readlink, rename, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseAllDocuments } from 'yaml';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { FAKE_OVMS, makeFakeExecutable, startWrapper, type Wrapper } from './helpers/entrypoint.js';
import { FILE_NAMES, servedSerial, type SetContents, type TlsClient } from './helpers/reload.js';
import { eventually, httpGet } from './helpers/ops.js';
import { freeLoopbackPorts } from '../src/ports.js';
import { issueServerCert, type Issued } from '../src/x509.js';
import { entrypointSettings } from '../src/entrypoint-config.js';
import { splitOvmsArgv } from '../src/ovms-args.js';

type Yaml = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

const MANIFEST = fileURLToPath(new URL('../../deploy/kubernetes/deployment.yaml', import.meta.url));
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
