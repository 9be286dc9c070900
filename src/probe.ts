/**
 * `ovms-mtls probe`: checks a running deployment the way a client would, one
 * step at a time, and says which layer failed (network, server certificate,
 * client certificate, protocol, upstream, model) when one does.
 */
import { request as httpsRequest } from 'node:https';
import { once } from 'node:events';
import { createServer, isIP, type AddressInfo, type Socket } from 'node:net';
import * as grpc from '@grpc/grpc-js';
import { kserveClient, unary, type KserveClient } from './demo/grpc-client.js';
import { connectWithProxyHeader, dropIpSniWarning, openTls, serverVerification, tlsHandshake, type Diagnosis, type HandshakeResult, type TlsTarget } from './probe-tls.js';
import { hostAndPort } from './addresses.js';
import { REFUSAL_PREFIX } from './refusal-answer.js';

export type { Diagnosis, Layer } from './probe-tls.js';

export interface ProbeOptions {
  readonly host: string;
  readonly grpcPort?: number | undefined;
  readonly restPort?: number | undefined;
  /** Name the server certificate must carry; default `host`. */
  readonly servername?: string | undefined;
  readonly cert: Buffer;
  readonly key: Buffer;
  readonly ca: Buffer;
  readonly model?: string | undefined;
  readonly timeoutMs: number;
  /** Begin every connection with a PROXY protocol header of this version (a port behind an L4 load balancer). */
  readonly proxyProtocol?: 1 | 2 | undefined;
}

export interface StepResult {
  readonly listener: 'grpc' | 'rest';
  readonly step: string;
  readonly ok: boolean;
  readonly detail: string;
  readonly diagnosis?: Diagnosis | undefined;
}

type Report = (step: StepResult) => void;

/** Runs every step asked for, reporting each as it finishes; true when all passed. */
export async function runProbe(options: ProbeOptions, report: Report): Promise<boolean> {
  let allOk = true;
  const record: Report = (step) => {
    allOk &&= step.ok;
    report(step);
  };
  if (options.grpcPort !== undefined) await probeGrpc(options, options.grpcPort, record);
  if (options.restPort !== undefined) await probeRest(options, options.restPort, record);
  return allOk;
}

function target(options: ProbeOptions, port: number): TlsTarget {
  return { host: options.host, port, servername: options.servername ?? options.host, cert: options.cert, key: options.key, ca: options.ca, timeoutMs: options.timeoutMs, proxyProtocol: options.proxyProtocol };
}

async function handshakeStep(options: ProbeOptions, port: number, listener: StepResult['listener'], report: Report): Promise<HandshakeResult> {
  const result = await tlsHandshake(target(options, port));
  report({ listener, step: `TLS handshake with ${hostAndPort(options.host, port)}`, ok: result.ok, detail: result.detail, diagnosis: result.diagnosis });
  return result;
}

// ---------------------------------------------------------------- gRPC

/** ovms-mtls answers a refused client with the reason (refusal-answer.ts): pass it on. */
function proxyRefusal(text: string): Diagnosis | undefined {
  if (!text.startsWith(REFUSAL_PREFIX)) return undefined;
  return { layer: 'client certificate', cause: `the server refused the client certificate and says why: ${text}` };
}

