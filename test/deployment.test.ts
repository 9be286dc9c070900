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
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseAllDocuments } from 'yaml';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { FAKE_OVMS, makeFakeExecutable, startWrapper, type Wrapper } from './helpers/entrypoint.js';
import { FILE_NAMES, postSse, servedSerial, type SetContents, type TlsClient } from './helpers/reload.js';
import { eventually, heldConnectionsTo, httpGet, settlesWithin, sumOf } from './helpers/ops.js';
import { startCli } from './helpers/cli.js';
import { clientCredentials, https1, startUpstream, type LogLine } from './helpers/harness.js';
import { openRaw } from './helpers/raw-http1.js';
import { sseEvents } from './helpers/sse.js';
import * as grpc from '@grpc/grpc-js';
import { freeLoopbackPorts } from '../src/ports.js';
import { createCa, createCrl, issueClientCert, issueServerCert, type Issued } from '../src/x509.js';
import { echoClient, unary, type EchoClient } from '../src/demo/grpc-client.js';
import { CHAT_REPLY_WORDS } from '../src/demo/openai-chat.js';
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

/** The container as the manifest says, each containerPort in the args replaced by a free one; `env`: the stand-in OVMS's knobs. */
async function startPod(container: Yaml, env: Record<string, string> = {}): Promise<Pod> {
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
  const wrapper = startWrapper([...args, ...certs, '--mtls_ovms_binary', FAKE_OVMS, '--mtls_ovms_user', 'root'], env, launcher);
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

/** A gRPC client with a connection of its own: grpc-js otherwise shares one between clients of equal credentials, and one connection is one handshake on one worker. */
function ownConnection(pod: Pod, identity: Issued): EchoClient {
  return echoClient(`localhost:${pod.port('grpc-tls')}`, clientCredentials(pki, identity), { 'grpc.use_local_subchannel_pool': 1 });
}

interface TrafficOutcome {
  calls: number;
  failures: string[];
  /** Those of calls begun after mark(). */
  failuresAfterMark: string[];
}

/** gRPC unary calls and REST requests in a loop until stopped, each on a new connection (a new handshake, handed to the next worker); every failure kept. */
function steadyTraffic(pod: Pod, identity: Issued): { calls(): number; mark(): void; stop(): Promise<TrafficOutcome> } {
  const failures: { message: string; afterMark: boolean }[] = [];
  let calls = 0;
  let marked = false;
  let running = true;
  const loop = async (call: () => Promise<void>) => {
    while (running) {
      const afterMark = marked;
      await call().then(() => (calls += 1), (err: Error) => failures.push({ message: err.message, afterMark }));
    }
  };
  const grpcCall = async () => {
    const echo = ownConnection(pod, identity);
    try {
      await unary(echo, 'Unary', { payload: Buffer.from('steady') });
    } finally {
      echo.close();
    }
  };
  const restCall = async () => {
    const { status } = await https1(pod.port('rest-tls'), pki, { path: '/v2/health/ready', client: identity });
    if (status !== 200) throw new Error(`REST: ${status}`);
  };
  const loops = [loop(grpcCall), loop(grpcCall), loop(restCall), loop(restCall)];
  return {
    calls: () => calls,
    mark: () => (marked = true),
    async stop() {
      running = false;
      await Promise.all(loops);
      return { calls, failures: failures.map((f) => f.message), failuresAfterMark: failures.filter((f) => f.afterMark).map((f) => f.message) };
    },
  };
}

/** A bidi stream that answers each message, and its final status (grpc-js's 'error' event comes with a failed one). */
function openBidi(echo: EchoClient) {
  const call = echo.Bidi();
  call.on('error', () => undefined);
  const status = new Promise<grpc.StatusObject>((resolve) => call.on('status', resolve));
  const replies = call[Symbol.asyncIterator]();
  return {
    call,
    status,
    async echo(text: string): Promise<string | undefined> {
      call.write({ payload: Buffer.from(text) });
      const next = await replies.next();
      return next.done ? undefined : String((next.value as { payload: Buffer }).payload);
    },
  };
}

const asClient = (identity: Issued): TlsClient => ({ ca: pki.serverCa.certPem, cert: identity.certPem, key: identity.keyPem });

describe('deploy/kubernetes/deployment.yaml under traffic (its 2 workers)', () => {
  test("Secret rotations while clients keep calling: no call fails, every new handshake gets the new certificate, streams in flight carry on, one reload line per change in each process, a revoked client and then the dropped CA's clients are refused at their next connection, and half-written updates keep the old set", { timeout: 300_000 }, async () => {
    const container = await readManifest();
    const [server2, server3, bob, newClientCa] = await Promise.all([
      issueServerCert({ issuer: pki.serverCa, commonName: 'localhost', dns: ['localhost'], ips: ['127.0.0.1'] }),
      issueServerCert({ issuer: pki.serverCa, commonName: 'localhost', dns: ['localhost'], ips: ['127.0.0.1'] }),
      issueClientCert({ issuer: pki.clientCa, commonName: 'bob' }),
      createCa({ commonName: 'ovms-mtls test client CA 2027' }),
    ]);
    const [carol, newCaCrl, bobRevoked] = await Promise.all([
      issueClientCert({ issuer: newClientCa, commonName: 'carol' }),
      createCrl({ issuer: newClientCa, revoked: [] }),
      createCrl({ issuer: pki.clientCa, revoked: [{ serialHex: bob.serialHex }] }),
    ]);
    const sseGate = join(await mkdtemp(join(tmpdir(), 'ovms-mtls-sse-')), 'open');
    await kubeletWrite(secretDir, originalSet());
    const pod = await startPod(container, { FAKE_OVMS_SSE_GATE_FILE: sseGate });
    const logs = pod.wrapper.logs;
    const count = (match: (l: LogLine) => boolean) => logs.filter(match).length;
    const reloadsIn = (worker: number | undefined) => count((l) => l.event === 'reloaded' && l['worker'] === worker);
    const failedReloads = () => count((l) => l.event === 'reload_failed');
    /** Each process (the primary, which reads the files, and both workers, which load what it validated) has logged `n` reloads. */
    const reloadedEverywhere = (n: number) =>
      settlesWithin(pod.wrapper.waitForLog(() => [undefined, 1, 2].every((worker) => reloadsIn(worker) >= n)), 60_000, `reload ${n} in the primary and in both workers`);
    const serialsOfNewHandshakes = async (identity: Issued) => {
      const serials = new Set<string>();
      for (let i = 0; i < 12; i += 1) serials.add(await servedSerial(pod.port(i % 2 ? 'grpc-tls' : 'rest-tls'), asClient(identity)));
      return [...serials];
    };
    const longLived = ownConnection(pod, pki.client);
    const bobLive = ownConnection(pod, bob);
    try {
      await pod.wrapper.waitForEvent('workers_listening');
      await eventually(async () => (await httpGet(pod.port('admin'), '/readyz')).status === 200, '/readyz 200');
      const bidi = openBidi(longLived);
      assert.equal(await bidi.echo('before'), 'before');
      const sse = sseEvents((await postSse(pod.port('rest-tls'), asClient(pki.client))).res)[Symbol.asyncIterator]();
      assert.match(String((await sse.next()).value), /^data: /);
      await unary(bobLive, 'Unary', { payload: Buffer.from('bob') });
      let traffic = steadyTraffic(pod, pki.client);

      // 1. The server certificate renewed.
      await kubeletWrite(secretDir, { ...originalSet(), cert: server2.certPem, key: server2.keyPem });
      await reloadedEverywhere(1);
      assert.deepEqual(await serialsOfNewHandshakes(pki.client), [server2.serialHex]);
      assert.equal(await bidi.echo('after the renewal'), 'after the renewal');

      // 2. bob revoked, and a new client CA trusted beside the old one.
      const overlap: SetContents = { cert: server2.certPem, key: server2.keyPem, clientCa: pki.clientCa.certPem + newClientCa.certPem, crl: bobRevoked + newCaCrl };
      await kubeletWrite(secretDir, overlap);
      await reloadedEverywhere(2);
      const bobCut = await pod.wrapper.waitForLog((l) => l.event === 'connection_revoked');
      assert.deepEqual([bobCut['reason'], bobCut['subject']], ['revoked', 'CN=bob']);
      const bobAgain = ownConnection(pod, bob);
      await assert.rejects(unary(bobAgain, 'Unary', { payload: Buffer.from('bob') }), (err: grpc.ServiceError) => err.code === grpc.status.UNAUTHENTICATED && /revoked/.test(err.details));
      bobAgain.close();
      const carolNow = ownConnection(pod, carol);
      await unary(carolNow, 'Unary', { payload: Buffer.from('carol') });
      carolNow.close();

      // 3. The Secret updated in steps: a certificate without its key, then an empty file. Neither is taken, nor reaches a worker.
      await kubeletWrite(secretDir, { ...overlap, cert: server3.certPem });
      await pod.wrapper.waitForLog(() => failedReloads() >= 1);
      assert.match(String(logs.findLast((l) => l.event === 'reload_failed')!['reason']), /--mtls_key: .* does not match --mtls_cert/);
      await kubeletWrite(secretDir, { ...overlap, cert: '', key: server3.keyPem });
      await pod.wrapper.waitForLog((l) => l.event === 'reload_failed' && /empty/.test(String(l['reason'])));
      assert.deepEqual(await serialsOfNewHandshakes(pki.client), [server2.serialHex]);
      assert.equal((await httpGet(pod.port('admin'), '/readyz')).status, 200);
      await kubeletWrite(secretDir, { ...overlap, cert: server3.certPem, key: server3.keyPem });
      await reloadedEverywhere(3);
      assert.deepEqual(await serialsOfNewHandshakes(pki.client), [server3.serialHex]);
      assert.equal(await bidi.echo('after the broken updates'), 'after the broken updates');
      await writeFile(sseGate, '');
      let events = 1;
      for (let next = await sse.next(); !next.done; next = await sse.next()) events += 1;
      assert.equal(events, CHAT_REPLY_WORDS.length + 1, 'every event of the stream begun before the rotations, [DONE] included');
      bidi.call.end();
      assert.equal((await bidi.status).code, grpc.status.OK);
      const before = await traffic.stop();
      assert.deepEqual(before.failures, []);
      assert.ok(before.calls > 0);

      // 4. The clients moved to the new CA: the old one is dropped.
      traffic = steadyTraffic(pod, carol);
      await kubeletWrite(secretDir, { cert: server3.certPem, key: server3.keyPem, clientCa: newClientCa.certPem, crl: newCaCrl });
      await reloadedEverywhere(4);
      assert.equal((await https1(pod.port('rest-tls'), pki, { path: '/v2/health/ready' })).status, 403);
      assert.deepEqual(await serialsOfNewHandshakes(carol), [server3.serialHex]);
      const after = await traffic.stop();
      assert.deepEqual(after.failures, []);
      assert.ok(after.calls > 0);

      // One line per change in each process: four rotations, no storm of reloads (a kubelet update is several directory events).
      assert.deepEqual([undefined, 1, 2].map(reloadsIn), [4, 4, 4]);
      assert.equal(count((l) => l.event === 'reload_failed' && l['worker'] !== undefined), 0);
      assert.ok(failedReloads() >= 2 && failedReloads() <= 4, `${failedReloads()} reload_failed lines for 2 broken updates`);
      const metrics = (await httpGet(pod.port('admin'), '/metrics')).body;
      assert.match(metrics, /^ovms_mtls_tls_reloads_total\{result="success"\} 4$/m);
    } finally {
      longLived.close();
      bobLive.close();
      pod.wrapper.child.kill('SIGTERM');
      await pod.wrapper.exited;
      await rm(dirname(sseGate), { recursive: true, force: true });
    }
  });

  test("a rolling update's SIGTERM (to tini, after the preStop pause): /readyz turns 503 while /healthz stays 200, calls and an upload in flight on both workers complete, an SSE stream finishes, streams that never end get UNAVAILABLE saying why, then OVMS gets SIGTERM and the exit code is 0", { timeout: 300_000 }, async () => {
    const container = await readManifest();
    const sseGate = join(await mkdtemp(join(tmpdir(), 'ovms-mtls-sse-')), 'open');
    await kubeletWrite(secretDir, originalSet());
    const pod = await startPod(container, { FAKE_OVMS_SSE_GATE_FILE: sseGate });
    const clients = Array.from({ length: 4 }, () => ownConnection(pod, pki.client));
    try {
      await pod.wrapper.waitForEvent('workers_listening');
      await eventually(async () => (await httpGet(pod.port('admin'), '/readyz')).status === 200, '/readyz 200');
      // Connections opened one after another alternate between the two workers.
      const endless = clients.slice(0, 2).map(openBidi);
      for (const stream of endless) assert.equal(await stream.echo('open'), 'open');
      const unaryCalls = clients.slice(2).map((echo) => {
        let write!: (text: string) => void;
        const reply = new Promise<string>((resolve, reject) => {
          const call = echo.ClientStream(new grpc.Metadata(), {}, (err, res) => (err ? reject(err) : resolve(String(res!.payload))));
          write = (text) => (text ? call.write({ payload: Buffer.from(text) }) : call.end());
        });
        // Handled here too: a test that fails before awaiting it closes the client, which rejects it.
        reply.catch(() => undefined);
        write('in ');
        return { reply, write };
      });
      const upload = await openRaw(pod.port('rest-tls'), pki);
      let uploadAnswer = '';
      upload.on('data', (chunk: Buffer) => (uploadAnswer += chunk.toString('latin1')));
      const uploadClosed = new Promise((resolve) => upload.once('close', resolve));
      upload.write('POST /echo-body HTTP/1.1\r\nhost: ovms\r\ncontent-length: 8\r\n\r\nbefore');
      const sse = sseEvents((await postSse(pod.port('rest-tls'), asClient(pki.client))).res)[Symbol.asyncIterator]();
      assert.match(String((await sse.next()).value), /^data: /);

      pod.wrapper.child.kill('SIGTERM');
      await pod.wrapper.waitForLog(() => pod.wrapper.logs.filter((l) => l.event === 'worker_draining').length === 2);
      assert.equal((await httpGet(pod.port('admin'), '/readyz')).status, 503);
      assert.equal((await httpGet(pod.port('admin'), '/healthz')).status, 200);

      for (const call of unaryCalls) call.write('flight');
      for (const call of unaryCalls) call.write('');
      assert.deepEqual(await Promise.all(unaryCalls.map((c) => c.reply)), ['in flight', 'in flight']);
      upload.write('!!');
      await uploadClosed;
      assert.match(uploadAnswer, /^HTTP\/1\.1 200 /);
      assert.match(uploadAnswer, /\r\nconnection: close\r\n/i);
      await writeFile(sseGate, '');
      let events = 1;
      for (let next = await sse.next(); !next.done; next = await sse.next()) events += 1;
      assert.equal(events, CHAT_REPLY_WORDS.length + 1);
      assert.equal((await httpGet(pod.port('admin'), '/readyz')).status, 503, 'not ready for as long as the drain lasts');
      assert.equal(pod.wrapper.logs.some((l) => l.event === 'ovms_stopping'), false, 'OVMS signalled while streams were in flight');

      for (const stream of endless) {
        const status = await stream.status;
        assert.deepEqual([status.code, status.details], [grpc.status.UNAVAILABLE, 'the proxy is shutting down: --mtls_shutdown_timeout ran out before this call finished (retry it)']);
      }
      assert.deepEqual(await pod.wrapper.exited, { code: 0, signal: null });
      assert.equal(pod.wrapper.logs.find((l) => l.event === 'ovms_stopping')?.['signal'], 'SIGTERM');
      assert.ok(pod.wrapper.ovmsLines.some((l) => l.includes('SIGTERM received')));
      assert.equal(pod.wrapper.logs.find((l) => l.event === 'stopped')?.['exitCode'], 0);
      assert.equal(pod.wrapper.logs.filter((l) => l.event === 'worker_exited' || l.event === 'worker_killed').length, 0);
    } finally {
      for (const echo of clients) echo.close();
      if (pod.wrapper.child.exitCode === null && pod.wrapper.child.signalCode === null) pod.wrapper.child.kill('SIGTERM');
      await pod.wrapper.exited;
      await rm(dirname(sseGate), { recursive: true, force: true });
    }
  });
  test('a worker killed by the out-of-memory killer (SIGKILL) under traffic: only calls it had in flight fail, every call begun after its exit succeeds, a new worker takes its place, /readyz stays 200, the totals never fall, and the open connections counted are those clients hold', { timeout: 300_000 }, async () => {
    const container = await readManifest();
    await kubeletWrite(secretDir, originalSet());
    const pod = await startPod(container);
    const admin = pod.port('admin');
    const requestsTotal = async () => sumOf((await httpGet(admin, '/metrics')).body, 'ovms_mtls_requests_total');
    try {
      const { pids } = await pod.wrapper.waitForEvent('workers_listening');
      await eventually(async () => (await httpGet(admin, '/readyz')).status === 200, '/readyz 200');
      const traffic = steadyTraffic(pod, pki.client);
      await eventually(() => traffic.calls() >= 20, 'calls served by both workers');
      const before = await requestsTotal();
      const [victim] = pids as number[];
      process.kill(victim!, 'SIGKILL');
      const exited = await pod.wrapper.waitForEvent('worker_exited');
      assert.deepEqual([exited['pid'], exited['signal']], [victim, 'SIGKILL']);
      traffic.mark();
      assert.equal((await httpGet(admin, '/readyz')).status, 200, 'the other worker serves');
      await pod.wrapper.waitForLog((l) => l.event === 'listening' && l['listener'] === 'rest' && Number(l['worker']) === 3);
      const callsAtReplacement = traffic.calls();
      await eventually(() => traffic.calls() >= callsAtReplacement + 20, 'calls served with the new worker');
      const outcome = await traffic.stop();
      assert.deepEqual(outcome.failuresAfterMark, []);
      // At most one per loop: the call each had on the killed worker.
      assert.ok(outcome.failures.length <= 4, JSON.stringify(outcome.failures));
      assert.ok((await requestsTotal()) >= before);
      await eventually(async () => /"2 of 2 workers listening"/.test((await httpGet(admin, '/readyz')).body), 'both workers listening');
      // What the workers count open is what clients still hold (grpc-js may keep a connection of a closed client that was reconnecting).
      const held = () => heldConnectionsTo(pod.port('grpc-tls')) + heldConnectionsTo(pod.port('rest-tls'));
      await eventually(async () => sumOf((await httpGet(admin, '/metrics')).body, 'ovms_mtls_open_connections') === held(), 'open connections as counted to match those clients hold');
    } finally {
      pod.wrapper.child.kill('SIGTERM');
      assert.deepEqual(await pod.wrapper.exited, { code: 0, signal: null });
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

const OPERATIONS = fileURLToPath(new URL('../../docs/operations.md', import.meta.url));

/** The value of `--name=value` in a container's args. */
const argValue = (args: string[], name: string) => args.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3);

// The pod docs/operations.md gives for Kubernetes' native sidecars was prose nobody ran: a swapped port, a missing
// restartPolicy (OVMS then an init container that never ends, the proxy never started) or a grace period shorter
// than the proxy's pause and drain would reach users as written.
describe("docs/operations.md's native-sidecar pod", () => {
  test('OVMS is a restartable init container on loopback at the ports the proxy forwards to, the grace period covers the pause, the drain and OVMS\'s stop, and the proxy\'s args serve with /readyz 200', async () => {
    const block = /native sidecar[\s\S]*?```yaml\n([\s\S]*?)```/.exec(await readFile(OPERATIONS, 'utf8'));
    assert.ok(block, 'docs/operations.md has no yaml block after "native sidecar"');
    const pod = (parseAllDocuments(block[1]!)[0]!.toJSON() as Yaml)['spec'] as Yaml;
    const ovms = (pod['initContainers'] as Yaml[]).find((c) => c['name'] === 'ovms')!;
    const proxy = (pod['containers'] as Yaml[])[0]!;
    assert.equal(ovms['restartPolicy'], 'Always');
    assert.equal((pod['containers'] as Yaml[]).length, 1);
    const ovmsArgs = ovms['args'] as string[];
    const args = proxy['args'] as string[];
    assert.equal(argValue(ovmsArgs, 'grpc_bind_address'), '127.0.0.1');
    assert.equal(argValue(ovmsArgs, 'rest_bind_address'), '127.0.0.1');
    assert.equal(argValue(args, 'mtls_grpc_upstream'), `127.0.0.1:${argValue(ovmsArgs, 'port')}`);
    assert.equal(argValue(args, 'mtls_rest_upstream'), `127.0.0.1:${argValue(ovmsArgs, 'rest_port')}`);
    const pause = Number((proxy['lifecycle']['preStop']['exec']['command'] as string[]).at(-1));
    const ovmsShareS = 5; // OVMS's own stop, as for the entrypoint's share
    assert.ok(pod['terminationGracePeriodSeconds'] >= pause + Number(argValue(args, 'mtls_shutdown_timeout')) + ovmsShareS);

    const upstream = await startUpstream();
    const [grpcPort, restPort, adminPort] = (await freeLoopbackPorts(3)) as [number, number, number];
    const swap: Record<string, string> = {
      '--port': String(grpcPort), '--rest_port': String(restPort), '--mtls_admin_port': String(adminPort), '--mtls_admin_bind_address': '127.0.0.1',
      '--mtls_grpc_upstream': `127.0.0.1:${upstream.grpcPort}`, '--mtls_rest_upstream': `127.0.0.1:${upstream.restPort}`,
    };
    const asRun = args.map((arg) => {
      const [name, value] = arg.split('=', 2) as [string, string | undefined];
      if (swap[name] !== undefined) return `${name}=${swap[name]}`;
      return value?.startsWith('/certs/') ? `${name}=${join(pki.dir, value.slice('/certs/'.length))}` : arg;
    });
    const running = startCli([...asRun, '--grpc_bind_address=127.0.0.1', '--rest_bind_address=127.0.0.1', '--mtls_workers=1']);
    try {
      const exitedEarly = running.exited.then((code) => assert.fail(`the documented proxy args exited (${code}): ${running.stderr()}`));
      const listening = (listener: string) => running.logs.waitFor((line: LogLine) => line.event === 'listening' && line.listener === listener);
      await Promise.race([Promise.all([listening('grpc'), listening('rest'), listening('admin')]), exitedEarly]);
      assert.equal((await httpGet(adminPort, '/readyz')).status, 200);
      assert.equal((await https1(restPort, pki, { path: '/v2/health/ready' })).status, 200);
    } finally {
      running.child.kill('SIGTERM');
      await running.exited;
      await upstream.close();
    }
  });
});
