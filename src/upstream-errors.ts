import { isIP } from 'node:net';
import type { HostPort } from './config.js';
import { CONNECT_TIMEOUT } from './upstream-connect.js';
import { hostAndPort } from './addresses.js';
import { PING_ANSWER_MS, UPSTREAM_UNRESPONSIVE } from './upstream-h2.js';
import { isServerPreface } from './h2-frames.js';

/**
 * The model server closed a kept-alive connection under a request before any byte of its answer: its
 * idle close met the request. Both REST modes count it under this code (and the relay logs it so).
 */
export const UPSTREAM_CLOSED_IDLE = 'UPSTREAM_CLOSED_IDLE';

/** A relayed gRPC connection whose upstream's first bytes were no HTTP/2 server preface. */
export const UPSTREAM_NOT_HTTP2 = 'UPSTREAM_NOT_HTTP2';

/**
 * Which port the model server's port was meant to be, for one that answered in the other's protocol
 * (--mtls_grpc_upstream and --mtls_rest_upstream swapped); /readyz (health.ts) asks the same.
 */
export const MEANT_PORT = {
  grpc: "is it the model server's gRPC port (OVMS --port)",
  rest: "is it the model server's REST port (OVMS --rest_port)",
} as const;

/** A model server's host name the system cannot resolve (ENOTFOUND, EAI_AGAIN): a Compose service or Kubernetes Service not there yet. */
export const NAME_DOES_NOT_RESOLVE = 'host name does not resolve';

/** nghttp2's NGHTTP2_ERR_TOO_MANY_CONTINUATIONS (not in Node's constants): its guard against CONTINUATION floods. */
const TOO_MANY_CONTINUATIONS = -905;

/**
 * What nghttp2 refused of a model server that had spoken HTTP/2 (its SETTINGS came), from Node's
 * error (NghttpError: nghttp2's code in `errno`, its words in `message`), or from the cause of ours.
 * Such a server's gRPC port is right: telling users to check it sent them the wrong way. More than
 * 8 CONTINUATION frames after a HEADERS is response metadata over 9 MiB from C-core (OVMS frames
 * it by our 1 MiB SETTINGS_MAX_FRAME_SIZE), over 144 KiB from a server that frames it at 16 KiB.
 */
export function http2Refusal(err: unknown): string {
  const refused = nghttp2Error(err);
  const words = refused?.message ? ` (nghttp2: "${refused.message}")` : '';
  if (refused?.errno === TOO_MANY_CONTINUATIONS) return `speaks HTTP/2, but sent a header block in more than 8 CONTINUATION frames (response metadata too large), which the proxy's HTTP/2 client refuses${words}`;
  return `speaks HTTP/2, but sent what the proxy's HTTP/2 client refuses${words}`;
}

/** Node's NghttpError (code ERR_HTTP2_ERROR) in `err` or its cause. */
function nghttp2Error(err: unknown, depth = 0): { errno?: unknown; message?: string } | undefined {
  if (!err || typeof err !== 'object' || depth > 2) return undefined;
  if (err instanceof Error && ownCode(err) === 'ERR_HTTP2_ERROR') return err as Error & { errno?: unknown };
  return 'cause' in err ? nghttp2Error(err.cause, depth + 1) : undefined;
}

/**
 * The one place upstream failures become client-visible text. Never echo raw
 * internal error text: say which upstream and what kind of failure.
 * `spokeHttp2`: the model server had sent its HTTP/2 SETTINGS on the connection that failed (upstream-h2.ts spokeHttp2()).
 */
export function describeUpstreamError(upstream: HostPort, err: unknown, spokeHttp2 = false): { code: string; message: string } {
  const code = errorCode(err);
  const where = `upstream ${hostAndPort(upstream.host, upstream.port)}`;
  switch (code) {
    case 'ECONNREFUSED':
      return { code, message: refusedMessage(where, upstream, err) };
    case 'UPSTREAM_CLOSED':
      return { code, message: `${where} closed the connection before answering` };
    case UPSTREAM_CLOSED_IDLE:
      return { code, message: `${where} closed a kept-alive connection as a request arrived on it, before answering (its idle timeout meeting the request)` };
    case 'UPSTREAM_BAD_RESPONSE':
      if (answeredInHttp2(err)) return { code, message: `${where} answered in HTTP/2 (h2c), as a gRPC server does: ${MEANT_PORT.rest}, not its gRPC port?` };
      return { code, message: `${where} sent a response that is not valid HTTP/1.1` };
    case 'ECONNRESET':
    case 'EPIPE':
      return { code, message: `${where} closed the connection` };
    case CONNECT_TIMEOUT:
      return { code, message: `${where} did not accept the connection in time (--mtls_upstream_connect_timeout)` };
    case UPSTREAM_UNRESPONSIVE:
      return { code, message: `${where} stopped answering on its HTTP/2 connection (no answer to a PING in ${PING_ANSWER_MS / 1000} s), which was closed: a model server that stopped reading, or a response header field over 64 KiB, which the proxy cannot decode; retry the call` };
    case 'ETIMEDOUT':
      return { code, message: `${where} did not answer in time` };
    // Our own shortage, not the model server's: say which limit to raise.
    case 'EMFILE':
      return { code, message: `cannot connect to ${where}: this proxy is at its open-files limit (raise ulimit -n / the nofile limit)` };
    case 'ENFILE':
      return { code, message: `cannot connect to ${where}: the machine is out of file descriptors (fs.file-max)` };
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return { code, message: `${where}: ${NAME_DOES_NOT_RESOLVE}` };
    // nghttp2 ended the connection. Before the model server's SETTINGS: bytes that are no HTTP/2 frames, as an HTTP/1.1
    // server's answer to the preface. After them: a server that speaks HTTP/2 sent what nghttp2 refuses.
    case UPSTREAM_NOT_HTTP2:
      return { code, message: `${where} does not speak HTTP/2 (h2c) as a gRPC server does: ${MEANT_PORT.grpc}, not its REST port?` };
    case 'ERR_HTTP2_ERROR':
      if (spokeHttp2) return { code, message: `${where} ${http2Refusal(err)}; the connection was closed, with every call on it` };
      return { code, message: `${where} does not speak HTTP/2 (h2c) as a gRPC server does: ${MEANT_PORT.grpc}, not its REST port?` };
    case 'ERR_HTTP2_GOAWAY_SESSION':
    case 'ERR_HTTP2_INVALID_SESSION':
    case 'ERR_HTTP2_SESSION_ERROR':
    case 'ERR_HTTP2_STREAM_CANCEL':
      return { code, message: `${where} went away during the call` };
    default:
      return { code, message: `${where} failed (${code})` };
  }
}

