/**
 * Readiness checks behind /readyz: are the listeners up, does the model
 * server answer, is the TLS material still valid. Each check is a small
 * function so the OVMS entrypoint can swap the upstream check for its own
 * knowledge of the child process.
 */
import { connect as connectH2 } from 'node:http2';
import { request as httpRequest } from 'node:http';
import type { Config, HostPort } from './config.js';
import type { RunningProxy } from './proxy.js';
import { subjectCn, validTo, type TlsMaterial } from './tls-material.js';
import { clientCaObstacles } from './tls-checks.js';
import { crlsForCa } from './crl-index.js';
import { hostAndPort } from './addresses.js';
import { oneAtATime } from './one-at-a-time.js';
import { MEANT_PORT, NAME_DOES_NOT_RESOLVE, http2Refusal } from './upstream-errors.js';
import { noteSettings, spokeHttp2 } from './upstream-h2.js';

export interface CheckResult {
  readonly ok: boolean;
  readonly detail: string;
}

export type HealthCheck = () => CheckResult | Promise<CheckResult>;

export interface HealthReport {
  readonly ready: boolean;
  readonly checks: Readonly<Record<string, CheckResult>>;
}

/** Runs every check; ready only when all pass. A check that throws counts as failed. */
export async function readinessReport(checks: Readonly<Record<string, HealthCheck>>): Promise<HealthReport> {
  const entries = await Promise.all(
    Object.entries(checks).map(async ([name, check]): Promise<[string, CheckResult]> => {
      try {
        return [name, await check()];
      } catch (err) {
        return [name, { ok: false, detail: (err as Error).message }];
      }
    }),
  );
  return { ready: entries.every(([, r]) => r.ok), checks: Object.fromEntries(entries) };
}

/** What /readyz says once shutdown has begun (a signal): no new connections, calls in flight finish. */
export const DRAINING = 'draining: shutting down, calls in flight finish (--mtls_shutdown_timeout)';

/** What /readyz says while the public ports close every new connection at once (fd-headroom.ts). */
export const AT_OPEN_FILES_LIMIT = 'at the open-files limit: new connections are closed at once until connections end (open_files_exhausted)';

/**
 * Up while every listener holds its ports and new connections are taken; false once shutdown has begun, said
 * as such: a drain read "not listening: rest", as a port that could not be bound does, while calls still finished.
 */
export function listenersCheck(proxy: () => Pick<RunningProxy, 'listeners' | 'takesNewConnections' | 'draining'> | undefined): HealthCheck {
  return () => {
    const running = proxy();
    if (!running) return { ok: false, detail: 'listeners not started' };
    if (running.draining?.() === true) return { ok: false, detail: DRAINING };
    const down = running.listeners().filter((l) => l.addresses().length === 0).map((l) => l.name);
    if (down.length > 0) return { ok: false, detail: `not listening: ${down.join(', ')}` };
    return running.takesNewConnections?.() === false ? { ok: false, detail: `listening, but ${AT_OPEN_FILES_LIMIT}` } : { ok: true, detail: 'listening' };
  };
}

/**
 * Ready while the material in force can admit a client: the server certificate and the CAs its
 * file sends with it inside their validity, and at least one client CA inside its own with, when CRLs are on, none of its CRLs
 * past their next update. The rule startup applies: a bundle may hold a CA that expired (a
 * rotation's leftover) or is not valid yet (the next CA) next to the one in use, and such a
 * proxy serves. Failing on any of them took every replica out of its Service at once
 * (all share the bundle), for as long as the leftover stayed, while each served its clients.
 * What refuses only some clients is still named in the detail.
 */
export function certificatesCheck(material: () => TlsMaterial, now: () => Date = () => new Date()): HealthCheck {
  return () => {
    const m = material();
    const at = now();
    // A CA the file sends with the server certificate that expires fails every client just the same.
    const lapsed = m.serverChain.filter((cert) => validTo(cert) <= at);
    const serverExpired = lapsed.length > 0;
    const caProblems = m.clientCas.map((ca) => clientCaObstacles(ca, m.clientCas, m.crls, at));
    const served = caProblems.some((problems) => problems.length === 0);
    const strayCrls = m.crls.filter((crl) => !m.clientCas.some((ca) => crlsForCa([crl], ca).length > 0) && crl.nextUpdate !== undefined && crl.nextUpdate <= at);
    const problems = [
      ...lapsed.map((cert) => `${cert === m.serverCert ? 'server certificate' : 'CA certificate sent with the server certificate,'} ${subjectCn(cert)} expired ${validTo(cert).toISOString()}`),
      ...caProblems.flat(),
      ...strayCrls.map((crl) => `CRL expired ${crl.nextUpdate!.toISOString()} for a CA clients send, CRL #${crl.index} (its clients are refused until it is renewed)`),
    ];
    if (serverExpired || !served) return { ok: false, detail: `${problems.join('; ')}${served ? '' : ' (no client can be admitted)'}` };
    const valid = `server certificate valid until ${validTo(m.serverCert).toISOString()}`;
    return { ok: true, detail: problems.length === 0 ? valid : `${valid}; ${problems.join('; ')}` };
  };
}

