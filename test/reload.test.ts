import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter, once } from 'node:events';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { connect as connectTcp, createServer as createTcpServer, type AddressInfo, type Socket } from 'node:net';
import { mkdir, readFile, rename, rm, symlink, writeFile } from 'node:fs/promises';
import { Agent } from 'node:https';
import { basename, join } from 'node:path';
import { connect as connectH2, type ClientHttp2Session } from 'node:http2';
import * as grpc from '@grpc/grpc-js';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { grpcClients, startTestProxy, startUpstream, type StartedProxy } from './helpers/harness.js';
import { GateBoard, sseEvents } from './helpers/sse.js';
import { freeLoopbackPorts } from '../src/ports.js';
import { runCli, runCommand, startCli } from './helpers/cli.js';
import { httpGet, sample } from './helpers/ops.js';
import {
  FILE_NAMES, kubernetesCertDir, kubernetesSwap, openToAll, plainCertDir, postSse, reloaderFor, replaceAtomically, servedSerial, startInFlight, symlinkedCertDir, symlinkedDirSwap,
  type CertDir, type SetContents, type TlsClient,
} from './helpers/reload.js';
import type { ReloadOutcome, TlsReloader } from '../src/tls-reload.js';
import { tlsMaterialFromTexts } from '../src/tls-material.js';
import { FORWARD_MODES, type ForwardMode } from '../src/config.js';
import { echoClient, type EchoReply } from '../src/demo/grpc-client.js';
import { createCrl, issueClientCert, issueServerCert, normaliseSerial, type Issued } from '../src/x509.js';
import type { ModelServer } from '../src/demo/model-server.js';

let pki: TestPki;
let upstream: ModelServer;
let board = new GateBoard();
/** A second client of the client CA, revoked in the revocation tests. */
let bob: Issued;
let newServer: Issued;
const dirs: string[] = [];

before(async () => {
  pki = await createTestPki();
  upstream = await startUpstream({ sseGate: (i) => board.wait(i) });
  [bob, newServer] = await Promise.all([
    issueClientCert({ issuer: pki.clientCa, commonName: 'bob' }),
    issueServerCert({ issuer: pki.serverCa, commonName: 'localhost', dns: ['localhost'], ips: ['127.0.0.1'] }),
  ]);
});
after(async () => {
  await upstream.close();
  await pki.cleanup();
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })));
});

const originalSet = (): SetContents => ({ cert: pki.server.certPem, key: pki.server.keyPem, clientCa: pki.clientCa.certPem, crl: pki.crlPem });
const as = (client: Issued): TlsClient => ({ ca: pki.serverCa.certPem, cert: client.certPem, key: client.keyPem });

interface Running {
  front: StartedProxy;
  reloader: TlsReloader;
  outcomes: ReloadOutcome[];
  certs: CertDir;
  stop(): Promise<void>;
}

/** `beforeWatch`: what happens after the reloader took the files in force and before its watch is placed (the listeners starting). */
async function startWithReloader(
  certs: CertDir,
  options: { watch?: boolean; graceMs?: number; restMode?: ForwardMode; debounceMs?: number; beforeWatch?: () => Promise<void> } = {},
): Promise<Running> {
  dirs.push(certs.dir);
  board = new GateBoard();
  const front = await startTestProxy({ pki, upstream, tls: certs.files, restMode: options.restMode ?? 'terminate' });
  const outcomes: ReloadOutcome[] = [];
  const reloader = reloaderFor(front, certs.files, {
    // An hour: only a graceful close can end a revoked connection, unless a test asks for the cut.
    revokedGraceMs: options.graceMs ?? 3_600_000,
    debounceMs: options.debounceMs ?? 20,
    onReload: (o) => outcomes.push(o),
  });
  await options.beforeWatch?.();
  if (options.watch) reloader.watch();
  return {
    front,
    reloader,
    outcomes,
    certs,
    async stop() {
      reloader.close();
      board.openAll();
      await front.proxy.shutdown(1000);
    },
  };
}

const reloadedLine = (r: Running, trigger: string) => r.front.logs.waitFor((l) => l.event === 'reloaded' && l.trigger === trigger);

// The timeouts are safety nets so a regression fails instead of hanging; nothing asserts on time.
const SAFETY = { timeout: 120_000 };