function grpcDiagnosis(err: grpc.ServiceError, model: string | undefined): Diagnosis {
  const refused = err.code === grpc.status.UNAUTHENTICATED || err.code === grpc.status.PERMISSION_DENIED ? proxyRefusal(err.details ?? '') : undefined;
  if (refused) return refused;
  const http = /Received HTTP status code (\d+)/.exec(err.details ?? '');
  // nginx answers every request on a connection whose client certificate it refused with 400, gRPC calls included.
  if (http?.[1] === '400') {
    return { layer: 'client certificate', cause: 'the server answered the gRPC call with plain HTTP 400, as nginx does when it refuses the client certificate: check it was issued by the server\'s client CA, is valid and not revoked (or, if --port is a REST port, use --rest_port for it)' };
  }
  if (http) return { layer: 'protocol', cause: `the port answered plain HTTP ${http[1]}, not gRPC: is --port the REST port? (use --rest_port for it)` };
  const contentType = answeredNotGrpc(err);
  if (contentType !== undefined) {
    return { layer: 'protocol', cause: `the port answered HTTP/2 with ${contentType}, not gRPC (application/grpc): is --port a web or REST port rather than the model server's gRPC port?` };
  }
  if (err.code === grpc.status.NOT_FOUND) return { layer: 'model', cause: `the model is not served (${err.details}): check --model_name or config.json` };
  // Asked after ServerReady passed: OVMS answers UNAVAILABLE for a model whose version is not loaded (yet).
  if (err.code === grpc.status.UNAVAILABLE && model !== undefined) {
    return { layer: 'model', cause: `the model server is ready but model ${model} is not available (${err.details}): it is still loading, or failed to load (see the model server's log)` };
  }
  if (err.code === grpc.status.UNAVAILABLE) return { layer: 'upstream', cause: `the proxy accepted the client but could not reach a ready model server: ${err.details}` };
  if (err.code === grpc.status.DEADLINE_EXCEEDED) return { layer: 'upstream', cause: 'no answer before the deadline: the model server may be overloaded or hung' };
  if (err.code === grpc.status.UNIMPLEMENTED) return { layer: 'protocol', cause: 'the server does not implement KServe GRPCInferenceService: is this a model server port?' };
  return { layer: 'upstream', cause: `the call failed with ${grpc.status[err.code]}: ${err.details}` };
}

/**
 * The content type of an HTTP/2 answer that is no gRPC at all (a web page, JSON). grpc-js reads its body as gRPC
 * messages anyway: an HTML page became "RESOURCE_EXHAUSTED: Received message larger than max", or a wait for the
 * rest of a message that never comes, reported as a hung model server at the deadline.
 */
function answeredNotGrpc(err: grpc.ServiceError & { headers?: grpc.Metadata }): string | undefined {
  const [contentType] = err.headers?.get('content-type') ?? [];
  if (typeof contentType !== 'string' || /^application\/grpc(?:[+;]|$)/i.test(contentType)) return undefined;
  return contentType;
}

async function grpcStep<T>(report: Report, step: string, call: () => Promise<T>, judge: (value: T) => { ok: boolean; detail: string; diagnosis?: Diagnosis }, model?: string): Promise<boolean> {
  try {
    const verdict = judge(await call());
    report({ listener: 'grpc', step, ...verdict });
    return verdict.ok;
  } catch (err) {
    const e = err as grpc.ServiceError;
    report({ listener: 'grpc', step, ok: false, detail: `${grpc.status[e.code] ?? 'ERROR'}: ${e.details ?? e.message}`, diagnosis: grpcDiagnosis(e, model) });
    return false;
  }
}

/**
 * Straight to the deployment, as the REST steps (Node's https) always go. grpc-js alone honours
 * grpc_proxy, https_proxy and http_proxy, which a container set up for Hugging Face downloads behind
 * a corporate proxy has: the gRPC steps went to that proxy and failed as "could not reach a ready
 * model server", blaming OVMS, while the REST steps passed.
 */
const DIRECT: grpc.ChannelOptions = { 'grpc.enable_http_proxy': 0 };

function grpcClient(options: ProbeOptions, port: number, hop: Hop | undefined): KserveClient {
  const servername = options.servername ?? options.host;
  if (isIP(servername) !== 0) dropIpSniWarning();
  const credentials = grpc.credentials.createSsl(options.ca, options.key, options.cert);
  // Through the hop the server certificate is still checked against the deployment's name, not the hop's address.
  const nameOverride = options.servername !== undefined || hop !== undefined ? { 'grpc.ssl_target_name_override': servername } : {};
  return kserveClient(hop ? hostAndPort('127.0.0.1', hop.port) : hostAndPort(options.host, port), credentials, { ...DIRECT, ...nameOverride });
}

interface Hop {
  readonly port: number;
  close(): void;
}

/**
 * grpc-js takes no socket of ours, so with --proxy_protocol its calls go through a hop on loopback
 * that passes each connection on to the deployment, the PROXY header before its first bytes.
 */
