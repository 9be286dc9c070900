import { once } from 'node:events';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { CHAT_REPLY_WORDS } from '../../src/demo/openai-chat.js';
import type { ModelServer } from '../../src/demo/model-server.js';
import type { TestPki } from './pki.js';
import { tlsClientOptions } from './harness.js';
import { eventually } from './ops.js';

/** A promise per SSE event index, created on first use by either side. */
export class GateBoard {
  private readonly gates = new Map<number, { promise: Promise<void>; open: () => void }>();
  private entry(i: number) {
    let e = this.gates.get(i);
    if (!e) {
      let open!: () => void;
      const promise = new Promise<void>((resolve) => { open = resolve; });
      e = { promise, open };
      this.gates.set(i, e);
    }
    return e;
  }
  wait = (i: number): Promise<void> => this.entry(i).promise;
  open(i: number): void { this.entry(i).open(); }
  openAll(): void { for (let i = 0; i <= CHAT_REPLY_WORDS.length; i++) this.open(i); }
}

/** Yields SSE events (text up to each blank line) as they arrive. */
export async function* sseEvents(body: AsyncIterable<unknown>): AsyncGenerator<string> {
  let pending = '';
  for await (const chunk of body) {
    pending += Buffer.isBuffer(chunk) ? chunk.toString('utf8') : String(chunk);
    let cut: number;
    while ((cut = pending.indexOf('\n\n')) >= 0) {
      yield pending.slice(0, cut);
      pending = pending.slice(cut + 2);
    }
  }
}

/**
 * A streamed chat completion sent over HTTP/1.1 to the proxy's REST port `port`, resolved once `upstream` has it:
 * with a model server whose sseGate never opens, a call in flight for as long as the test holds it (a drain waits for it).
 */
export async function heldChatStream(port: number, pki: TestPki, upstream: ModelServer): Promise<TLSSocket> {
  const client = tlsConnect({ ...tlsClientOptions(pki), host: '127.0.0.1', port });
  client.on('error', () => {});
  await once(client, 'secureConnect');
  const body = JSON.stringify({ model: 'm', stream: true, messages: [{ role: 'user', content: 'hi' }] });
  client.write(`POST /v3/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`);
  await eventually(() => upstream.received.length > 0, 'the stream to reach the model server');
  return client;
}
