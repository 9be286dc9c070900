/**
 * `--mtls_workers 2`: the built CLI with two proxy workers behind one set of
 * public ports, in proxy mode and as the OVMS entrypoint (fake OVMS).
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createHash } from 'node:crypto';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import type { ClientHttp2Session } from 'node:http2';
import { createServer, type Server } from 'node:net';
import { createInterface } from 'node:readline';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import * as grpc from '@grpc/grpc-js';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { runCli, startCli, BIN, type LongRunningCli } from './helpers/cli.js';
import { baseConfig, grpcClients, grpcFrame, h2Request, h2Session, https1, startUpstream, LogCapture, type LogLine } from './helpers/harness.js';
import cluster, { type Worker } from 'node:cluster';
import { WorkerPool } from '../src/workers.js';
import { createLogger } from '../src/log.js';
import { loadTlsMaterialSync } from '../src/tls-material.js';
import type { MetricsJson } from '../src/metrics-aggregate.js';
import { httpGet, eventually, settlesWithin, sumOf } from './helpers/ops.js';
import { openRaw } from './helpers/raw-http1.js';
import { GateBoard } from './helpers/sse.js';
import { CHAT_REPLY_WORDS } from '../src/demo/openai-chat.js';
import { plainCertDir, replaceAtomically, servedSerial, type CertDir, type TlsClient } from './helpers/reload.js';
import { FAKE_OVMS, fakeRuns, makeFakeExecutable, processGone, startWrapper, streamAcrossSigterm, tlsArgs } from './helpers/entrypoint.js';
import { freeLoopbackPorts } from '../src/ports.js';
import { unary, type EchoReply } from '../src/demo/grpc-client.js';
import { createCa, createCrl, issueClientCert, issueServerCert, parseCrl, type Issued } from '../src/x509.js';
import type { ModelServer } from '../src/demo/model-server.js';

let pki: TestPki;
let upstream: ModelServer;
let dir: string;

before(async () => {
  makeFakeExecutable();
  [pki, upstream] = await Promise.all([createTestPki(), startUpstream()]);
  dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-workers-'));
});

after(async () => {
  await upstream.close();
  await pki.cleanup();
  await rm(dir, { recursive: true, force: true });
});

// Safety net so a regression fails instead of hanging; nothing asserts on time. It bounds a
// whole suite (each of these takes 80-120 s on a loaded 2-core machine), not one test.
const SAFETY = { timeout: 300_000 };
/** Bounds a wait for a worker's process to start, as the waits for connections to settle here are bounded (60 s). */
const WORKER_START_BOUND_MS = 60_000;

function certFlags(files: { cert: string; key: string; clientCa: string; crl?: string | undefined } = { cert: pki.paths['server.pem']!, key: pki.paths['server.key']!, clientCa: pki.paths['client_cert_ca.pem']! }): string[] {
  return ['--mtls_cert', files.cert, '--mtls_key', files.key, '--mtls_client_ca', files.clientCa, ...(files.crl ? ['--mtls_crl', files.crl] : [])];
}

interface Running {
  cli: LongRunningCli;
  grpcPort: number;
  restPort: number;
  adminPort: number;
}

/** `until`: the log line that says it is up (a worker that never starts holds back `workers_listening`). */
async function startWorkersCli(flags: string[] = certFlags(), options: { env?: NodeJS.ProcessEnv; until?: (l: LogLine) => boolean } = {}): Promise<Running> {
  const [grpcPort, restPort, adminPort] = (await freeLoopbackPorts(3)) as [number, number, number];
  const cli = startCli([
    'proxy', '--mtls_workers', '2', '--port', String(grpcPort), '--grpc_bind_address', '127.0.0.1', '--mtls_grpc_upstream', `127.0.0.1:${upstream.grpcPort}`,
    '--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`,
    '--mtls_admin_port', String(adminPort), ...flags,
  ], { env: options.env ?? {} });
  const until = options.until ?? ((l) => l.event === 'workers_listening');
  await Promise.race([cli.logs.waitFor(until), cli.exited.then((code) => assert.fail(`proxy exited ${code}: ${cli.stderr()}`))]);
  return { cli, grpcPort, restPort, adminPort };
}

async function stop(cli: LongRunningCli): Promise<number | null> {
  if (cli.child.exitCode === null && cli.child.signalCode === null) cli.child.kill('SIGTERM');
  return cli.exited;
}

const workersOf = (lines: LogLine[]) => new Set(lines.map((l) => l['worker']));

const root = process.getuid?.() === 0;

/** Whether `server` could listen on 127.0.0.1:`port` now; it keeps listening if so. */
function bindsNow(server: Server, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const failed = () => resolve(false);
    server.once('error', failed);
    server.listen(port, '127.0.0.1', () => {
      server.off('error', failed);
      resolve(true);
    });
  });
}

/** A port below 1024 that nothing on 127.0.0.1 listens on (root only). */
async function freePrivilegedPort(): Promise<number> {
  for (let port = 1023; port >= 600; port -= 1) {
    const server = createServer();
    if (!(await bindsNow(server, port))) continue;
    await new Promise((resolve) => server.close(resolve));
    return port;
  }
  throw new Error('no free port below 1024 on 127.0.0.1');
}

/** Resolves once `count` lines match: the workers log each finished call after the client has its answer. */
async function linesMatching(logs: LogCapture, count: number, match: (l: LogLine) => boolean): Promise<LogLine[]> {
  for (let seen = 0; seen < count; ) {
    await logs.waitFor((l) => match(l) && logs.lines.filter(match).length > seen);
    seen = logs.lines.filter(match).length;
  }
  return logs.lines.filter(match);
}

/** `calls` REST requests, each on a connection of its own and answered 200: their access lines. */
async function servedCalls(r: Running, calls: number): Promise<LogLine[]> {
  for (let i = 0; i < calls; i += 1) assert.equal((await https1(r.restPort, pki, { path: '/v2/health/ready' })).status, 200);
  return linesMatching(r.cli.logs, calls, (l) => l.event === 'access');
}

/** A TLS connection with the client certificate (kept in `sockets`): 'secure' once a worker completed the handshake, 'closed' if it closed first. */
function handshakeOrClose(port: number, sockets: TLSSocket[]): Promise<'secure' | 'closed'> {
  const socket = tlsConnect({ host: '127.0.0.1', port, ca: pki.serverCa.certPem, cert: pki.client.certPem, key: pki.client.keyPem, servername: 'localhost' });
  sockets.push(socket);
  socket.on('error', () => undefined);
  return new Promise((resolve) => {
    socket.once('secureConnect', () => resolve('secure'));
    socket.once('close', () => resolve('closed'));
  });
}

/** Once the ports are open again, a handshake on `port` succeeds (a new worker took it). */
async function aNewWorkerServes(port: number, sockets: TLSSocket[]): Promise<void> {
  let served = false;
  await eventually(async () => (served = (await handshakeOrClose(port, sockets)) === 'secure'), 'a new worker to serve');
  assert.equal(served, true);
}

/** A raw HTTP/1.1 connection and what came on it; `answer` is all of it once a response has ended, undefined if it closed first. */
interface Tracked {
  readonly socket: TLSSocket;
  text(): string;
  readonly answer: Promise<string | undefined>;
}

/** The end of an SSE stream (its last chunk) or of a JSON answer. */
const ANSWER_END = /(?:data: \[DONE\]\n\n\r\n0\r\n\r\n|"sha256":"[0-9a-f]{64}"\})$/;

function track(socket: TLSSocket): Tracked {
  let text = '';
  const answer = new Promise<string | undefined>((resolve) => {
    socket.on('data', (chunk: Buffer) => {
      text += chunk.toString('latin1');
      if (ANSWER_END.test(text)) resolve(text);
    });
    socket.once('close', () => resolve(undefined));
  });
  return { socket, text: () => text, answer };
}

