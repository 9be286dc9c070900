/**
 * A fake OpenAI-style `/v3/chat/completions` endpoint, the OVMS LLM surface
 * whose streaming mode (Server-Sent Events) a buffering proxy breaks. The
 * reply is fixed; what matters is that streamed events are written one at a
 * time, each with its own write, so a test can tell whether the proxy passes
 * them through as they come or holds them back.
 */
import type { ServerResponse } from 'node:http';
import { asRecord } from './http-util.js';

/** The fixed answer, streamed one word per event. */
export const CHAT_REPLY_WORDS: readonly string[] = ['Hello', ' from', ' the', ' stand-in', ' server.'];
export const DEFAULT_CHAT_MODEL = 'dummy-llm';

export type SseGate = (index: number) => Promise<void>;

interface ChatRequest {
  model: string;
  stream: boolean;
}

function parseChatRequest(body: unknown): ChatRequest {
  const obj = asRecord(body, 'Chat completion request');
  return {
    model: typeof obj.model === 'string' ? obj.model : DEFAULT_CHAT_MODEL,
    stream: obj.stream === true,
  };
}

function chunkEvent(id: string, model: string, created: number, index: number): string {
  const last = index === CHAT_REPLY_WORDS.length - 1;
  const delta = index === 0
    ? { role: 'assistant', content: CHAT_REPLY_WORDS[index] }
    : { content: CHAT_REPLY_WORDS[index] };
  const chunk = {
    id,
    object: 'chat.completion.chunk',
    created,
    model,
    choices: [{ index: 0, delta, finish_reason: last ? 'stop' : null }],
  };
  return `data: ${JSON.stringify(chunk)}\n\n`;
}

/**
 * Every SSE event of one streamed answer, in order: one chunk per word, then
 * `data: [DONE]`. Event #i is what `sseGate(i)` guards, so the [DONE] event
 * has index CHAT_REPLY_WORDS.length.
 */
export function chatStreamEvents(model: string): string[] {
  const id = `chatcmpl-${Date.now().toString(36)}`;
  const created = Math.floor(Date.now() / 1000);
  const events = CHAT_REPLY_WORDS.map((_, i) => chunkEvent(id, model, created, i));
  events.push('data: [DONE]\n\n');
  return events;
}

function completion(model: string): unknown {
  const content = CHAT_REPLY_WORDS.join('');
  return {
    id: `chatcmpl-${Date.now().toString(36)}`,
    object: 'chat.completion',
    created: Math.floor(Date.now() / 1000),
    model,
    choices: [{ index: 0, message: { role: 'assistant', content }, finish_reason: 'stop' }],
    usage: { prompt_tokens: 1, completion_tokens: CHAT_REPLY_WORDS.length, total_tokens: CHAT_REPLY_WORDS.length + 1 },
  };
}

async function streamEvents(res: ServerResponse, events: string[], gate?: SseGate): Promise<void> {
  res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
  // Headers leave now, so a client (and a test) sees the response start
  // before the first event is released.
  res.flushHeaders();
  for (const [index, event] of events.entries()) {
    if (gate) await gate(index);
    // The client may have left while we waited; writing then is pointless.
    if (res.destroyed) return;
    res.write(event);
  }
  res.end();
}

export async function handleChatCompletions(res: ServerResponse, body: unknown, gate?: SseGate): Promise<void> {
  const request = parseChatRequest(body);
  if (!request.stream) {
    const text = JSON.stringify(completion(request.model));
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
    res.end(text);
    return;
  }
  await streamEvents(res, chatStreamEvents(request.model), gate);
}
