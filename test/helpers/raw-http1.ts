import { once } from 'node:events';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import type { TestPki } from './pki.js';
import { tlsClientOptions } from './harness.js';

/**
 * An mTLS connection that speaks HTTP/1.1 as the test writes it, byte for byte; a reset shows as 'close'.
 * `allowHalfOpen`: it does not close its side when the server closes its own.
 */
export async function openRaw(port: number, pki: TestPki, options: { allowHalfOpen?: boolean } = {}): Promise<TLSSocket> {
  const socket = tlsConnect({ host: '127.0.0.1', port, ALPNProtocols: ['http/1.1'], ...tlsClientOptions(pki), ...options });
  socket.on('error', () => {});
  await once(socket, 'secureConnect');
  return socket;
}

/** Everything the server sends until it closes the connection. */
export async function readToClose(socket: TLSSocket): Promise<string> {
  const chunks: Buffer[] = [];
  socket.on('data', (c: Buffer) => chunks.push(c));
  await once(socket, 'close');
  return Buffer.concat(chunks).toString('latin1');
}

/** As readToClose(), but a bounded wait: a server that has not closed by `ms` has the connection closed by us, and what came by then is returned. */
export async function readToCloseWithin(socket: TLSSocket, ms: number): Promise<string> {
  const bound = setTimeout(() => socket.destroy(), ms);
  try {
    return await readToClose(socket);
  } finally {
    clearTimeout(bound);
  }
}

/** Resolves with what arrived once `pattern` shows up in it. */
export function readUntil(socket: TLSSocket, pattern: RegExp): Promise<string> {
  return new Promise((resolve, reject) => {
    let text = '';
    const onData = (c: Buffer) => {
      text += c.toString('latin1');
      if (pattern.test(text)) {
        socket.off('data', onData);
        resolve(text);
      }
    };
    socket.on('data', onData);
    socket.once('close', () => reject(new Error(`closed before ${pattern}; got ${JSON.stringify(text)}`)));
  });
}
