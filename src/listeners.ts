import type { X509Certificate } from 'node:crypto';
import { createServer as createTlsServer, type Server as TlsServer, type TLSSocket, type SecureContextOptions } from 'node:tls';
import { createServer as createTcpServer, type AddressInfo, type ListenOptions, type Server as TcpServer, type Socket } from 'node:net';
import { bindsIpv6Only, type AllowList, type BindSpec, type Limits, type ProxyProtocolSettings } from './config.js';
import { bindEach, type SkippedAddress } from './bind-addresses.js';
import { ListenError } from './errors.js';
import { identityFromCertificate, isAllowed, presentedCertificates, refusal, rfc2253Name, verificationRefusal, type ClientIdentity, type Refusal, type RefusalReason } from './client-identity.js';
import { clientRef, type ListenerName, type ProxyObserver } from './observer.js';
import { LOAD_BALANCER_CHECK, handshakeFailureReason, judgedWithServedCertificate } from './handshake-failures.js';
import { namesIssuer, pathToTrust, validTo } from './tls-checks.js';
import { clientAddress, hostAndPort } from './addresses.js';
import { awaitProxyHeader, headerExpected } from './proxy-protocol.js';
import { answerRefusal } from './refusal-answer.js';
import type { DescriptorHeadroom } from './fd-headroom.js';
import { SendStallSweeper } from './send-stall.js';
import type { OcspChecker } from './ocsp.js';

/** What the protocol layer learns about a connection that passed every check. */
export interface ConnectionContext {
  readonly listener: ListenerName;
  readonly identity: ClientIdentity;
  /**
   * The leaf as read at the handshake, linked to the CA certificates the client sent. Read
   * later, Node no longer links them, so the reload's revocation check uses this one.
   */
  readonly certificate: X509Certificate;
  readonly remoteAddress: string | undefined;
  readonly socket: TLSSocket;
  /**
   * Set just before the proxy itself destroys the connection: the requests in flight on it are
   * logged with this, not as cancelled by a client that did nothing. Read only when one ends cut short.
   */
  closedBy: ProxyCut | undefined;
  /**
   * When a relay took the connection, set (relay.ts noteHold) when the client had sent bytes
   * while the relay connected upstream, as it joins the connection or hands it to the terminating
   * front; cleared once its first requests have started (requestStart).
   */
  heldSince?: number | undefined;
}

/**
 * When a request's clock starts: now, or, for the first requests on a connection a relay held,
 * when the hold began. Those waited through it: sent while held, or (gRPC clients, which wait for
 * the server's SETTINGS) sent as soon as the server side answered. The requests read in the same turn
 * of the event loop (pipelined, or calls queued together) waited alike; later ones did not.
 */
export function requestStart(context: ConnectionContext): number {
  const held = context.heldSince;
  if (held === undefined) return performance.now();
  setImmediate(() => {
    context.heldSince = undefined;
  });
  return held;
}

/**
 * Why the proxy cut a connection under requests still in flight: a revoked client's grace ran out,
 * nghttp2 gave up decoding a header field over 64 KiB or ended the connection for the client's protocol error, or the
 * client answered no PING (http-fronts.ts), the client took nothing
 * of what waited for it (send-stall.ts), the shutdown timeout ran out.
 */
export type ProxyCut = 'proxy_closed_revoked' | 'proxy_closed_undecodable_header' | 'proxy_closed_unresponsive' | 'client_protocol_error' | 'shutdown_timeout';

/** Destroys a connection, first noting why, for the access lines of what was in flight on it. */
export function cutConnection(context: ConnectionContext, why: ProxyCut): void {
  context.closedBy ??= why;
  context.socket.destroy();
}

/** Why the TLS material in force refuses a client chain verified under earlier material (tls-reload.ts liveJudge). */
export type LateJudge = (presented: readonly X509Certificate[]) => RefusalReason | undefined;