describe('proxy mode with two workers', SAFETY, () => {
  test('calls on separate connections are served by both workers through one port, and /metrics counts every call once', async () => {
    const r = await startWorkersCli();
    try {
      const calls = 6;
      const lines = await servedCalls(r, calls);
      assert.equal(workersOf(lines).size, 2, 'both workers served calls');
      assert.equal(new Set(lines.map((l) => l['pid'])).size, 2);
      const metrics = (await httpGet(r.adminPort, '/metrics')).body;
      assert.equal(sumOf(metrics, 'ovms_mtls_requests_total'), calls);
      assert.equal(metrics.split('\n').filter((l) => l.startsWith('ovms_mtls_certificate_expiry_timestamp_seconds{role="server"')).length, 1);
      assert.equal(sumOf(metrics, 'ovms_mtls_open_connections'), 0);
      // The service's start, once: prom-client's merge would drop it.
      const started = metrics.split('\n').filter((l) => l.startsWith('ovms_mtls_process_start_time_seconds '));
      assert.equal(started.length, 1);
      assert.ok(Math.abs(Number(started[0]!.split(' ')[1]) - Date.now() / 1000) < 3600);
      assert.equal((await httpGet(r.adminPort, '/readyz')).status, 200);
    } finally {
      assert.equal(await stop(r.cli), 0, r.cli.stderr());
    }
  });

  test('SIGTERM with a gRPC stream in flight: every worker drains, the stream finishes, and the proxy exits 0', async () => {
    const r = await startWorkersCli();
    const clients = grpcClients(`localhost:${r.grpcPort}`, pki);
    try {
      const bidi = clients.echo.Bidi();
      const replies = bidi[Symbol.asyncIterator]();
      bidi.write({ payload: Buffer.from('before') });
      assert.equal(((await replies.next()).value as EchoReply).payload.toString(), 'before');
      r.cli.child.kill('SIGTERM');
      await linesMatching(r.cli.logs, 2, (l) => l.event === 'worker_draining');
      bidi.write({ payload: Buffer.from('during drain') });
      assert.equal(((await replies.next()).value as EchoReply).payload.toString(), 'during drain');
      const status = once(bidi, 'status') as Promise<[grpc.StatusObject]>;
      bidi.end();
      assert.equal((await replies.next()).done, true);
      assert.equal((await status)[0].code, grpc.status.OK);
      assert.equal(await r.cli.exited, 0, r.cli.stderr());
      assert.equal(r.cli.logs.lines.filter((l) => l.event === 'worker_exited').length, 0, 'no worker was replaced during shutdown');
    } finally {
      clients.close();
      await stop(r.cli);
    }
  });

  test('a worker killed with SIGKILL is replaced while the port keeps serving', async () => {
    const r = await startWorkersCli();
    try {
      const started = await r.cli.logs.waitFor((l) => l.event === 'workers_listening');
      const [victim] = started['pids'] as number[];
      process.kill(victim!, 'SIGKILL');
      const exited = await r.cli.logs.waitFor((l) => l.event === 'worker_exited');
      assert.equal(exited['pid'], victim);
      assert.equal(exited['signal'], 'SIGKILL');
      const replacement = await r.cli.logs.waitFor((l) => l.event === 'listening' && Number(l['worker']) > 2);
      assert.notEqual(replacement['pid'], victim);
      for (let i = 0; i < 4; i += 1) assert.equal((await https1(r.restPort, pki, { path: '/v2/health/live' })).status, 200);
      const served = await linesMatching(r.cli.logs, 4, (l) => l.event === 'access');
      assert.ok(served.every((l) => l['pid'] !== victim));
    } finally {
      assert.equal(await stop(r.cli), 0, r.cli.stderr());
    }
  });

  // Node's round-robin hands a connection to the stopped worker and waits for its answer; it never comes. Unfixed, the
  // primary held that connection open for ever once the worker was killed: the client waited, and an fd leaked each time.
  test('a worker killed before it took the connection it was handed (stopped, then killed): the other worker serves that connection, not the primary holding it for ever', async () => {
    const r = await startWorkersCli();
    const sockets: TLSSocket[] = [];
    const [victim] = (await r.cli.logs.waitFor((l) => l.event === 'workers_listening'))['pids'] as number[];
    try {
      process.kill(victim!, 'SIGSTOP');
      const states: ('secure' | 'closed' | undefined)[] = [];
      const handshakes = [r.restPort, r.grpcPort].flatMap((port) => [0, 1, 2].map(() => handshakeOrClose(port, sockets))).map((h, i) => h.then((state) => (states[i] = state)));
      // Of each port's three, the stopped worker was handed one (it was free) and the other worker took the others.
      await eventually(() => states.filter((state) => state === 'secure').length === 4, 'two handshakes on each port');
      const untaken = handshakes.filter((_h, i) => states[i] === undefined);
      assert.equal(untaken.length, 2, 'one connection per port waits on the stopped worker');
      process.kill(victim!, 'SIGKILL');
      const exited = await lineSoon(r.cli.logs, (l) => l.event === 'worker_exited', 'a worker_exited line');
      assert.equal(exited['pid'], victim);
      const outcomes = await settlesWithin(Promise.all(untaken), 60_000, 'the connections handed to the killed worker to be served');
      assert.deepEqual(outcomes, ['secure', 'secure']);
      assert.equal(exited['untakenConnections'], 2);
      assert.equal(exited['untakenClosed'], undefined);
      assert.match(String(exited['msg']), /2 connections handed to it that it had not taken yet went to another worker/);
    } finally {
      for (const socket of sockets) socket.destroy();
      killIfAlive(victim);
      assert.equal(await stop(r.cli), 0, r.cli.stderr());
    }
  });

  // Node closes a port's listener and queue when its last worker leaves; a connection given back then would wait for ever.
  test('both workers killed before they took the connections they were handed: every one is closed, none waits, and new workers serve', async () => {
    const r = await startWorkersCli();
    const sockets: TLSSocket[] = [];
    const pids = (await r.cli.logs.waitFor((l) => l.event === 'workers_listening'))['pids'] as number[];
    try {
      for (const pid of pids) process.kill(pid, 'SIGSTOP');
      const primaryFds = () => readdirSync(`/proc/${r.cli.child.pid}/fd`).length;
      const before = primaryFds();
      // Of each port's three, each stopped worker is handed one and the third waits in Node's queue.
      const handshakes = [r.restPort, r.grpcPort].flatMap((port) => [0, 1, 2].map(() => handshakeOrClose(port, sockets)));
      await eventually(() => primaryFds() >= before + 6, 'the primary to accept the six connections');
      for (const pid of pids) process.kill(pid, 'SIGKILL');
      const outcomes = await settlesWithin(Promise.all(handshakes), 60_000, 'the connections handed to the killed workers to close');
      assert.deepEqual(outcomes, Array(6).fill('closed'));
      const exits = () => r.cli.logs.lines.filter((l) => l.event === 'worker_exited');
      await eventually(() => exits().length === 2, 'two worker_exited lines');
      const untaken = exits().map((l) => ({ all: Number(l['untakenConnections'] ?? 0), closed: Number(l['untakenClosed'] ?? 0) }));
      assert.equal(untaken[0]!.all + untaken[1]!.all, 4, 'each worker was handed one connection per port');
      assert.equal(untaken[1]!.closed, 2, 'the last worker to go closed its two: no worker was left to serve them');
      await lineSoon(r.cli.logs, (l) => l.event === 'listening' && Number(l['worker']) > 2, 'a new worker listening');
      await aNewWorkerServes(r.grpcPort, sockets);
    } finally {
      for (const socket of sockets) socket.destroy();
      for (const pid of pids) killIfAlive(pid);
      assert.equal(await stop(r.cli), 0, r.cli.stderr());
    }
  });

  // The primary stopped while the worker dies: once it runs again, it reads the end of the worker's channel before the
  // worker's exit, and a connection is accepted in between. Node hands it to the dead worker, which was free on that
  // port, finds the channel closed and drops it unclosed: its client waited for ever. It must go to the other worker.
  test('a connection accepted between the end of a dead worker\'s channel and its exit goes to another worker, not dropped unclosed', async () => {
    const r = await startWorkersCli();
    const sockets: TLSSocket[] = [];
    const primary = r.cli.child.pid!;
    const seen = new Set<LogLine>();
    const [victim] = (await r.cli.logs.waitFor((l) => l.event === 'workers_listening'))['pids'] as number[];
    try {
      // Round-robin hands a connection to the first free worker, and a worker that took one goes last: after a gRPC call the
      // other worker served, the victim comes first on that port.
      for (let served = false; !served; ) {
        const session = h2Session(r.grpcPort, pki);
        await h2Request(session, { ':method': 'POST', ':path': '/inference.GRPCInferenceService/ServerLive', 'content-type': 'application/grpc', te: 'trailers' }, grpcFrame(Buffer.alloc(0)));
        session.close();
        const line = await r.cli.logs.waitFor((l) => l.event === 'access' && l['listener'] === 'grpc' && !seen.has(l));
        seen.add(line);
        served = line['pid'] !== victim;
      }
      process.kill(victim!, 'SIGSTOP');
      // A REST connection waits on the stopped worker (its channel holds a socket not yet received); on gRPC it is free.
      const states: ('secure' | 'closed' | undefined)[] = [];
      const rest = [0, 1, 2].map(() => handshakeOrClose(r.restPort, sockets)).map((h, i) => h.then((state) => (states[i] = state)));
      await eventually(() => states.filter((state) => state === 'secure').length === 2, 'two REST handshakes');
      const untaken = rest.find((_h, i) => states[i] === undefined)!;
      process.kill(primary, 'SIGSTOP');
      process.kill(victim!, 'SIGKILL');
      await eventually(() => processGone(victim!), 'the worker to be gone');
      const grpcSocket = tlsConnect({ host: '127.0.0.1', port: r.grpcPort, ca: pki.serverCa.certPem, cert: pki.client.certPem, key: pki.client.keyPem, servername: 'localhost', ALPNProtocols: ['h2'] });
      sockets.push(grpcSocket);
      grpcSocket.on('error', () => undefined);
      const grpcHandshake = new Promise<string>((resolve) => {
        grpcSocket.once('secureConnect', () => resolve('secure'));
        grpcSocket.once('close', () => resolve('closed'));
      });
      await once(grpcSocket, 'connect');
      process.kill(primary, 'SIGCONT');
      assert.equal(await settlesWithin(grpcHandshake, 60_000, 'the gRPC connection accepted as the worker died'), 'secure');
      assert.equal(await settlesWithin(untaken, 60_000, 'the REST connection handed to the dead worker'), 'secure', 'given to the other worker');
      await lineSoon(r.cli.logs, (l) => l.event === 'listening' && Number(l['worker']) > 2, 'a new worker listening');
    } finally {
      killIfAlive(victim);
      process.kill(primary, 'SIGCONT');
      for (const socket of sockets) socket.destroy();
      assert.equal(await stop(r.cli), 0, r.cli.stderr());
    }
  });

  /**
   * Starts the proxy on a CRL of `issuer` (after the set's own) that lapses once it serves. The CRL's
   * life is a guess at how long a start takes: a start slower than it (a loaded machine took over 6 s)
   * is refused for the lapsed CRL, and the proxy is started again on a CRL that lives longer.
   */
  async function startBeforeCrlLapses(issuer: Awaited<ReturnType<typeof createCa>>, path: string, flags: (crl: string) => string[]): Promise<{ r: Running; lapsing: string }> {
    const lives = [6_000, 20_000, 60_000];
    for (const lifeMs of lives) {
      const lapsing = await createCrl({ issuer, nextUpdate: new Date(Date.now() + lifeMs) });
      await writeFile(path, pki.crlPem + lapsing);
      try {
        return { r: await startWorkersCli(flags(path)), lapsing };
      } catch (err) {
        if (lifeMs === lives.at(-1) || !/CRL #2 expired on/.test(String(err))) throw err;
      }
    }
    throw new Error('not reached: the last start either served or threw');
  }

  // The running workers serve a set whose CRL of a second CA has lapsed (only that CA's clients are refused);
  // the worker started in place of one that exits judged the primary's set at its own moment and failed, for ever.
  test('a worker replaced after a CRL of the set in force passed its next update starts on that set and serves', async () => {
    const partnerCa = await createCa({ commonName: 'ovms-mtls test partner CA' });
    const [bundle, crls] = [join(dir, 'partner_bundle.pem'), join(dir, 'partner_bundle.crl')];
    await writeFile(bundle, pki.clientCa.certPem + partnerCa.certPem);
    const { r, lapsing } = await startBeforeCrlLapses(partnerCa, crls, (crl) => certFlags({ cert: pki.paths['server.pem']!, key: pki.paths['server.key']!, clientCa: bundle, crl }));
    try {
      const [victim] = (await r.cli.logs.waitFor((l) => l.event === 'workers_listening'))['pids'] as number[];
      // A wait for the moment, not a timed assertion.
      await sleep(Math.max(0, parseCrl(lapsing).nextUpdate!.getTime() - Date.now()) + 1500);
      process.kill(victim!, 'SIGKILL');
      const next = await r.cli.logs.waitFor((l) => (l.event === 'listening' && Number(l['worker']) > 2) || l.event === 'worker_start_failed');
      assert.equal(next.event, 'listening', next.msg);
      for (let i = 0; i < 4; i += 1) assert.equal((await https1(r.restPort, pki, { path: '/v2/health/live' })).status, 200);
    } finally {
      assert.equal(await stop(r.cli), 0, r.cli.stderr());
    }
  });

  test('a worker that exits takes none of its counts away: /metrics totals stay where they were once it is replaced', async () => {
    const r = await startWorkersCli();
    try {
      const calls = 6;
      const lines = await servedCalls(r, calls);
      const [victim] = (await r.cli.logs.waitFor((l) => l.event === 'workers_listening'))['pids'] as number[];
      assert.ok(lines.some((l) => l['pid'] === victim), 'the worker to be killed served calls');
      const before = (await httpGet(r.adminPort, '/metrics')).body;
      assert.equal(sumOf(before, 'ovms_mtls_requests_total'), calls);
      process.kill(victim!, 'SIGKILL');
      await r.cli.logs.waitFor((l) => l.event === 'worker_exited');
      await r.cli.logs.waitFor((l) => l.event === 'listening' && Number(l['worker']) > 2);
      const after = (await httpGet(r.adminPort, '/metrics')).body;
      for (const counter of ['ovms_mtls_requests_total', 'ovms_mtls_connections_total', 'ovms_mtls_handshakes_total', 'ovms_mtls_request_duration_seconds_count']) {
        assert.equal(sumOf(after, counter), sumOf(before, counter), counter);
      }
      assert.equal(sumOf(after, 'ovms_mtls_open_connections'), 0, 'gauges count only the living');
    } finally {
      assert.equal(await stop(r.cli), 0, r.cli.stderr());
    }
  });

  test('every worker killed at once and the port taken before a new one listens: the proxy exits 70 with one line saying why, not replacing workers for ever', async () => {
    const r = await startWorkersCli();
    const squatter = createServer();
    try {
      const pids = (await r.cli.logs.waitFor((l) => l.event === 'workers_listening'))['pids'] as number[];
      for (const pid of pids) process.kill(pid, 'SIGKILL');
      // The port closes with the last worker (node:cluster); another process takes it before a new worker listens.
      await eventually(() => bindsNow(squatter, r.restPort), 'the REST port to close with the last worker');
      await eventually(() => r.cli.child.exitCode !== null, 'the proxy to exit', 60_000);
      assert.equal(r.cli.child.exitCode, 70, r.cli.stderr());
      const failed = r.cli.logs.lines.filter((l) => l.event === 'proxy_failed');
      assert.equal(failed.length, 1);
      assert.match(String(failed[0]!['reason']), /^every worker exited, .*cannot listen on 127\.0\.0\.1:\d+: .*in use/);
    } finally {
      squatter.close();
      await stop(r.cli);
    }
  });

  // Every worker fails the bind and exits 1 in the stop that follows: each was logged as a worker_exited error whose
  // calls "were cut", before the one line that says what is wrong.
  test('a port in use with 4 workers is the one line on stderr and exit 2: no worker_exited line about calls cut', async () => {
    const squatter = createServer();
    const [busy] = (await freeLoopbackPorts(1)) as [number];
    assert.ok(await bindsNow(squatter, busy));
    try {
      const run = await runCli(['proxy', '--mtls_workers', '4', '--rest_port', String(busy), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`, ...certFlags()]);
      assert.equal(run.code, 2, run.stderr);
      assert.equal(run.stderr, `ovms-mtls: --rest_port ${busy}: cannot listen on 127.0.0.1:${busy}: the port is already in use (stop what uses it or pick another port)\n`);
      assert.doesNotMatch(run.stdout, /worker_exited/);
    } finally {
      squatter.close();
    }
  });

  test("a terminal's Ctrl-C (SIGINT to the whole process group) drains every worker and exits 0", async () => {
    const [restPort] = (await freeLoopbackPorts(1)) as [number];
    const child = spawn(process.execPath, [BIN, 'proxy', '--mtls_workers', '2', '--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`, ...certFlags()], {
      detached: true,
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const logs = new LogCapture();
    createInterface({ input: child.stdout! }).on('line', (line) => line.startsWith('{') && logs.write(line));
    const exited = once(child, 'exit');
    try {
      await logs.waitFor((l) => l.event === 'workers_listening');
      process.kill(-child.pid!, 'SIGINT');
      assert.deepEqual(await exited, [0, null]);
      assert.equal(logs.lines.filter((l) => l.event === 'worker_draining').length, 2);
      assert.equal(logs.lines.filter((l) => l.event === 'worker_exited').length, 0);
    } finally {
      if (child.exitCode === null) process.kill(-child.pid!, 'SIGKILL');
    }
  });
});

const STALL_WORKER = fileURLToPath(new URL('./fixtures/stall-worker.js', import.meta.url));

/** test/fixtures/stall-worker preloaded into the primary and every worker, with its settings. */
function stallEnv(settings: { stall?: string; workers?: readonly number[]; crash?: string }): NodeJS.ProcessEnv {
  return { NODE_OPTIONS: `--import=${STALL_WORKER}`, STALL_PATH: settings.stall, STALL_WORKERS: settings.workers?.join(','), CRASH_PATH: settings.crash };
}

/** The pid a stalled worker wrote as it blocked (test/fixtures/stall-worker). */
async function stalledPid(stall: string, worker: number): Promise<number> {
  const file = `${stall}.worker-${worker}`;
  // A worker blocking from its start writes it once it has started: a process start.
  await eventually(() => existsSync(file), `worker ${worker} to block`, WORKER_START_BOUND_MS);
  return Number(readFileSync(file, 'utf8'));
}

interface StallRun {
  readonly r: Running;
  /** test/fixtures/stall-worker's STALL_PATH: the chosen workers block while it exists. */
  readonly stall: string;
  /** The pid of the worker the test stopped or stalled, to be killed at the end whatever the proxy did. */
  stuck(pid: number): number;
}

/** Two workers under test/fixtures/stall-worker, `workers` blocking while the file exists (created first if `fromStart`); nothing outlives `body`. */
async function withStallingWorkers(options: { name: string; workers: readonly number[]; fromStart: boolean; until?: (l: LogLine) => boolean }, body: (run: StallRun) => Promise<void>): Promise<void> {
  const stall = join(dir, options.name);
  if (options.fromStart) await writeFile(stall, '');
  const r = await startWorkersCli([...certFlags(), '--mtls_shutdown_timeout', '1'], { env: stallEnv({ stall, workers: options.workers }), until: options.until });
  let stuck: number | undefined;
  try {
    await body({ r, stall, stuck: (pid) => (stuck = pid) });
  } finally {
    killIfAlive(stuck);
    await rm(stall, { force: true });
    await stop(r.cli);
  }
}

function killIfAlive(pid: number | undefined): void {
  try {
    if (pid !== undefined) process.kill(pid, 'SIGKILL');
  } catch {
    // Gone already: the proxy killed it.
  }
}

/**
 * A line that must come soon: waited for a bounded time, so that a test missing it fails and stops its children.
 * Often it is a new worker's `listening`: a process start, which takes seconds when the machine is loaded (2.5 s
 * only to load the program at a load of 7 on 2 cores), so the bound is WORKER_START_BOUND_MS, not eventually()'s 20 s.
 */
async function lineSoon(logs: LogCapture, match: (l: LogLine) => boolean, what: string): Promise<LogLine> {
  await eventually(() => logs.lines.some(match), what, WORKER_START_BOUND_MS);
  return logs.lines.find(match)!;
}

/** The proxy or the entrypoint, as sigtermKillsOnly sees it. */
interface Primary {
  readonly child: ChildProcess;
  lines(): readonly LogLine[];
  stderr(): string;
}

const primaryOf = (r: Running): Primary => ({ child: r.cli.child, lines: () => r.cli.logs.lines, stderr: r.cli.stderr });

/** SIGTERM: the process exits 0 (waited for a bounded time), having killed the stuck worker and no other, with a line naming it. */
async function sigtermKillsOnly(primary: Primary, stuck: number): Promise<void> {
  const { child } = primary;
  child.kill('SIGTERM');
  await eventually(() => child.exitCode !== null || child.signalCode !== null, 'the process to exit after SIGTERM', 60_000);
  assert.equal(child.exitCode, 0, primary.stderr());
  assert.deepEqual(primary.lines().filter((l) => l.event === 'worker_killed').map((l) => l['pid']), [stuck]);
}

describe('a primary killed with SIGKILL (the out-of-memory killer, the grace period of docker stop run out)', SAFETY, () => {
  test('a worker that still had a scrape to answer exits at the disconnect, and writes no stack trace to the log', async () => {
    const r = await startWorkersCli();
    const [victim] = (await r.cli.logs.waitFor((l) => l.event === 'workers_listening'))['pids'] as [number];
    // The workers share its stdout and stderr: they close once every worker is gone too.
    const closed = once(r.cli.child, 'close');
    try {
      // Stopped, the worker reads the scrape's request only once continued, when the primary is gone.
      process.kill(victim, 'SIGSTOP');
      assert.equal((await httpGet(r.adminPort, '/metrics')).status, 200);
      r.cli.child.kill('SIGKILL');
      await r.cli.exited;
      process.kill(victim, 'SIGCONT');
      await eventually(() => processGone(victim), `worker ${victim} to exit`);
      await closed;
      assert.equal(r.cli.stderr(), '');
    } finally {
      if (!processGone(victim)) process.kill(victim, 'SIGKILL');
      await stop(r.cli);
    }
  });
});

/** A bidi stream on one worker, then SIGTERM: resolves once the other worker, with nothing to drain, has exited. */
async function drainHoldingStream(r: Running, clients: ReturnType<typeof grpcClients>) {
  const bidi = clients.echo.Bidi();
  const replies = bidi[Symbol.asyncIterator]();
  bidi.write({ payload: Buffer.from('held') });
  await replies.next();
  const pids = (await r.cli.logs.waitFor((l) => l.event === 'workers_listening'))['pids'] as number[];
  r.cli.child.kill('SIGTERM');
  await eventually(() => pids.some(processGone), 'the worker without the stream to exit');
  return { bidi, replies, pids };
}

// Apart: under load the suite above takes most of its SAFETY time already.
describe('proxy mode with two workers, at shutdown', SAFETY, () => {
  test('SIGTERM: the calls a worker served stay in /metrics once it has drained and exited, while the other still drains a stream', async () => {
    const r = await startWorkersCli();
    const clients = grpcClients(`localhost:${r.grpcPort}`, pki);
    try {
      // Never scraped before the drain: all that /metrics knows of them is what each worker hands over.
      const calls = 6;
      assert.equal(workersOf(await servedCalls(r, calls)).size, 2, 'both workers served calls');
      const { bidi, replies } = await drainHoldingStream(r, clients);
      const during = await httpGet(r.adminPort, '/metrics');
      assert.equal(sumOf(during.body, 'ovms_mtls_requests_total'), calls);
      bidi.end();
      assert.equal((await replies.next()).done, true);
      assert.equal(await r.cli.exited, 0, r.cli.stderr());
    } finally {
      clients.close();
      await stop(r.cli);
    }
  });

  test('a worker killed (SIGKILL) in the middle of its drain is named in a worker_exited line, and not replaced', async () => {
    const r = await startWorkersCli();
    const clients = grpcClients(`localhost:${r.grpcPort}`, pki);
    try {
      const { bidi, pids } = await drainHoldingStream(r, clients);
      const ended = new Promise<grpc.ServiceError>((resolve) => bidi.on('error', resolve));
      const holder = pids.find((pid) => !processGone(pid))!;
      process.kill(holder, 'SIGKILL');
      // grpc-js names a connection that went away UNAVAILABLE, or INTERNAL "Received RST_STREAM with code 2" where Node's
      // client closed the stream (INTERNAL_ERROR) before it saw the socket's error: once in a loaded run. Either way the call ended.
      const { code, details } = await ended;
      assert.ok(code === grpc.status.UNAVAILABLE || (code === grpc.status.INTERNAL && /^Received RST_STREAM with code 2\b/.test(details)), `${code} ${details}`);
      assert.equal(await r.cli.exited, 0, r.cli.stderr());
      const exited = r.cli.logs.lines.filter((l) => l.event === 'worker_exited');
      assert.deepEqual(exited.map((l) => [l['pid'], l['signal'], l['restartInMs']]), [[holder, 'SIGKILL', undefined]]);
      assert.equal(r.cli.logs.lines.filter((l) => l.event === 'listening' && l['worker'] === 3).length, 0, 'no worker started in its place');
    } finally {
      clients.close();
      await stop(r.cli);
    }
  });
});

describe('a worker that stops making progress without exiting', SAFETY, () => {
  for (const how of ['SIGSTOP', 'a blocked event loop'] as const) {
    test(`${how}: /metrics answers, naming it once until it answers again; SIGHUP is not held up; SIGTERM kills it with a line naming it and exits 0`, () =>
      withStallingWorkers({ name: `stall-${how === 'SIGSTOP' ? 'stop' : 'loop'}`, workers: [1], fromStart: false }, async ({ r, stall, stuck }) => {
        await servedCalls(r, 4);
        const before = (await httpGet(r.adminPort, '/metrics')).body;
        const victim = stuck(((await r.cli.logs.waitFor((l) => l.event === 'workers_listening'))['pids'] as number[])[0]!);
        const stallIt = async () => {
          if (how === 'SIGSTOP') return process.kill(victim, 'SIGSTOP');
          await writeFile(stall, '');
          assert.equal(await stalledPid(stall, 1), victim);
        };
        const resumeIt = async () => {
          if (how === 'SIGSTOP') return process.kill(victim, 'SIGCONT');
          await rm(`${stall}.worker-1`);
          await rm(stall);
        };
        await stallIt();
        const during = await httpGet(r.adminPort, '/metrics');
        assert.equal(during.status, 200);
        assert.equal(sumOf(during.body, 'ovms_mtls_requests_total'), sumOf(before, 'ovms_mtls_requests_total'), "the stalled worker's counts as last scraped");
        const named = await lineSoon(r.cli.logs, (l) => l.event === 'worker_unresponsive', 'a worker_unresponsive line');
        assert.equal(named['pid'], victim);
        assert.equal((await httpGet(r.adminPort, '/metrics')).status, 200);
        assert.equal(r.cli.logs.lines.filter((l) => l.event === 'worker_unresponsive').length, 1, 'said once while it stays stuck');
        assert.equal((await httpGet(r.adminPort, '/healthz')).status, 200);
        assert.equal((await httpGet(r.adminPort, '/readyz')).status, 200);

        r.cli.child.kill('SIGHUP');
        assert.equal((await r.cli.logs.waitFor((l) => l.event === 'reloaded' && l['worker'] === undefined)).trigger, 'signal');
        const workerLine = await r.cli.logs.waitFor((l) => l.event === 'reloaded' && l['worker'] !== undefined && l['pid'] !== victim);
        assert.equal(workerLine.trigger, 'primary', 'a worker says whose order it reloaded on');

        await resumeIt();
        // Scrapes until one finds it answering: the first may come before it has caught up.
        const answering = (l: LogLine) => l.event === 'worker_answering';
        await eventually(async () => (await httpGet(r.adminPort, '/metrics')).status === 200 && r.cli.logs.lines.some(answering), 'a worker_answering line');
        assert.equal(r.cli.logs.lines.find(answering)!['pid'], victim);
        await stallIt();
        await sigtermKillsOnly(primaryOf(r), victim);
      }));
  }

  test('every worker stuck: /readyz answers 503 naming them within a few pings, not 200 while each client waits, and 200 once they answer again', () =>
    withStallingWorkers({ name: 'stall-all', workers: [1, 2], fromStart: false }, async ({ r, stall }) => {
      assert.equal((await httpGet(r.adminPort, '/readyz')).status, 200);
      await writeFile(stall, '');
      await Promise.all([stalledPid(stall, 1), stalledPid(stall, 2)]);
      // Pinged every 5 s: unready once a ping has gone unanswered, waited for a bounded time.
      await eventually(async () => (await httpGet(r.adminPort, '/readyz')).status === 503, '/readyz to answer 503', 60_000);
      assert.match((await httpGet(r.adminPort, '/readyz')).body, /2 of 2 workers listening, 2 answering no ping/);
      await rm(stall);
      await eventually(async () => (await httpGet(r.adminPort, '/readyz')).status === 200, '/readyz to answer 200 again', 60_000);
    }));

  test('a worker stuck in its start does not hold SIGTERM up: the proxy drains the other, kills it with a line naming it, and exits 0', () =>
    withStallingWorkers({ name: 'stall-start', workers: [2], fromStart: true, until: (l) => l.event === 'listening' && l['worker'] === 1 }, async ({ r, stall, stuck }) => {
      await sigtermKillsOnly(primaryOf(r), stuck(await stalledPid(stall, 2)));
      assert.equal(r.cli.logs.lines.filter((l) => l.event === 'worker_draining').length, 1, 'the worker that listened drained');
    }));

  test('a worker killed in its start (the out-of-memory killer) ends the run in one line naming it, exit 70, no stack trace', () =>
    withStallingWorkers({ name: 'killed-start', workers: [2], fromStart: true, until: (l) => l.event === 'listening' && l['worker'] === 1 }, async ({ r, stall }) => {
      const pid = await stalledPid(stall, 2);
      process.kill(pid, 'SIGKILL');
      await eventually(() => r.cli.child.exitCode !== null || r.cli.child.signalCode !== null, 'the proxy to exit', 60_000);
      assert.equal(r.cli.child.exitCode, 70, r.cli.stderr());
      assert.equal(r.cli.stderr(), `ovms-mtls: worker 2 (pid ${pid}) exited (SIGKILL) before it listened (killed from outside: the out-of-memory killer, or a kill -9?)\n`);
    }));

  test('a replacement stuck in its start at SIGTERM is killed and named, and no error says a worker failed to start', () =>
    withStallingWorkers({ name: 'stall-replacement', workers: [3], fromStart: true }, async ({ r, stall, stuck }) => {
      const [first] = (await r.cli.logs.waitFor((l) => l.event === 'workers_listening'))['pids'] as number[];
      process.kill(first!, 'SIGKILL');
      await sigtermKillsOnly(primaryOf(r), stuck(await stalledPid(stall, 3)));
      assert.deepEqual(r.cli.logs.lines.filter((l) => l.event === 'worker_start_failed'), []);
    }));

  test('workers that exit right after they start listening are replaced with a growing delay, not in a loop', async () => {
    const crash = join(dir, 'crash');
    const r = await startWorkersCli(certFlags(), { env: stallEnv({ crash }) });
    try {
      await writeFile(crash, '');
      const [victim] = (await r.cli.logs.waitFor((l) => l.event === 'workers_listening'))['pids'] as number[];
      process.kill(victim!, 'SIGKILL');
      // Five exits take long enough for the other worker to have served 10 s: its doing well must not reset the delay.
      await linesMatching(r.cli.logs, 4, (l) => l.event === 'worker_exited' && l['code'] === 3);
      const delays = r.cli.logs.lines.filter((l) => l.event === 'worker_exited').map((l) => l['restartInMs'] as number);
      assert.deepEqual(delays.slice(0, 5), [500, 1000, 2000, 4000, 8000]);
      // One early exit (an OOM kill after a start) is said as one; it read "workers keep exiting soon after they start".
      const messages = r.cli.logs.lines.filter((l) => l.event === 'worker_exited').map((l) => l['msg'] as string);
      assert.match(messages[0]!, /: starting a new one in 0\.5 s \(it exited within 10 s of listening\)$/);
      assert.match(messages[1]!, /: starting a new one in 1 s \(2 workers in a row exited within 10 s of listening\)$/);
    } finally {
      await rm(crash, { force: true });
      assert.equal(await stop(r.cli), 0, r.cli.stderr());
    }
  });
});

/**
 * cluster.fork() throws, rather than emitting 'error', for the spawn errors Node does not expect (all but EACCES, EAGAIN,
 * EMFILE, ENFILE, ENOENT): E2BIG here, an environment larger than the kernel passes to a new program (a quarter of the
 * stack limit). The proxy starts with 800 KB of environment under the usual 8 MiB stack limit (2 MiB allowed), and
 * `prlimit --pid` then lowers its stack limit to 2 MiB (512 KiB allowed), which the workers it forks inherit.
 */
describe('a worker the kernel will not start (fork throws: spawn E2BIG)', SAFETY, () => {
  const PADDED_ENV = Object.fromEntries(Array.from({ length: 8 }, (_, i) => [`TEST_PAD_${i}`, 'x'.repeat(100_000)]));
  const LOW_STACK = String(2 * 1024 * 1024);
  const E2BIG_HINT = ' (the environment is more than the kernel passes to a new program: a quarter of the stack limit, ulimit -s, in all, 128 KiB for each variable)';

  function stackLimit(pid: number, soft: string): void {
    const set = spawnSync('prlimit', ['--pid', String(pid), `--stack=${soft}:`], { encoding: 'utf8' });
    assert.equal(set.status, 0, set.stderr);
  }

  const softStackLimit = (pid: number) => spawnSync('prlimit', ['--pid', String(pid), '--stack', '--raw', '--noheadings', '--output', 'SOFT'], { encoding: 'utf8' }).stdout.trim();

  test('at the start: one line saying a new worker could not be started and why, exit 70, no stack trace', async () => {
    const hold = join(dir, 'hold-primary');
    await writeFile(hold, '');
    const [grpcPort] = (await freeLoopbackPorts(1)) as [number];
    const cli = startCli(['proxy', '--mtls_workers', '2', '--port', String(grpcPort), '--grpc_bind_address', '127.0.0.1', '--mtls_grpc_upstream', `127.0.0.1:${upstream.grpcPort}`, ...certFlags()], {
      env: { ...PADDED_ENV, NODE_OPTIONS: `--import=${STALL_WORKER}`, HOLD_PRIMARY_PATH: hold },
    });
    try {
      await eventually(() => existsSync(`${hold}.primary`), 'the primary to hold before its first line');
      stackLimit(Number(readFileSync(`${hold}.primary`, 'utf8')), LOW_STACK);
      await rm(hold);
      assert.equal(await cli.exited, 70, cli.stderr());
      assert.equal(cli.stderr(), `ovms-mtls: a new worker could not be started: spawn E2BIG${E2BIG_HINT}\n`);
      assert.deepEqual(cli.logs.lines.filter((l) => l.event === 'listening'), []);
    } finally {
      await rm(hold, { force: true });
      await stop(cli);
    }
  });

  test('after the start: a worker that exits is not replaced while fork throws, each try a worker_start_failed line with a growing delay; once it can be, it is, and the port serves on', async () => {
    const r = await startWorkersCli(certFlags(), { env: PADDED_ENV });
    try {
      const primary = r.cli.child.pid!;
      const usual = softStackLimit(primary);
      const [victim] = (await r.cli.logs.waitFor((l) => l.event === 'workers_listening'))['pids'] as number[];
      stackLimit(primary, LOW_STACK);
      process.kill(victim!, 'SIGKILL');
      const failed = await linesMatching(r.cli.logs, 2, (l) => l.event === 'worker_start_failed');
      assert.deepEqual(failed.slice(0, 2).map((l) => l['reason']), Array(2).fill(`a new worker could not be started: spawn E2BIG${E2BIG_HINT}`));
      const [first, second] = failed.map((l) => l['restartInMs'] as number);
      assert.ok(second! > first!, `a growing delay: ${first} ms, then ${second} ms`);
      assert.equal((await https1(r.restPort, pki, { path: '/v2/health/ready' })).status, 200, 'the other worker serves meanwhile');
      stackLimit(primary, usual);
      const replaced = await r.cli.logs.waitFor((l) => l.event === 'listening' && (l['worker'] as number) > 2);
      assert.notEqual(replaced['pid'], victim);
      assert.equal((await https1(r.restPort, pki, { path: '/v2/health/ready' })).status, 200);
    } finally {
      assert.equal(await stop(r.cli), 0, r.cli.stderr());
    }
    assert.doesNotMatch(r.cli.stderr(), /\n\s+at /, 'no stack trace');
  });
});

// Apart: it waits a minute of unanswered pings, more than the suite above has to spare under load.
describe('a listening worker stuck for good', SAFETY, () => {
  test('a listening worker stuck for good is killed with a worker_hung line naming it and replaced: the port serves on, counters never fall, SIGTERM exits 0', () =>
    withStallingWorkers({ name: 'stall-hung', workers: [1], fromStart: false }, async ({ r, stall, stuck }) => {
      await servedCalls(r, 4);
      const before = sumOf((await httpGet(r.adminPort, '/metrics')).body, 'ovms_mtls_requests_total');
      const victim = stuck(((await r.cli.logs.waitFor((l) => l.event === 'workers_listening'))['pids'] as number[])[0]!);
      await writeFile(stall, '');
      assert.equal(await stalledPid(stall, 1), victim);
      // Twelve pings unanswered, one each 5 s (MISSED_PINGS): waited for a bounded time.
      await eventually(() => r.cli.logs.lines.some((l) => l.event === 'worker_hung'), 'a worker_hung line', 180_000);
      assert.deepEqual(r.cli.logs.lines.filter((l) => l.event === 'worker_hung').map((l) => l['pid']), [victim]);
      await lineSoon(r.cli.logs, (l) => l.event === 'listening' && Number(l['worker']) > 2, 'a new worker listening');
      assert.ok(processGone(victim));
      for (let i = 0; i < 4; i += 1) assert.equal((await https1(r.restPort, pki, { path: '/v2/health/ready' })).status, 200);
      await linesMatching(r.cli.logs, 8, (l) => l.event === 'access');
      assert.equal(sumOf((await httpGet(r.adminPort, '/metrics')).body, 'ovms_mtls_requests_total'), before + 4);
      assert.equal(await stop(r.cli), 0, r.cli.stderr());
      assert.deepEqual(r.cli.logs.lines.filter((l) => l.event === 'worker_killed'), []);
    }));
});

describe('certificate reload with two workers', SAFETY, () => {
  let bob: Issued;
  let newServer: Issued;
  const dirs: string[] = [];
  after(() => Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true }))));
  before(async () => {
    [bob, newServer] = await Promise.all([
      issueClientCert({ issuer: pki.clientCa, commonName: 'bob' }),
      issueServerCert({ issuer: pki.serverCa, commonName: 'localhost', dns: ['localhost'], ips: ['127.0.0.1'] }),
    ]);
  });

  async function certDir(): Promise<CertDir> {
    const certs = await plainCertDir({ cert: pki.server.certPem, key: pki.server.keyPem, clientCa: pki.clientCa.certPem, crl: pki.crlPem });
    dirs.push(certs.dir);
    return certs;
  }

  const alice = (): TlsClient => ({ ca: pki.serverCa.certPem, cert: pki.client.certPem, key: pki.client.keyPem });

  test('SIGHUP reaches every worker: each reloads, and new connections get the new server certificate', async () => {
    const certs = await certDir();
    const r = await startWorkersCli(certFlags(certs.files));
    try {
      await replaceAtomically(certs.files.key, newServer.keyPem);
      await replaceAtomically(certs.files.cert, newServer.certPem);
      r.cli.child.kill('SIGHUP');
      await r.cli.logs.waitFor((l) => l.event === 'reloaded' && l.trigger === 'signal' && l['worker'] === undefined);
      const reloaded = await linesMatching(r.cli.logs, 2, (l) => l.event === 'reloaded' && l['worker'] !== undefined);
      assert.equal(workersOf(reloaded).size, 2);
      const serials = [];
      for (let i = 0; i < 4; i += 1) serials.push(await servedSerial(r.restPort, alice()));
      assert.deepEqual(new Set(serials), new Set([newServer.serialHex]));
    } finally {
      assert.equal(await stop(r.cli), 0, r.cli.stderr());
    }
  });

  test('streams in flight on both workers carry on across SIGHUP; a worker killed takes only its own streams, the other finishes them, and counters never fall', async () => {
    const certs = await certDir();
    const r = await startWorkersCli(certFlags(certs.files));
    // A certificate each: equal credentials would share one connection (grpc-js pools them), and one connection is one worker.
    const identities = await Promise.all(['s1', 's2', 's3', 's4'].map((commonName) => issueClientCert({ issuer: pki.clientCa, commonName })));
    const clients = identities.map((identity) => grpcClients(`localhost:${r.grpcPort}`, pki, identity));
    try {
      const streams = clients.map((c) => {
        const bidi = c.echo.Bidi();
        // Not once(): it rejects on the 'error' event that comes with a stream that failed.
        const status = new Promise<grpc.StatusObject>((resolve) => bidi.on('status', resolve));
        bidi.on('error', () => undefined);
        return { bidi, replies: bidi[Symbol.asyncIterator](), status };
      });
      const echoAll = async (text: string) => Promise.all(streams.map(async (s) => {
        s.bidi.write({ payload: Buffer.from(text) });
        const next = await s.replies.next().catch(() => ({ done: true, value: undefined }));
        return next.done ? undefined : (next.value as EchoReply).payload.toString();
      }));
      assert.deepEqual(await echoAll('before'), ['before', 'before', 'before', 'before']);

      await replaceAtomically(certs.files.key, newServer.keyPem);
      await replaceAtomically(certs.files.cert, newServer.certPem);
      r.cli.child.kill('SIGHUP');
      await linesMatching(r.cli.logs, 2, (l) => l.event === 'reloaded' && l['worker'] !== undefined);
      assert.equal(await servedSerial(r.grpcPort, alice()), newServer.serialHex);
      assert.deepEqual(await echoAll('after reload'), ['after reload', 'after reload', 'after reload', 'after reload']);

      const before = (await httpGet(r.adminPort, '/metrics')).body;
      const [victim] = (await r.cli.logs.waitFor((l) => l.event === 'workers_listening'))['pids'] as number[];
      process.kill(victim!, 'SIGKILL');
      await r.cli.logs.waitFor((l) => l.event === 'worker_exited');
      const answers = await echoAll('after kill');
      const survivors = streams.filter((_, i) => answers[i] === 'after kill');
      const lost = streams.filter((_, i) => answers[i] === undefined);
      assert.ok(survivors.length > 0 && lost.length > 0, `streams on both workers (answers: ${JSON.stringify(answers)})`);
      for (const s of lost) assert.equal((await s.status).code, grpc.status.UNAVAILABLE);
      for (const s of survivors) s.bidi.end();
      for (const s of survivors) assert.equal((await s.status).code, grpc.status.OK);
      await r.cli.logs.waitFor((l) => l.event === 'listening' && Number(l['worker']) > 2);
      const after = (await httpGet(r.adminPort, '/metrics')).body;
      for (const counter of ['ovms_mtls_handshakes_total', 'ovms_mtls_connections_total', 'ovms_mtls_requests_total']) {
        assert.ok(sumOf(after, counter) >= sumOf(before, counter), counter);
      }
    } finally {
      for (const c of clients) c.close();
      assert.equal(await stop(r.cli), 0, r.cli.stderr());
    }
  });

  test('--mtls_rest_mode relay: SSE streams and slow uploads in flight on both workers carry on across SIGHUP; a worker killed ends only its own connections, the other worker finishes its intact, and counters never fall', async () => {
    const board = new GateBoard();
    const model = await startUpstream({ grpcPort: null, sseGate: (i) => board.wait(i) });
    const certs = await certDir();
    const r = await startWorkersCli([...certFlags(certs.files), '--mtls_rest_mode', 'relay', '--mtls_rest_upstream', `127.0.0.1:${model.restPort}`]);
    const sockets: TLSSocket[] = [];
    try {
      const connect = async (): Promise<Tracked> => {
        const socket = await openRaw(r.restPort, pki);
        sockets.push(socket);
        return track(socket);
      };
      // Round-robin: connections alternate between the two workers, so each gets two streams and two uploads.
      const streams: Tracked[] = [];
      const uploads: Tracked[] = [];
      const chat = JSON.stringify({ model: 'm', stream: true });
      const upload = Buffer.from('0123456789abcdefghijABCDEFGHIJ');
      for (let i = 0; i < 4; i += 1) {
        const stream = await connect();
        stream.socket.write(`POST /v3/chat/completions HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: ${chat.length}\r\n\r\n${chat}`);
        streams.push(stream);
      }
      for (let i = 0; i < 4; i += 1) {
        const slow = await connect();
        slow.socket.write(Buffer.concat([Buffer.from(`POST /echo-body HTTP/1.1\r\nhost: a\r\ncontent-length: ${upload.length}\r\n\r\n`), upload.subarray(0, 10)]));
        uploads.push(slow);
      }
      const eventsOf = (t: Tracked) => (t.text().match(/\n\n/g) ?? []).length;
      board.open(0);
      await eventually(() => streams.every((t) => eventsOf(t) === 1), 'the first event on every stream');

      await replaceAtomically(certs.files.key, newServer.keyPem);
      await replaceAtomically(certs.files.cert, newServer.certPem);
      r.cli.child.kill('SIGHUP');
      await linesMatching(r.cli.logs, 2, (l) => l.event === 'reloaded' && l['worker'] !== undefined);
      assert.equal(await servedSerial(r.restPort, alice()), newServer.serialHex);
      board.open(1);
      await eventually(() => streams.every((t) => eventsOf(t) === 2), 'the second event on every stream, after the reload');
      for (const t of uploads) t.socket.write(upload.subarray(10, 20));
      assert.ok([...streams, ...uploads].every((t) => !t.socket.destroyed), 'no connection ended on SIGHUP');

      const before = (await httpGet(r.adminPort, '/metrics')).body;
      const [victim] = (await r.cli.logs.waitFor((l) => l.event === 'workers_listening'))['pids'] as number[];
      process.kill(victim!, 'SIGKILL');
      await r.cli.logs.waitFor((l) => l.event === 'worker_exited');
      for (const t of uploads) if (!t.socket.destroyed) t.socket.write(upload.subarray(20));
      board.openAll();
      const answers = await Promise.all([...streams, ...uploads].map((t) => t.answer));
      const streamAnswers = answers.slice(0, streams.length);
      const uploadAnswers = answers.slice(streams.length);
      for (const kind of [streamAnswers, uploadAnswers]) {
        const survived = kind.filter((a) => a !== undefined).length;
        assert.ok(survived > 0 && survived < kind.length, `some on each worker (survived: ${JSON.stringify(answers.map((a) => a !== undefined))})`);
      }
      for (const text of streamAnswers) {
        if (text === undefined) continue;
        const events = [...text.matchAll(/data: (.*)\n\n/g)].map((m) => m[1]!);
        assert.deepEqual(events.slice(0, -1).map((e) => (JSON.parse(e) as { choices: { delta: { content: string } }[] }).choices[0]!.delta.content), CHAT_REPLY_WORDS);
        assert.equal(events.at(-1), '[DONE]');
      }
      for (const text of uploadAnswers) {
        if (text === undefined) continue;
        assert.deepEqual(JSON.parse(text.slice(text.indexOf('\r\n\r\n') + 4)), { bytes: upload.length, sha256: createHash('sha256').update(upload).digest('hex') });
      }
      await r.cli.logs.waitFor((l) => l.event === 'listening' && Number(l['worker']) > 2);
      const after = (await httpGet(r.adminPort, '/metrics')).body;
      for (const counter of ['ovms_mtls_handshakes_total', 'ovms_mtls_connections_total', 'ovms_mtls_requests_total']) {
        assert.ok(sumOf(after, counter) >= sumOf(before, counter), counter);
      }
    } finally {
      board.openAll();
      for (const socket of sockets) socket.destroy();
      assert.equal(await stop(r.cli), 0, r.cli.stderr());
      await model.close();
    }
  });

  test('with the files broken (a failed reload), workers that die are replaced and serve the set still in force', async () => {
    const certs = await certDir();
    const r = await startWorkersCli(certFlags(certs.files));
    try {
      const { pids } = await r.cli.logs.waitFor((l) => l.event === 'workers_listening');
      await writeFile(certs.files.cert, 'not a certificate');
      r.cli.child.kill('SIGHUP');
      await r.cli.logs.waitFor((l) => l.event === 'reload_failed' && l.trigger === 'signal');
      for (const pid of pids as number[]) process.kill(pid, 'SIGKILL');
      const failed = r.cli.logs.waitFor((l) => l.event === 'worker_start_failed').then((l) => assert.fail(`a replacement failed: ${String(l['reason'])}`));
      await Promise.race([linesMatching(r.cli.logs, 2, (l) => l.event === 'listening' && Number(l['worker']) > 2), failed]);
      // A worker logs `listening` before the primary hears it over IPC: readiness follows a moment later.
      await eventually(async () => (await httpGet(r.adminPort, '/readyz')).status === 200, '/readyz to turn 200 with both replacements');
      for (let i = 0; i < 4; i += 1) assert.equal(await servedSerial(r.restPort, alice()), pki.server.serialHex);
      assert.equal((await https1(r.restPort, pki, { path: '/v2/health/ready' })).status, 200);
    } finally {
      assert.equal(await stop(r.cli), 0, r.cli.stderr());
    }
  });

  test("a CRL that revokes a client closes its live connections in both workers, and a broken set reaches no worker", async () => {
    const certs = await certDir();
    const r = await startWorkersCli(certFlags(certs.files));
    const sessions = Array.from({ length: 4 }, () => h2Session(r.restPort, pki, bob));
    try {
      for (const s of sessions) assert.equal((await h2Request(s, { ':method': 'GET', ':path': '/v2/health/live' })).headers[':status'], 200);
      assert.equal(workersOf(await linesMatching(r.cli.logs, 4, (l) => l.event === 'access')).size, 2, "bob's connections are spread over both workers");

      await writeFile(certs.files.cert, 'not a certificate');
      r.cli.child.kill('SIGHUP');
      await r.cli.logs.waitFor((l) => l.event === 'reload_failed' && l.trigger === 'signal');
      await replaceAtomically(certs.files.cert, pki.server.certPem);

      const closed = Promise.all(sessions.map((s) => once(s, 'close')));
      await replaceAtomically(certs.files.crl!, await createCrl({ issuer: pki.clientCa, revoked: [{ serialHex: bob.serialHex }] }));
      r.cli.child.kill('SIGHUP');
      await closed;
      const revoked = await linesMatching(r.cli.logs, 4, (l) => l.event === 'connection_revoked');
      assert.equal(workersOf(revoked).size, 2);
      assert.ok(revoked.every((l) => /CN=bob/.test(String(l['subject']))));
      assert.equal(r.cli.logs.lines.filter((l) => l.event === 'reload_failed' && l['worker'] !== undefined).length, 0, 'workers never saw the broken set');
    } finally {
      for (const s of sessions) s.destroy();
      assert.equal(await stop(r.cli), 0, r.cli.stderr());
    }
  });
});

