import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { connect, type Socket } from 'node:net';

/**
 * Listens with a backlog of one (Node turns 0 into 511) and blocks its event
 * loop for good, so nothing is ever accepted; the ready line goes out first
 * (pipes are synchronous on Linux).
 */
const NEVER_ACCEPTS = `
const server = require('node:net').createServer();
server.listen({ port: 0, host: '127.0.0.1', backlog: 1 }, () => {
  process.stdout.write(server.address().port + '\\n');
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0);
});`;

export interface Blackhole {
  readonly port: number;
  close(): void;
}

/**
 * A loopback port where a connection hangs as it does toward a host that
 * drops SYNs: the listener's accept queue is full (Linux queues backlog + 1,
 * two connections of ours) and nobody ever accepts, so the kernel drops
 * further SYNs.
 */
export async function startBlackhole(): Promise<Blackhole> {
  const child = spawn(process.execPath, ['-e', NEVER_ACCEPTS], { stdio: ['ignore', 'pipe', 'inherit'] });
  const [line] = (await once(child.stdout!, 'data')) as [Buffer];
  const port = Number(line.toString().trim());
  const fillers: Socket[] = [];
  for (let i = 0; i < 2; i++) {
    fillers.push(connect({ port, host: '127.0.0.1' }));
    await once(fillers.at(-1)!, 'connect');
  }
  return {
    port,
    close() {
      for (const filler of fillers) filler.destroy();
      child.kill('SIGKILL');
    },
  };
}