/** Where an authorized connection goes, by negotiated ALPN protocol. */
export interface Handover {
  h2(socket: TLSSocket, context: ConnectionContext): void;
  http1(socket: TLSSocket, context: ConnectionContext): void;
  /** Ends one handed-over connection gracefully: GOAWAY on HTTP/2, close after the current response on HTTP/1.1. */
  close?(socket: TLSSocket): void;
}

export interface SecureListenerOptions extends BindSpec {
  readonly name: ListenerName;
  readonly port: number;
  readonly secureContext: SecureContextOptions;
  /** The certificates of that context, as the material parsed them. */
  readonly certificates: ContextCertificates;
  readonly limits: Limits;
  readonly allow: AllowList;
  readonly observer: ProxyObserver;
  readonly handover: Handover;
  /** Shared by the process's listeners; none where the open-files limit is unknown. */
  readonly descriptors?: DescriptorHeadroom | undefined;
  /** Asked about every client that passed the other checks before it is served (--mtls_ocsp); shared by the process's listeners. */
  readonly ocsp?: OcspChecker | undefined;
  /** Which connections begin with a PROXY protocol header (--mtls_proxy_protocol), read before the TLS handshake. */
  readonly proxyProtocol?: ProxyProtocolSettings | undefined;
}

/** What a TLS context serves and trusts, as the material parsed it. */
export interface ContextCertificates {
  /** The server certificate file: the server certificate, then the CAs sent with it. */
  readonly serverChain: readonly X509Certificate[];
  readonly clientCas: readonly X509Certificate[];
}

/** When the first certificate we serve expires (ms since the epoch): from then on, clients refuse it. */
function servedUntil(serverChain: readonly X509Certificate[]): number {
  return Math.min(...serverChain.map((cert) => validTo(cert).getTime()));
}

/** What a finished handshake comes to: the client refused (its subject for the log line), or who it is. */
type Judged = Refused | Passed;
type Refused = { readonly refused: Refusal; readonly subject: string | undefined; readonly serial?: string };
type Passed = { readonly identity: ClientIdentity; readonly peer: X509Certificate };

/** The flags a user changes when a bind fails, for the error message. */
const PORT_FLAG: Record<ListenerName, string> = { grpc: '--port', rest: '--rest_port' };
export const BIND_FLAG: Record<ListenerName, string> = { grpc: 'grpc_bind_address', rest: 'rest_bind_address' };

/**
 * TCP keepalive probes start after this long without a byte. A client whose host
 * vanished (node lost, NAT entry dropped) sends no FIN; without probes its open
 * streams, and the upstream resources behind them, would be held for ever.
 * Detected after this plus the kernel's probe interval times count (Linux: 9 x 75 s).
 */
export const TCP_KEEPALIVE_DELAY_MS = 60_000;

/**
 * Once the proxy drains, a connection whose side of ours has ended (an idle keep-alive
 * connection closed at the drain's start, one closed after its last answer) is destroyed this
 * long after, whether the client has closed its side or not: time for the last bytes to reach
 * it before a reset could drop them (Go's server waits 500 ms so). A client that reads its idle
 * pooled connections only at their next use (Python's requests and urllib3) never closes its
 * side before then, and held the drain, and OVMS's stop behind it, until --mtls_shutdown_timeout.
 */
const DRAIN_LINGER_MS = 1000;

/** TCP connections whose PROXY protocol header named a client: that address stands for the connection's own. */
const declaredClients = new WeakMap<Socket, string>();

/** TCP connections whose PROXY protocol header said LOCAL: the load balancer's health checks. */
const balancerChecks = new WeakSet<Socket>();

/**
 * A health check behind a LOCAL header closes without a handshake every few seconds (HAProxy's
 * check-send-proxy: 43,000 a day at its 2 s default), which is no client's failure: told apart.
 */
function asBalancerCheck(reason: string, socket: TLSSocket): string {
  const parent = parentOf(socket);
  return reason === 'client_closed' && parent && balancerChecks.has(parent) ? LOAD_BALANCER_CHECK : reason;
}

