/**
 * Helpers for the reload tests: certificate directories laid out plainly or
 * as a Kubernetes secret volume (`..data` symlink), the ways operators swap
 * files in them, and calls kept in flight across a reload.
 */
import assert from 'node:assert/strict';
import { on, once } from 'node:events';
import { chmod, mkdir, mkdtemp, readdir, rename, symlink, writeFile } from 'node:fs/promises';
import { request as httpsRequest, type Agent } from 'node:https';
import type { ClientRequest, IncomingMessage } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import { echoClient } from '../../src/demo/grpc-client.js';
import { CHAT_REPLY_WORDS } from '../../src/demo/openai-chat.js';
import { normaliseSerial, type Issued } from '../../src/x509.js';
import type { TlsFiles } from '../../src/config.js';
import { TlsReloader, type TlsReloaderOptions } from '../../src/tls-reload.js';
import { loadTlsMaterialSync } from '../../src/tls-material.js';
import { createLogger } from '../../src/log.js';
import { baseConfig, h2Session, readyStatus, type StartedProxy } from './harness.js';
import type { TestPki } from './pki.js';
import { sseEvents, type GateBoard } from './sse.js';

/** A reloader for a test proxy started on `files`: it starts from what they hold now and logs into the proxy's own capture. */
export function reloaderFor(front: Pick<StartedProxy, 'proxy' | 'logs'>, files: TlsFiles, options: Omit<TlsReloaderOptions, 'files' | 'current' | 'proxy' | 'logger'>): TlsReloader {
  return new TlsReloader({ files, current: loadTlsMaterialSync(files), proxy: front.proxy, logger: createLogger({ level: 'debug', destination: front.logs }), ...options });
}

/**
 * A client of `client` and one of the plain CA connect; `change` rewrites a file and the
 * reload runs: the first connection must close, logged with `subject` and `reason`, and
 * the plain client must be served on. Ends the proxy and the reloader.
 */
export async function closedByReload(pki: TestPki, running: { front: StartedProxy; reloader: TlsReloader }, client: Issued, change: () => Promise<void>, subject: RegExp, reason: string): Promise<void> {
  const { front, reloader } = running;
  const target = h2Session(front.restPort, pki, client);
  const plain = h2Session(front.restPort, pki);
  try {
    assert.equal(await readyStatus(target), 200);
    assert.equal(await readyStatus(plain), 200);
    const closed = once(target, 'close');
    await change();
    const outcome = await reloader.reload('api');
    assert.equal(outcome.ok, true, outcome.ok ? '' : outcome.reason);
    assert.equal(outcome.ok && outcome.revokedConnections, 1);
    await closed;
    const line = await front.logs.waitFor((l) => l.event === 'connection_revoked');
    assert.match(String(line['subject']), subject);
    assert.equal(line['reason'], reason);
    assert.equal(await readyStatus(plain), 200);
  } finally {
    reloader.close();
    target.destroy();
    plain.close();
    await front.proxy.shutdown(1000);
  }
}

export const FILE_NAMES = { cert: 'server.pem', key: 'server.key', clientCa: 'client_cert_ca.pem', crl: 'client_cert_ca.crl' } as const;
export type SetContents = Record<keyof typeof FILE_NAMES, string>;

export interface CertDir {
  dir: string;
  files: TlsFiles;
}

function filesIn(dir: string): TlsFiles {
  return { cert: join(dir, FILE_NAMES.cert), key: join(dir, FILE_NAMES.key), clientCa: join(dir, FILE_NAMES.clientCa), crl: join(dir, FILE_NAMES.crl) };
}

export async function plainCertDir(contents: SetContents): Promise<CertDir> {
  const dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-reload-'));
  await writeSet(dir, contents);
  return { dir, files: filesIn(dir) };
}

/** A certificate directory that is a symlink, as an operator lays out rotations by hand: DIR/certs -> v1/ holding the files. */
export async function symlinkedCertDir(contents: SetContents): Promise<CertDir> {
  const dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-reload-link-'));
  await writeSet(join(dir, 'v1'), contents);
  await symlink('v1', join(dir, 'certs'));
  return { dir, files: filesIn(join(dir, 'certs')) };
}

/** The operator's swap of a symlinkedCertDir: a new directory, then `ln -s VERSION certs_tmp && mv -T certs_tmp certs`. */
export async function symlinkedDirSwap(dir: string, version: string, contents: SetContents): Promise<void> {
  await writeSet(join(dir, version), contents);
  await replaceLinkAtomically(join(dir, 'certs'), version);
}

/** What kubelet mounts: DIR/NAME -> ..data/NAME, ..data -> ..VERSION/ holding the files. */
export async function kubernetesCertDir(contents: SetContents): Promise<CertDir> {
  const dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-reload-k8s-'));
  await writeVersion(dir, 'v1', contents);
  await symlink('..v1', join(dir, '..data'));
  for (const name of Object.values(FILE_NAMES)) await symlink(join('..data', name), join(dir, name));
  return { dir, files: filesIn(dir) };
}

/** Lets any uid enter the directory (and a secret mount's version directories) and read the files: a test may then take some of that away. */
export async function openToAll(certs: CertDir): Promise<CertDir> {
  await chmod(certs.dir, 0o755);
  for (const name of await readdir(certs.dir)) {
    if (name.startsWith('..v')) await chmod(join(certs.dir, name), 0o755);
  }
  for (const path of Object.values(certs.files)) await chmod(path!, 0o644);
  return certs;
}

async function writeVersion(dir: string, version: string, contents: SetContents): Promise<void> {
  await writeSet(join(dir, `..${version}`), contents);
}

