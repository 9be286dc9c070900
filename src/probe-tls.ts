/**
 * The probe's first step on each port: a TLS handshake presenting the client
 * certificate, held open until the server has shown it accepted us. With TLS
 * 1.3 a client sees `secureConnect` before the server has judged its
 * certificate (FINDINGS), so "handshake done" proves nothing about the client
 * cert; the server speaking (HTTP/2 SETTINGS, or an HTTP/1.1 answer) does.
 */
import { connect as netConnect, isIP, type Socket } from 'node:net';
import { checkServerIdentity, connect as tlsConnect, type ConnectionOptions, type PeerCertificate, type TLSSocket } from 'node:tls';
import { hostAndPort } from './addresses.js';
import { proxyHeader } from './proxy-protocol.js';
import { subjectCn } from './tls-checks.js';

export type Layer = 'network' | 'server certificate' | 'client certificate' | 'protocol' | 'upstream' | 'model';

/** Why a step failed: the layer, and the likely cause in words a user can act on. */
export interface Diagnosis {
  readonly layer: Layer;
  readonly cause: string;
}

export interface TlsTarget {
  readonly host: string;
  readonly port: number;
  readonly servername: string;
  readonly cert: Buffer;
  readonly key: Buffer;
  readonly ca: Buffer;
  readonly timeoutMs: number;
  /** Begin each connection with a PROXY protocol header of this version, as a load balancer would. */
  readonly proxyProtocol?: 1 | 2 | undefined;
}

export interface HandshakeResult {
  readonly ok: boolean;
  readonly detail: string;
  readonly diagnosis?: Diagnosis;
  /** The protocol the server chose by ALPN ('' for none), once the handshake succeeded. */
  readonly alpn?: string;
}

// The TLS alerts a server sends when it refuses the client certificate, as OpenSSL names them in its messages.
const CLIENT_CERT_ALERT = /alert (certificate required|bad certificate|unknown ca|certificate revoked|certificate expired|certificate unknown|access denied|handshake failure)/i;

// A TLS alert as OpenSSL words it: "sslv3 alert handshake failure" ("ssl/tls alert handshake failure" from
// OpenSSL 3.2 on: Node 22 and 24), "tlsv1 alert protocol version", "tlsv1 unrecognized name".
const TLS_ALERT = /\b(?:sslv3|ssl\/tls|tlsv1\d?) (?:alert )?([a-z ]+?)(?::|$)/i;

const UNTRUSTED_SERVER = new Set([
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'UNABLE_TO_GET_ISSUER_CERT', 'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'SELF_SIGNED_CERT_IN_CHAIN', 'DEPTH_ZERO_SELF_SIGNED_CERT', 'CERT_SIGNATURE_FAILURE', 'CERT_UNTRUSTED',
]);

/**
 * How far the connection got when it failed. Until the server has sent its certificate it has not
 * seen ours, so an alert then is about the hello (name, TLS version, cipher, ALPN), never the client
 * certificate; and a connection the server accepted but never answered is no firewall.
 */
export type HandshakeStage = 'connecting' | 'hello sent' | 'server certificate received' | 'secured';

/**
 * OpenSSL says UNABLE_TO_VERIFY_LEAF_SIGNATURE both for a server certificate from another CA and for
 * one whose server leaves out the intermediate CA that issued it; passing that intermediate alone
 * as --mtls_ca does not help (a trusted chain ends at a root), so the advice names both ways out.
 */
function untrustedServerFix(code: string): string {
  if (code === 'DEPTH_ZERO_SELF_SIGNED_CERT') return 'it is self-signed: pass that certificate itself, if you trust it';
  if (code === 'UNABLE_TO_VERIFY_LEAF_SIGNATURE') {
    return 'pass the CA that issued it; if that is an intermediate CA, pass its root and have the server send the intermediate after its own certificate (or put both in --mtls_ca)';
  }
  return 'pass the root CA of the chain the server sends';
}