/**
 * A public TLS port: verifies the client certificate and the allow-list after
 * the handshake and before a single byte of HTTP is read, then hands the
 * socket to the HTTP/2 or HTTP/1.1 server. Refused clients are logged with
 * the reason, told it in their protocol, and closed (refusal-answer.ts).
 */
export class SecureListener {
  readonly name: ListenerName;
  readonly #options: SecureListenerOptions;
  /** What listens: one TCP server per host, handing what it accepts to the TLS server of the same host. */
  readonly #servers: { tcp: TcpServer; tls: TlsServer }[] = [];
  readonly #connections = new Map<TLSSocket, ConnectionContext>();
  /** TCP connections of every host, handshakes included: what --mtls_max_connections counts. */
  #open = 0;
  #allow: AllowList;
  /** The client CAs of the context in force, to tell an untrusted client from a CRL problem. */
  #trustedCas: readonly X509Certificate[];
  /** When the first certificate the context serves expires (ms since the epoch). */
  #servedUntil: number;
  /** Connections closeConnection is ending, within their grace. */
  readonly #revoked = new WeakSet<Socket>();
  /** How many times the context was replaced; each handshake is stamped with the count it began under. */
  #contexts = 0;
  readonly #handshakeContext = new WeakMap<Socket, number>();
  /** How the context in force judges a client verified under an earlier one (none before a reload). */
  #judgeLate: LateJudge | undefined;
  /**
   * TCP connections whose TLS handshake has not finished. The TCP server's close waits for them
   * too, so one whose client sends nothing (a port scanner, a load balancer's TCP check) held the
   * shutdown until --mtls_handshake_timeout, past --mtls_shutdown_timeout: destroyAll cuts them.
   */
  readonly #handshaking = new Set<Socket>();
  /** Handshaken connections waiting for their OCSP status: destroyAll cuts them too. */
  readonly #awaitingOcsp = new Set<TLSSocket>();
  /** Whether a connection from that address begins with a PROXY protocol header (--mtls_proxy_protocol, _from). */
  readonly #expectsProxyHeader: (remote: string | undefined) => boolean;
  /** Stopped accepting: the shutdown waits for the connections, and ended ones get a short linger. */
  #draining = false;
  /** What waits for the last live connection to close (stopAccepting). */
  readonly #whenNoneLeft: (() => void)[] = [];
  /** Closes a connection whose client takes none of the bytes waiting for it (nginx's send_timeout). */
  readonly #sendStall: SendStallSweeper<ConnectionContext>;

