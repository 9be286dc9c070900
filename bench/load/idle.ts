/**
 * Opens many mutual-TLS HTTP/2 connections (what an idle gRPC channel is)
 * and holds them. A connection counts once the server's SETTINGS arrived:
 * only then has the server accepted it past the certificate checks.
 */
import { once } from 'node:events';
import type { ClientHttp2Session } from 'node:http2';
import type { DriverSpec } from '../protocol.js';
import { connectH2 } from './h2-pool.js';

const PARALLEL_HANDSHAKES = 32;
const CONNECT_TIMEOUT_MS = 15_000;

export interface Held {
  sessions: ClientHttp2Session[];
  failed: number;
  errorSamples: Record<string, number>;
}

export async function openIdle(spec: DriverSpec): Promise<Held> {
  const held: Held = { sessions: [], failed: 0, errorSamples: {} };
  let next = 0;
  const openOne = async () => {
    const session = connectH2(spec.endpoint);
    const timeout = AbortSignal.timeout(CONNECT_TIMEOUT_MS);
    try {
      await Promise.race([
        once(session, 'remoteSettings', { signal: timeout }),
        once(session, 'close', { signal: timeout }).then(() => Promise.reject(new Error('closed by server'))),
      ]);
      held.sessions.push(session);
    } catch (err) {
      held.failed += 1;
      const reason = (err as Error).name === 'AbortError' ? 'connect timeout' : (err as Error).message;
      held.errorSamples[reason] = (held.errorSamples[reason] ?? 0) + 1;
      session.destroy();
    }
  };
  const worker = async () => {
    while (next < spec.idleConnections) {
      next += 1;
      await openOne();
    }
  };
  await Promise.all(Array.from({ length: Math.min(PARALLEL_HANDSHAKES, spec.idleConnections) }, worker));
  return held;
}