/** Maps a client-side socket error to the layer that failed. */
export function diagnoseTlsError(err: NodeJS.ErrnoException, target: TlsTarget, stage: HandshakeStage): Diagnosis {
  const code = err.code ?? '';
  const at = hostAndPort(target.host, target.port);
  if (code === 'ECONNREFUSED') return { layer: 'network', cause: `nothing listens on ${at} (wrong port, or the server is not running)` };
  if (code === 'ENOTFOUND' || code === 'EAI_AGAIN') return { layer: 'network', cause: `host name ${target.host} does not resolve` };
  if (code === 'PROBE_TIMEOUT' && stage === 'secured') return silentAfterHandshake(target);
  if (code === 'PROBE_TIMEOUT' && stage !== 'connecting') return silentHandshake(target);
  if (code === 'ETIMEDOUT' || code === 'PROBE_TIMEOUT') return { layer: 'network', cause: `no answer from ${at} within ${target.timeoutMs} ms (firewall, or the wrong host)` };
  if (UNTRUSTED_SERVER.has(code)) return { layer: 'server certificate', cause: `the server certificate is not trusted by --mtls_ca (${code}): ${untrustedServerFix(code)}` };
  if (code === 'CERT_HAS_EXPIRED') return { layer: 'server certificate', cause: 'the server certificate has expired: renew it on the server' };
  if (code === 'INVALID_PURPOSE') return { layer: 'server certificate', cause: 'the server certificate is not for servers (its extended key usage lacks serverAuth; a client certificate?): give the server its server certificate' };
  if (code === 'CERT_NOT_YET_VALID') return { layer: 'server certificate', cause: 'the server certificate is not valid yet: check the clocks' };
  if (code === 'ERR_TLS_CERT_ALTNAME_INVALID') return { layer: 'server certificate', cause: `the server certificate does not name ${target.servername} (${err.message}); use --servername or reissue it with that SAN` };
  if (code === 'ERR_SSL_WRONG_VERSION_NUMBER' || code === 'ERR_SSL_PACKET_LENGTH_TOO_LONG' || /wrong version number|packet length too long|http request/i.test(err.message)) {
    return { layer: 'protocol', cause: `${at} does not speak TLS: is it the model server's own plain port instead of the mTLS port?` };
  }
  const helloAlert = stage === 'hello sent' ? TLS_ALERT.exec(err.message)?.[1] : undefined;
  if (helloAlert) return helloRefused(helloAlert.toLowerCase(), target);
  const alert = CLIENT_CERT_ALERT.exec(err.message);
  if (alert) {
    return { layer: 'client certificate', cause: `the server refused the client certificate (TLS alert "${alert[1]!.toLowerCase()}"): check it was issued by the server's client CA, is valid and not revoked` };
  }
  if (stage === 'secured') return refusedAfterHandshake();
  if (stage === 'hello sent' && code === 'ECONNRESET') return closedOnHello(target);
  return { layer: 'network', cause: `the connection failed before the TLS handshake finished (${code || err.message})` };
}

/** A TLS server that refuses a hello says why in an alert; a close without one is something in front of TLS. */
function closedOnHello(target: TlsTarget): Diagnosis {
  const header = target.proxyProtocol === undefined
    ? 'the server closed the connection on the TLS hello without a TLS alert: a port that expects a PROXY protocol header first (ovms-mtls --mtls_proxy_protocol, nginx proxy_protocol: probe through the load balancer, or with --proxy_protocol v2)'
    : 'the server closed the connection on the PROXY protocol header and TLS hello without a TLS alert: a port that takes no PROXY header (started without --mtls_proxy_protocol, or this address is not in its --mtls_proxy_protocol_from: probe without --proxy_protocol)';
  return { layer: 'network', cause: `${header}, or a server refusing connections over its limit (--mtls_max_connections); its log says which (ECONNRESET)` };
}

/** The server refused our hello with an alert, before it sent its certificate (so before it saw ours). */
function helloRefused(alert: string, target: TlsTarget): Diagnosis {
  if (alert === 'unrecognized name') {
    const cause = isIP(target.servername) === 0
      ? `the server serves no certificate for the name ${target.servername} (TLS alert "unrecognized name"): give a name it serves with --servername`
      : `the server wants the name it serves, and ${target.servername} is an IP address, which TLS does not send as a name (TLS alert "unrecognized name"): give that name with --servername`;
    return { layer: 'server certificate', cause };
  }
  const why = alert === 'protocol version' ? 'no TLS version in common (this client speaks TLS 1.2 and 1.3)'
    : alert === 'no application protocol' ? 'it speaks neither h2 nor http/1.1 (ALPN): is it an HTTP port?'
      : 'no TLS version, cipher or ALPN protocol in common with this client (TLS 1.2 and 1.3, h2 and http/1.1)';
  return { layer: 'protocol', cause: `the server refused the TLS hello (TLS alert "${alert}") before sending its certificate, so not for the client certificate: ${why}` };
}

// The kernel completes a TCP connection for a listening process even when it is stopped or hung; a firewall would not.
function silentHandshake(target: TlsTarget): Diagnosis {
  return {
    layer: 'network',
    cause: `${hostAndPort(target.host, target.port)} accepted the connection but did not answer the TLS handshake within ${target.timeoutMs} ms: the server is hung or stopped, or a load balancer or port-forward in front of it has no backend`,
  };
}

function refusedAfterHandshake(): Diagnosis {
  return {
    layer: 'client certificate',
    cause: 'the server closed the connection right after the handshake: it refused the client certificate (unknown CA, expired, revoked, wrong purpose, or not on its allow-list; the server log names the reason)',
  };
}

// A server that finished the handshake and then says nothing is no HTTP server: ours and nginx answer or close.
function silentAfterHandshake(target: TlsTarget): Diagnosis {
  return {
    layer: 'protocol',
    cause: `the TLS handshake with ${hostAndPort(target.host, target.port)} finished but the server sent nothing within ${target.timeoutMs} ms after it (no HTTP/2 SETTINGS, no answer to an HTTP/1.1 request): is it an HTTP server?`,
  };
}