describe('reload keeps every call alive', SAFETY, () => {
  test('a reload on request (SIGHUP) serves the new server certificate to new handshakes while a gRPC stream and an SSE response in flight finish', async () => {
    const r = await startWithReloader(await plainCertDir(originalSet()));
    try {
      const inFlight = await startInFlight({ grpcAddress: r.front.grpcAddress, restPort: r.front.restPort, client: as(pki.client) });
      await writeFile(r.certs.files.cert, newServer.certPem);
      await writeFile(r.certs.files.key, newServer.keyPem);
      const outcome = await r.reloader.reload('signal');
      assert.equal(outcome.ok, true);
      await reloadedLine(r, 'signal');
      assert.equal(await servedSerial(r.front.restPort, as(pki.client)), newServer.serialHex);
      assert.equal(await servedSerial(r.front.grpcPort, as(pki.client)), newServer.serialHex);
      await inFlight.finish(board);
    } finally {
      await r.stop();
    }
  });

  test('replacing the files by atomic rename is caught by the directory watch, with calls in flight unharmed', async () => {
    const r = await startWithReloader(await plainCertDir(originalSet()), { watch: true });
    try {
      const inFlight = await startInFlight({ grpcAddress: r.front.grpcAddress, restPort: r.front.restPort, client: as(pki.client) });
      await replaceAtomically(r.certs.files.key, newServer.keyPem);
      await replaceAtomically(r.certs.files.cert, newServer.certPem);
      await r.front.logs.waitFor((l) => l.event === 'reloaded' && l.trigger === 'file' && r.reloader.material.cert.toString() === newServer.certPem);
      assert.equal(await servedSerial(r.front.restPort, as(pki.client)), newServer.serialHex);
      await inFlight.finish(board);
    } finally {
      await r.stop();
    }
  });

  test('a Kubernetes secret update (the ..data symlink swapped to a new directory) is caught, with calls in flight unharmed', async () => {
    const r = await startWithReloader(await kubernetesCertDir(originalSet()), { watch: true });
    try {
      const inFlight = await startInFlight({ grpcAddress: r.front.grpcAddress, restPort: r.front.restPort, client: as(pki.client) });
      await kubernetesSwap(r.certs.dir, 'v2', { ...originalSet(), cert: newServer.certPem, key: newServer.keyPem });
      await reloadedLine(r, 'file');
      assert.equal(await servedSerial(r.front.restPort, as(pki.client)), newServer.serialHex);
      await inFlight.finish(board);
      // The watch follows the link: a second swap is caught as well.
      await kubernetesSwap(r.certs.dir, 'v3', originalSet());
      await r.front.logs.waitFor((l) => l.event === 'reloaded' && r.reloader.material.cert.toString() === pki.server.certPem);
      assert.equal(await servedSerial(r.front.restPort, as(pki.client)), pki.server.serialHex);
    } finally {
      await r.stop();
    }
  });

  test('a certificate directory replaced whole (another renamed over it, or removed and made again) is watched anew: later rotations inside it are caught, and changes beside it while it is missing are not taken for it', async () => {
    const r = await startWithReloader(await plainCertDir(originalSet()), { watch: true });
    const { dir } = r.certs;
    const serving = (set: Issued) => r.front.logs.waitFor((l) => l.event === 'reloaded' && r.reloader.material.cert.toString() === set.certPem);
    const rotateInside = async (set: Issued) => {
      await replaceAtomically(r.certs.files.key, set.keyPem);
      await replaceAtomically(r.certs.files.cert, set.certPem);
      await serving(set);
      assert.equal(await servedSerial(r.front.restPort, as(pki.client)), set.serialHex);
    };
    try {
      const next = await plainCertDir({ ...originalSet(), cert: newServer.certPem, key: newServer.keyPem });
      dirs.push(next.dir, `${dir}.old`);
      await rename(dir, `${dir}.old`);
      await rename(next.dir, dir);
      await serving(newServer);
      await rotateInside(pki.server);
      // Removed: the reload fails (no files) and the watch waits above it for the directory to come back.
      await rm(dir, { recursive: true });
      await r.front.logs.waitFor((l) => l.event === 'reload_failed' && /does not exist/.test(String(l.reason)));
      // The last events of the removal may start one more reload: let them pass (ten quiet times) and any reload end.
      await new Promise((resolve) => setTimeout(resolve, 200));
      await r.reloader.reload('signal');
      // Meanwhile the directory above (here the temporary directory) is busy: over the longest wait of the watch (10 quiet times).
      const failedBefore = r.outcomes.length;
      const sibling = `${dir}.busy`;
      dirs.push(sibling);
      for (let i = 0; i < 40; i++) {
        await writeFile(sibling, String(i));
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      await r.reloader.reload('signal');
      assert.deepEqual(r.outcomes.slice(failedBefore).map((o) => o.trigger), ['signal'], 'no reload for changes beside the missing directory');
      await mkdir(dir);
      for (const [role, name] of Object.entries(FILE_NAMES)) await writeFile(join(dir, name), { ...originalSet(), cert: newServer.certPem, key: newServer.keyPem }[role as keyof SetContents]);
      await serving(newServer);
      await rotateInside(pki.server);
    } finally {
      await r.stop();
    }
  });

  test('a symlinked certificate directory pointed at a new directory (a new link renamed over it) is caught: the client the new CRL revokes is cut, and the watch follows the link there', async () => {
    const r = await startWithReloader(await symlinkedCertDir(originalSet()), { watch: true });
    const revoked = h2(r.front.restPort, bob);
    try {
      assert.equal(await h2Get(revoked), 200);
      const goaway = once(revoked, 'goaway');
      await symlinkedDirSwap(r.certs.dir, 'v2', { ...originalSet(), crl: await crlRevoking(bob) });
      await goaway;
      assert.match(String((await r.front.logs.waitFor((l) => l.event === 'connection_revoked')).subject), /CN=bob/);
      // Watched there: a rotation inside the new directory, then the link swapped again.
      await replaceAtomically(r.certs.files.key, newServer.keyPem);
      await replaceAtomically(r.certs.files.cert, newServer.certPem);
      await r.front.logs.waitFor((l) => l.event === 'reloaded' && r.reloader.material.cert.toString() === newServer.certPem);
      assert.equal(await servedSerial(r.front.restPort, as(pki.client)), newServer.serialHex);
      await symlinkedDirSwap(r.certs.dir, 'v3', originalSet());
      await r.front.logs.waitFor((l) => l.event === 'reloaded' && r.reloader.material.cert.toString() === pki.server.certPem);
      assert.equal(await servedSerial(r.front.restPort, as(pki.client)), pki.server.serialHex);
    } finally {
      revoked.destroy();
      await r.stop();
    }
  });

  test('a change made after the files were read and before the watch is placed (while the listeners and workers start) is applied once the watch is placed', async () => {
    const certs = await plainCertDir(originalSet());
    const r = await startWithReloader(certs, {
      watch: true,
      beforeWatch: async () => {
        await replaceAtomically(certs.files.crl!, await crlRevoking(bob));
        await replaceAtomically(certs.files.key, newServer.keyPem);
        await replaceAtomically(certs.files.cert, newServer.certPem);
      },
    });
    try {
      await reloadedLine(r, 'file');
      assert.equal(await servedSerial(r.front.restPort, as(pki.client)), newServer.serialHex);
      const refused = h2(r.front.restPort, bob);
      await once(refused, 'close');
      await r.front.logs.waitFor((l) => l.event === 'client_refused' && l.reason === 'revoked' && /CN=bob/.test(String(l.subject)));
    } finally {
      await r.stop();
    }
  });

  test('a half-rotated or broken set keeps the old one serving, logs why, and the next change is retried', async () => {
    const r = await startWithReloader(await plainCertDir(originalSet()), { watch: true });
    try {
      // The new key lands before its certificate: they do not match yet.
      await replaceAtomically(r.certs.files.key, newServer.keyPem);
      const failed = await r.front.logs.waitFor((l) => l.event === 'reload_failed');
      assert.match(String(failed.reason), /--mtls_key: .*server\.key does not match --mtls_cert/);
      assert.equal(failed.level, 'error');
      assert.equal(await servedSerial(r.front.restPort, as(pki.client)), pki.server.serialHex);
      assert.equal(r.reloader.material.cert.toString(), pki.server.certPem);
      await replaceAtomically(r.certs.files.cert, newServer.certPem);
      await reloadedLine(r, 'file');
      assert.equal(await servedSerial(r.front.restPort, as(pki.client)), newServer.serialHex);
      assert.ok(r.reloader.counts.failures >= 1 && r.reloader.counts.reloads === 1, JSON.stringify(r.reloader.counts));
      assert.deepEqual(r.outcomes.filter((o) => o.ok && o.changed).length, 1);
      assert.ok(r.outcomes.some((o) => !o.ok));
    } finally {
      await r.stop();
    }
  });

  // Each later change beside a broken set (the kubelet deleting the old version directory, a file written there)
  // logged reload_failed again and counted another failure, for the same files.
  test('a broken set is logged and counted once, not again at each later change beside it while its files stay as they were', async () => {
    const r = await startWithReloader(await plainCertDir(originalSet()), { watch: true });
    try {
      await replaceAtomically(r.certs.files.key, newServer.keyPem);
      const failed = await r.front.logs.waitFor((l) => l.event === 'reload_failed');
      await writeFile(join(r.certs.dir, 'notes.txt'), 'not a certificate');
      const next = await r.front.logs.waitFor((l) => l !== failed && (l.event === 'reload_failed' || l.event === 'reload_still_failing'));
      assert.equal(next.event, 'reload_still_failing');
      assert.match(String(next.reason), /--mtls_key: .*server\.key does not match --mtls_cert/);
      assert.equal(r.front.logs.lines.filter((l) => l.event === 'reload_failed').length, 1);
      assert.equal(r.reloader.counts.failures, 1);
      // A signal is answered in full, and a fix is taken as ever.
      assert.equal((await r.reloader.reload('signal')).ok, false);
      assert.equal(r.front.logs.lines.filter((l) => l.event === 'reload_failed').length, 2);
      await replaceAtomically(r.certs.files.cert, newServer.certPem);
      await reloadedLine(r, 'file');
      assert.equal(await servedSerial(r.front.restPort, as(pki.client)), newServer.serialHex);
    } finally {
      await r.stop();
    }
  });

  // Undoing a broken set (a bad Secret rolled back) was a debug line only: the log's last word on TLS stayed the error.
  test('a broken set put back as the set in use is said at info (reload_recovered), counted as nothing, and the served set never changed', async () => {
    const r = await startWithReloader(await plainCertDir(originalSet()), { watch: true });
    try {
      await replaceAtomically(r.certs.files.key, newServer.keyPem);
      const failed = await r.front.logs.waitFor((l) => l.event === 'reload_failed');
      await replaceAtomically(r.certs.files.key, pki.server.keyPem);
      const recovered = await r.front.logs.waitFor((l) => l.event === 'reload_recovered');
      assert.equal(recovered.level, 'info');
      assert.equal(recovered.trigger, 'file');
      assert.equal(recovered.previous_reason, failed.reason);
      assert.equal(r.front.logs.lines.filter((l) => l.event === 'reloaded').length, 0);
      assert.deepEqual(r.reloader.counts, { reloads: 0, failures: 1 });
      assert.deepEqual(r.outcomes.map((o) => [o.ok, o.ok && o.changed]), [[false, false], [true, false]]);
      assert.equal(await servedSerial(r.front.restPort, as(pki.client)), pki.server.serialHex);
      // Said once: the next change beside the set in use is the usual debug line.
      await writeFile(join(r.certs.dir, 'notes.txt'), 'not a certificate');
      await r.front.logs.waitFor((l) => l.event === 'reload_unchanged');
      assert.equal(r.front.logs.lines.filter((l) => l.event === 'reload_recovered').length, 1);
    } finally {
      await r.stop();
    }
  });

  test('a change to an unrelated file in the directory reloads nothing', async () => {
    const r = await startWithReloader(await plainCertDir(originalSet()), { watch: true });
    try {
      await writeFile(join(r.certs.dir, 'notes.txt'), 'not a certificate');
      await r.front.logs.waitFor((l) => l.event === 'reload_unchanged');
      assert.deepEqual(r.reloader.counts, { reloads: 0, failures: 0 });
      assert.equal(r.front.logs.lines.filter((l) => l.event === 'reloaded').length, 0);
    } finally {
      await r.stop();
    }
  });

  test('a file written beside the certificates more often than the quiet time (a log) does not hold a rotation back for ever', async () => {
    // A quiet time the writes below never leave, however slow this machine.
    const r = await startWithReloader(await plainCertDir(originalSet()), { watch: true, debounceMs: 500 });
    let writing = true;
    const log = (async () => {
      // Until the rotation is in force, or a bound that fails the test (far beyond the cap on the quiet time).
      for (let line = 0; writing && line < 20_000; line++) {
        await writeFile(join(r.certs.dir, 'proxy.log'), `line ${line}\n`, { flag: 'a' });
        await new Promise((resolve) => setTimeout(resolve, 2));
      }
    })();
    try {
      await replaceAtomically(r.certs.files.key, newServer.keyPem);
      await replaceAtomically(r.certs.files.cert, newServer.certPem);
      const rotated = r.front.logs.waitFor((l) => l.event === 'reloaded' && r.reloader.material.cert.toString() === newServer.certPem).then(() => true);
      assert.equal(await Promise.race([rotated, log.then(() => false)]), true, 'the rotation waited for the log to stop');
      assert.equal(await servedSerial(r.front.restPort, as(pki.client)), newServer.serialHex);
    } finally {
      writing = false;
      await log;
      await r.stop();
    }
  });

  test('a burst of reload requests (SIGHUPs, a watch and a reloader sidecar at once) costs one reload of the newest files, not one each', async () => {
    const r = await startWithReloader(await plainCertDir(originalSet()));
    try {
      await replaceAtomically(r.certs.files.key, newServer.keyPem);
      await replaceAtomically(r.certs.files.cert, newServer.certPem);
      const triggers = ['file', 'signal', 'api', 'signal', 'file'] as const;
      const outcomes = await Promise.all(Array.from({ length: 20 }, (_, i) => r.reloader.reload(triggers[i % triggers.length]!)));
      assert.deepEqual(r.reloader.counts, { reloads: 1, failures: 0 });
      assert.ok(outcomes.every((o) => o.ok && o.changed && o.material.cert.toString() === newServer.certPem));
      assert.equal(r.front.logs.lines.filter((l) => l.event === 'reloaded').length, 1);
      assert.equal(await servedSerial(r.front.restPort, as(pki.client)), newServer.serialHex);
    } finally {
      await r.stop();
    }
  });

  test('a server certificate OpenSSL refuses to serve (signed with SHA-1) fails the reload with one line naming the file and the fix, as `check` and a start do', async () => {
    const r = await startWithReloader(await plainCertDir(originalSet()));
    try {
      const sha1 = await sha1SignedServerCert(r.certs.dir);
      await replaceAtomically(r.certs.files.cert, sha1);
      const outcome = await r.reloader.reload('api');
      const expected = /^--mtls_cert: \S+server\.pem: a certificate of it is signed with a digest OpenSSL refuses \(SHA-1 or MD5\): reissue it signed with SHA-256$/;
      assert.match(outcome.ok ? 'reloaded' : outcome.reason, expected);
      assert.equal(await servedSerial(r.front.restPort, as(pki.client)), pki.server.serialHex);
      const tlsArgs = ['--mtls_cert', r.certs.files.cert, '--mtls_key', r.certs.files.key, '--mtls_client_ca', r.certs.files.clientCa];
      const check = await runCli(['check', ...tlsArgs]);
      assert.equal(check.code, 1, check.stdout);
      assert.match(check.stdout, /FAIL +--mtls_cert: .*signed with a digest OpenSSL refuses/);
      const [port] = await freeLoopbackPorts(1);
      const start = await runCli(['proxy', '--rest_port', String(port), '--mtls_rest_upstream', '127.0.0.1:1', '--mtls_workers', '1', ...tlsArgs]);
      assert.equal(start.code, 2, start.stderr);
      assert.deepEqual(start.stderr.trim().split('\n'), [`ovms-mtls: ${outcome.ok ? '' : outcome.reason}`]);
    } finally {
      await r.stop();
    }
  });

  // kubelet swaps ..data between any two reads: the reload read the new certificate and the old key, failed and was counted.
  test('a Kubernetes secret update landing between the reads of the certificate and the key is read again, not a failed reload', async () => {
    const certs = await kubernetesCertDir(originalSet());
    dirs.push(certs.dir);
    const front = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, tls: certs.files });
    const outcomes: ReloadOutcome[] = [];
    let swapped = false;
    const read = (path: string | undefined) => readFile(path!, 'latin1');
    const reloader = reloaderFor(front, certs.files, {
      revokedGraceMs: 3_600_000,
      onReload: (o) => outcomes.push(o),
      // The files read one after another, as the default reader does, with the swap landing after the first read, once.
      load: async () => {
        const cert = await read(certs.files.cert);
        if (!swapped) {
          swapped = true;
          await kubernetesSwap(certs.dir, 'v2', { ...originalSet(), cert: newServer.certPem, key: newServer.keyPem });
        }
        return tlsMaterialFromTexts(certs.files, { cert, key: await read(certs.files.key), ca: await read(certs.files.clientCa), crl: await read(certs.files.crl), validatedAt: Date.now() });
      },
    });
    try {
      const outcome = await reloader.reload('file');
      assert.equal(outcome.ok, true, outcome.ok ? '' : outcome.reason);
      assert.deepEqual(outcomes.map((o) => o.ok), [true]);
      assert.equal(front.logs.lines.filter((l) => l.event === 'reload_failed').length, 0);
      assert.equal(await servedSerial(front.restPort, as(pki.client)), newServer.serialHex);
    } finally {
      reloader.close();
      await front.proxy.shutdown(1000);
    }
  });

  test('a truncated certificate fails the reload with the startup message and keeps the old one', async () => {
    const r = await startWithReloader(await plainCertDir(originalSet()));
    try {
      await writeFile(r.certs.files.cert, pki.server.certPem.slice(0, 200));
      const outcome = await r.reloader.reload('signal');
      assert.equal(outcome.ok, false);
      assert.match(outcome.ok ? '' : outcome.reason, /--mtls_cert: .*server\.pem is cut short: a -----BEGIN CERTIFICATE----- block has no -----END CERTIFICATE----- line/);
      assert.equal(await servedSerial(r.front.restPort, as(pki.client)), pki.server.serialHex);
    } finally {
      await r.stop();
    }
  });

  // A start refuses such a bundle; a reload took it and refused every client until the next rotation.
  test('a client CA bundle in which no CA can admit a client (an intermediate without its root) fails the reload and the old set keeps admitting', async () => {
    const r = await startWithReloader(await plainCertDir(originalSet()));
    try {
      await writeFile(r.certs.files.crl!, await createCrl({ issuer: pki.intermediateCa, crlNumber: 1 }));
      await writeFile(r.certs.files.clientCa, pki.intermediateCa.certPem);
      const outcome = await r.reloader.reload('signal');
      assert.match(outcome.ok ? 'reloaded' : outcome.reason, /^--mtls_client_ca: \S+: no CA of the bundle can admit a client, so every client would be refused: client CA ovms-mtls test intermediate CA leads to no root CA/);
      assert.equal(await servedSerial(r.front.restPort, as(pki.client)), pki.server.serialHex);
    } finally {
      await r.stop();
    }
  });
});

