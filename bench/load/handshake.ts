/**
 * A new mutual-TLS connection per operation, never resumed (no session
 * ticket is offered): handshake with the client certificate, one
 * `GET /v2/health/ready` over HTTP/1.1, `Connection: close`. An operation
 * counts only if the answer is `200`.
 */
import { connect, type ConnectionOptions } from 'node:tls';
import { PATHS, type DriverSpec } from '../protocol.js';
import { clientTlsOptions } from './h2-pool.js';
import { timedLoop } from './phase.js';
import type { Load } from './load.js';

const REQUEST = `GET ${PATHS.restReady} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n`;

export function handshakeLoad(spec: DriverSpec): Load {
  if (!spec.endpoint.tls) throw new Error('the handshake scenario needs a TLS endpoint');
  const options: ConnectionOptions = {
    ...clientTlsOptions(spec.endpoint),
    host: spec.endpoint.host,
    port: spec.endpoint.port,
    ALPNProtocols: ['http/1.1'],
  };
  const once = () =>
    new Promise<string | undefined>((resolve) => {
      const socket = connect(options);
      let head = '';
      socket.setEncoding('latin1');
      socket.once('secureConnect', () => socket.write(REQUEST));
      socket.on('data', (text: string) => {
        if (head.length < 16) head += text;
      });
      socket.on('error', (err: NodeJS.ErrnoException) => {
        if (head === '') head = `error ${err.code ?? err.message}`;
      });
      socket.once('close', () => resolve(head.startsWith('HTTP/1.1 200') ? undefined : head.startsWith('error') ? head : `answer '${head.slice(0, 12)}'`));
      socket.once('end', () => socket.destroy());
    });
  return {
    prepare: async () => {},
    slots: spec.connections,
    loop: timedLoop(once),
    close: () => {},
  };
}