/**
 * How the server certificate is checked: SNI, the name it must carry, and that it must verify at all.
 * RFC 6066 forbids an IP address as SNI (Node warns on stderr and will drop it), so an IP is sent as no
 * SNI and still checked against the certificate's IP SANs. rejectUnauthorized is said, not left to
 * Node's default: NODE_TLS_REJECT_UNAUTHORIZED=0 left in a shell turned that off, and the probe passed
 * the handshake and REST steps for a server certificate --mtls_ca did not issue, then blamed the model
 * server for the gRPC call that grpc-js refused.
 */
export function serverVerification(servername: string): Pick<ConnectionOptions, 'servername' | 'checkServerIdentity' | 'rejectUnauthorized'> {
  return {
    rejectUnauthorized: true,
    servername: isIP(servername) === 0 ? servername : '',
    checkServerIdentity: (_host: string, cert: PeerCertificate) => checkServerIdentity(servername, cert),
  };
}

const IP_SNI_WARNING = 'DEP0123';
let ipSniWarningDropped = false;

/**
 * grpc-js sends the host it dials as SNI, an IP address too (no channel option turns that off), and
 * Node then prints DEP0123 on stderr in the middle of the report. Only that warning is dropped: the
 * address is still checked against the certificate's IP SANs, as serverVerification does for our own
 * connections.
 */
export function dropIpSniWarning(): void {
  if (ipSniWarningDropped) return;
  ipSniWarningDropped = true;
  const emitWarning = process.emitWarning;
  process.emitWarning = ((...args: unknown[]) => {
    if (args.some(isIpSniWarningCode)) return;
    Reflect.apply(emitWarning, process, args);
  }) as typeof process.emitWarning;
}

/** emitWarning takes the code as its third argument or in an options object. */
function isIpSniWarningCode(arg: unknown): boolean {
  return arg === IP_SNI_WARNING || (typeof arg === 'object' && arg !== null && (arg as { code?: unknown }).code === IP_SNI_WARNING);
}

function describeSession(socket: TLSSocket): string {
  const peer = socket.getPeerX509Certificate();
  const cn = peer ? subjectCn(peer) : 'unknown';
  const alpn = socket.alpnProtocol || 'no ALPN';
  // Not "client certificate accepted": a server may finish the handshake and refuse it with its first answer (ours, nginx).
  return `${socket.getProtocol() ?? 'TLS'}, ${alpn}, server certificate "${cn}" valid until ${peer ? new Date(peer.validTo).toISOString().slice(0, 10) : '?'}`;
}

/** A TLS connection to the target as a client makes it, its PROXY header first if asked for. */
export function openTls(target: TlsTarget, alpn: string[]): TLSSocket {
  const client = { ...serverVerification(target.servername), cert: target.cert, key: target.key, ca: target.ca, ALPNProtocols: alpn };
  if (target.proxyProtocol === undefined) return tlsConnect({ host: target.host, port: target.port, ...client });
  // The TLS socket starts its handshake on the TCP socket's connect, after connectWithProxyHeader's listener has written the header.
  return tlsConnect({ socket: connectWithProxyHeader(target.host, target.port, target.proxyProtocol), ...client });
}

/** A TCP connection whose first bytes are a PROXY header naming its own two ends, as a load balancer's hop would name the client. */
export function connectWithProxyHeader(host: string, port: number, version: 1 | 2): Socket {
  const socket = netConnect({ host, port, noDelay: true });
  socket.once('connect', () => {
    socket.write(proxyHeader(version, { address: socket.localAddress!, port: socket.localPort! }, { address: socket.remoteAddress!, port: socket.remotePort! }));
  });
  return socket;
}

/**
 * Connects, completes the handshake and waits for the server's first bytes.
 * HTTP/2 servers send SETTINGS unasked; on HTTP/1.1 we ask for /v2/health/live.
 */
export function tlsHandshake(target: TlsTarget): Promise<HandshakeResult> {
  return new Promise((resolve) => {
    let stage: HandshakeStage = 'connecting';
    let settled = false;
    const socket = openTls(target, ['h2', 'http/1.1']);
    const finish = (result: HandshakeResult) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      resolve(result);
    };
    const fail = (err: NodeJS.ErrnoException) => {
      if (stage === 'hello sent' && socket.getPeerX509Certificate()) stage = 'server certificate received';
      const diagnosis = diagnoseTlsError(err, target, stage);
      finish({ ok: false, detail: err.code ?? err.message, diagnosis });
    };
    const timer = setTimeout(() => fail(Object.assign(new Error('timeout'), { code: 'PROBE_TIMEOUT' })), target.timeoutMs);
    socket.once('connect', () => (stage = 'hello sent'));
    socket.on('secureConnect', () => {
      stage = 'secured';
      if (socket.alpnProtocol !== 'h2') socket.write(`HEAD /v2/health/live HTTP/1.1\r\nHost: ${target.servername}\r\nConnection: close\r\n\r\n`);
    });
    socket.once('data', () => finish({ ok: true, detail: describeSession(socket), alpn: socket.alpnProtocol || '' }));
    socket.on('error', fail);
    socket.on('close', () => {
      if (stage === 'secured') finish({ ok: false, detail: 'closed by the server', diagnosis: refusedAfterHandshake() });
      else fail(Object.assign(new Error('closed before the handshake finished'), { code: 'ECONNRESET' }));
    });
  });
}