  constructor(options: SecureListenerOptions) {
    this.name = options.name;
    this.#options = options;
    this.#allow = options.allow;
    this.#trustedCas = options.certificates.clientCas;
    this.#servedUntil = servedUntil(options.certificates.serverChain);
    options.ocsp?.trust(options.certificates.clientCas);
    this.#expectsProxyHeader = headerExpected(options.proxyProtocol);
    const { idleTimeoutMs } = options.limits;
    this.#sendStall = new SendStallSweeper(idleTimeoutMs, this.#connections, (_socket, context, waitingBytes) => {
      options.observer.clientUnresponsive({ ...clientRef(context), waitingBytes, idleTimeoutMs });
      cutConnection(context, 'proxy_closed_unresponsive');
    });
  }

  /** Live, authorized connections and what is known about each. */
  get connections(): ReadonlyMap<TLSSocket, ConnectionContext> {
    return this.#connections;
  }

  addresses(): AddressInfo[] {
    return this.#servers.map((s) => s.tcp.address() as AddressInfo).filter(Boolean);
  }

  /** Binds every address; resolves with those of a host name skipped as not on this machine (bindEach). */
  async listen(): Promise<SkippedAddress[]> {
    let port = this.#options.port;
    const { hosts } = this.#options;
    return bindEach(this.#options, async (host) => {
      const server = this.#createServer();
      await listenOn(server.tcp, { host, port, exclusive: false, ipv6Only: bindsIpv6Only(host, hosts) }, this.name);
      this.#servers.push(server);
      // With port 0 and several hosts, every host shares the port chosen first.
      port = (server.tcp.address() as AddressInfo).port;
    });
  }

  /**
   * New handshakes use the new material; live connections keep theirs. `judgeLate` judges
   * the clients of handshakes under way now, which OpenSSL verifies under the old material.
   */
  setSecureContext(options: SecureContextOptions, certificates: ContextCertificates, allow?: AllowList, judgeLate?: LateJudge): void {
    for (const server of this.#servers) server.tls.setSecureContext(this.#withVersions(options));
    this.#trustedCas = certificates.clientCas;
    this.#options.ocsp?.trust(certificates.clientCas);
    this.#servedUntil = servedUntil(certificates.serverChain);
    if (allow) this.#allow = allow;
    this.#contexts += 1;
    this.#judgeLate = judgeLate;
  }

  /**
   * Stop accepting. Resolves once every connection of this listener has
   * closed: draining them is the protocol layer's job.
   */
  async stopAccepting(): Promise<void> {
    this.#draining = true;
    for (const socket of this.#connections.keys()) if (socket.writableFinished) this.#destroyIfPeerStaysOpen(socket);
    await Promise.all(this.#servers.map(({ tcp }) => new Promise<void>((resolve) => (tcp.listening ? tcp.close(() => resolve()) : resolve()))));
    await this.#noneLeft();
  }

  /**
   * A TCP server closes once its raw sockets have; the TLS socket over one closes after it, and
   * with it the HTTP layer's response, whose 'close' writes the access line of a call cut short
   * (the shutdown timeout ran out, the model server died). Resolving at the TCP server's close let
   * the process exit first: those lines were never written (with workers, every one of them).
   */
  #noneLeft(): Promise<void> {
    if (this.#connections.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.#whenNoneLeft.push(resolve));
  }

  destroyAll(): void {
    for (const context of this.#connections.values()) cutConnection(context, 'shutdown_timeout');
    for (const socket of this.#handshaking) socket.destroy();
    for (const socket of this.#awaitingOcsp) socket.destroy();
  }

  /**
   * Ends one live connection (its client was just revoked): gracefully, then
   * by force after `graceMs` so a never-ending stream cannot outlive revocation.
   * False when it is being ended already: a later reload that refuses it again
   * must not count, log or time it a second time.
   */
  closeConnection(socket: TLSSocket, graceMs: number): boolean {
    const context = this.#connections.get(socket);
    if (!context || this.#revoked.has(socket)) return false;
    this.#revoked.add(socket);
    const timer = setTimeout(() => cutConnection(context, 'proxy_closed_revoked'), graceMs);
    timer.unref();
    socket.once('close', () => clearTimeout(timer));
    if (this.#options.handover.close) this.#options.handover.close(socket);
    else socket.end();
    return true;
  }

  /** The TLS versions are the listener's (--mtls_min_tls_version), whatever material a reload brings. */
  #withVersions(options: SecureContextOptions): SecureContextOptions {
    return { ...options, minVersion: `TLSv${this.#options.limits.minTlsVersion}` };
  }

  /**
   * The limit is ours, not Node's `server.maxConnections`: in a cluster worker
   * Node answers a connection over it by handing it back to the primary, which
   * offers it to a worker again at once, so it waited (no answer, no log) until
   * a connection closed while the primary and the workers spun on it.
   */
  #createServer(): { tcp: TcpServer; tls: TlsServer } {
    const { limits } = this.#options;
    const tls = createTlsServer({
      ...this.#withVersions(this.#options.secureContext),
      requestCert: true,
      // We judge the certificate ourselves to log WHY it was refused; Node's
      // own rejection gives no reason (FINDINGS).
      rejectUnauthorized: false,
      // http/1.0 too (as nginx): Node refuses the handshake of a client offering no protocol it lists (curl --http1.0), though both fronts serve HTTP/1.0.
      ALPNProtocols: ['h2', 'http/1.1', 'http/1.0'],
      handshakeTimeout: limits.handshakeTimeoutMs,
    });
    tls.on('secureConnection', (socket: TLSSocket) => this.#onSecureConnection(socket));
    tls.on('tlsClientError', (err: NodeJS.ErrnoException, socket: TLSSocket) => {
      const reason = judgedWithServedCertificate(asBalancerCheck(handshakeFailureReason(err), socket), Date.now() >= this.#servedUntil);
      this.#options.observer.handshakeFailed(this.name, reason, remoteOf(socket));
      socket.destroy();
    });
    const tcp = createTcpServer({ noDelay: true, keepAlive: true, keepAliveInitialDelay: TCP_KEEPALIVE_DELAY_MS }, (socket: Socket) => {
      // Read now, while the socket is open: Node caches it, and a client that resets mid-handshake is still named.
      void socket.remoteAddress;
      if (this.#options.descriptors?.admit(socket) === false) {
        this.#options.observer.openFilesRefused(this.name);
        socket.destroy();
        return;
      }
      if (limits.maxConnections !== 0 && !this.#admit(socket, limits.maxConnections)) return;
      this.#handshakeContext.set(socket, this.#contexts);
      this.#handshaking.add(socket);
      // on(), not once(): 'close' comes once, and once() keeps a wrapper for the connection's life.
      socket.on('close', () => this.#handshaking.delete(socket));
      if (this.#expectsProxyHeader(socket.remoteAddress)) this.#startAfterProxyHeader(socket, tls);
      else tls.emit('connection', socket);
    });
    return { tcp, tls };
  }

  /** The TLS handshake begins once the load balancer's header has named the client; a connection without one is closed. */
  #startAfterProxyHeader(socket: Socket, tls: TlsServer): void {
    awaitProxyHeader(socket, this.#options.limits.handshakeTimeoutMs, (outcome) => {
      if ('failure' in outcome) {
        this.#options.observer.handshakeFailed(this.name, outcome.failure, clientAddress(socket.remoteAddress), outcome.why);
        socket.destroy();
        return;
      }
      if (outcome.source !== undefined) declaredClients.set(socket, outcome.source);
      if (outcome.local) balancerChecks.add(socket);
      tls.emit('connection', socket);
    });
  }

  /** Under --mtls_max_connections: counted until it closes. Over it: refused, logged and counted, before any handshake. */
  #admit(socket: Socket, max: number): boolean {
    if (this.#open >= max) {
      this.#options.observer.handshakeRefused(this.name, refusal('too_many_connections', `${max}`), clientAddress(socket.remoteAddress));
      socket.destroy();
      return false;
    }
    this.#open++;
    socket.on('close', () => this.#open--);
    return true;
  }

  #onSecureConnection(socket: TLSSocket): void {
    this.#handshaking.delete(parentOf(socket)!);
    const judged = this.#judgeSafely(socket);
    if ('refused' in judged) this.#refuse(socket, judged);
    else if (this.#options.ocsp) this.#admitOnOcsp(socket, judged, this.#options.ocsp);
    else this.#handOver(socket, judged);
  }

  #refuse(socket: TLSSocket, judged: Refused): void {
    this.#options.observer.handshakeRefused(this.name, judged.refused, remoteOf(socket), judged.subject, judged.serial);
    if (!socket.destroyed) answerRefusal(socket, judged.refused);
  }

  /**
   * The OCSP status comes asynchronously: the connection waits for it, what the client sends
   * meanwhile buffered by the TLS socket, and is refused or handed over then. Judged on the chain
   * as verified under the CAs in force at the handshake.
   */
  #admitOnOcsp(socket: TLSSocket, judged: Passed, ocsp: OcspChecker): void {
    const path = pathToTrust(presentedCertificates(judged.peer), this.#trustedCas, namesIssuer) ?? [judged.peer];
    this.#awaitingOcsp.add(socket);
    // A client's reset meanwhile does not throw: Node's TLS server listens for its sockets' errors.
    void ocsp.judge(path).catch(internalError).then((refused) => {
      this.#awaitingOcsp.delete(socket);
      const { identity } = judged;
      if (refused) {
        this.#refuse(socket, { refused, subject: identity.subject, serial: identity.serial });
        return;
      }
      // A client that left while it waited is not served: handed over, it stayed among the live connections for ever.
      if (socket.destroyed) return;
      // Judged again: a reload while it waited (a CRL revoking it, its CA or allow-list rule taken out) closed only
      // the live connections, among which it was not yet.
      const now = this.#judgeSafely(socket);
      if ('refused' in now) this.#refuse(socket, now);
      else this.#handOver(socket, now);
    });
  }

  #handOver(socket: TLSSocket, judged: Passed): void {
    this.#options.observer.handshakeAccepted(this.name);
    const context: ConnectionContext = { listener: this.name, identity: judged.identity, certificate: judged.peer, remoteAddress: remoteOf(socket), socket, closedBy: undefined };
    this.#track(socket, context);
    if (socket.alpnProtocol === 'h2') this.#options.handover.h2(socket, context);
    else this.#options.handover.http1(socket, context);
  }

  /**
   * Any client can send any certificate, trusted or not, before we have judged it: one our
   * judgement cannot handle (an exception of ours, as an empty subject once was) refuses that
   * client, where it took down the process and every connection it served, or, as the OVMS
   * entrypoint, the model server too.
   */
  #judgeSafely(socket: TLSSocket): Judged {
    try {
      return this.#judge(socket);
    } catch (err) {
      return { refused: internalError(err), subject: undefined };
    }
  }

  #judge(socket: TLSSocket): Judged {
    // Read once: each call parses anew.
    const peer = socket.getPeerX509Certificate();
    const refused = verificationRefusal(socket, peer, this.#trustedCas) ?? this.#chainRefusal(peer) ?? this.#lateRefusal(socket, peer);
    if (refused) return { refused, subject: peer && rfc2253Name(peer, 'subject'), serial: peer?.serialNumber.toLowerCase() };
    const identity = identityFromCertificate(peer!);
    if (!isAllowed(identity, this.#allow)) return { refused: refusal('not_allowed'), subject: identity.subject, serial: identity.serial };
    return { identity, peer: peer! };
  }

  /**
   * Node has no verify-depth setting; count the chain OpenSSL verified, as it builds it: each
   * issuer from --mtls_client_ca when it holds one, else from what the client sent. Counting
   * only what the client sent, plus a root, missed a bundled intermediate, so a client
   * sending its leaf alone passed a chain one longer than the limit.
   */
  #chainRefusal(peer: X509Certificate | undefined) {
    if (!peer) return undefined;
    const presented = presentedCertificates(peer);
    // No path by names (not seen for a verified chain): what the client sent plus a root, as before.
    const depth = pathToTrust(presented, this.#trustedCas, namesIssuer)?.length ?? presented.length + 1;
    return depth > this.#options.limits.verifyDepth ? refusal('chain_too_long', `depth ${depth}`) : undefined;
  }

  /**
   * A reload during this handshake closed the live connections its new CRL or CAs refuse, but
   * this one was not live yet, and OpenSSL verified it under the material the handshake began
   * with: a client revoked then was let in, and no reload would close it. Judged as the new
   * material judges, like a handshake begun after the reload.
   */
  #lateRefusal(socket: TLSSocket, peer: X509Certificate | undefined): Refusal | undefined {
    if (!peer || !this.#judgeLate || this.#handshakeContext.get(parentOf(socket)!) === this.#contexts) return undefined;
    const reason = this.#judgeLate(presentedCertificates(peer));
    return reason ? refusal(reason) : undefined;
  }

  #track(socket: TLSSocket, context: ConnectionContext): void {
    this.#connections.set(socket, context);
    this.#sendStall.start();
    this.#options.observer.connectionOpened(this.name);
    // on(), not once(): 'finish' comes once anyway, and once() keeps a wrapper per idle connection.
    socket.on('finish', () => this.#destroyIfPeerStaysOpen(socket));
    socket.on('close', () => {
      this.#connections.delete(socket);
      this.#sendStall.stopIfEmpty();
      this.#options.observer.connectionClosed(this.name);
      if (this.#connections.size === 0) for (const resolve of this.#whenNoneLeft.splice(0)) resolve();
    });
  }

  /** Our side has ended: the client gets the idle timeout to close its side, or, in a drain, DRAIN_LINGER_MS. */
  #destroyIfPeerStaysOpen(socket: TLSSocket): void {
    const { idleTimeoutMs } = this.#options.limits;
    destroyIfPeerStaysOpen(socket, this.#draining ? Math.min(DRAIN_LINGER_MS, idleTimeoutMs) : idleTimeoutMs);
  }
}

/** A defect of ours while judging a client: refused, the error kept for our log. */
function internalError(err: unknown): Refusal {
  const error = err instanceof Error ? (err.stack ?? `${err.name}: ${err.message}`) : String(err);
  return { ...refusal('internal_error'), error };
}

/**
 * Our side of the connection has ended (idle timeout, GOAWAY done, `connection: close`,
 * the model server gone): the client is expected to close its side. One that never does,
 * a stuck or half-open client, would otherwise hold the socket, its file descriptor and
 * its open_connections count for ever. A timer only for connections in this state, which
 * most leave at once.
 */
function destroyIfPeerStaysOpen(socket: TLSSocket, graceMs: number): void {
  if (socket.destroyed) return;
  const timer = setTimeout(() => socket.destroy(), graceMs);
  timer.unref();
  socket.on('close', () => clearTimeout(timer));
}

/**
 * The client's address as cached at accept on the TCP socket the TLS socket wraps
 * (`_parent`, set by Node's TLS server): once a client has reset, the TLS socket's
 * own lookup finds nothing. An IPv4 client of a dual-stack `::` listener is named
 * by its IPv4 address (clientAddress). Behind a load balancer that sends a PROXY protocol header,
 * the client it names.
 */
function remoteOf(socket: TLSSocket): string | undefined {
  const parent = parentOf(socket);
  return (parent && declaredClients.get(parent)) ?? clientAddress(parent?.remoteAddress ?? socket.remoteAddress);
}

/** The TCP socket Node's TLS server wrapped in `socket`. */
export function parentOf(socket: TLSSocket): Socket | null | undefined {
  return (socket as TLSSocket & { _parent?: Socket | null })._parent;
}

function listenOn(server: TcpServer, options: ListenOptions & { host: string; port: number }, name: ListenerName): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException) => {
      server.off('listening', onListening);
      reject(describeListenError(err, options.host, options.port, name));
    };
    const onListening = () => {
      server.off('error', onError);
      resolve();
    };
    server.once('error', onError);
    server.once('listening', onListening);
    server.listen(options);
  });
}

export function describeListenError(err: NodeJS.ErrnoException, host: string, port: number, name: ListenerName): ListenError {
  const where = `${PORT_FLAG[name]} ${port}: cannot listen on ${hostAndPort(host, port)}`;
  const flag = `--${BIND_FLAG[name]}`;
  // The system's error stays attached: bindEach tells an address that is not here from a port in use by its code.
  const cause = { cause: err };
  switch (err.code) {
    case 'EADDRINUSE':
      return new ListenError(`${where}: the port is already in use (stop what uses it or pick another port)`, cause);
    case 'EACCES':
      return new ListenError(`${where}: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)`, cause);
    case 'EADDRNOTAVAIL':
      return new ListenError(`${where}: the address is not on this machine (check ${flag})`, cause);
    case 'EAFNOSUPPORT':
      // A kernel booted with ipv6.disable=1 (some hardened nodes) has no IPv6 sockets at all, `::` included.
      return new ListenError(`${where}: IPv6 is turned off on this machine (give ${flag} an IPv4 address, e.g. 0.0.0.0)`, cause);
    default:
      return new ListenError(`${where}: ${err.code ?? err.message}`, cause);
  }
}
