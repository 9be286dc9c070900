/**
 * Why a TLS handshake failed, for the log and the metrics label, and what an
 * operator can do about it. A refused client certificate is not here: that is
 * a refusal (client-identity.ts), judged after a handshake that succeeded.
 */
import type { MinTlsVersion } from './config.js';

/** Client alerts that mean "I do not accept your server certificate". */
const DISTRUST_ALERTS = new Set(['tlsv1_alert_unknown_ca', 'sslv3_alert_bad_certificate', 'sslv3_alert_certificate_unknown',
  'sslv3_alert_certificate_expired', 'sslv3_alert_unsupported_certificate', 'tlsv1_alert_access_denied']);

/**
 * Every client's handshake fails once the certificate we serve, or a CA certificate we send with
 * it, has expired: OpenSSL clients with a certificate_expired alert, Go's and Java's with another
 * distrust alert, Node's (grpc-js) with a bare close, as they judge after the handshake. Those lines
 * told the operator to hand out the CA or check the name, or blamed TCP health checks.
 */
export const SERVER_CERTIFICATE_EXPIRED = 'server_certificate_expired';

/** A connection whose PROXY protocol header said LOCAL, closed before its handshake: the load balancer checking the port. */
export const LOAD_BALANCER_CHECK = 'load_balancer_check';

const DETAILS: Record<string, string> = {
  [LOAD_BALANCER_CHECK]: 'the load balancer checked the port (a PROXY protocol LOCAL header, then a close before TLS); logged at debug',
  [SERVER_CERTIFICATE_EXPIRED]: 'our server certificate (--mtls_cert), or a CA certificate the file sends with it, has expired, so every client refuses it: renew it (a reload picks it up; `ovms-mtls check` names the certificate and its date)',
  not_tls: 'the client did not start TLS: a plaintext client (an insecure gRPC channel, http://) on a TLS port, or a load balancer sending a PROXY protocol header (then start the proxy with --mtls_proxy_protocol, or name it in --mtls_proxy_protocol_from)?',
  handshake_timeout: 'the client did not finish the TLS handshake within --mtls_handshake_timeout',
  client_closed: 'the client closed the connection before the TLS handshake finished: a TCP health check, or a client that does not trust our server certificate',
  no_shared_cipher: 'the client offers no cipher suite we accept',
  no_application_protocol: 'the client offers no application protocol we speak (ALPN h2, http/1.1 or http/1.0)',
  no_suitable_signature_algorithm: 'the client accepts no signature algorithm the key of --mtls_cert can make (an EC or Ed25519 key, and a client that takes RSA signatures only, or the reverse): serve a certificate with a key type the client supports',
  // TLS 1.2: the client signed with a key on a curve outside our groups. Under TLS 1.3 an OpenSSL client sends no certificate instead.
  wrong_curve: 'the client certificate has an EC key on a curve we do not take (such as brainpool or secp256k1): issue it with a P-256 or P-384 key',
  proxy_protocol_missing: 'the connection did not begin with a PROXY protocol header, which --mtls_proxy_protocol requires (of every connection, or of those from --mtls_proxy_protocol_from): a client connecting past the load balancer, or a load balancer not set to send one (HAProxy send-proxy or send-proxy-v2, an AWS NLB target group\'s proxy_protocol_v2.enabled)',
  proxy_protocol_invalid: 'the PROXY protocol header that began the connection is malformed',
  // OpenSSL's cap on a Certificate message (max_cert_list); the client is told only "illegal parameter".
  excessive_message_size: 'the client sent a certificate chain over OpenSSL\'s 100 KiB limit (a whole CA bundle appended to its certificate?): it should send its own certificate and intermediates only',
};

/** `reason` as the log and metrics give it: what the certificate we serve explains, when it has expired. */
export function judgedWithServedCertificate(reason: string, servedExpired: boolean): string {
  return servedExpired && (DISTRUST_ALERTS.has(reason) || reason === 'client_closed') ? SERVER_CERTIFICATE_EXPIRED : reason;
}

const DISTRUST_DETAIL = 'the client refused our server certificate: give it the CA that signed --mtls_cert, and connect by a name the certificate holds';

/**
 * A short, stable reason: `not_tls`, `client_closed`, or OpenSSL's code in lower case (`tlsv1_alert_unknown_ca`).
 * OpenSSL 3.2 renamed the alerts it had named "sslv3 alert ..." to "ssl/tls alert ..." (Node 22 and 24:
 * ERR_SSL_SSL/TLS_ALERT_BAD_CERTIFICATE), so the same client refusal became another log reason and metrics
 * label (with a slash), and an expired server certificate was no longer recognised in it: the old name stays.
 */
export function handshakeFailureReason(err: NodeJS.ErrnoException): string {
  if (err.code === 'ERR_SSL_WRONG_VERSION_NUMBER' || err.code === 'ERR_SSL_HTTP_REQUEST') return 'not_tls';
  if (err.code === 'ERR_TLS_HANDSHAKE_TIMEOUT') return 'handshake_timeout';
  // Node reports a client's FIN during the handshake as ECONNRESET ("socket hang up") too.
  if (err.code === 'ECONNRESET' || err.code === 'EPIPE') return 'client_closed';
  return (err.code ?? 'handshake_error').replace(/^ERR_SSL_/, '').toLowerCase().replace(/^ssl\/tls_alert_/, 'sslv3_alert_');
}

/** No TLS version in common: the words name the versions this proxy takes. */
const VERSION_DETAILS: Record<string, (taken: string) => string> = {
  unsupported_protocol: (taken) => `the client offers no TLS version we accept (${taken})`,
  tlsv1_alert_protocol_version: (taken) => `the client accepts no TLS version we offer (${taken})`,
};

/** One sentence for the log line: what happened, and where the fix usually is. */
export function handshakeFailureDetail(reason: string, minTlsVersion: MinTlsVersion = '1.2'): string {
  if (DISTRUST_ALERTS.has(reason)) return `${DISTRUST_DETAIL} (TLS alert ${reason.replace(/^(tlsv1|sslv3)_alert_/, '')})`;
  const versions = VERSION_DETAILS[reason];
  if (versions) return versions(minTlsVersion === '1.3' ? 'TLS 1.3 only, --mtls_min_tls_version' : 'TLS 1.2 and 1.3');
  return DETAILS[reason] ?? `TLS handshake failed (${reason})`;
}
