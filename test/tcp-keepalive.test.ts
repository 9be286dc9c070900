import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { readFile } from 'node:fs/promises';
import { connect, type TLSSocket } from 'node:tls';
import type { TestPki } from './helpers/pki.js';
import { startProxyFixture, tlsClientOptions, type StartedProxy } from './helpers/harness.js';
import { eventually } from './helpers/ops.js';
import { TCP_KEEPALIVE_DELAY_MS } from '../src/listeners.js';

/** `tr` in /proc/net/tcp: which timer the socket has pending; 2 is the keepalive timer. */
const KEEPALIVE_TIMER = 2;
/** /proc/net/tcp counts the time left in clock ticks (USER_HZ, 100 on Linux). */
const TICKS_PER_SECOND = 100;

let pki: TestPki;
let front: StartedProxy;
let closeAll: () => Promise<void>;

before(async () => ({ pki, front, close: closeAll } = await startProxyFixture()));
after(() => closeAll());

/** The proxy's end of a loopback connection, as the kernel shows it: its pending timer and the ticks left on it. */
async function serverSideTimer(serverPort: number, clientPort: number): Promise<{ timer: number; ticksLeft: number } | undefined> {
  const hexPort = (port: number) => port.toString(16).toUpperCase().padStart(4, '0');
  for (const line of (await readFile('/proc/net/tcp', 'utf8')).split('\n').slice(1)) {
    const fields = line.trim().split(/\s+/);
    if (fields[1]?.endsWith(`:${hexPort(serverPort)}`) && fields[2]?.endsWith(`:${hexPort(clientPort)}`)) {
      const [timer, ticksLeft] = fields[5]!.split(':').map((hex) => parseInt(hex, 16));
      return { timer: timer!, ticksLeft: ticksLeft! };
    }
  }
  return undefined;
}

async function authenticatedConnection(port: number, alpn: string): Promise<TLSSocket> {
  const socket = connect({ ...tlsClientOptions(pki), host: '127.0.0.1', port, ALPNProtocols: [alpn] });
  await once(socket, 'secureConnect');
  return socket;
}

for (const [listener, alpn] of [['grpc', 'h2'], ['rest', 'http/1.1']] as const) {
  test(`${listener} port: an idle client connection has TCP keepalive probes armed after ${TCP_KEEPALIVE_DELAY_MS / 1000} s, so a vanished client is found`, async () => {
    const port = listener === 'grpc' ? front.grpcPort : front.restPort;
    const socket = await authenticatedConnection(port, alpn);
    try {
      let seen: { timer: number; ticksLeft: number } | undefined;
      await eventually(async () => (seen = await serverSideTimer(port, socket.localPort!))?.timer === KEEPALIVE_TIMER, 'the keepalive timer on the proxy side of the connection');
      // The kernel's own default would be 7,200 s.
      assert.ok(seen!.ticksLeft <= (TCP_KEEPALIVE_DELAY_MS / 1000) * TICKS_PER_SECOND, `keepalive fires in ${seen!.ticksLeft} ticks`);
    } finally {
      socket.destroy();
    }
  });
}
