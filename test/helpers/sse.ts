import { CHAT_REPLY_WORDS } from '../../src/demo/openai-chat.js';

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
