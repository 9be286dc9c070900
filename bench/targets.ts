/**
 * What a scenario runs against: the upstream itself (direct), nginx, or
 * ovms-mtls as its real CLI. Each proxy starts fresh for every scenario (so
 * its peak RSS belongs to that scenario) and is probed end to end before the
 * load starts.
 */
import { fork, spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, openSync, closeSync, readFileSync, writeFileSync, existsSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { request as httpsRequest } from 'node:https';
import type { BenchPki } from './pki.js';
import type { Endpoint, ScenarioId, UpstreamMessage, UpstreamPorts } from './protocol.js';
import { nginxConfig } from './nginx-config.js';
import { connectH2, grpcFrame, h2Exchange, judgeGrpc } from './load/h2-pool.js';
import { PATHS } from './protocol.js';
import { processTree } from './procstat.js';
import { freeLoopbackPorts } from '../src/ports.js';

/** `pipe`: node-pipe.ts, the floor of any Node.js proxy, launched like the proxy. */
export type TargetKind = 'direct' | 'nginx' | 'proxy' | 'pipe';

export interface TargetSpec {
  readonly id: string;
  readonly label: string;
  readonly kind: TargetKind;
  readonly workers: number;
  readonly accessLog: boolean;
  /** Proxy only: another build's launcher (A/B of a change); default bin/ovms-mtls. */
  readonly cli?: string | undefined;
  /** Proxy only: node options instead of the context's (A/B of V8 flags). */
  readonly nodeFlags?: readonly string[] | undefined;
  /** Proxy only: options added after the context's (A/B of an option). */
  readonly extraArgs?: readonly string[] | undefined;
  /** Proxy only: another node executable (A/B of Node versions); default the bench's own. */
  readonly node?: string | undefined;
}

export interface BenchContext {
  readonly dir: string;
  readonly repoRoot: string;
  readonly pki: BenchPki;
  readonly upstream: UpstreamPorts;
  readonly upstreamPid: number;
  readonly nginx: string | undefined;
  /** Connections a proxy must be able to hold (idle scenario). */
  readonly maxConnections: number;
  /** Extra node options for the proxy (experiments: `--node-flags=--max-semi-space-size=32`). */
  readonly nodeFlags: readonly string[];
  /** Extra proxy options (experiments: `--proxy-args="--mtls_stream_window 4194304"`). */
  readonly proxyArgs: readonly string[];
}

export interface RunningTarget {
  /** Root of the process tree whose CPU and memory we sample. */
  readonly pid: number;
  endpoint(scenario: ScenarioId): Endpoint;
  /** Worker processes found running (proxy: primary + workers). */
  readonly processes: number;
  stop(): Promise<void>;
}

const HOST = '127.0.0.1';
const READY_TIMEOUT_MS = 20_000;
const STOP_TIMEOUT_MS = 10_000;

export function usesGrpcPort(scenario: ScenarioId): boolean {
  return scenario.startsWith('grpc') || scenario === 'idle';
}

/**
 * Proxies and nginx still running. They have no IPC channel to notice that
 * the bench went away (drivers and upstreams do), so an interrupted bench
 * stops them itself: stopAllTargets().
 */
const running = new Set<ChildProcess>();
let stopping = false;

/** Spawns under bash so the file-descriptor limit can be raised to the hard limit first. */
function spawnWithFdLimit(argv: string[], logFile: string, cwd: string): ChildProcess {
  // Once the bench is stopping, a target started now would outlive it.
  if (stopping) throw new Error('the bench is stopping');
  const fd = openSync(logFile, 'w');
  try {
    const child = spawn('bash', ['-c', 'ulimit -n "$(ulimit -Hn)"; exec "$@"', 'bench-target', ...argv], { cwd, stdio: ['ignore', fd, fd], detached: false });
    running.add(child);
    child.once('exit', () => running.delete(child));
    return child;
  } finally {
    closeSync(fd);
  }
}

/**
 * SIGKILL to every process of the tree: sent to a master alone, it leaves
 * the children running (nginx's workers keep serving its ports).
 */
function killTree(root: number): void {
  for (const pid of processTree(root)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone already
    }
  }
}

