/**
 * The grpcio (C-core) KServe stand-in of test/fixtures/kserve_grpcio.py, shared by the tests
 * that put a real C-core server behind the proxy: it echoes metadata, XFCC and received bytes,
 * and reports each held call as it starts and as it ends because its client went away.
 */
import { execFile, spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { once } from 'node:events';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

export const PYTHON = '/usr/bin/python3';
export const GRPCIO_SCRIPT = fileURLToPath(new URL('../../../test/fixtures/kserve_grpcio.py', import.meta.url));
export const PROTO_DIR = fileURLToPath(new URL('../../../proto', import.meta.url));

const run = promisify(execFile);

/** The Python stubs of kserve_v2.proto in a directory of their own, and the environment that finds them. */
export interface PythonStubs {
  dir: string;
  /** No HTTP proxy: C-core honours http_proxy even for 127.0.0.1. */
  env(): NodeJS.ProcessEnv;
  cleanup(): Promise<void>;
}

export async function pythonStubs(): Promise<PythonStubs> {
  const env = (dir: string): NodeJS.ProcessEnv => ({ PATH: process.env.PATH, PYTHONPATH: dir, LANG: 'C.UTF-8' });
  await run(PYTHON, ['-c', 'import grpc, google.protobuf'], { env: env('') }).catch(() => {
    throw new Error(`${PYTHON} cannot import grpc: these tests need Debian's python3-grpcio, python3-protobuf and protobuf-compiler (apt-get install -y python3-grpcio python3-protobuf protobuf-compiler; .ci/run does it)`);
  });
  const dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-grpcio-'));
  await run('protoc', ['-I', PROTO_DIR, '--python_out', dir, join(PROTO_DIR, 'kserve_v2.proto')]);
  return { dir, env: () => env(dir), cleanup: () => rm(dir, { recursive: true, force: true }) };
}

export interface GrpcioServer {
  child: ChildProcessWithoutNullStreams;
  port: number;
  events: Record<string, unknown>[];
  /** How many held calls have ended because their client went away. */
  clientsLeft(): number;
  /** How many held calls have started. */
  held(): number;
  stop(): Promise<void>;
}

/** `options`: the script's server options (`strict-pings`). */
export async function startGrpcioServer(stubs: PythonStubs, options: string[] = []): Promise<GrpcioServer> {
  const child = spawn(PYTHON, [GRPCIO_SCRIPT, 'server', ...options], { env: stubs.env() });
  let stderr = '';
  child.stderr.on('data', (chunk: Buffer) => { stderr += chunk.toString(); });
  const events: Record<string, unknown>[] = [];
  const lines = createInterface({ input: child.stdout });
  const port = await new Promise<number>((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`the grpcio server exited (${code}) before listening: ${stderr}`)));
    lines.on('line', (line) => {
      const announced = /^PORT (\d+)$/.exec(line);
      if (announced) resolve(Number(announced[1]));
      else events.push(JSON.parse(line) as Record<string, unknown>);
    });
  });
  return {
    child,
    port,
    events,
    clientsLeft: () => events.filter((e) => e.event === 'client_left').length,
    held: () => events.filter((e) => e.event === 'held').length,
    async stop() {
      child.stdin.end();
      if (child.exitCode === null) await once(child, 'exit');
    },
  };
}
