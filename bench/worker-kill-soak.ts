/**
 * Soak of `--mtls_workers 2` while workers die: a steady stream of new TLS connections on both public ports
 * (a REST request, a gRPC call or just a handshake, each on a connection of its own) while workers are killed
 * in every way the pool meets (SIGKILL, stopped then killed, both at once, one while the primary is stopped,
 * the replacement as soon as it listens, each drained by a SIGTERM of its own, one left stopped until the pool's
 * ping kills it, one in the shutdown's drain). See bench/README.md. Checks that no client waits
 * (each is served or sees its connection close within hangMs), that the primary's open files come back to
 * their count before the load, that the log has no worker_error line nor stack trace, that the worker_exited
 * lines' connections closed untaken are no more than the clients that saw a close before the handshake, and that SIGTERM ends the proxy with 0.
 *
 *   node dist/bench/worker-kill-soak.js [--rounds N] [--hung] [--only scenario,scenario]
 *
 * It runs the built CLI with the node that runs it (`PATH=/path/to/node24/bin:$PATH node ...` for another Node).
 */
import { connect as tlsConnect } from 'node:tls';
import { connect as h2Connect } from 'node:http2';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { createTestPki, type TestPki } from '../test/helpers/pki.js';
import { startUpstream, grpcFrame } from '../test/helpers/harness.js';
import { startCli, type LongRunningCli } from '../test/helpers/cli.js';
import { freeLoopbackPorts } from '../src/ports.js';
import { httpGet } from '../test/helpers/ops.js';

/** A client waits no longer than this for an answer or a close; a worker stopped for good holds the connections it took until the pool's ping kills it (60 s). */
let hangMs = 30_000;
const CLIENT_LOOPS = 6;

type Kind = 'rest' | 'grpc' | 'handshake-rest' | 'handshake-grpc';
type Outcome = 'served' | 'refused' | 'closedBeforeHandshake' | 'cutAfterHandshake' | 'hung';

interface Tally {
  readonly outcomes: Record<Outcome, number>;
  readonly hung: { kind: Kind; startedAt: string }[];
}

const tally: Tally = { outcomes: { served: 0, refused: 0, closedBeforeHandshake: 0, cutAfterHandshake: 0, hung: 0 }, hung: [] };
const kills: Record<string, number> = {};

function argValue(name: string, fallback: number): number {
  const i = process.argv.indexOf(name);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
}

/** One connection of `kind`: what its client saw, the bound (hangMs) standing in for "waits for ever". */
function oneConnection(kind: Kind, ports: { rest: number; grpc: number }, pki: TestPki): Promise<Outcome> {
  const tlsOptions = { ca: pki.serverCa.certPem, cert: pki.client.certPem, key: pki.client.keyPem, servername: 'localhost' };
  return new Promise<Outcome>((resolve) => {
    let handshaken = false;
    let done = false;
    let cleanup = () => undefined as void;
    const finish = (outcome: Outcome) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      cleanup();
      resolve(outcome);
    };
    let refused = false;
    const noted = (err: NodeJS.ErrnoException) => (refused ||= err.code === 'ECONNREFUSED');
    const ended = () => finish(handshaken ? 'cutAfterHandshake' : refused ? 'refused' : 'closedBeforeHandshake');
    const timer = setTimeout(() => finish('hung'), hangMs);
    if (kind === 'grpc') {
      const session = h2Connect(`https://localhost:${ports.grpc}`, tlsOptions);
      cleanup = () => void session.destroy();
      session.on('error', noted);
      session.once('connect', () => (handshaken = true));
      session.once('close', ended);
      const stream = session.request({ ':method': 'POST', ':path': '/inference.GRPCInferenceService/ServerLive', 'content-type': 'application/grpc', te: 'trailers' }, { endStream: false });
      stream.on('error', () => undefined);
      stream.on('trailers', (t) => {
        if (t['grpc-status'] === '0') finish('served');
      });
      stream.on('data', () => undefined);
      stream.once('close', () => setImmediate(ended));
      stream.end(grpcFrame(Buffer.alloc(0)));
      return;
    }
    const port = kind === 'rest' || kind === 'handshake-rest' ? ports.rest : ports.grpc;
    const socket = tlsConnect({ host: '127.0.0.1', port, ...tlsOptions, ALPNProtocols: port === ports.grpc ? ['h2'] : ['http/1.1'] });
    cleanup = () => void socket.destroy();
    socket.on('error', noted);
    socket.once('close', ended);
    socket.once('secureConnect', () => {
      handshaken = true;
      if (kind !== 'rest') return finish('served');
      socket.write('GET /v2/health/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n');
    });
    let text = '';
    socket.on('data', (chunk: Buffer) => {
      text += chunk.toString('latin1');
      if (/^HTTP\/1\.1 200 /.test(text) && text.includes('\r\n\r\n')) finish('served');
    });
  });
}