async function stopProcess(child: ChildProcess, signal: NodeJS.Signals): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = once(child, 'exit');
  if (signal === 'SIGKILL') killTree(child.pid!);
  else child.kill(signal);
  const timer = setTimeout(() => killTree(child.pid!), STOP_TIMEOUT_MS);
  await exited;
  clearTimeout(timer);
}

/** Stops every proxy and nginx still running, and starts no more (an interrupted bench). */
export async function stopAllTargets(): Promise<void> {
  stopping = true;
  await Promise.all([...running].map((child) => stopProcess(child, 'SIGTERM')));
}

function shrink(file: string): void {
  if (existsSync(file) && statSync(file).size > 1024 * 1024) writeFileSync(file, tail(file, 50) + '\n');
}

function tail(file: string, lines = 15): string {
  try {
    return readFileSync(file, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return '(no log)';
  }
}

/** One REST request and one gRPC call through the target; resolves when both succeed. */
async function probe(target: Pick<RunningTarget, 'endpoint'>, child: ChildProcess | undefined, log: string): Promise<void> {
  const deadline = Date.now() + READY_TIMEOUT_MS;
  let last = 'not tried';
  for (let delay = 20; Date.now() < deadline; delay = Math.min(delay * 2, 500)) {
    if (child && (child.exitCode !== null || child.signalCode !== null)) throw new Error(`exited (${child.exitCode ?? child.signalCode}) before it was ready:\n${tail(log)}`);
    last = (await probeRest(target.endpoint('rest-h1-1k'))) ?? (await probeGrpc(target.endpoint('grpc-unary-1k'))) ?? '';
    if (last === '') return;
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
  throw new Error(`not ready after ${READY_TIMEOUT_MS} ms (${last}):\n${tail(log)}`);
}

function probeRest(endpoint: Endpoint): Promise<string | undefined> {
  if (!endpoint.tls) return Promise.resolve(undefined);
  const tls = endpoint.tls;
  return new Promise((resolve) => {
    const req = httpsRequest(
      { host: endpoint.host, port: endpoint.port, path: PATHS.restReady, agent: false, servername: 'localhost', ca: readFileSync(tls.ca), cert: readFileSync(tls.cert), key: readFileSync(tls.key) },
      (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode === 200 ? undefined : `REST probe: status ${res.statusCode}`));
      },
    );
    req.on('error', (err: NodeJS.ErrnoException) => resolve(`REST probe: ${err.code ?? err.message}`));
    req.end();
  });
}

async function probeGrpc(endpoint: Endpoint): Promise<string | undefined> {
  const session = connectH2(endpoint);
  try {
    const headers = { ':method': 'POST', ':path': PATHS.grpcUnary, 'content-type': 'application/grpc', te: 'trailers' };
    const problem = judgeGrpc(await h2Exchange(session, headers, grpcFrame(16)), 21);
    return problem && `gRPC probe: ${problem}`;
  } finally {
    session.destroy();
  }
}

function tlsEndpoint(port: number, pki: BenchPki): Endpoint {
  return { host: HOST, port, tls: { ca: pki.serverCa, cert: pki.clientCert, key: pki.clientKey } };
}