/** How long /readyz waits for the model server; an orchestrator's probe timeout must be longer (deploy/kubernetes). */
export const UPSTREAM_CHECK_TIMEOUT_MS = 2000;

/**
 * Proxy mode: the model server is ready when its REST `/v2/health/ready`
 * answers 200 and its gRPC ServerReady says ready (whichever are configured).
 */
export function upstreamCheck(config: Pick<Config, 'grpc' | 'rest'>, timeoutMs = UPSTREAM_CHECK_TIMEOUT_MS): HealthCheck {
  const ask = upstreamReadiness(config, timeoutMs);
  return async () => {
    const { ok, detail } = await ask();
    return { ok, detail };
  };
}

/**
 * What upstreamCheck finds, whether a port gave no answer at all (refused, reset, or silent until the timeout), and
 * whether one answered in the other protocol (the REST port in HTTP/2, the gRPC port in HTTP/1.1): a server is there, not the one meant.
 */
export interface UpstreamReadiness extends CheckResult {
  readonly unanswered: boolean;
  readonly otherProtocol: boolean;
}

/**
 * Each /readyz and each scrape asks, a connection per port: one at a time, or a burst of admin
 * requests (a client pipelining thousands of /readyz on one connection, many scrapers) opened as
 * many connections to the model server at once, each held up to the timeout by one that hangs.
 */
export function upstreamReadiness(config: Pick<Config, 'grpc' | 'rest'>, timeoutMs = UPSTREAM_CHECK_TIMEOUT_MS): () => Promise<UpstreamReadiness> {
  return oneAtATime(async () => {
    // Both at once: a model server that answers neither takes one timeout, not two, within the kubelet's probe timeout or the scrape's.
    const results = await Promise.all([
      ...(config.rest ? [restReady(config.rest.upstream, timeoutMs)] : []),
      ...(config.grpc ? [grpcServerReady(config.grpc.upstream, timeoutMs)] : []),
    ]);
    return {
      ok: results.every((r) => r.ok),
      detail: results.map((r) => r.detail).join('; '),
      unanswered: results.some((r) => !r.answered),
      otherProtocol: results.some((r) => r.otherProtocol === true),
    };
  });
}

interface PortAnswer extends CheckResult {
  readonly answered: boolean;
  readonly otherProtocol?: boolean;
}

function restReady(upstream: HostPort, timeoutMs: number): Promise<PortAnswer> {
  const where = `REST ${hostAndPort(upstream.host, upstream.port)}`;
  return new Promise((resolve) => {
    const req = httpRequest({ host: upstream.host, port: upstream.port, path: '/v2/health/ready', agent: false, timeout: timeoutMs }, (res) => {
      res.resume();
      const ok = res.statusCode === 200;
      resolve({ ok, answered: true, detail: `${where} /v2/health/ready answered ${res.statusCode}` });
    });
    req.on('timeout', () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)));
    req.on('error', (err: NodeJS.ErrnoException) => resolve(portFailure(where, err, 'rest')));
    req.end();
  });
}

/**
 * A port's failure as the detail says it: the system's code, a name that does not resolve as such, or, for a port that answered in the
 * other protocol (the model server's ports swapped in --mtls_grpc_upstream and --mtls_rest_upstream),
 * which port was expected: the parser's code alone (HPE_INVALID_CONSTANT, ERR_HTTP2_ERROR) said neither.
 * `spokeHttp2`: the gRPC port had sent its SETTINGS; an ERR_HTTP2_ERROR then is nghttp2 refusing what it sent later.
 */
