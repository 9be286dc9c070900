import { once } from 'node:events';
import { createServer as createTcpServer, type AddressInfo, type Socket } from 'node:net';

export interface ScriptedUpstream {
  readonly port: number;
  /** Every connection the upstream accepted, oldest first. */
  readonly sockets: Socket[];
  close(): void;
}

/**
 * A raw TCP "model server" on loopback that answers the first bytes of each
 * connection by running `answer` on its socket (with those bytes): whatever bytes, timing or
 * closing a test needs, without an HTTP library smoothing them over.
 */
export async function scriptedUpstream(answer: (socket: Socket, first: Buffer) => void): Promise<ScriptedUpstream> {
  const sockets: Socket[] = [];
  const server = createTcpServer((socket) => {
    sockets.push(socket);
    socket.on('error', () => {});
    socket.once('data', (first: Buffer) => answer(socket, first));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return { port: (server.address() as AddressInfo).port, sockets, close: () => server.close() };
}