/** Forks a bench upstream (upstream.ts) and waits for its ports. */
export async function startUpstream(pkiDir: string): Promise<{ child: ChildProcess; ports: UpstreamPorts }> {
  const child = fork(fileURLToPath(new URL('./upstream.js', import.meta.url)), [pkiDir], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const [message] = (await once(child, 'message')) as [UpstreamMessage];
  return { child, ports: message.ports };
}

/**
 * The upstream itself. For the TLS-only scenarios (handshakes, idle
 * connections) a fresh upstream process serves as "Node TLS without
 * forwarding", so its memory is measured from the same start as a proxy's.
 */
async function direct(ctx: BenchContext, scenario: ScenarioId): Promise<RunningTarget> {
  const fresh = scenario === 'handshake' || scenario === 'idle' ? await startUpstream(dirname(ctx.pki.serverCert)) : undefined;
  const up = fresh?.ports ?? ctx.upstream;
  return {
    pid: fresh?.child.pid ?? ctx.upstreamPid,
    processes: 1,
    endpoint(scenario) {
      if (scenario === 'handshake' || scenario === 'idle') return tlsEndpoint(up.tls, ctx.pki);
      if (scenario === 'rest-h2-1k') return { host: HOST, port: up.restH2c };
      return { host: HOST, port: usesGrpcPort(scenario) ? up.grpc : up.rest };
    },
    stop: async () => {
      if (fresh) await stopProcess(fresh.child, 'SIGTERM');
    },
  };
}

async function proxied(spec: TargetSpec, ctx: BenchContext, scenario: ScenarioId, cpuProfileDir: string | undefined): Promise<RunningTarget> {
  // Held together while chosen: two ports picked one after the other (each freed before the next) came out equal,
  // and the proxy refused to start ("--port and --rest_port are both 40201"), losing a round.
  const [grpcPort, restPort] = (await freeLoopbackPorts(2, HOST)) as [number, number];
  const dir = join(ctx.dir, `${spec.id}-${scenario}`);
  mkdirSync(dir, { recursive: true, mode: 0o755 });
  const log = join(dir, spec.kind === 'nginx' ? 'error.log' : 'proxy.log');
  let argv: string[];
  if (spec.kind === 'nginx') {
    const conf = join(dir, 'nginx.conf');
    writeFileSync(conf, nginxConfig({
      dir, workers: spec.workers, grpcPort, restPort, upstreamGrpcPort: ctx.upstream.grpc, upstreamRestPort: ctx.upstream.rest, pki: ctx.pki,
      maxConnections: Math.ceil(ctx.maxConnections / spec.workers) + 1024,
    }));
    argv = [ctx.nginx!, '-e', log, '-p', dir, '-c', conf];
  } else {
    const node = [spec.node ?? process.execPath, ...(spec.nodeFlags ?? ctx.nodeFlags)];
    if (cpuProfileDir) node.push('--cpu-prof', `--cpu-prof-dir=${cpuProfileDir}`);
    const cli = spec.kind === 'pipe' ? fileURLToPath(new URL('./node-pipe.js', import.meta.url)) : (spec.cli ?? join(ctx.repoRoot, 'bin/ovms-mtls'));
    argv = [...node, cli, 'proxy',
      '--port', String(grpcPort), '--grpc_bind_address', HOST, '--rest_port', String(restPort), '--rest_bind_address', HOST,
      '--mtls_grpc_upstream', `${HOST}:${ctx.upstream.grpc}`, '--mtls_rest_upstream', `${HOST}:${ctx.upstream.rest}`,
      '--mtls_cert', ctx.pki.serverCert, '--mtls_key', ctx.pki.serverKey, '--mtls_client_ca', ctx.pki.clientCa, '--mtls_crl', ctx.pki.crl,
      '--mtls_log_level', 'info', `--mtls_access_log=${spec.accessLog}`,
      // nginx's keepalive_timeout here: the idle scenario's connections must outlive their opening.
      '--mtls_idle_timeout', '600',
      '--mtls_workers', String(spec.workers), '--mtls_shutdown_timeout', '2', ...ctx.proxyArgs, ...(spec.extraArgs ?? []),
      ...(spec.kind === 'pipe' ? ['--rest_h2c_upstream', `${HOST}:${ctx.upstream.restH2c}`] : [])];
  }
  const child = spawnWithFdLimit(argv, spec.kind === 'nginx' ? join(dir, 'stdout.log') : log, ctx.repoRoot);
  child.on('error', () => {});
  const target: RunningTarget = {
    pid: child.pid!,
    processes: 1,
    endpoint: (s) => tlsEndpoint(usesGrpcPort(s) ? grpcPort : restPort, ctx.pki),
    async stop() {
      // nginx: SIGTERM is its fast shutdown; the proxy drains (2 s at most) and exits.
      await stopProcess(child, 'SIGTERM');
      // Access logs grow large; keep only their end, which is what explains a failure.
      for (const name of ['access.log', 'proxy.log']) shrink(join(dir, name));
    },
  };
  try {
    await probe(target, child, log);
  } catch (err) {
    await stopProcess(child, 'SIGKILL');
    throw new Error(`${spec.label}: ${(err as Error).message}`, { cause: err });
  }
  return { ...target, processes: processTree(child.pid!).length };
}

export async function startTarget(spec: TargetSpec, ctx: BenchContext, scenario: ScenarioId, cpuProfileDir?: string): Promise<RunningTarget> {
  if (spec.kind === 'direct') {
    const target = await direct(ctx, scenario);
    await probe(target, undefined, '');
    return target;
  }
  return proxied(spec, ctx, scenario, cpuProfileDir);
}