describe('the OVMS entrypoint with two workers', SAFETY, () => {
  test('while OVMS starts /readyz is false and both workers answer 503 / UNAVAILABLE; once ready calls flow; SIGTERM mid-stream exits with OVMS code 0', async () => {
    const [grpcPort, restPort, adminPort] = (await freeLoopbackPorts(3)) as [number, number, number];
    const gate = join(dir, 'gate');
    const wrapper = startWrapper([
      '--port', String(grpcPort), '--grpc_bind_address', '127.0.0.1', '--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1',
      ...tlsArgs(pki), '--mtls_ovms_binary', FAKE_OVMS, '--mtls_ovms_user', 'root', '--mtls_workers', '2', '--mtls_admin_port', String(adminPort),
    ], { FAKE_OVMS_START_GATE_FILE: gate });
    const clients = grpcClients(`localhost:${grpcPort}`, pki);
    try {
      await wrapper.waitForEvent('ovms_started');
      await wrapper.waitForEvent('workers_listening');
      const readyz = await httpGet(adminPort, '/readyz');
      assert.equal(readyz.status, 503);
      assert.equal((JSON.parse(readyz.body) as { checks: Record<string, { detail: string }> }).checks['upstream']?.detail, 'OVMS is starting');
      for (let i = 0; i < 4; i += 1) assert.equal((await https1(restPort, pki, { path: '/v2/health/ready' })).status, 503);
      const isEarly = (l: LogLine) => l.event === 'access' && l['status'] === 503;
      await wrapper.waitForLog(() => wrapper.logs.filter(isEarly).length >= 4);
      const early = wrapper.logs.filter(isEarly);
      assert.equal(workersOf(early).size, 2, 'both workers refused while OVMS started');
      await assert.rejects(unary(clients.kserve, 'ServerLive', {}), (err: grpc.ServiceError) => err.code === grpc.status.UNAVAILABLE);

      await writeFile(gate, '');
      await wrapper.waitForEvent('ovms_ready');
      assert.equal((await httpGet(adminPort, '/readyz')).status, 200);
      // The primary tells the workers right after logging ovms_ready; no line says they heard it.
      await eventually(async () => (await https1(restPort, pki, { path: '/v2/health/ready' })).status === 200, 'the workers forward to OVMS');
      await streamAcrossSigterm(clients.kserve, wrapper);
    } finally {
      clients.close();
      await writeFile(gate, '');
      if (wrapper.child.exitCode === null) wrapper.child.kill('SIGKILL');
    }
  });

  // node:cluster closes a shared port when its last worker leaves; as --mtls_user the primary cannot bind it again.
  test('started as root on a port below 1024, every worker killed at once: no endless replacing of workers that cannot listen; OVMS is stopped and the exit code is 70, with one line saying why', { skip: !root && 'binding a port below 1024 needs root' }, async () => {
    const restPort = await freePrivilegedPort();
    const wrapper = startWrapper([
      '--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1',
      ...tlsArgs(pki), '--mtls_ovms_binary', FAKE_OVMS, '--mtls_ovms_user', 'nobody', '--mtls_user', 'nobody', '--mtls_workers', '2',
    ]);
    try {
      const pids = (await wrapper.waitForEvent('workers_listening'))['pids'] as number[];
      await wrapper.waitForEvent('ovms_ready');
      for (const pid of pids) process.kill(pid, 'SIGKILL');
      await eventually(() => wrapper.child.exitCode !== null || wrapper.child.signalCode !== null, 'the entrypoint to exit', 60_000);
      assert.equal(wrapper.child.exitCode, 70, wrapper.stderr());
      const failed = wrapper.logs.filter((l) => l.event === 'proxy_failed');
      assert.equal(failed.length, 1);
      assert.match(String(failed[0]!['reason']), new RegExp(`^every worker exited, .*--rest_port ${restPort}: cannot listen on 127\\.0\\.0\\.1:${restPort}: permission denied`));
      assert.ok(wrapper.logs.some((l) => l.event === 'ovms_exited'), 'OVMS was stopped');
    } finally {
      if (wrapper.child.exitCode === null) wrapper.child.kill('SIGKILL');
    }
  });

  test('SIGTERM while a worker is stuck in its start: the other drains, the stuck one is killed and named, OVMS is never started (it would load its models to be stopped at once), and the exit code is 0', async () => {
    const [grpcPort, restPort] = (await freeLoopbackPorts(2)) as [number, number];
    const stall = join(dir, 'entrypoint-stall');
    const argvFile = join(dir, 'entrypoint-stall-ovms-runs.jsonl');
    await writeFile(stall, '');
    const wrapper = startWrapper([
      '--port', String(grpcPort), '--grpc_bind_address', '127.0.0.1', '--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1',
      ...tlsArgs(pki), '--mtls_ovms_binary', FAKE_OVMS, '--mtls_ovms_user', 'root', '--mtls_workers', '2', '--mtls_shutdown_timeout', '2',
    ], { NODE_OPTIONS: `--import=${STALL_WORKER}`, STALL_PATH: stall, STALL_WORKERS: '2', FAKE_OVMS_ARGV_FILE: argvFile });
    let stuck: number | undefined;
    try {
      await wrapper.waitForLog((l) => l.event === 'listening' && l['worker'] === 1);
      stuck = await stalledPid(stall, 2);
      await sigtermKillsOnly({ child: wrapper.child, lines: () => wrapper.logs, stderr: wrapper.stderr }, stuck);
      assert.ok(wrapper.logs.some((l) => l.event === 'worker_draining' && l['worker'] === 1), 'the worker that listened drained');
      assert.deepEqual(fakeRuns(argvFile), [], 'OVMS was started after the SIGTERM');
      assert.equal(wrapper.logs.some((l) => l.event === 'ovms_started'), false);
    } finally {
      killIfAlive(stuck);
      await rm(stall, { force: true });
      if (wrapper.child.exitCode === null) wrapper.child.kill('SIGKILL');
    }
  });

  test("a terminal's Ctrl-C (SIGINT to the wrapper and to each worker): each worker's own drain keeps OVMS's share of --mtls_shutdown_timeout out, as the wrapper's does", async () => {
    const [grpcPort] = (await freeLoopbackPorts(1)) as [number];
    const wrapper = startWrapper([
      '--port', String(grpcPort), '--grpc_bind_address', '127.0.0.1',
      ...tlsArgs(pki), '--mtls_ovms_binary', FAKE_OVMS, '--mtls_ovms_user', 'root', '--mtls_workers', '2', '--mtls_shutdown_timeout', '4',
    ]);
    try {
      const pids = (await wrapper.waitForEvent('workers_listening'))['pids'] as number[];
      await wrapper.waitForEvent('ovms_ready');
      // The workers first: each drains on its own signal, before the wrapper's drain message could reach it.
      for (const pid of pids) process.kill(pid, 'SIGINT');
      wrapper.child.kill('SIGINT');
      assert.deepEqual(await wrapper.exited, { code: 0, signal: null }, wrapper.stderr());
      // OVMS's share of 4 s is 2 s (half, at most 5 s): the drain gets the other 2 s.
      assert.deepEqual(wrapper.logs.filter((l) => l.event === 'worker_draining').map((l) => l['timeoutMs']), [2000, 2000]);
    } finally {
      if (wrapper.child.exitCode === null) wrapper.child.kill('SIGKILL');
    }
  });
});