const KINDS: Kind[] = ['rest', 'grpc', 'handshake-rest', 'handshake-grpc'];

/** A client loop: one connection after another until `running()` is false. */
async function clientLoop(index: number, ports: { rest: number; grpc: number }, pki: TestPki, running: () => boolean): Promise<void> {
  for (let n = index; running(); n += 1) {
    const kind = KINDS[n % KINDS.length]!;
    const startedAt = new Date().toISOString();
    const outcome = await oneConnection(kind, ports, pki);
    tally.outcomes[outcome] += 1;
    if (outcome === 'hung') tally.hung.push({ kind, startedAt });
  }
}

function alive(pid: number): boolean {
  try {
    return !readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.startsWith('Z');
  } catch {
    return false;
  }
}

/** The primary's children: its workers (their log lines may be dropped when this reads the log more slowly than they write it). */
function childrenOf(pid: number): number[] {
  return readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number).filter(alive);
}

/** Two workers, both listening as /readyz tells. */
async function twoWorkers(cli: LongRunningCli, adminPort: number): Promise<number[]> {
  for (let i = 0; i < 600; i += 1) {
    const pids = childrenOf(cli.child.pid!);
    if (pids.length === 2 && (await readyDetail(adminPort)).includes('2 of 2 workers listening')) return pids;
    await sleep(100);
  }
  throw new Error(`the pool did not get back to two workers: ${JSON.stringify(childrenOf(cli.child.pid!))}`);
}

async function readyDetail(adminPort: number): Promise<string> {
  try {
    return (await httpGet(adminPort, '/readyz')).body;
  } catch {
    return '';
  }
}

/** Waits until a worker has listened for SETTLE_MS (10 s), so that killing it does not grow the replacement delay. */
async function settled(cli: LongRunningCli, pid: number): Promise<void> {
  const line = cli.logs.lines.findLast((l) => l.event === 'listening' && Number(l['pid']) === pid);
  const since = line ? Date.parse(String(line['time'])) || Number(line['time']) : Date.now();
  const wait = since + 10_500 - Date.now();
  if (wait > 0) await sleep(wait);
}

/** The workers a scenario sent SIGKILL or SIGTERM: the next one waits until they are gone. */
const ending = new Set<number>();

const kill = (pid: number, signal: NodeJS.Signals) => {
  if (signal === 'SIGKILL' || signal === 'SIGTERM') ending.add(pid);
  try {
    process.kill(pid, signal);
  } catch {
    // gone already
  }
};

const count = (name: string) => (kills[name] = (kills[name] ?? 0) + 1);

