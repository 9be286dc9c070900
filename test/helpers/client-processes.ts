/**
 * Real clients (curl, Python's requests and httpx) run as child processes against the proxy, as users run them,
 * and an event stream released to them one event at a time.
 */
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { CHAT_REPLY_WORDS } from '../../src/demo/openai-chat.js';
import type { GateBoard } from './sse.js';

/**
 * No proxy variables, and none of the CA-bundle ones this machine sets: requests lets
 * REQUESTS_CA_BUNDLE override a Session's `verify`, and curl would read CURL_CA_BUNDLE.
 */
export const clientEnv = (): NodeJS.ProcessEnv => ({ PATH: process.env.PATH, LANG: 'C.UTF-8' });

export interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

export function runClient(file: string, args: string[]): Promise<Run> {
  return new Promise((resolve) => {
    execFile(file, args, { env: clientEnv(), timeout: 30_000, maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

/**
 * Releases the upstream's events one at a time (`board`: the model server's sseGate, fresh): event i+1 is not even
 * written upstream until the client has printed event i, so a client that got them only at the end would hang here.
 * Returns what the client printed, one line per event.
 */
export async function releasedOneByOne(board: GateBoard, command: string, args: string[], eventOf: (line: string) => string | undefined): Promise<{ events: string[]; code: number; lines: string[] }> {
  const child = spawn(command, args, { env: clientEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (chunk: Buffer) => { stderr += chunk.toString(); });
  const exited = once(child, 'exit');
  const events: string[] = [];
  const lines: string[] = [];
  try {
    board.open(0);
    for await (const line of createInterface({ input: child.stdout })) {
      lines.push(line);
      const event = eventOf(line);
      if (event === undefined) continue;
      events.push(event);
      // Still running: this event came before the stream ended.
      assert.equal(child.exitCode, null, `exited before event ${events.length}: ${stderr}`);
      board.open(events.length);
    }
    const [code] = await exited;
    return { events, code: code as number, lines };
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
  }
}

/** The chat reply's words, then [DONE]: what a client of the stand-in's stream must see. */
export function assertChatStream(events: string[]): void {
  const words = events.slice(0, -1).map((e) => JSON.parse(e.replace(/^data: /, '')).choices[0].delta.content as string);
  assert.deepEqual(words, CHAT_REPLY_WORDS);
  assert.equal(events.at(-1), 'data: [DONE]');
}
