/**
 * Server-Sent Events over HTTP/1.1: each event carries the upstream's
 * monotonic clock reading taken right before it wrote the event; the
 * operation latency is the time until this process read it. CLOCK_MONOTONIC
 * is shared by all processes on the machine, so no clock sync is needed.
 */
import { Agent as HttpAgent, get as httpGet, type IncomingMessage } from 'node:http';
import { Agent as HttpsAgent, get as httpsGet } from 'node:https';
import { PATHS, type DriverSpec } from '../protocol.js';
import { clientTlsOptions } from './h2-pool.js';
import type { Recorder } from './phase.js';
import type { Load } from './load.js';

const STAMP = /"t":(\d+)/;

export function sseLoad(spec: DriverSpec): Load {
  const tls = clientTlsOptions(spec.endpoint);
  const agentOptions = { keepAlive: true, maxSockets: spec.connections };
  const agent = tls ? new HttpsAgent({ ...agentOptions, ...tls }) : new HttpAgent(agentOptions);
  const get = tls ? httpsGet : httpGet;
  const options = {
    agent,
    host: spec.endpoint.host,
    port: spec.endpoint.port,
    path: `${PATHS.sse}?events=${spec.messagesPerStream}&interval_ms=${spec.intervalMs}`,
    headers: { host: 'localhost', accept: 'text/event-stream' },
  };
  const oneStream = (recorder: Recorder) =>
    new Promise<void>((resolve) => {
      const req = get(options, (res: IncomingMessage) => {
        let pending = '';
        let events = 0;
        let done = false;
        res.setEncoding('utf8');
        res.on('data', (text: string) => {
          const now = process.hrtime.bigint();
          pending += text;
          let end: number;
          while ((end = pending.indexOf('\n\n')) >= 0) {
            const event = pending.slice(0, end);
            pending = pending.slice(end + 2);
            if (event === 'data: [DONE]') {
              done = true;
              continue;
            }
            const stamp = STAMP.exec(event);
            if (!stamp) {
              recorder.fail('malformed event');
              continue;
            }
            events += 1;
            recorder.ok(Number(now - BigInt(stamp[1]!)) / 1000);
          }
        });
        res.on('end', () => {
          if (res.statusCode !== 200) recorder.fail(`http status ${res.statusCode}`);
          else if (!done || events !== spec.messagesPerStream) recorder.fail(`stream ended after ${events} of ${spec.messagesPerStream} events`);
          resolve();
        });
        res.on('error', () => {
          recorder.fail('response aborted');
          resolve();
        });
      });
      req.on('error', (err) => {
        recorder.fail(`request: ${(err as NodeJS.ErrnoException).code ?? err.message}`);
        resolve();
      });
    });
  return {
    prepare: async () => {},
    slots: spec.connections,
    async loop(_slot, recorder) {
      while (recorder.more()) await oneStream(recorder);
    },
    close: () => agent.destroy(),
  };
}