/** Writes the set's files into `dir`, made if missing. */
async function writeSet(dir: string, contents: SetContents): Promise<void> {
  await mkdir(dir, { recursive: true });
  for (const role of Object.keys(FILE_NAMES) as (keyof SetContents)[]) await writeFile(join(dir, FILE_NAMES[role]), contents[role]);
}

/** Kubelet's update: a new version directory, then one atomic rename of the `..data` link. */
export async function kubernetesSwap(dir: string, version: string, contents: SetContents): Promise<void> {
  await writeVersion(dir, version, contents);
  await replaceLinkAtomically(join(dir, '..data'), `..${version}`);
}

/** A new link beside `link`, renamed over it: readers find the old target or the new one, never none. */
async function replaceLinkAtomically(link: string, target: string): Promise<void> {
  await symlink(target, `${link}_tmp`);
  await rename(`${link}_tmp`, link);
}

/** Write a temp file, then rename it over the old one: readers see old or new, never half. */
export async function replaceAtomically(path: string, contents: string): Promise<void> {
  await writeFile(`${path}.tmp`, contents);
  await rename(`${path}.tmp`, path);
}

export interface TlsClient {
  ca: string;
  cert: string;
  key: string;
}

/** Serial (normalised hex) of the certificate the server presents to a new handshake. */
export async function servedSerial(port: number, client: TlsClient): Promise<string> {
  const socket = tlsConnect({ host: '127.0.0.1', port, servername: 'localhost', ...client, ALPNProtocols: ['h2'] });
  socket.on('error', () => {});
  await once(socket, 'secureConnect');
  const serial = normaliseSerial(socket.getPeerX509Certificate()!.serialNumber);
  socket.destroy();
  return serial;
}

/** A gRPC bidi stream and an SSE response, both started and mid-way; `finish` completes both and asserts no error. */
export interface InFlight {
  finish(board: GateBoard): Promise<void>;
}

export async function startInFlight(options: { grpcAddress: string; restPort: number; client: TlsClient }): Promise<InFlight> {
  const credentials = grpc.credentials.createSsl(Buffer.from(options.client.ca), Buffer.from(options.client.key), Buffer.from(options.client.cert));
  const echo = echoClient(options.grpcAddress, credentials);
  const call = echo.Bidi();
  const status = once(call, 'status');
  const replies = on(call, 'data');
  call.write({ payload: Buffer.from('before'), count: 1 });
  assert.equal(((await replies.next()).value as [{ count: number }])[0].count, 1);
  const { res } = await postSse(options.restPort, options.client);
  const events = sseEvents(res);
  return {
    async finish(board) {
      call.write({ payload: Buffer.from('after'), count: 2 });
      assert.equal(((await replies.next()).value as [{ count: number }])[0].count, 2);
      call.end();
      const [final] = (await status) as [grpc.StatusObject];
      assert.equal(final.code, grpc.status.OK, final.details);
      echo.close();
      board.openAll();
      let count = 0;
      for await (const event of events) {
        count += 1;
        if (event === 'data: [DONE]') break;
      }
      assert.equal(count, CHAT_REPLY_WORDS.length + 1);
    },
  };
}

/** Starts a streamed chat completion and resolves once its response headers arrive. */
export function postSse(port: number, client: TlsClient, agent: Agent | false = false): Promise<{ req: ClientRequest; res: IncomingMessage }> {
  return new Promise((resolve, reject) => {
    const req = httpsRequest(
      { host: '127.0.0.1', port, method: 'POST', path: '/v3/chat/completions', agent, servername: 'localhost', headers: { 'content-type': 'application/json' }, ...client },
      (res) => resolve({ req, res }),
    );
    req.on('error', reject);
    req.end(JSON.stringify({ model: 'dummy', stream: true }));
  });
}

/** A client process with steady streams of requests (test/helpers/client-processes.ts CommandedClient). */
interface SteadyClient<O> {
  steady(client: string, spec: { method?: string; path: string; body?: string }, workers: number): Promise<{ stop: () => Promise<O> }>;
  close(): void;
}

/**
 * Five reloads of the API of `front` (started on `pki`'s files) while a client process (`start`) sends steady
 * streams of readiness GETs and KServe infers (`inferBody`) from `workers` workers on each of its `clients`: each
 * reload goes through, and every request is answered 200; `failures`: a stream's failed requests, none expected.
 */
export async function reloadsUnderSteadyStreams<O extends { statuses: Record<string, number> }>(
  front: StartedProxy,
  pki: TestPki,
  run: { start: () => Promise<SteadyClient<O>>; clients: readonly string[]; workers: number; inferBody: string; failures: (outcome: O) => unknown[] },
): Promise<void> {
  const reloader = reloaderFor(front, baseConfig({ pki }).tls, { revokedGraceMs: 1000 });
  const client = await run.start();
  try {
    const streams = await Promise.all(run.clients.flatMap((name) => [
      client.steady(name, { path: '/v2/health/ready' }, run.workers),
      client.steady(name, { method: 'POST', path: '/v2/models/dummy/infer', body: run.inferBody }, run.workers),
    ]));
    for (let i = 0; i < 5; i++) {
      const outcome = await reloader.reload('api');
      assert.equal(outcome.ok, true, outcome.ok ? '' : outcome.reason);
    }
    for (const stream of streams) {
      const outcome = await stream.stop();
      assert.deepEqual(run.failures(outcome), []);
      assert.deepEqual(Object.keys(outcome.statuses), ['200']);
    }
  } finally {
    client.close();
    reloader.close();
  }
}
