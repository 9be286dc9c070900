/**
 * KServe-style JSON inference over HTTP/1.1 (kept-alive sockets, one request
 * in flight each) and over HTTP/2 (streams on a few sessions). Every answer
 * must be 200 with the echoed body, byte for byte.
 */
import { Agent as HttpAgent, request as httpRequest, type IncomingMessage } from 'node:http';
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';
import type { OutgoingHttpHeaders } from 'node:http2';
import { PATHS, type DriverSpec } from '../protocol.js';
import { H2Pool, clientTlsOptions, h2Exchange } from './h2-pool.js';
import { timedLoop } from './phase.js';
import type { Load } from './load.js';

/** A KServe v2 JSON infer request of about `bytes` bytes (FP32 data, like a real one). */
export function kserveJsonBody(bytes: number): Buffer {
  const head = '{"id":"bench","inputs":[{"name":"input","shape":[1,N],"datatype":"FP32","data":[';
  const tail = ']}]}';
  const values: string[] = [];
  let length = head.length + tail.length;
  while (length < bytes) {
    const v = (values.length % 97) / 8;
    const text = String(v);
    values.push(text);
    length += text.length + 1;
  }
  return Buffer.from(head.replace('N', String(values.length)) + values.join(',') + tail);
}

/**
 * Why an echoed body is wrong, or undefined when it is the request's: a
 * forwarder that garbles bytes without changing their count must show up
 * as errors, not as throughput.
 */
export function echoProblem(chunks: readonly Buffer[], sent: Buffer): string | undefined {
  const reply = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks);
  if (reply.length !== sent.length) return `reply ${reply.length} bytes, expected ${sent.length}`;
  return reply.equals(sent) ? undefined : 'reply differs from the request body it echoes';
}

export function restH1Load(spec: DriverSpec): Load {
  const body = kserveJsonBody(spec.payloadBytes);
  const tls = clientTlsOptions(spec.endpoint);
  const agentOptions = { keepAlive: true, maxSockets: spec.connections, maxFreeSockets: spec.connections, scheduling: 'fifo' as const };
  const agent = tls ? new HttpsAgent({ ...agentOptions, ...tls }) : new HttpAgent(agentOptions);
  const send = tls ? httpsRequest : httpRequest;
  const options = {
    agent,
    host: spec.endpoint.host,
    port: spec.endpoint.port,
    method: 'POST',
    path: PATHS.restInfer,
    headers: { host: 'localhost', 'content-type': 'application/json', 'content-length': body.length },
  };
  const exchange = () =>
    new Promise<string | undefined>((resolve) => {
      const req = send(options, (res: IncomingMessage) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve(res.statusCode !== 200 ? `http status ${res.statusCode}` : echoProblem(chunks, body)));
        res.on('error', (err) => resolve(`response: ${(err as NodeJS.ErrnoException).code ?? err.message}`));
      });
      req.on('error', (err) => resolve(`request: ${(err as NodeJS.ErrnoException).code ?? err.message}`));
      req.end(body);
    });
  return {
    // Sockets open on first use; the warm-up phase pays for that.
    prepare: async () => {},
    slots: spec.connections,
    loop: timedLoop(exchange),
    close: () => agent.destroy(),
  };
}

export function restH2Load(spec: DriverSpec): Load {
  const body = kserveJsonBody(spec.payloadBytes);
  const pool = new H2Pool(spec.endpoint, spec.connections);
  const headers: OutgoingHttpHeaders = {
    ':method': 'POST',
    ':path': PATHS.restInfer,
    ':authority': 'localhost',
    'content-type': 'application/json',
    'content-length': body.length,
  };
  return {
    prepare: () => pool.ready(),
    slots: spec.connections * spec.streamsPerConnection,
    loop: timedLoop(async (slot) => {
      const o = await h2Exchange(pool.session(slot), headers, body, true);
      return o.rstCode !== undefined ? `stream reset ${o.rstCode}`
        : o.status !== 200 ? `http status ${o.status}`
        : echoProblem(o.chunks!, body);
    }),
    close: () => pool.close(),
  };
}
