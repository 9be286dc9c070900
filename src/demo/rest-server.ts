/**
 * The stand-in's REST port: node:http (HTTP/1.1, keep-alive), the OVMS REST
 * routes for the dummy model, the OpenAI-style chat endpoint, and two
 * streaming helpers for proxy tests (/echo-body, /stream-bytes). Where OVMS's
 * Drogon refuses what Node accepts (Expect fields, request trailers), it refuses
 * as Drogon does.
 */
import { createHash } from 'node:crypto';
import http from 'node:http';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { serverMetadata, tensorMetadata } from './dummy-model.js';
import { HttpError, parseJson, readBody, sendEmpty, sendJson, sendText, writable } from './http-util.js';
import { configStatus, inferRest, requireModel } from './kserve-rest.js';
import { handleChatCompletions, type SseGate } from './openai-chat.js';

export interface RestHooks {
  sseGate?: SseGate;
  /** Every request as it arrived, before routing; `target` is the raw request target (path + query). */
  onRequest(target: string, headers: Record<string, string | string[]>): void;
  /** A response whose client went away before it was finished (path without query). */
  onAborted(path: string): void;
}

type Handler = (req: IncomingMessage, res: ServerResponse, params: string[], url: URL) => Promise<void> | void;

interface Route {
  method: string;
  pattern: RegExp;
  handler: Handler;
}

export const STREAM_CHUNK_BYTES = 64 * 1024;

const METRICS_TEXT = [
  '# HELP ovms_requests_success Number of successful requests to a model or a DAG.',
  '# TYPE ovms_requests_success counter',
  'ovms_requests_success{api="KServe",interface="gRPC",method="ModelInfer",name="dummy",version="1"} 0',
  'ovms_requests_success{api="KServe",interface="REST",method="ModelInfer",name="dummy",version="1"} 0',
  '# HELP ovms_streams Number of OpenVINO execution streams.',
  '# TYPE ovms_streams gauge',
  'ovms_streams{name="dummy",version="1"} 1',
  '',
].join('\n');

/** Hashes the body as it streams by, so a 1 GiB upload costs no memory. */
async function echoBody(req: IncomingMessage, res: ServerResponse): Promise<void> {
  const hash = createHash('sha256');
  let bytes = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    bytes += chunk.length;
    hash.update(chunk);
  }
  refuseTrailers(req);
  sendJson(res, 200, { bytes, sha256: hash.digest('hex') });
}

/** The byte at absolute offset i is i & 0xff; 64 KiB is a multiple of 256, so one chunk serves all. */
const PATTERN_CHUNK = Buffer.from(Array.from({ length: STREAM_CHUNK_BYTES }, (_, i) => i & 0xff));

async function streamBytes(res: ServerResponse, url: URL): Promise<void> {
  const n = Number(url.searchParams.get('n') ?? '0');
  if (!Number.isSafeInteger(n) || n < 0) throw new HttpError(400, 'n must be a non-negative integer');
  res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': n });
  for (let sent = 0; sent < n && !res.destroyed;) {
    const size = Math.min(STREAM_CHUNK_BYTES, n - sent);
    sent += size;
    // Honour backpressure: never queue more than the socket accepts.
    if (!res.write(size === STREAM_CHUNK_BYTES ? PATTERN_CHUNK : PATTERN_CHUNK.subarray(0, size))) {
      await writable(res);
    }
  }
  if (!res.destroyed) res.end();
}

function routes(hooks: RestHooks): Route[] {
  const model = '([^/]+)';
  const version = '(?:/versions/([^/]+))?';
  return [
    { method: 'GET', pattern: /^\/v2\/health\/(?:live|ready)$/, handler: (_q, res) => sendEmpty(res, 200) },
    { method: 'GET', pattern: /^\/v2\/?$/, handler: (_q, res) => sendJson(res, 200, serverMetadata()) },
    {
      method: 'GET', pattern: new RegExp(`^/v2/models/${model}${version}/ready$`),
      handler: (_q, res, [m, v]) => { requireModel(m, v); sendEmpty(res, 200); },
    },
    {
      method: 'GET', pattern: new RegExp(`^/v2/models/${model}${version}$`),
      handler: (_q, res, [m, v]) => { requireModel(m, v); sendJson(res, 200, tensorMetadata()); },
    },
    {
      method: 'POST', pattern: new RegExp(`^/v2/models/${model}${version}/infer$`),
      handler: async (req, res, [m, v]) => {
        const header = req.headers['inference-header-content-length'];
        const body = await bodyOf(req);
        sendJson(res, 200, inferRest(m, v, body, Array.isArray(header) ? header[0] : header));
      },
    },
    { method: 'GET', pattern: /^\/v1\/config$/, handler: (_q, res) => sendJson(res, 200, configStatus()) },
    { method: 'POST', pattern: /^\/v1\/config\/reload$/, handler: (_q, res) => sendJson(res, 200, configStatus()) },
    {
      method: 'GET', pattern: /^\/metrics$/,
      handler: (_q, res) => sendText(res, 200, 'text/plain; version=0.0.4; charset=utf-8', METRICS_TEXT),
    },
    {
      method: 'POST', pattern: /^\/v3\/(?:v1\/)?chat\/completions$/,
      handler: async (req, res) => handleChatCompletions(res, parseJson(await bodyOf(req)), hooks.sseGate),
    },
    { method: 'POST', pattern: /^\/echo-body$/, handler: (req, res) => echoBody(req, res) },
    { method: 'GET', pattern: /^\/stream-bytes$/, handler: (_q, res, _p, url) => streamBytes(res, url) },
  ];
}