/** A CRL revoking the usual revoked client and `extra`, newer than the original. */
const crlRevoking = (extra: Issued) => createCrl({ issuer: pki.clientCa, revoked: [{ serialHex: pki.revokedClient.serialHex }, { serialHex: extra.serialHex }], crlNumber: 2 });

function h2(port: number, client: Issued): ClientHttp2Session {
  const session = connectH2(`https://localhost:${port}`, as(client));
  session.on('error', () => {});
  return session;
}

async function h2Get(session: ClientHttp2Session, path = '/v2/health/live'): Promise<number> {
  const stream = session.request({ ':path': path });
  stream.resume();
  const [headers] = (await once(stream, 'response')) as [Record<string, unknown>];
  await once(stream, 'end');
  return Number(headers[':status']);
}

/**
 * A loopback TCP hop to `port` that passes a client's first flight (its ClientHello) and the
 * server's answer, then holds the client's next flight (its certificate, TLS 1.3) until released:
 * a handshake kept under way for as long as a test needs.
 */
async function handshakeHoldingHop(port: number): Promise<{ port: number; holding: Promise<void>; release(): void; close(): void }> {
  const held = new EventEmitter();
  let released = false;
  const sockets: Socket[] = [];
  const server = createTcpServer((client) => {
    const toProxy = connectTcp(port, '127.0.0.1');
    for (const s of [client, toProxy]) {
      sockets.push(s);
      s.on('error', () => {});
    }
    toProxy.pipe(client);
    let flights = 0;
    client.on('data', (chunk: Buffer) => {
      flights += 1;
      if (flights === 1 || released) {
        toProxy.write(chunk);
        return;
      }
      client.pause();
      held.emit('holding');
      held.once('release', () => {
        toProxy.write(chunk);
        client.resume();
      });
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: (server.address() as AddressInfo).port,
    holding: once(held, 'holding').then(() => undefined),
    release() {
      released = true;
      held.emit('release');
    },
    close() {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

describe('revocation reaches live connections', SAFETY, () => {
  test('a CRL reload sends GOAWAY to the HTTP/2 connection of a client it now revokes, while another client carries on', async () => {
    const r = await startWithReloader(await plainCertDir(originalSet()));
    const alice = h2(r.front.restPort, pki.client);
    const revoked = h2(r.front.restPort, bob);
    try {
      assert.equal(await h2Get(alice), 200);
      assert.equal(await h2Get(revoked), 200);
      const goaway = once(revoked, 'goaway');
      await writeFile(r.certs.files.crl!, await crlRevoking(bob));
      const outcome = await r.reloader.reload('signal');
      assert.equal(outcome.ok && outcome.revokedConnections, 1);
      await goaway;
      await once(revoked, 'close');
      const line = await r.front.logs.waitFor((l) => l.event === 'connection_revoked');
      assert.match(String(line.subject), /CN=bob/);
      assert.equal(line.serial, normaliseSerial(bob.serialHex));
      assert.equal(alice.closed, false);
      assert.equal(await h2Get(alice), 200);
      // And bob cannot come back.
      const again = h2(r.front.restPort, bob);
      await once(again, 'close');
      await r.front.logs.waitFor((l) => l.event === 'client_refused' && l.reason === 'revoked');
    } finally {
      alice.close();
      revoked.destroy();
      await r.stop();
    }
  });

  test('a client whose TLS handshake was under way when the CRL revoking it was reloaded is refused, not let in under the CRL its handshake began with', async () => {
    const r = await startWithReloader(await plainCertDir(originalSet()));
    const hop = await handshakeHoldingHop(r.front.restPort);
    const revoked = h2(hop.port, bob);
    try {
      await hop.holding;
      await writeFile(r.certs.files.crl!, await crlRevoking(bob));
      const outcome = await r.reloader.reload('signal');
      assert.equal(outcome.ok && outcome.revokedConnections, 0);
      hop.release();
      // Let in, bob would be answered 200 on a connection no reload closes.
      assert.equal(await h2Get(revoked, '/v2/health/ready'), 403);
      const line = await r.front.logs.waitFor((l) => l.event === 'client_refused' && /CN=bob/.test(String(l.subject)));
      assert.equal(line.reason, 'revoked');
    } finally {
      revoked.destroy();
      hop.close();
      await r.stop();
    }
  });

  test('the container default CRL, not in the Secret at start, is used once a Secret update brings it: the client it revokes is cut and refused, also after the file goes away', async () => {
    // The Secret without the optional CRL: no user-visible link for it.
    const certs = await kubernetesCertDir(originalSet());
    await rm(certs.files.crl!);
    const r = await startWithReloader({ ...certs, files: { ...certs.files, crlOptional: true } }, { watch: true });
    const revoked = h2(r.front.restPort, bob);
    try {
      assert.equal(await h2Get(revoked), 200);
      const goaway = once(revoked, 'goaway');
      await kubernetesSwap(certs.dir, 'v2', { ...originalSet(), crl: await crlRevoking(bob) });
      // The kubelet links a key new to the Secret after the swap.
      await symlink(join('..data', FILE_NAMES.crl), certs.files.crl!);
      await goaway;
      const line = await r.front.logs.waitFor((l) => l.event === 'connection_revoked');
      assert.match(String(line.subject), /CN=bob/);
      const again = h2(r.front.restPort, bob);
      await once(again, 'close');
      await r.front.logs.waitFor((l) => l.event === 'client_refused' && l.reason === 'revoked');
      // Once in force, the CRL does not lapse because its file went away.
      await rm(certs.files.crl!);
      const failed = await r.front.logs.waitFor((l) => l.event === 'reload_failed');
      assert.match(String(failed.reason), /client_cert_ca\.crl is gone; its revocations stay in force/);
      const refusedBefore = r.front.logs.lines.filter((l) => l.event === 'client_refused').length;
      const third = h2(r.front.restPort, bob);
      await once(third, 'close');
      await r.front.logs.waitFor((l) => l.event === 'client_refused' && r.front.logs.lines.filter((x) => x.event === 'client_refused').length > refusedBefore);
    } finally {
      revoked.destroy();
      await r.stop();
    }
  });

  for (const restMode of FORWARD_MODES) {
    test(`a revoked HTTP/1.1 client gets the rest of its response in progress, then its connection closes (--mtls_rest_mode ${restMode})`, async () => {
      const r = await startWithReloader(await plainCertDir(originalSet()), { restMode });
      const agent = new Agent({ keepAlive: true, maxSockets: 1 });
      try {
        const { res } = await postSse(r.front.restPort, as(bob), agent);
        const closed = once(res.socket, 'close');
        await writeFile(r.certs.files.crl!, await crlRevoking(bob));
        assert.equal((await r.reloader.reload('signal')).ok, true);
        await r.front.logs.waitFor((l) => l.event === 'connection_revoked');
        board.openAll();
        const events: string[] = [];
        for await (const event of sseEvents(res)) events.push(event);
        assert.equal(events.at(-1), 'data: [DONE]');
        await closed;
      } finally {
        agent.destroy();
        await r.stop();
      }
    });
  }

  test('a revoked connection still within its grace is closed, logged and counted once, not again by each later reload that refuses it', async () => {
    const r = await startWithReloader(await plainCertDir(originalSet()));
    const credentials = grpc.credentials.createSsl(Buffer.from(pki.serverCa.certPem), Buffer.from(bob.keyPem), Buffer.from(bob.certPem));
    const echo = echoClient(r.front.grpcAddress, credentials);
    try {
      const held = new Promise<void>((resolve) => {
        const call = echo.Hold({ payload: Buffer.from('x') }, new grpc.Metadata(), {}, () => undefined);
        call.on('metadata', () => resolve());
      });
      await held;
      await writeFile(r.certs.files.crl!, await crlRevoking(bob));
      const first = await r.reloader.reload('signal');
      assert.equal(first.ok && first.revokedConnections, 1);
      // Another CRL that still revokes bob: his connection is within its grace (an hour), its call still held.
      await writeFile(r.certs.files.crl!, await createCrl({ issuer: pki.clientCa, revoked: [{ serialHex: bob.serialHex }], crlNumber: 3 }));
      const second = await r.reloader.reload('signal');
      assert.equal(second.ok && second.changed, true);
      assert.equal(second.ok && second.revokedConnections, 0);
      assert.equal(r.front.logs.lines.filter((l) => l.event === 'connection_revoked').length, 1);
    } finally {
      echo.close();
      await r.stop();
    }
  });

  test('a revoked client whose call never ends is cut once the grace period is over', async () => {
    const r = await startWithReloader(await plainCertDir(originalSet()), { graceMs: 50 });
    const credentials = grpc.credentials.createSsl(Buffer.from(pki.serverCa.certPem), Buffer.from(bob.keyPem), Buffer.from(bob.certPem));
    const echo = echoClient(r.front.grpcAddress, credentials);
    try {
      const ended = new Promise<grpc.ServiceError | null>((resolve) => {
        const call = echo.Hold({ payload: Buffer.from('x') }, new grpc.Metadata(), {}, (err) => resolve(err));
        call.on('metadata', () => void revoke());
      });
      const revoke = async () => {
        await writeFile(r.certs.files.crl!, await crlRevoking(bob));
        await r.reloader.reload('signal');
      };
      const err = await ended;
      assert.ok(err, 'the call must end with an error');
      assert.equal(err.code, grpc.status.UNAVAILABLE);
    } finally {
      echo.close();
      await r.stop();
    }
  });
});

describe('the proxy command reloads on SIGHUP and on file changes', SAFETY, () => {
  test('a SIGHUP during the drain reloads instead of killing the proxy: the stream in flight finishes and the exit code is 0', async () => {
    const [port] = (await freeLoopbackPorts(1)) as [number];
    const cli = startCli([
      'proxy', '--port', String(port), '--grpc_bind_address', '127.0.0.1', '--mtls_grpc_upstream', `127.0.0.1:${upstream.grpcPort}`,
      '--mtls_cert', pki.paths['server.pem']!, '--mtls_key', pki.paths['server.key']!, '--mtls_client_ca', pki.paths['client_cert_ca.pem']!,
    ]);
    const clients = grpcClients(`localhost:${port}`, pki);
    // Dying of the SIGHUP would leave the awaited lines unwritten: fail at once instead.
    const died = cli.exited.then((code) => assert.fail(`proxy exited (${code ?? cli.child.signalCode}) before the stream finished`));
    const meanwhile = <T>(p: Promise<T>) => Promise.race([p, died]);
    try {
      await meanwhile(cli.logs.waitFor((l) => l.event === 'listening'));
      const bidi = clients.echo.Bidi();
      const replies = bidi[Symbol.asyncIterator]();
      bidi.write({ payload: Buffer.from('before') });
      assert.equal(((await meanwhile(replies.next())).value as EchoReply).payload.toString(), 'before');
      cli.child.kill('SIGTERM');
      await meanwhile(cli.logs.waitFor((l) => l.event === 'signal'));
      cli.child.kill('SIGHUP');
      await meanwhile(cli.logs.waitFor((l) => l.event === 'reloaded' && l.trigger === 'signal'));
      bidi.write({ payload: Buffer.from('after the SIGHUP') });
      assert.equal(((await meanwhile(replies.next())).value as EchoReply).payload.toString(), 'after the SIGHUP');
      const status = once(bidi, 'status') as Promise<[grpc.StatusObject]>;
      bidi.end();
      assert.equal((await meanwhile(status))[0].code, grpc.status.OK);
      assert.equal(await cli.exited, 0, cli.stderr());
    } finally {
      died.catch(() => undefined);
      clients.close();
      if (cli.child.exitCode === null && cli.child.signalCode === null) cli.child.kill('SIGKILL');
    }
  });

  test('SIGHUP reloads with calls in flight; `certs revoke` then closes the revoked client and the other continues; SIGTERM exits 0', async () => {
    const dir = join(pki.dir, 'cli-set');
    assert.equal((await runCli(['certs', 'init', '--dir', dir])).code, 0);
    assert.equal((await runCli(['certs', 'client', '--dir', dir, '--name', 'carol'])).code, 0);
    const read = (name: string) => readFile(join(dir, name), 'utf8');
    const ca = await read('server_ca.pem');
    const client: TlsClient = { ca, cert: await read('client.pem'), key: await read('client.key') };
    const carol: TlsClient = { ca, cert: await read('carol.pem'), key: await read('carol.key') };
    board = new GateBoard();
    const [port] = (await freeLoopbackPorts(1)) as [number];
    const cli = startCli([
      'proxy', '--rest_port', String(port), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`,
      '--mtls_cert', join(dir, FILE_NAMES.cert), '--mtls_key', join(dir, FILE_NAMES.key),
      '--mtls_client_ca', join(dir, FILE_NAMES.clientCa), '--mtls_crl', join(dir, FILE_NAMES.crl),
    ]);
    try {
      await Promise.race([cli.logs.waitFor((l) => l.event === 'listening'), cli.exited.then((code) => assert.fail(`proxy exited ${code}: ${cli.stderr()}`))]);
      const { res } = await postSse(port, client);
      const events = sseEvents(res);
      const carolSession = connectH2(`https://localhost:${port}`, carol);
      carolSession.on('error', () => {});
      assert.equal(await h2Get(carolSession), 200);

      cli.child.kill('SIGHUP');
      await cli.logs.waitFor((l) => l.event === 'reloaded' && l.trigger === 'signal');

      const closed = once(carolSession, 'close');
      assert.equal((await runCli(['certs', 'revoke', '--dir', dir, '--cert', 'carol'])).code, 0);
      const revoked = await cli.logs.waitFor((l) => l.event === 'connection_revoked');
      assert.match(String(revoked.subject), /CN=carol/);
      await closed;

      board.openAll();
      let last = '';
      for await (const event of events) last = event;
      assert.equal(last, 'data: [DONE]');
      cli.child.kill('SIGTERM');
      assert.equal(await cli.exited, 0, cli.stderr());
    } finally {
      board.openAll();
      if (cli.child.exitCode === null) cli.child.kill('SIGKILL');
    }
  });
});

describe('the proxy command shows a failing reload in its metrics until it is over', SAFETY, () => {
  test('with 2 workers, ovms_mtls_tls_reload_failing is 1 from a broken set until the files are the set in use again (reload_recovered), then 0', async () => {
    const certs = await plainCertDir(originalSet());
    dirs.push(certs.dir);
    const [port, adminPort] = (await freeLoopbackPorts(2)) as [number, number];
    const cli = startCli([
      'proxy', '--mtls_workers', '2', '--rest_port', String(port), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`,
      '--mtls_cert', certs.files.cert, '--mtls_key', certs.files.key, '--mtls_client_ca', certs.files.clientCa, '--mtls_crl', certs.files.crl!,
      '--mtls_admin_port', String(adminPort),
    ]);
    const failing = async () => sample((await httpGet(adminPort, '/metrics')).body, 'ovms_mtls_tls_reload_failing');
    try {
      await Promise.race([cli.logs.waitFor((l) => l.event === 'workers_listening'), cli.exited.then((code) => assert.fail(`proxy exited ${code}: ${cli.stderr()}`))]);
      assert.equal(await failing(), 0);
      await replaceAtomically(certs.files.key, newServer.keyPem);
      await cli.logs.waitFor((l) => l.event === 'reload_failed');
      assert.equal(await failing(), 1);
      await replaceAtomically(certs.files.key, pki.server.keyPem);
      await cli.logs.waitFor((l) => l.event === 'reload_recovered' && l.level === 'info');
      const text = (await httpGet(adminPort, '/metrics')).body;
      assert.equal(sample(text, 'ovms_mtls_tls_reload_failing'), 0);
      assert.equal(sample(text, 'ovms_mtls_tls_reloads_total', { result: 'failure' }), 1);
      assert.equal(sample(text, 'ovms_mtls_tls_reloads_total', { result: 'success' }), 0);
      assert.equal(await servedSerial(port, as(pki.client)), pki.server.serialHex);
      cli.child.kill('SIGTERM');
      assert.equal(await cli.exited, 0, cli.stderr());
    } finally {
      if (cli.child.exitCode === null) cli.child.kill('SIGKILL');
    }
  });
});

/** The proxy command on a REST port only, reading `certs`, run under `wrap`; in one process: the reloaded line is then the one that serves. */
async function startRestProxy(certs: CertDir, wrap: readonly string[]): Promise<{ port: number; cli: ReturnType<typeof startCli> }> {
  const [port] = (await freeLoopbackPorts(1)) as [number];
  const { cert, key, clientCa, crl } = certs.files;
  const cli = startCli(
    ['proxy', '--rest_port', String(port), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`, '--mtls_workers', '1',
      '--mtls_cert', cert, '--mtls_key', key, '--mtls_client_ca', clientCa, '--mtls_crl', crl!],
    { wrap },
  );
  return { port, cli };
}

/** A uid of its own (OpenShift's range, no passwd entry): the inotify limit below is per uid, so nothing else on the machine shares it. */
const POLLING_UID = 1000680001;
const AS_POLLING_UID = ['setpriv', `--reuid=${POLLING_UID}`, '--regid=0', '--clear-groups'];
/** Takes every inotify instance the uid may have (fs.inotify.max_user_instances), says how many, and holds them. */
const INOTIFY_HOG = `
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
held = 0
while libc.inotify_init() >= 0:
    held += 1
print("held", held, flush=True)
time.sleep(3600)
`;

describe('certificate directories that cannot be watched', { ...SAFETY, skip: !(process.getuid?.() === 0 && existsSync('/usr/bin/setpriv') && existsSync('/usr/bin/python3')) && 'needs root, setpriv and python3' }, () => {
  test('with the uid\'s inotify instances used up (a node\'s containers of one uid share 128), the proxy polls the files and serves a Kubernetes secret update', async () => {
    const certs = await openToAll(await kubernetesCertDir(originalSet()));
    dirs.push(certs.dir);
    const hog = spawn('setpriv', [...AS_POLLING_UID, '/usr/bin/python3', '-c', INOTIFY_HOG], { stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      const [held] = (await once(createInterface({ input: hog.stdout! }), 'line')) as [string];
      assert.match(held, /^held \d+$/);
      const { port, cli } = await startRestProxy(certs, AS_POLLING_UID);
      try {
        const failed = await Promise.race([cli.logs.waitFor((l) => l.event === 'watch_failed'), cli.exited.then((code) => assert.fail(`proxy exited ${code}: ${cli.stderr()}`))]);
        assert.match(String(failed.msg), /^cannot watch \S+ for certificate changes \(EMFILE: too many open files, watch .*\); looking at the files every 5 s instead until the watch can be placed$/);
        await cli.logs.waitFor((l) => l.event === 'listening');
        assert.equal(await servedSerial(port, as(pki.client)), pki.server.serialHex);
        await kubernetesSwap(certs.dir, 'v2', { ...originalSet(), cert: newServer.certPem, key: newServer.keyPem });
        const polled = await cli.logs.waitFor((l) => l.event === 'reloaded' && l.trigger === 'file');
        assert.equal(await servedSerial(port, as(pki.client)), newServer.serialHex);
        assert.equal(cli.logs.lines.filter((l) => l.event === 'watch_failed' && l.level === 'warn').length, 1, 'one warning, not one per directory or per poll');

        // Instances free again: the watch is placed, and the next update is caught as well.
        hog.kill('SIGKILL');
        await cli.logs.waitFor((l) => l.event === 'watch_restored');
        await kubernetesSwap(certs.dir, 'v3', originalSet());
        await cli.logs.waitFor((l) => l.event === 'reloaded' && l !== polled);
        assert.equal(await servedSerial(port, as(pki.client)), pki.server.serialHex);
        cli.child.kill('SIGTERM');
        assert.equal(await cli.exited, 0, cli.stderr());
      } finally {
        if (cli.child.exitCode === null && cli.child.signalCode === null) cli.child.kill('SIGKILL');
      }
    } finally {
      hog.kill('SIGKILL');
    }
  });
});

/**
 * The CLI in a user namespace of its own whose processes may hold one inotify watch: the limit
 * (fs.inotify.max_user_watches, which other containers of the uid use up as well) counts per
 * namespace, so nothing outside it shares this one.
 */
const ONE_INOTIFY_WATCH = ['unshare', '--user', '--map-root-user', 'sh', '-c', 'echo 1 > /proc/sys/user/max_inotify_watches && exec "$@"', 'sh'];
const USER_NAMESPACE = spawnSync('unshare', ['--user', '--map-root-user', 'sh', '-c', 'echo 1 > /proc/sys/user/max_inotify_watches']).status === 0;

describe('a certificate directory that cannot be watched beside one that can', { ...SAFETY, skip: !USER_NAMESPACE && 'unshare --user, with its own inotify limits, is not available here' }, () => {
  test('each new version directory of a secret mount that cannot be watched either is no new warning while the files are polled', async () => {
    const certs = await kubernetesCertDir(originalSet());
    dirs.push(certs.dir);
    // The mount directory takes the one watch; its version directory (..v1, then each new one) cannot have one.
    const { cli } = await startRestProxy(certs, ONE_INOTIFY_WATCH);
    try {
      await Promise.race([cli.logs.waitFor((l) => l.event === 'listening' && l.listener === 'rest'), cli.exited.then((code) => assert.fail(`proxy exited ${code}: ${cli.stderr()}`))]);
      const reloaded = new Set<object>();
      for (const [version, contents] of [['v2', { ...originalSet(), cert: newServer.certPem, key: newServer.keyPem }], ['v3', originalSet()]] as const) {
        await kubernetesSwap(certs.dir, version, contents);
        // The watches are placed again before the reloaded line: a warning for this version directory is logged by then.
        reloaded.add(await cli.logs.waitFor((l) => l.event === 'reloaded' && l.trigger === 'file' && !reloaded.has(l)));
      }
      const warnings = cli.logs.lines.filter((l) => l.event === 'watch_failed' && l.level === 'warn');
      assert.deepEqual(warnings.map((l) => basename(String(l.dir))), ['..v1'], 'one warning when the polling began, not one per rotation');
      assert.match(String(warnings[0]!.reason), /^ENOSPC/);
      cli.child.kill('SIGTERM');
      assert.equal(await cli.exited, 0, cli.stderr());
    } finally {
      if (cli.child.exitCode === null && cli.child.signalCode === null) cli.child.kill('SIGKILL');
    }
  });
});

/** The test server certificate's key and names in a certificate the server CA signs with SHA-1, as the openssl CLI still does when asked. */
async function sha1SignedServerCert(dir: string): Promise<string> {
  const at = (name: string) => join(dir, name);
  await writeFile(at('sha1.cnf'), '[req]\ndistinguished_name=dn\n[dn]\n[ext]\nsubjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n');
  await writeFile(at('server_ca.key'), pki.serverCa.keyPem);
  await writeFile(at('server_ca.pem'), pki.serverCa.certPem);
  for (const args of [
    ['req', '-new', '-key', at(FILE_NAMES.key), '-subj', '/CN=localhost', '-config', at('sha1.cnf'), '-out', at('sha1.csr')],
    ['x509', '-req', '-sha1', '-in', at('sha1.csr'), '-CA', at('server_ca.pem'), '-CAkey', at('server_ca.key'), '-set_serial', '7', '-days', '1', '-extfile', at('sha1.cnf'), '-extensions', 'ext', '-out', at('sha1.pem')],
  ]) {
    const run = await runCommand('openssl', args);
    assert.equal(run.code, 0, run.stderr);
  }
  return readFile(at('sha1.pem'), 'utf8');
}