/**
 * A host name's refusal names the addresses tried: `localhost` is ::1 first in many /etc/hosts
 * files, and a model server listening on 127.0.0.1 alone refuses it there while "running" all
 * along; the name alone sent users to check a model server that was up.
 */
function refusedMessage(where: string, upstream: HostPort, err: unknown): string {
  const tried = isIP(upstream.host) === 0 ? refusedAddresses(err) : [];
  if (tried.length === 0) return `${where} refused the connection (is the model server running?)`;
  const which = tried.length === 1 ? 'that address' : 'one of them';
  return `${where} refused the connection at ${tried.join(' and ')} (is the model server running, and listening on ${which}?)`;
}

/**
 * The addresses of a refused connection, as the system reports them: Node's error names the one it
 * tried (`address`, `port`); with several (happy eyeballs), an AggregateError holds one per address;
 * an HTTP/2 stream cancelled for its session's failure carries that failure as its cause.
 */
function refusedAddresses(err: unknown, depth = 0): string[] {
  if (!err || typeof err !== 'object' || depth > 3) return [];
  const { address, port, errors, cause } = err as { address?: unknown; port?: unknown; errors?: unknown; cause?: unknown };
  const own = typeof address === 'string' && typeof port === 'number' ? [hostAndPort(address, port)] : [];
  const inner = [...(Array.isArray(errors) ? errors : []), cause].flatMap((e) => refusedAddresses(e, depth + 1));
  return [...new Set([...own, ...inner])];
}

/**
 * Whether the bytes a response failed on (`data`: undici's parser error holds them as text, the REST
 * relay gives them as they came) begin with an HTTP/2 server's preface: the model server's gRPC port
 * given as --mtls_rest_upstream, whose answer to an HTTP/1.1 request is its SETTINGS and a GOAWAY.
 */
function answeredInHttp2(err: unknown): boolean {
  const data = err && typeof err === 'object' && 'data' in err ? err.data : undefined;
  if (typeof data === 'string') return isServerPreface(Buffer.from(data, 'latin1'));
  return Buffer.isBuffer(data) && isServerPreface(data);
}

/** undici's names for failures we already name (the REST forwarder's upstream client). */
const UNDICI_CODES: ReadonlyMap<string, string> = new Map([
  ['UND_ERR_CONNECT_TIMEOUT', CONNECT_TIMEOUT],
  // The model server closed the connection: before answering, or the client would have been cut instead.
  ['UND_ERR_SOCKET', 'UPSTREAM_CLOSED'],
  // undici's parser failing on a head with a Content-Length (one that is no number, or next to Transfer-Encoding).
  ['UND_ERR_RES_CONTENT_LENGTH_MISMATCH', 'UPSTREAM_BAD_RESPONSE'],
]);

/**
 * undici's messages when it drops the connection itself over what the model
 * server sent (a final 100, an upgrade nobody asked for): the same
 * UND_ERR_SOCKET as the model server closing it.
 */
const UNDICI_BAD_RESPONSE = new Set(['bad response', 'bad upgrade']);

/**
 * undici's parser refusing what the model server sent (a status line or header line that is
 * not HTTP/1.1, bare LF line ends): an HTTPParserError, whose code is undefined for most of
 * them, so only its name tells. It was "failed (UPSTREAM_ERROR)", saying nothing.
 */
const isParserError = (err: unknown): boolean => err instanceof Error && err.name === 'HTTPParserError';

/**
 * The model server answered with what the proxy's client refuses (undici's "bad response": a 100 it never asked
 * for, an upgrade; a head its parser refuses): it did answer, unlike a connection closed under the request.
 */
export function isBadResponse(err: unknown): boolean {
  return errorCode(err) === 'UPSTREAM_BAD_RESPONSE';
}

function errorCode(err: unknown): string {
  const own = ownCode(err);
  if (isParserError(err)) return 'UPSTREAM_BAD_RESPONSE';
  if (own === 'UND_ERR_SOCKET' && err instanceof Error && UNDICI_BAD_RESPONSE.has(err.message)) return 'UPSTREAM_BAD_RESPONSE';
  const code = own === undefined ? undefined : (UNDICI_CODES.get(own) ?? own);
  // A call waiting on a session that never connected is cancelled with the session's failure as its cause: name that.
  if (code === 'ERR_HTTP2_STREAM_CANCEL' && err && typeof err === 'object' && 'cause' in err) return ownCode(err.cause) ?? code;
  return code ?? 'UPSTREAM_ERROR';
}

function ownCode(err: unknown): string | undefined {
  return err && typeof err === 'object' && 'code' in err && typeof err.code === 'string' ? err.code : undefined;
}