/** The values of one metric in every part of a scrape, added up. */
function scrapedSum(parts: MetricsJson[], name: string): number {
  return parts.flatMap((part) => part.filter((m) => m.name === name)).flatMap((m) => m.values).reduce((n, v) => n + v.value, 0);
}

describe('a scrape that a worker exit overtakes', SAFETY, () => {
  test('a worker that answered a scrape and exited while the other was still to answer is counted once in it: the total does not fall at the next scrape', async () => {
    const config = { ...baseConfig({ pki, upstream: { restPort: upstream.restPort! } }), workers: 2, logLevel: 'warn' as const, admin: { hosts: ['127.0.0.1'], port: 0 } };
    const logs = new LogCapture();
    // No timeout in the way: the stopped worker answers once it is continued.
    const pool = await new WorkerPool({ config, material: loadTlsMaterialSync(config.tls), logger: createLogger({ level: 'info', destination: logs }), metricsTimeoutMs: 300_000 }).start();
    const [first, second] = Object.values(cluster.workers!) as [Worker, Worker];
    try {
      const calls = 6;
      for (let i = 0; i < calls; i += 1) assert.equal((await https1(pool.port('rest')!, pki, { path: '/v2/health/ready' })).status, 200);
      await eventually(async () => scrapedSum(await pool.collectMetrics(), 'ovms_mtls_requests_total') === calls, 'every call counted');
      second.process.kill('SIGSTOP');
      // Our listener comes after the pool's: when it runs, the pool has taken the first worker's answer.
      const firstAnswered = new Promise<void>((resolve) => first.on('message', (m: { type?: string }) => m.type === 'metrics' && resolve()));
      const racing = pool.collectMetrics();
      await firstAnswered;
      first.process.kill('SIGKILL');
      await logs.waitFor((l) => l.event === 'worker_exited');
      second.process.kill('SIGCONT');
      assert.equal(scrapedSum(await racing, 'ovms_mtls_requests_total'), calls, 'the exited worker is counted once');
      assert.equal(scrapedSum(await pool.collectMetrics(), 'ovms_mtls_requests_total'), calls);
    } finally {
      second.process.kill('SIGCONT');
      await pool.shutdown(1000);
    }
  });
});