function headersOf(req: IncomingMessage): Record<string, string | string[]> {
  const out: Record<string, string | string[]> = {};
  for (const [key, value] of Object.entries(req.headers)) {
    if (value !== undefined) out[key] = value;
  }
  return out;
}

/**
 * OVMS's REST server, Drogon v1.9.7 (HttpRequestParser), takes nothing but the empty line
 * after a chunked body's last chunk: a request trailer field gets 400 and the connection
 * closed. Node reads trailers into req.trailers, which would hide that from proxy tests.
 */
class TrailerRefused extends Error {}

function refuseTrailers(req: IncomingMessage): void {
  if (req.rawTrailers.length > 0) throw new TrailerRefused('request trailers');
}

async function bodyOf(req: IncomingMessage): Promise<Buffer> {
  const body = await readBody(req);
  refuseTrailers(req);
  return body;
}

/** Drogon's own refusals: a bare status line, `connection: close`, no body. */
function refuseAsDrogon(res: ServerResponse, status: number): void {
  res.writeHead(status, { connection: 'close', 'content-length': 0 });
  res.end();
}

function sendFailure(res: ServerResponse, err: unknown): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  if (err instanceof TrailerRefused) return refuseAsDrogon(res, 400);
  if (err instanceof HttpError) sendJson(res, err.status, { error: err.message });
  else sendJson(res, 500, { error: err instanceof Error ? err.message : String(err) });
}

async function dispatch(table: Route[], req: IncomingMessage, res: ServerResponse): Promise<void> {
  const url = new URL(req.url ?? '/', 'http://stand-in');
  let path: string;
  try {
    path = decodeURIComponent(url.pathname);
  } catch {
    throw new HttpError(400, 'Malformed percent-encoding in path');
  }
  for (const route of table) {
    const match = route.pattern.exec(path);
    if (!match) continue;
    if (req.method !== route.method && !(route.method === 'GET' && req.method === 'HEAD')) {
      throw new HttpError(405, `Method ${req.method} not allowed on ${path}`);
    }
    await route.handler(req, res, match.slice(1), url);
    return;
  }
  throw new HttpError(404, `No route for ${req.method} ${path}`);
}

export function createRestServer(hooks: RestHooks): http.Server {
  const table = routes(hooks);
  const onRequest = (req: IncomingMessage, res: ServerResponse): void => {
    const target = req.url ?? '/';
    hooks.onRequest(target, headersOf(req));
    // Aborts are reported by path alone, so a test can match without the query.
    const path = target.split('?')[0];
    // An aborted upload errors the request stream; the 'close' check below reports it.
    req.on('error', () => {});
    res.on('error', () => {});
    res.on('close', () => {
      if (!res.writableFinished) hooks.onAborted(path);
    });
    dispatch(table, req, res).catch((err: unknown) => sendFailure(res, err));
  };
  // Node emits 'request' for an HTTP/1.0 request whatever its Expect, 'checkContinue' or 'checkExpectation' for an HTTP/1.1 one.
  const server = http.createServer({ keepAlive: true }, (req, res) => (req.headers.expect ? answerExpect(req, res, onRequest) : onRequest(req, res)));
  server.on('checkContinue', (req: IncomingMessage, res: ServerResponse) => answerExpect(req, res, onRequest));
  server.on('checkExpectation', (req: IncomingMessage, res: ServerResponse) => answerExpect(req, res, onRequest));
  return server;
}

/**
 * Expect as OVMS's REST server, Drogon v1.9.7 (HttpRequestParser), answers it before any
 * handler runs. Exactly `100-continue` (compared as sent) on HTTP/1.1: 100 when the request
 * declares a Content-Length above 0, else 400 and the connection closed, so a chunked
 * upload that carries it (curl sends it with `-T -` or `-H 'Transfer-Encoding: chunked'`
 * above 1 MiB) is refused. Any other value, `100-Continue` and any Expect of an HTTP/1.0
 * request included: 417 and a close. Node alone would send 100 for the first, take
 * HTTP/1.0 ones and keep the connection, hiding all of that from proxy tests.
 */
function answerExpect(req: IncomingMessage, res: ServerResponse, onRequest: (req: IncomingMessage, res: ServerResponse) => void): void {
  const expect = req.headers.expect ?? '';
  if (expect === '') return onRequest(req, res);
  if (expect !== '100-continue' || req.httpVersion === '1.0') return refuseAsDrogon(res, 417);
  if (Number(req.headers['content-length'] ?? 0) > 0) {
    res.writeContinue();
    onRequest(req, res);
    return;
  }
  refuseAsDrogon(res, 400);
}