/** Each scenario kills workers one way; the pool is back to two settled workers before the next. */
const SCENARIOS: Record<string, (cli: LongRunningCli, pids: number[], adminPort: number) => Promise<void>> = {
  async sigkill(_cli, [a]) {
    kill(a!, 'SIGKILL');
  },
  async stopThenKill(_cli, [a]) {
    kill(a!, 'SIGSTOP');
    await sleep(300 + Math.random() * 1500);
    kill(a!, 'SIGKILL');
  },
  async bothAtOnce(_cli, [a, b]) {
    kill(a!, 'SIGKILL');
    kill(b!, 'SIGKILL');
  },
  async bothStoppedThenKilled(_cli, [a, b]) {
    kill(a!, 'SIGSTOP');
    kill(b!, 'SIGSTOP');
    await sleep(300 + Math.random() * 1000);
    kill(a!, 'SIGKILL');
    kill(b!, 'SIGKILL');
  },
  async oneStoppedOtherKilled(_cli, [a, b]) {
    // Connections wait on the stopped one; the other dies; then the stopped one dies too.
    kill(a!, 'SIGSTOP');
    await sleep(500 + Math.random() * 1000);
    kill(b!, 'SIGKILL');
    await sleep(Math.random() * 1500);
    kill(a!, 'SIGKILL');
  },
  async whilePrimaryStopped(cli, [a]) {
    const primary = cli.child.pid!;
    kill(primary, 'SIGSTOP');
    kill(a!, 'SIGKILL');
    await sleep(200 + Math.random() * 800);
    kill(primary, 'SIGCONT');
  },
  async stoppedKillPrimaryStopped(cli, [a]) {
    const primary = cli.child.pid!;
    kill(a!, 'SIGSTOP');
    await sleep(500 + Math.random() * 1000);
    kill(primary, 'SIGSTOP');
    kill(a!, 'SIGKILL');
    await sleep(200 + Math.random() * 800);
    kill(primary, 'SIGCONT');
  },
  async bothWhilePrimaryStopped(cli, [a, b]) {
    const primary = cli.child.pid!;
    kill(a!, 'SIGSTOP');
    await sleep(500);
    kill(primary, 'SIGSTOP');
    kill(a!, 'SIGKILL');
    kill(b!, 'SIGKILL');
    await sleep(200 + Math.random() * 800);
    kill(primary, 'SIGCONT');
  },
  async bothDrainOnTheirOwnSigterm(_cli, [a, b]) {
    // Each closes its ports and drains (exit 0, replaced): connections handed to it meanwhile are answered "not taken".
    kill(a!, 'SIGTERM');
    kill(b!, 'SIGTERM');
  },
  async oneDrainsOtherKilled(_cli, [a, b]) {
    kill(a!, 'SIGTERM');
    await sleep(Math.random() * 100);
    kill(b!, 'SIGKILL');
  },
  async killReplacementAtOnce(cli, [a, b], adminPort) {
    // The replacement is killed as soon as it listens, while the other still holds connections it was handed.
    kill(b!, 'SIGSTOP');
    kill(a!, 'SIGKILL');
    for (let i = 0; i < 300; i += 1) {
      const fresh = childrenOf(cli.child.pid!).filter((pid) => pid !== a && pid !== b);
      if (fresh.length > 0 && (await readyDetail(adminPort)).includes('2 of 2 workers listening')) {
        kill(fresh[0]!, 'SIGKILL');
        break;
      }
      await sleep(50);
    }
    kill(b!, 'SIGKILL');
  },
};

function primaryFds(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).length;
}

/** The fd count once it stops moving (the load over, timers and sockets closed). */
async function idleFds(pid: number, baseline: number): Promise<number> {
  let last = primaryFds(pid);
  for (let i = 0; i < 60 && last > baseline; i += 1) {
    await sleep(500);
    last = primaryFds(pid);
  }
  return last;
}