function failure(err: NodeJS.ErrnoException, code: string, port: 'rest' | 'grpc', spokeHttp2: boolean, otherProtocol: boolean): string {
  if (otherProtocol) return `answered, but not in ${port === 'rest' ? 'HTTP/1.1' : 'HTTP/2'} (${code}): ${MEANT_PORT[port]}?`;
  if (port === 'grpc' && spokeHttp2 && code === 'ERR_HTTP2_ERROR') return http2Refusal(err);
  // A Compose service or Kubernetes Service not there yet; the name is looked up again at each check and connection.
  if (code === 'ENOTFOUND' || code === 'EAI_AGAIN') return `${NAME_DOES_NOT_RESOLVE} (${code})`;
  return code;
}

/**
 * A port that failed the check, and whether it answered. Bytes came back from it when it spoke HTTP/2 (its
 * SETTINGS), or when the parser refused what it sent (the port answered in the other protocol): an answer,
 * whatever it says, as the hang watchdog counts them (ovmsLivenessCheck). Refused or reset before a byte, it gave none.
 */
function portFailure(where: string, err: NodeJS.ErrnoException, port: 'rest' | 'grpc', spokeHttp2 = false): PortAnswer {
  const code = err.code ?? err.message;
  const otherProtocol = answeredInOtherProtocol(code, port, spokeHttp2);
  return { ok: false, answered: spokeHttp2 || otherProtocol, otherProtocol, detail: `${where}: ${failure(err, code, port, spokeHttp2, otherProtocol)}` };
}

/** The parser refused the first bytes back: HTTP/1.1's (HPE_*) on the REST port, nghttp2 before any SETTINGS on the gRPC port. */
function answeredInOtherProtocol(code: string, port: 'rest' | 'grpc', spokeHttp2: boolean): boolean {
  return port === 'rest' ? code.startsWith('HPE_') : code === 'ERR_HTTP2_ERROR' && !spokeHttp2;
}

/** An empty gRPC message: flag 0, length 0. ServerReadyRequest has no fields. */
const EMPTY_GRPC_MESSAGE = Buffer.alloc(5);
/** ServerReadyResponse{ready: true}: field 1, varint, value 1. */
const READY_TRUE = Buffer.from([0x08, 0x01]);

/** A raw h2c KServe ServerReady call: no .proto files needed. */
function grpcServerReady(upstream: HostPort, timeoutMs: number): Promise<PortAnswer> {
  const where = `gRPC ${hostAndPort(upstream.host, upstream.port)}`;
  return new Promise((resolve) => {
    const session = connectH2(`http://${hostAndPort(upstream.host, upstream.port)}`);
    noteSettings(session);
    const finish = (result: PortAnswer) => {
      clearTimeout(timer);
      session.destroy();
      resolve(result);
    };
    const timer = setTimeout(() => finish({ ok: false, answered: false, detail: `${where}: no answer within ${timeoutMs} ms` }), timeoutMs);
    session.on('error', (err: NodeJS.ErrnoException) => finish(portFailure(where, err, 'grpc', spokeHttp2(session))));
    // Given, not left to Node: from an IPv6 URL it builds `::1:9000`, without the brackets an authority needs.
    const authority = hostAndPort(upstream.host, upstream.port);
    const stream = session.request({ ':method': 'POST', ':path': '/inference.GRPCInferenceService/ServerReady', ':authority': authority, 'content-type': 'application/grpc', te: 'trailers' });
    const chunks: Buffer[] = [];
    let grpcStatus: string | undefined;
    stream.on('response', (headers) => (grpcStatus = headers['grpc-status'] as string | undefined ?? grpcStatus));
    stream.on('trailers', (trailers) => (grpcStatus = trailers['grpc-status'] as string | undefined));
    stream.on('data', (chunk: Buffer) => chunks.push(chunk));
    // A connection that fails cancels the pending stream first (ERR_HTTP2_STREAM_CANCEL): name the connection's error, as REST does.
    stream.on('error', (err: NodeJS.ErrnoException) => {
      const why = (err.cause as NodeJS.ErrnoException | undefined) ?? err;
      finish(portFailure(where, why, 'grpc', spokeHttp2(session)));
    });
    stream.on('end', () => {
      const body = Buffer.concat(chunks).subarray(5);
      if (grpcStatus !== '0') finish({ ok: false, answered: true, detail: `${where} ServerReady: grpc-status ${grpcStatus ?? 'missing'}` });
      else finish({ ok: body.equals(READY_TRUE), answered: true, detail: `${where} ServerReady: ${body.equals(READY_TRUE) ? 'ready' : 'not ready'}` });
    });
    stream.end(EMPTY_GRPC_MESSAGE);
  });
}
