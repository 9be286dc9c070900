/**
 * Real clients (curl, Python's requests and httpx) run as child processes against the proxy, as users run them,
 * and an event stream released to them one event at a time.
 */
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
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

/** A command to a commanded client: `op` and its fields. */
export type Command = { op: string } & Record<string, unknown>;

/**
 * A long-running REST client process in another language (test/fixtures/go-rest-client, java-rest-client) that
 * reads one command a line on stdin, runs each on its own, and writes JSON lines on stdout carrying the command's
 * id: its final line, and on the way lines with `event` (an SSE event or line read) or `progress`. So a test can
 * act (drain, reload, release an event) while requests are in flight. `encode` writes a command as the client reads it;
 * `Spec`: what a request says, `Result` its outcome, `Outcome` a steady stream's.
 */
export class CommandedClient<Spec extends object, Result, Outcome> {
  readonly #child: ChildProcessWithoutNullStreams;
  readonly #waiting = new Map<number, (line: Record<string, unknown>) => void>();
  readonly #events = new Map<number, (line: Record<string, unknown>) => void>();
  readonly #what: string;
  readonly #encode: (id: number, command: Command) => string;
  #next = 1;
  #stderr = '';

  constructor(what: string, command: string, args: string[], encode: (id: number, command: Command) => string) {
    this.#what = what;
    this.#encode = encode;
    this.#child = spawn(command, args, { env: clientEnv() });
    this.#child.stderr.on('data', (chunk: Buffer) => (this.#stderr += chunk.toString()));
    createInterface({ input: this.#child.stdout }).on('line', (text) => {
      const line = JSON.parse(text) as Record<string, unknown> & { id: number };
      if ('event' in line || 'progress' in line) this.#events.get(line.id)?.(line);
      else this.#waiting.get(line.id)?.(line);
    });
    this.#child.once('exit', (code) => {
      for (const settle of this.#waiting.values()) settle({ exited: code, stderr: this.#stderr });
    });
  }

  /** Sends a command; its id, and its final line once it comes. `onEvent`: events and progress lines on the way. */
  send(command: Command, onEvent?: (line: Record<string, unknown>) => void): { id: number; done: Promise<Record<string, unknown>> } {
    const id = this.#next++;
    if (onEvent) this.#events.set(id, onEvent);
    const done = new Promise<Record<string, unknown>>((resolve) => this.#waiting.set(id, resolve));
    this.#child.stdin.write(`${this.#encode(id, command)}\n`);
    return { id, done: done.then((line) => (assert.ok(!('exited' in line), `the ${this.#what} exited: ${this.#stderr}`), line)) };
  }

  async request(client: string, spec: Spec): Promise<Result> {
    return (await this.send({ op: 'request', client, ...spec }).done).result as Result;
  }

  /**
   * Sends `command` (a request for an event stream) with the model server's events released one at a time by
   * `board` (its sseGate, fresh): event i+1 is written only once the client has reported event i, so nothing may be
   * held back on the way. Its result.
   */
  async releasedOneByOne(board: GateBoard, command: Command): Promise<{ result: Result; released: number }> {
    board.open(0);
    let released = 0;
    const result = (await this.send(command, () => board.open(++released)).done).result as Result;
    return { result, released };
  }

  async parallel(client: string, spec: Spec): Promise<Result[]> {
    return (await this.send({ op: 'request', client, ...spec }).done).results as Result[];
  }

  /** Requests back to back from `workers` workers until stop(); resolves once 20 were answered. */
  async steady(client: string, spec: Spec, workers: number): Promise<{ stop: () => Promise<Outcome> }> {
    let running!: () => void;
    const started = new Promise<void>((resolve) => (running = resolve));
    const { id, done } = this.send({ op: 'steady', client, workers, ...spec }, () => running());
    await started;
    return {
      stop: async () => {
        await this.send({ op: 'stop', target: id }).done;
        return (await done).steady as Outcome;
      },
    };
  }

  close(): void {
    this.#child.stdin.end();
  }
}

/** A client the JSON-lines programs (go-rest-client, rust-rest-client) define, by name, for requests to name. */
export interface ClientSpec {
  h2: boolean;
  expect_continue_ms?: number;
  no_cert?: boolean;
}

/** A request of a JSON-lines program. */
export interface RequestSpec {
  method?: string;
  path: string;
  /** '1.0': an HTTP/1.0 request (rust-rest-client). */
  version?: '1.0';
  body?: string;
  body_bytes?: number;
  unknown_length?: boolean;
  headers?: Record<string, string>;
  read?: 'body' | 'sse' | 'pattern';
  parallel?: number;
}

/** What a steady stream of a JSON-lines program's requests came to. */
export interface SteadyOutcome<Result> {
  ok: number;
  failures: Result[] | null;
  statuses: Record<string, number>;
}

/** A compiled client of test/fixtures that reads its commands as JSON lines (go-rest-client, rust-rest-client). */
export class JsonLinesClient<Result> extends CommandedClient<RequestSpec, Result, SteadyOutcome<Result>> {
  readonly #name: string;

  constructor(what: string, binary: string, args: string[]) {
    super(what, binary, args, (id, command) => JSON.stringify({ id, ...command }));
    this.#name = what;
  }

  async client(name: string, spec: ClientSpec): Promise<void> {
    const line = await this.send({ op: 'client', name, ...spec }).done;
    assert.equal(line.err, undefined, `the ${this.#name} could not make client ${name}`);
  }
}

/** Each failure of a steady stream by its message with addresses taken out (ADDR), and how many times it came. */
export function failuresOf<Result extends { err?: string }>(outcome: SteadyOutcome<Result>): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const failure of outcome.failures ?? []) {
    const what = failure.err!.replace(/127\.0\.0\.1:\d+|localhost:\d+/g, 'ADDR');
    counts[what] = (counts[what] ?? 0) + 1;
  }
  return counts;
}