async function main(): Promise<void> {
  const rounds = argValue('--rounds', 3);
  const withHung = process.argv.includes('--hung');
  const [pki, upstream] = await Promise.all([createTestPki(), startUpstream()]);
  const [grpcPort, restPort, adminPort] = (await freeLoopbackPorts(3)) as [number, number, number];
  const cli = startCli([
    'proxy', '--mtls_workers', '2', '--port', String(grpcPort), '--grpc_bind_address', '127.0.0.1', '--mtls_grpc_upstream', `127.0.0.1:${upstream.grpcPort}`,
    '--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`,
    '--mtls_admin_port', String(adminPort), '--mtls_shutdown_timeout', '3',
    '--mtls_cert', pki.paths['server.pem']!, '--mtls_key', pki.paths['server.key']!, '--mtls_client_ca', pki.paths['client_cert_ca.pem']!,
  ]);
  await cli.logs.waitFor((l) => l.event === 'workers_listening');
  const primary = cli.child.pid!;
  const ports = { rest: restPort, grpc: grpcPort };
  await sleep(1000);
  const baseline = primaryFds(primary);
  let running = true;
  const loops = Array.from({ length: CLIENT_LOOPS }, (_v, i) => clientLoop(i, ports, pki, () => running));
  const only = process.argv.indexOf('--only');
  const names = only >= 0 ? process.argv[only + 1]!.split(',') : Object.keys(SCENARIOS);
  for (let round = 0; round < rounds; round += 1) {
    for (const name of names) {
      const pids = await twoWorkers(cli, adminPort);
      for (const pid of pids) await settled(cli, pid);
      await sleep(500 + Math.random() * 1000);
      await SCENARIOS[name]!(cli, Math.random() < 0.5 ? pids : [...pids].reverse(), adminPort);
      count(name);
      for (const pid of ending) while (alive(pid)) await sleep(100);
      ending.clear();
      console.log(new Date().toISOString(), `round ${round} ${name}`, JSON.stringify(tally.outcomes));
    }
  }
  if (withHung) {
    hangMs = 90_000;
    const [a] = await twoWorkers(cli, adminPort);
    kill(a!, 'SIGSTOP');
    while (alive(a!)) await sleep(500);
    count('hungByPing');
    console.log(new Date().toISOString(), 'hung worker killed by the ping', JSON.stringify(tally.outcomes));
  }
  await twoWorkers(cli, adminPort);
  running = false;
  await Promise.all(loops);
  hangMs = 30_000;
  const idle = await idleFds(primary, baseline);

  // The shutdown: SIGTERM with the load on, one worker killed in the drain.
  running = true;
  const drainLoops = Array.from({ length: CLIENT_LOOPS }, (_v, i) => clientLoop(i, ports, pki, () => running));
  await sleep(1000);
  const [victim] = await twoWorkers(cli, adminPort);
  kill(primary, 'SIGTERM');
  await sleep(50);
  kill(victim!, 'SIGKILL');
  count('killedInDrain');
  const code = await cli.exited;
  running = false;
  await Promise.all(drainLoops);

  const exits = cli.logs.lines.filter((l) => l.event === 'worker_exited');
  const untaken = exits.reduce((sum, l) => sum + Number(l['untakenConnections'] ?? 0), 0);
  const untakenClosed = exits.reduce((sum, l) => sum + Number(l['untakenClosed'] ?? 0), 0);
  const problems = cli.logs.lines.filter((l) => l.event === 'worker_error' || /\n\s+at /.test(String(l['msg'])) || l['stack'] !== undefined || (l.level === 'fatal'));
  const stackInStderr = /\n\s+at /.test(cli.stderr());
  const report = {
    node: process.version,
    connections: Object.values(tally.outcomes).reduce((a, b) => a + b, 0),
    outcomes: tally.outcomes,
    hung: tally.hung,
    kills,
    workerExitedLines: exits.length,
    workerHungLines: cli.logs.lines.filter((l) => l.event === 'worker_hung').length,
    untakenConnections: untaken,
    untakenClosed,
    primaryFds: { baseline, idle },
    problemLines: problems.map((l) => `${l.event}: ${l.msg}`).slice(0, 20),
    problemLineCount: problems.length,
    stackInStderr,
    stderrTail: cli.stderr().slice(-2000),
    exitCode: code,
  };
  console.log(JSON.stringify(report, null, 2));
  const logFile = process.env['SOAK_LOG'];
  if (logFile) writeFileSync(logFile, cli.logs.lines.map((l) => JSON.stringify(l)).join('\n') + '\n');
  await upstream.close();
  await pki.cleanup();
  const ok = tally.outcomes.hung === 0 && idle <= baseline && problems.length === 0 && !stackInStderr && code === 0 && untakenClosed <= tally.outcomes.closedBeforeHandshake;
  console.log(ok ? 'SOAK OK' : 'SOAK FOUND PROBLEMS');
  process.exit(ok ? 0 : 1);
}

await main();

