import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { connect, type Socket } from 'node:net';

/** What a late acceptor answers each read with (an HTTP/1.1 200 "ok" unless told), and whether it then closes. */
export interface LateAnswer {
  readonly bytes: Buffer;
  readonly close: boolean;
}

const HTTP_OK: LateAnswer = { bytes: Buffer.from('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok'), close: false };

/**
 * Listens with a backlog of one (Node turns 0 into 511) and blocks its event
 * loop for WAIT_MS (for good when Infinity), so nothing is accepted meanwhile;
 * the ready line goes out first (pipes are synchronous on Linux). Afterwards
 * it answers each read with `answer`.
 */
function neverAcceptsFor(waitMs: number, answer: LateAnswer): string {
  return `
const answer = Buffer.from('${answer.bytes.toString('base64')}', 'base64');
const server = require('node:net').createServer((socket) => {
  socket.on('error', () => {});
  socket.on('data', () => ${answer.close ? 'socket.end(answer)' : 'socket.write(answer)'});
});
server.listen({ port: 0, host: '127.0.0.1', backlog: 1 }, () => {
  process.stdout.write(server.address().port + '\\n');
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ${String(waitMs)});
});`;
}

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
export function startBlackhole(): Promise<Blackhole> {
  return startLateAcceptor(Infinity);
}

/**
 * As startBlackhole, until `ms` have passed: then the port accepts (the kernel's
 * next SYN retransmission, a second or more later, gets through) and answers.
 */
export async function startLateAcceptor(ms: number, answer: LateAnswer = HTTP_OK): Promise<Blackhole> {
  const child = spawn(process.execPath, ['-e', neverAcceptsFor(ms, answer)], { stdio: ['ignore', 'pipe', 'inherit'] });
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
