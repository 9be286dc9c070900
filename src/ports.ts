/**
 * Free loopback ports for OVMS. The nginx example hard-coded 7000/7001 and
 * never checked them (FINDINGS). Here the OS picks: every port is held open
 * until all are chosen, so the ports of one call are distinct, then released
 * for OVMS to bind. Between release and OVMS's bind another process can take
 * a port; the entrypoint detects that with `isPortTaken` after OVMS fails to
 * start and picks new ports.
 */
import { once } from 'node:events';
import { createServer, isIPv6, type AddressInfo, type Server } from 'node:net';
import { ListenError } from './errors.js';

async function listenOn(host: string, port: number): Promise<Server> {
  const server = createServer();
  server.listen({ host, port, exclusive: true });
  await Promise.race([
    once(server, 'listening'),
    once(server, 'error').then(([err]) => {
      throw err;
    }),
  ]);
  return server;
}

function close(server: Server): Promise<void> {
  return new Promise((resolve) => server.close(() => resolve()));
}

/**
 * `count` distinct ports that were free on `host` a moment ago, none of them in `except`.
 * A port of `except` the system offers is held with the others, so it cannot come twice.
 */
export async function freeLoopbackPorts(count: number, host = '127.0.0.1', except: ReadonlySet<number> = new Set()): Promise<number[]> {
  const servers: Server[] = [];
  const chosen: number[] = [];
  try {
    while (chosen.length < count) {
      const server = await listenOn(host, 0).catch((err: NodeJS.ErrnoException) => Promise.reject(noLoopbackAddress(err, host)));
      servers.push(server);
      const { port } = server.address() as AddressInfo;
      if (!except.has(port)) chosen.push(port);
    }
    return chosen;
  } finally {
    await Promise.all(servers.map(close));
  }
}

/**
 * The model server's loopback address missing, as in a network namespace set up IPv6-only
 * without 127.0.0.1 on its loopback interface: one line saying so and how to add it, where
 * the system's EADDRNOTAVAIL came out as an internal error with a stack trace. OVMS keeps
 * 127.0.0.1 rather than ::1: older releases refuse an IPv6 bind address.
 */
function noLoopbackAddress(err: NodeJS.ErrnoException, host: string): Error {
  if (err.code !== 'EADDRNOTAVAIL') return err;
  return new ListenError(
    `cannot pick a loopback port for the model server: ${host} is not on this machine (the loopback interface has no such address); ` +
      `the model server listens on ${host} whatever the public addresses are, as older OVMS releases refuse an IPv6 bind address: add it, e.g. ip addr add ${host}/${isIPv6(host) ? 128 : 8} dev lo`,
    { cause: err },
  );
}

/** True when something already listens on host:port (we cannot bind it). */
export async function isPortTaken(port: number, host = '127.0.0.1'): Promise<boolean> {
  try {
    await close(await listenOn(host, port));
    return false;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EADDRINUSE') return true;
    throw err;
  }
}

/**
 * OVMS's loopback ports, as the forwarders see them. The upstream objects
 * read the current port at each connection, so after `choose()` picks new
 * ports (one was taken before OVMS could bind it) the proxy follows without
 * rebuilding its listeners.
 */
export class LoopbackUpstreams {
  readonly host: string;
  readonly #wanted: { readonly grpc: boolean; readonly rest: boolean };
  readonly #ours: ReadonlySet<number>;
  #ports: { grpc?: number; rest?: number } = {};

  /**
   * `ours`: the public and admin ports. They are bound only after OVMS's ports are chosen, and
   * one that was free until then (picked by the operator or a test among free ports) could be
   * offered for OVMS too: OVMS then found it taken by our own listener and was started again.
   */
  constructor(wanted: { grpc: boolean; rest: boolean }, host = '127.0.0.1', ours: readonly number[] = []) {
    this.#wanted = wanted;
    this.host = host;
    this.#ours = new Set(ours);
  }

  async choose(): Promise<void> {
    const names = (['grpc', 'rest'] as const).filter((n) => this.#wanted[n]);
    const ports = await freeLoopbackPorts(names.length, this.host, this.#ours);
    const next: { grpc?: number; rest?: number } = {};
    names.forEach((name, i) => (next[name] = ports[i]!));
    this.#ports = next;
  }

  current(): { readonly grpc?: number; readonly rest?: number } {
    return { ...this.#ports };
  }

  /** A host:port whose port follows `choose()`. */
  upstream(name: 'grpc' | 'rest'): { readonly host: string; readonly port: number } {
    const current = () => this.#ports[name] ?? 0;
    return {
      host: this.host,
      get port() {
        return current();
      },
    };
  }

  /** The first of our ports that something else now listens on, if any. */
  async takenPort(): Promise<number | undefined> {
    for (const port of Object.values(this.#ports)) {
      if (await isPortTaken(port, this.host)) return port;
    }
    return undefined;
  }
}
