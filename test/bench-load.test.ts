/**
 * The benchmark's REST load (bench/load/rest.ts) checks every answer: status
 * 200 and the request body echoed byte for byte. A forwarder that garbles
 * bytes without changing their count is counted as failing, not as
 * throughput. Plaintext on loopback, as the bench's direct row; no figure is
 * measured here.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer as createHttpServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { createServer as createH2cServer, type Http2ServerRequest, type Http2ServerResponse } from 'node:http2';
import type { AddressInfo, Server } from 'node:net';
import type { DriverSpec } from '../bench/protocol.js';
import { restH1Load, restH2Load } from '../bench/load/rest.js';
import { runPhase } from '../bench/load/phase.js';
import type { LoadFactory } from '../bench/load/load.js';

const OPS = 12;

/** Echoes each POST body; `garble` overwrites 50 of its bytes with spaces (same length). */
function echo(garble: boolean) {
  return (req: IncomingMessage | Http2ServerRequest, res: ServerResponse | Http2ServerResponse) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      if (garble) body.fill(0x20, 10, 60);
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': body.length });
      res.end(body);
    });
  };
}

async function phaseAgainst(server: Server, load: LoadFactory, scenario: DriverSpec['scenario']) {
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const spec: DriverSpec = {
    scenario, endpoint: { host: '127.0.0.1', port: (server.address() as AddressInfo).port }, connections: 1, streamsPerConnection: 1,
    payloadBytes: 1024, replyBytes: -1, warmupMs: 0, durationMs: 600_000, maxOps: OPS, messagesPerStream: 0, intervalMs: 0, idleConnections: 0,
  };
  const running = load(spec);
  try {
    await running.prepare();
    // Ended by the operation count (one slot, one operation at a time), never by the clock.
    return await runPhase(running.slots, { durationMs: spec.durationMs, maxOps: OPS, graceMs: 60_000 }, running.loop);
  } finally {
    running.close();
    server.close();
  }
}

const serve = {
  h1: (garble: boolean): Server => createHttpServer(echo(garble)),
  h2c: (garble: boolean): Server => createH2cServer(echo(garble)) as unknown as Server,
};

for (const [name, load, scenario, createServer] of [
  ['HTTP/1.1', restH1Load, 'rest-h1-1k', serve.h1],
  ['HTTP/2', restH2Load, 'rest-h2-1k', serve.h2c],
] as const) {
  test(`REST over ${name}: an echo with the right length but other bytes is an error for every request`, async () => {
    const result = await phaseAgainst(createServer(true), load, scenario);
    assert.deepEqual({ ops: result.ops, errors: result.errors, errorSamples: result.errorSamples }, { ops: 0, errors: OPS, errorSamples: { 'reply differs from the request body it echoes': OPS } });
  });

  test(`REST over ${name}: the exact echo counts every request as done`, async () => {
    const result = await phaseAgainst(createServer(false), load, scenario);
    assert.deepEqual({ ops: result.ops, errors: result.errors }, { ops: OPS, errors: 0 });
  });
}
