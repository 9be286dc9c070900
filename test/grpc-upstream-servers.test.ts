/**
 * Why gRPC terminate opens several upstream connections: OVMS with --grpc_workers N runs N
 * C-core servers on one port (SO_REUSEPORT), and the kernel gives each connection to one of
 * them. grpcio's C-core stands in for OVMS's here.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { grpcFrame, h2Request, h2Session, startTestProxy } from './helpers/harness.js';
import { PYTHON } from './helpers/grpcio.js';

const SCRIPT = fileURLToPath(new URL('../../test/fixtures/grpc_servers_one_port.py', import.meta.url));
const SERVERS = 4;

let pki: TestPki;
let servers: ReturnType<typeof spawn>;
let port: number;

before(async () => {
  pki = await createTestPki();
  servers = spawn(PYTHON, [SCRIPT, String(SERVERS)], { env: { PATH: process.env.PATH, LANG: 'C.UTF-8' }, stdio: ['pipe', 'pipe', 'inherit'] });
  const [line] = (await once(createInterface({ input: servers.stdout! }), 'line')) as [string];
  port = Number(/^PORT (\d+)$/.exec(line)![1]);
});

after(async () => {
  servers.stdin!.end();
  if (servers.exitCode === null) await once(servers, 'exit');
  await pki.cleanup();
});

/** The servers that took 48 calls sent at once through a proxy opening `connections` upstream connections. */
async function serversReached(connections: number): Promise<Set<number>> {
  const local = await startTestProxy({ pki, upstream: { grpcPort: port }, grpcUpstreamConnections: connections });
  const session = h2Session(local.grpcPort, pki);
  try {
    const headers = { ':method': 'POST', ':path': '/demo.Servers/Which', 'content-type': 'application/grpc', te: 'trailers' };
    const answers = await Promise.all(Array.from({ length: 48 }, () => h2Request(session, headers, grpcFrame(Buffer.alloc(0)))));
    assert.deepEqual(new Set(answers.map((a) => a.trailers?.['grpc-status'])), new Set(['0']));
    // A gRPC message: 5 bytes of prefix, then the server's number.
    return new Set(answers.map((a) => a.body[5]!));
  } finally {
    session.close();
    await local.proxy.shutdown(1000);
  }
}

describe('gRPC servers sharing a port (OVMS --grpc_workers)', () => {
  test('over one upstream connection every call reaches the same server', async () => {
    assert.equal((await serversReached(1)).size, 1);
  });

  test('over sixteen, the calls reach several of the four (the kernel picks by a hash: all four, but for about one run in 25)', async () => {
    assert.ok((await serversReached(16)).size > 1);
  });
});