describe('a scrape while every worker is stopped', SAFETY, () => {
  test('the connections they still hold stay in ovms_mtls_open_connections as last scraped: not 0 while every client waits', async () => {
    const config = { ...baseConfig({ pki, upstream: { restPort: upstream.restPort! } }), workers: 2, logLevel: 'warn' as const, admin: { hosts: ['127.0.0.1'], port: 0 } };
    const pool = await new WorkerPool({ config, material: loadTlsMaterialSync(config.tls), logger: createLogger({ level: 'warn', destination: new LogCapture() }), metricsTimeoutMs: 1000 }).start();
    const workers = Object.values(cluster.workers!) as Worker[];
    const sessions = Array.from({ length: 4 }, () => h2Session(pool.port('rest')!, pki));
    const open = async () => scrapedSum(await pool.collectMetrics(), 'ovms_mtls_open_connections');
    try {
      for (const session of sessions) assert.equal((await h2Request(session, { ':method': 'GET', ':path': '/v2/health/ready' })).headers[':status'], 200);
      await eventually(async () => (await open()) === sessions.length, 'every connection counted open');
      for (const worker of workers) worker.process.kill('SIGSTOP');
      assert.equal(await open(), sessions.length, 'the stopped workers still hold every connection');
    } finally {
      for (const worker of workers) worker.process.kill('SIGCONT');
      for (const session of sessions) session.close();
      await pool.shutdown(1000);
    }
  });
});