async function proxyHeaderHop(host: string, port: number, version: 1 | 2): Promise<Hop> {
  const sockets = new Set<Socket>();
  const server = createServer((client) => {
    const upstream = connectWithProxyHeader(host, port, version);
    for (const socket of [client, upstream]) {
      sockets.add(socket);
      socket.on('error', () => socket.destroy()).on('close', () => sockets.delete(socket));
    }
    client.on('close', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
    // Piped only once connected, so the header (written on connect) goes before the client's bytes.
    upstream.once('connect', () => {
      client.pipe(upstream);
      upstream.pipe(client);
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: (server.address() as AddressInfo).port,
    close: () => {
      server.close();
      for (const socket of sockets) socket.destroy();
    },
  };
}

/**
 * gRPC runs on HTTP/2 only, and a TLS client gets it only when the server picks h2 by ALPN (grpc-js and
 * grpc-go refuse the connection otherwise): a server that did not is no gRPC port, whatever it serves.
 */
function withoutHttp2(alpn: string): StepResult {
  return {
    listener: 'grpc', step: 'gRPC over HTTP/2', ok: false, detail: `ALPN ${alpn || 'none'}`,
    diagnosis: { layer: 'protocol', cause: `the server did not agree to HTTP/2 in the TLS handshake (ALPN ${alpn ? `chose ${alpn}` : 'chose nothing'}), which gRPC needs: is --port an HTTP/1.1 or REST port? (use --rest_port for it)` },
  };
}

async function probeGrpc(options: ProbeOptions, port: number, report: Report): Promise<void> {
  const handshake = await handshakeStep(options, port, 'grpc', report);
  if (!handshake.ok) return;
  if (handshake.alpn !== 'h2') return report(withoutHttp2(handshake.alpn ?? ''));
  const hop = options.proxyProtocol === undefined ? undefined : await proxyHeaderHop(options.host, port, options.proxyProtocol);
  const client = grpcClient(options, port, hop);
  const deadline = () => ({ deadline: Date.now() + options.timeoutMs });
  try {
    const live = await grpcStep(report, 'gRPC ServerLive', () => unary(client, 'ServerLive', {}, new grpc.Metadata(), deadline()),
      (r) => r.response.live
        ? { ok: true, detail: 'live' }
        : { ok: false, detail: 'not live', diagnosis: { layer: 'upstream', cause: 'the model server answers but says it is not live (failed, or shutting down): see its log' } });
    if (!live) return;
    const ready = await grpcStep(report, 'gRPC ServerReady', () => unary(client, 'ServerReady', {}, new grpc.Metadata(), deadline()),
      (r) => r.response.ready
        ? { ok: true, detail: 'ready' }
        : { ok: false, detail: 'not ready', diagnosis: { layer: 'upstream', cause: 'the model server answers but is not ready yet (starting, or models still loading)' } });
    if (!ready || !options.model) return;
    const model = options.model;
    await grpcStep(report, `gRPC ModelMetadata ${model}`, () => unary(client, 'ModelMetadata', { name: model }, new grpc.Metadata(), deadline()),
      (r) => ({ ok: true, detail: `versions [${r.response.versions.join(', ')}], inputs ${r.response.inputs.map((t) => `${t.name} ${t.datatype} [${t.shape.join(',')}]`).join('; ')}` }), model);
  } finally {
    client.close();
    hop?.close();
  }
}

// ---------------------------------------------------------------- REST

interface RestAnswer {
  status: number;
  body: string;
}

// The report shows 160 characters of a body at most: a longer one (a stream, a file, a misrouted download) is not read to its end.
const MAX_BODY_BYTES = 64 * 1024;

/**
 * One GET, bounded as a whole by --timeout: a socket idle timeout alone let a server that sends a
 * byte a second, or an endless body, hold the probe (and its memory) for as long as it kept sending.
 */
function httpsGet(options: ProbeOptions, port: number, path: string): Promise<RestAnswer> {
  return new Promise((resolve, reject) => {
    const settle = (outcome: () => void) => {
      clearTimeout(timer);
      outcome();
      req.destroy();
    };
    // Node's client takes a connection of ours only without an agent.
    const connection = options.proxyProtocol === undefined
      ? { agent: false as const, ...serverVerification(options.servername ?? options.host), cert: options.cert, key: options.key, ca: options.ca }
      : { createConnection: () => openTls(target(options, port), ['http/1.1']) };
    const req = httpsRequest({ host: options.host, port, path, ...connection }, (res) => {
      const chunks: Buffer[] = [];
      let size = 0;
      const answer = () => settle(() => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).subarray(0, MAX_BODY_BYTES).toString('utf8').trim() }));
      res.on('data', (c: Buffer) => {
        chunks.push(c);
        size += c.length;
        if (size >= MAX_BODY_BYTES) answer();
      });
      res.on('end', answer);
      res.on('error', (err) => settle(() => reject(err)));
    });
    const timer = setTimeout(() => settle(() => reject(Object.assign(new Error('timeout'), { code: 'PROBE_TIMEOUT' }))), options.timeoutMs);
    req.on('error', (err) => settle(() => reject(err)));
    req.end();
  });
}

// nginx (as in the OVMS example) finishes the handshake with any client certificate and refuses a bad one with these 400 pages.
const NGINX_CLIENT_CERT_REFUSAL = /The SSL certificate error|No required SSL certificate was sent/;

function restDiagnosis(answer: RestAnswer, what: 'server' | 'model', model?: string): Diagnosis {
  const refused = answer.status === 403 ? proxyRefusal(jsonError(answer.body)) : undefined;
  if (refused) return refused;
  const refusal = answer.status === 400 ? NGINX_CLIENT_CERT_REFUSAL.exec(answer.body) : null;
  if (refusal) {
    return { layer: 'client certificate', cause: `the server finished the TLS handshake but refused the client certificate with HTTP 400 "${refusal[0]}" (nginx's way): check it was issued by the server's client CA, is valid and not revoked` };
  }
  if (answer.status === 426) return { layer: 'protocol', cause: 'this is the gRPC port: REST belongs on --rest_port' };
  if (answer.status === 502 || answer.status === 504) return { layer: 'upstream', cause: `the proxy accepted the client but cannot reach the model server (${short(answer.body)})` };
  if (answer.status === 503) return { layer: 'upstream', cause: `the model server is not ready yet (${short(answer.body) || 'starting, or models still loading'})` };
  if (what === 'model' && answer.status === 404) return { layer: 'model', cause: `model ${model} is not served: check --model_name or config.json` };
  return { layer: what === 'model' ? 'model' : 'upstream', cause: `unexpected HTTP ${answer.status}` };
}

function jsonError(body: string): string {
  try {
    const error: unknown = (JSON.parse(body) as { error?: unknown }).error;
    return typeof error === 'string' ? error : '';
  } catch {
    return '';
  }
}

function short(text: string): string {
  return text.length > 160 ? `${text.slice(0, 157)}...` : text;
}

// As gRPC's DEADLINE_EXCEEDED: the handshake step has shown the port answers HTTP.
function restTimeout(options: ProbeOptions): Diagnosis {
  return { layer: 'upstream', cause: `no complete answer within ${options.timeoutMs} ms: the model server may be overloaded or hung` };
}

/**
 * KServe model metadata is a JSON object; a web server or an ingress's default backend answers 200 with a page for
 * any path, which passed as the model. Only the start is looked at: the body may have been cut at MAX_BODY_BYTES.
 */
function isJsonObject(body: string): boolean {
  return body.startsWith('{');
}

function notModelMetadata(): Diagnosis {
  return { layer: 'protocol', cause: 'the port answered HTTP 200, but not with KServe model metadata (a JSON object): is --rest_port a web server or an ingress default rather than the model server\'s REST port?' };
}

async function restStep(options: ProbeOptions, port: number, path: string, what: 'server' | 'model', report: Report): Promise<boolean> {
  const step = `REST GET ${path}`;
  try {
    const answer = await httpsGet(options, port, path);
    const notMetadata = what === 'model' && answer.status === 200 && !isJsonObject(answer.body);
    const ok = answer.status === 200 && !notMetadata;
    const diagnosis = notMetadata ? notModelMetadata() : ok ? undefined : restDiagnosis(answer, what, options.model);
    report({ listener: 'rest', step, ok, detail: `HTTP ${answer.status}${what === 'model' && answer.status === 200 ? ` ${short(answer.body)}` : ''}`, diagnosis });
    return ok;
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    report({ listener: 'rest', step, ok: false, detail: e.code ?? e.message, diagnosis: e.code === 'PROBE_TIMEOUT' ? restTimeout(options) : { layer: 'protocol', cause: `the request failed after a good handshake (${e.code ?? e.message}): is --rest_port an HTTP port?` } });
    return false;
  }
}

async function probeRest(options: ProbeOptions, port: number, report: Report): Promise<void> {
  if (!(await handshakeStep(options, port, 'rest', report)).ok) return;
  const ready = await restStep(options, port, '/v2/health/ready', 'server', report);
  if (ready && options.model) await restStep(options, port, `/v2/models/${encodeURIComponent(options.model)}`, 'model', report);
}
