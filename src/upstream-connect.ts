import type { Socket } from 'node:net';

/** Our code for a connection the model server never accepted (describeUpstreamError names it). */
export const CONNECT_TIMEOUT = 'UPSTREAM_CONNECT_TIMEOUT';

/**
 * Destroys a socket that is still connecting after `ms`. An upstream that
 * drops SYNs (a vanished host, a firewall) would otherwise hold the request
 * for the kernel's own timeout, about two minutes. A plain timer, and both
 * listeners removed once connected: a socket keeps a setTimeout() timer and
 * its listener for life.
 */
export function failIfNotConnectedWithin(socket: Socket, ms: number): void {
  if (!socket.connecting) return;
  const timer = setTimeout(() => socket.destroy(Object.assign(new Error(`no connection within ${ms} ms`), { code: CONNECT_TIMEOUT })), ms);
  const stop = (): void => {
    clearTimeout(timer);
    socket.off('connect', stop);
    socket.off('close', stop);
  };
  socket.on('connect', stop);
  socket.on('close', stop);
}