/** A gRPC Bidi call on a connection of its own, answered once and left open: the worker that has it drains until it ends. */
async function heldBidi(port: number): Promise<ClientHttp2Session> {
  const session = h2Session(port, pki);
  const stream = session.request({ ':method': 'POST', ':path': '/ovmsmtls.test.Echo/Bidi', 'content-type': 'application/grpc', te: 'trailers' }, { endStream: false });
  stream.on('error', () => undefined);
  // EchoRequest { payload: "hi" }
  stream.write(grpcFrame(Buffer.from([0x0a, 0x02, 0x68, 0x69])));
  await once(stream, 'data');
  return session;
}

describe('workers that drain on a SIGTERM of their own (not the primary\'s)', SAFETY, () => {
  // Each worker closes its ports and drains a call it holds; the primary, stopped meanwhile, accepted connections and hands
  // them out before it reads that the workers closed their ports. Each worker answers "not taken", and Node gave each back to
  // the port's round-robin, which every worker had left: unfixed, those connections waited in the primary for ever, unread,
  // even once new workers served the ports, and the primary kept a file descriptor for each.
  test('connections handed to them after they closed their ports are closed, none waits for ever, and the new workers serve', async () => {
    const r = await startWorkersCli();
    const sockets: TLSSocket[] = [];
    const sessions: ClientHttp2Session[] = [];
    const primary = r.cli.child.pid!;
    const pids = (await r.cli.logs.waitFor((l) => l.event === 'workers_listening'))['pids'] as number[];
    try {
      // Round-robin hands the first connection to one worker and the next to the other: a call held on each.
      for (let i = 0; i < 2; i += 1) sessions.push(await heldBidi(r.grpcPort));
      process.kill(primary, 'SIGSTOP');
      // Accepted by the kernel while the primary is stopped: it hands them out once it runs again, before it reads the workers' news.
      const handshakes = [r.restPort, r.grpcPort].flatMap((port) => [0, 1, 2].map(() => handshakeOrClose(port, sockets)));
      await Promise.all(sockets.map((socket) => once(socket, 'connect')));
      for (const pid of pids) process.kill(pid, 'SIGTERM');
      // A worker closes its listeners (telling the primary, which reads it later) as it logs this line; its log is not the primary's to pass on.
      await linesMatching(r.cli.logs, 2, (l) => l.event === 'worker_draining');
      process.kill(primary, 'SIGCONT');
      await eventually(async () => (await handshakeOrClose(r.restPort, sockets)) === 'closed', 'the ports to close');
      for (const session of sessions) session.destroy();
      await linesMatching(r.cli.logs, 2, (l) => l.event === 'worker_exited');
      await lineSoon(r.cli.logs, (l) => l.event === 'listening' && Number(l['worker']) > 2, 'a new worker listening');
      const outcomes = await settlesWithin(Promise.all(handshakes), 60_000, 'the connections handed to the draining workers to close');
      assert.deepEqual(outcomes, Array(6).fill('closed'));
      await aNewWorkerServes(r.grpcPort, sockets);
    } finally {
      process.kill(primary, 'SIGCONT');
      for (const session of sessions) session.destroy();
      for (const socket of sockets) socket.destroy();
      for (const pid of pids) killIfAlive(pid);
      assert.equal(await stop(r.cli), 0, r.cli.stderr());
    }
  });
});
