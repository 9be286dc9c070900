import type { X509Certificate } from 'node:crypto';
import type { TLSSocket } from 'node:tls';
import type { AllowList } from './config.js';
import { unsupportedCriticalExtensions } from './crl-index.js';
import { EMPTY_NAME, nameOf, pathToTrust, securityLevelWeakness, timeLeft, validFrom, validTo } from './tls-checks.js';
import { x509 } from './x509/peculiar.js';

/** Who the client is, computed once per TLS connection. */
export interface ClientIdentity {
  /** RFC 2253 order and escaping, e.g. `CN=client,O=Example`. */
  readonly subject: string;
  readonly cn: string | undefined;
  readonly ous: readonly string[];
  readonly serial: string;
  /** sha256 of the certificate DER, lowercase hex without colons. */
  readonly fingerprint: string;
  readonly uris: readonly string[];
  readonly dns: readonly string[];
  readonly validTo: string;
  /** Envoy-format x-forwarded-client-cert value. */
  readonly xfcc: string;
}

/** Why a client was refused; `reason` is a stable label for logs and metrics. */
export interface Refusal {
  readonly reason: RefusalReason;
  readonly detail: string;
  /** What the refused client reads instead of `detail`, where that names what is the operator's alone (an internal OCSP responder's address). */
  readonly clientDetail?: string;
  /** For our log only, never the client's answer: the error of an `internal_error`. */
  readonly error?: string;
}

export type RefusalReason =
  | 'no_certificate'
  | 'unknown_ca'
  | 'expired'
  | 'not_yet_valid'
  | 'revoked'
  | 'wrong_purpose'
  | 'crl_missing'
  | 'crl_expired'
  | 'chain_too_long'
  | 'not_allowed'
  | 'too_many_connections'
  | 'verify_failed'
  | 'ocsp_revoked'
  | 'ocsp_unknown'
  | 'ocsp_unavailable'
  | 'ocsp_invalid'
  | 'ocsp_no_responder'
  | 'internal_error';

const OPENSSL_REASONS: Record<string, RefusalReason> = {
  UNABLE_TO_VERIFY_LEAF_SIGNATURE: 'unknown_ca',
  UNABLE_TO_GET_ISSUER_CERT: 'unknown_ca',
  UNABLE_TO_GET_ISSUER_CERT_LOCALLY: 'unknown_ca',
  SELF_SIGNED_CERT_IN_CHAIN: 'unknown_ca',
  DEPTH_ZERO_SELF_SIGNED_CERT: 'unknown_ca',
  CERT_SIGNATURE_FAILURE: 'unknown_ca',
  CERT_HAS_EXPIRED: 'expired',
  CERT_NOT_YET_VALID: 'not_yet_valid',
  CERT_REVOKED: 'revoked',
  INVALID_PURPOSE: 'wrong_purpose',
  UNABLE_TO_GET_CRL: 'crl_missing',
  CRL_HAS_EXPIRED: 'crl_expired',
  CRL_NOT_YET_VALID: 'crl_expired',
  CERT_CHAIN_TOO_LONG: 'chain_too_long',
};

const CRL_REASONS = new Set<RefusalReason | undefined>(['crl_missing', 'crl_expired']);

const REASON_TEXT: Record<RefusalReason, string> = {
  // Go's and Java's TLS send only a certificate issued by a CA the server's request names, so a
  // wrong-CA certificate there shows up as none at all: say so, or the operator hunts a missing file.
  no_certificate: 'client sent no certificate (Go and Java clients send none when theirs is not issued by a CA of --mtls_client_ca, which the handshake names)',
  unknown_ca: 'client certificate is not issued by a trusted client CA',
  expired: 'client certificate has expired',
  not_yet_valid: 'client certificate is not valid yet',
  revoked: 'client certificate is revoked by the CRL',
  wrong_purpose: 'client certificate key usage / EKU does not allow client authentication',
  crl_missing: 'no CRL for the CA that issued the client certificate (give one CRL per trusted CA)',
  crl_expired: 'the CRL for the client CA is expired or not yet valid; every client of that CA is refused until it is renewed',
  chain_too_long: 'client certificate chain is longer than --mtls_verify_depth',
  not_allowed: 'client certificate matches no --mtls_allow_* rule',
  too_many_connections: 'the listener already holds --mtls_max_connections open connections',
  verify_failed: 'client certificate failed verification',
  ocsp_revoked: 'client certificate is revoked by its OCSP responder',
  ocsp_unknown: 'the OCSP responder answered that the client certificate is unknown to it',
  ocsp_unavailable: 'the OCSP status of the client certificate could not be learnt (--mtls_ocsp fails closed)',
  ocsp_invalid: 'the OCSP responder\'s answer cannot be trusted (--mtls_ocsp fails closed)',
  ocsp_no_responder: 'no OCSP responder to ask about the client certificate',
  internal_error: 'the proxy failed to judge this client certificate, a defect of the proxy (its log has the error)',
};

export function refusal(reason: RefusalReason, opensslCode?: string): Refusal {
  return { reason, detail: opensslCode ? `${REASON_TEXT[reason]} (${opensslCode})` : REASON_TEXT[reason] };
}

/**
 * Judges a finished handshake. Node's `authorizationError` reports a missing
 * certificate as UNABLE_TO_GET_ISSUER_CERT (misleading), so look at the
 * certificate itself first.
 */
export function verificationRefusal(socket: TLSSocket, peer: X509Certificate | undefined, trustedCas: readonly X509Certificate[]): Refusal | undefined {
  if (socket.authorized) return undefined;
  if (!peer) return refusal('no_certificate');
  const code = String(socket.authorizationError ?? 'UNKNOWN');
  const reason = OPENSSL_REASONS[code];
  // The issuer is what the operator compares with --mtls_client_ca: a client intermediate left out
  // of the bundle, or a bundle holding the server's CA (cert-manager's ca.crt) instead of the clients'.
  if (reason === 'unknown_ca') return refusal(reason, `${code}; issued by ${describedName(peer, 'issuer')}`);
  // OpenSSL reports the last of its errors: a client that sends its own root along (OpenSSL clients
  // add the CA they trust to their chain) ends on "no CRL" for a CA we never trusted.
  const path = CRL_REASONS.has(reason) ? pathToTrust(presentedCertificates(peer), trustedCas) : undefined;
  if (CRL_REASONS.has(reason) && !path) {
    return refusal('unknown_ca', `no trusted CA in its chain, OpenSSL's last error ${code}; issued by ${describedName(peer, 'issuer')}`);
  }
  // Also when OpenSSL's last error is about a CRL: that of a CA nobody may add a CRL for.
  const unfit = !reason || CRL_REASONS.has(reason) ? unfitIssuer(peer) : undefined;
  if (unfit) return refusal('verify_failed', `${code}; ${unfit}`);
  const sentCa = reason === 'crl_missing' && path ? caSentByClient(path, trustedCas) : undefined;
  if (sentCa) {
    return refusal(reason!, `${code}; ${describedName(sentCa, 'subject')}, which the client sent with its certificate (it is not in --mtls_client_ca), has no CRL in --mtls_crl: add that CA's CRL there`);
  }
  if (reason === 'expired' || reason === 'not_yet_valid') return validityRefusal(reason, code, peer, trustedCas);
  if (reason) return refusal(reason, code);
  return refusal('verify_failed', `${code}${weakCertificateNote(peer, trustedCas) || unsupportedCriticalNote(peer)}`);
}

/**
 * OpenSSL's CERT_HAS_EXPIRED and CERT_NOT_YET_VALID are about any certificate of the chain, the
 * client CA of the bundle included, and Node does not say which: a client CA that expired while the
 * proxy ran refused every client as "client certificate has expired", blaming certificates that
 * were fine, and neither line gave a date or said that a clock may be off. Name the certificate,
 * the one nearest the trust anchor first (the one OpenSSL reports), and its date.
 */
function validityRefusal(reason: 'expired' | 'not_yet_valid', code: string, peer: X509Certificate, trustedCas: readonly X509Certificate[], now = new Date()): Refusal {
  const chain = pathToTrust(presentedCertificates(peer), trustedCas) ?? presentedCertificates(peer);
  const index = chain.findLastIndex((cert) => (reason === 'expired' ? validTo(cert) <= now : validFrom(cert) > now));
  // Judged a moment after OpenSSL: a certificate it found out of its validity may be back in it (not valid yet, then valid).
  if (index < 0) return refusal(reason, code);
  const cert = chain[index]!;
  const trusted = trustedCas.some((ca) => ca.fingerprint256 === cert.fingerprint256);
  const who = index === 0 ? 'client certificate' : trusted ? `client CA ${describedName(cert, 'subject')} of --mtls_client_ca` : `CA ${describedName(cert, 'subject')}, sent by the client,`;
  if (reason === 'not_yet_valid') {
    const ahead = `${who} is not valid before ${validFrom(cert).toISOString()} (CERT_NOT_YET_VALID), ${timeLeft(validFrom(cert), now)} ahead of this machine's clock`;
    return { reason, detail: `${ahead}: the clock of the machine that issued it, or of this one, is off (issuers backdate notBefore a few minutes for this), or it was issued for later` };
  }
  const expired = `${who} expired on ${validTo(cert).toISOString()} (CERT_HAS_EXPIRED)`;
  if (index === 0) return { reason, detail: `${expired}: the client needs a renewed certificate` };
  if (trusted) return { reason, detail: `${expired}: every client certificate it issued is refused, however long each is valid; put the CA's renewed certificate in --mtls_client_ca` };
  return { reason, detail: `${expired}: the client must send that CA's renewed certificate with its own` };
}

/**
 * OpenSSL's security level refuses a chain holding a certificate signed with SHA-1 or MD5, or a
 * key too small (RSA or DSA under 1024 bits up to Node 22, under 2048 from Node 24):
 * CA_MD_TOO_WEAK, EE_KEY_TOO_SMALL, CA_KEY_TOO_SMALL. These reach Node as UNSPECIFIED: the
 * log said only that. Older enterprise PKIs and devices still issue SHA-1 client certificates,
 * and Go, Java and grpcio clients send them: name the certificate and what its issuer has to
 * change. The trust anchor's own signature is not checked by OpenSSL, nor here.
 */
function weakCertificateNote(leaf: X509Certificate, trustedCas: readonly X509Certificate[]): string {
  const presented = presentedCertificates(leaf);
  for (const cert of pathToTrust(presented, trustedCas) ?? presented) {
    const weakness = securityLevelWeakness(cert);
    if (weakness) return `; ${describedName(cert, 'subject')} ${weakness.what}, which OpenSSL refuses at its security level: reissue it ${weakness.fix}`;
  }
  return '';
}

/**
 * The first CA of a verified path that the client sent and --mtls_client_ca does not hold: its
 * intermediate. Startup and reloads insist on a CRL for every CA of the bundle, and Node checks
 * the CRL of every CA of the chain, so "no CRL" for a chain through such a CA is that CA's CRL
 * missing, which "one CRL per trusted CA" did not lead the operator to.
 */
function caSentByClient(path: readonly X509Certificate[], trustedCas: readonly X509Certificate[]): X509Certificate | undefined {
  return path.slice(1).find((ca) => !trustedCas.some((trusted) => trusted.fingerprint256 === ca.fingerprint256));
}

/**
 * A certificate the client sent that signed the one before it without being allowed to: not a
 * CA, a key usage without keyCertSign (OpenSSL's errors for both reach Node as UNSPECIFIED), or
 * more CAs below it than its pathlen allows. Only read for a refused chain.
 */
function unfitIssuer(leaf: X509Certificate): string | undefined {
  const chain = presentedCertificates(leaf);
  for (let i = 1; i < chain.length; i++) {
    const issuer = chain[i]!;
    const parsed = safelyParse(issuer);
    if (!parsed) continue;
    // Not Node's `ca`: OpenSSL's X509_check_ca, false for a CA:TRUE certificate without keyCertSign too.
    const constraints = parsed.getExtension(x509.BasicConstraintsExtension);
    const usage = parsed.getExtension(x509.KeyUsagesExtension);
    const pathLength = constraints?.pathLength;
    const lack = !constraints?.ca
      ? 'is no CA (no basicConstraints CA:TRUE)'
      : usage && (usage.usages & x509.KeyUsageFlags.keyCertSign) === 0
        ? 'has a key usage without keyCertSign'
        : pathLength !== undefined && i - 1 > pathLength
          ? `allows ${pathLength} CA certificate(s) below it (pathlen), and the chain has ${i - 1}`
          : undefined;
    if (lack) return `${describedName(issuer, 'subject')}, sent by the client, signed ${describedName(chain[i - 1]!, 'subject')} but ${lack}: it may not issue that certificate`;
  }
  return undefined;
}

function safelyParse(cert: X509Certificate): x509.X509Certificate | undefined {
  try {
    return new x509.X509Certificate(cert.raw);
  } catch {
    return undefined;
  }
}

/**
 * Node names none of OpenSSL's codes for an unknown critical extension (it says UNSPECIFIED):
 * name the extension, which is what the certificate's issuer has to change.
 */
function unsupportedCriticalNote(leaf: X509Certificate): string {
  for (const cert of presentedCertificates(leaf)) {
    const oids = safely(() => unsupportedCriticalExtensions(cert.raw));
    if (oids.length > 0) {
      return `; ${describedName(cert, 'subject')} marks extension ${oids.join(', ')} critical, which OpenSSL cannot process: reissue it with that extension non-critical or without it`;
    }
  }
  return '';
}

/** Leaf first, then the certificates the client sent with it, as Node links them. */
export function presentedCertificates(leaf: X509Certificate): X509Certificate[] {
  const chain: X509Certificate[] = [];
  const seen = new Set<string>();
  for (let cert: X509Certificate | undefined = leaf; cert && !seen.has(cert.fingerprint256); cert = cert.issuerCertificate) {
    seen.add(cert.fingerprint256);
    chain.push(cert);
  }
  return chain;
}

function safely(parse: () => string[]): string[] {
  try {
    return parse();
  } catch {
    return [];
  }
}

/** `DNS:a, URI:spiffe://x, IP Address:1.2.3.4`; Node quotes entries holding commas. */
export function parseSubjectAltName(san: string | undefined): { dns: string[]; uris: string[] } {
  const dns: string[] = [];
  const uris: string[] = [];
  if (!san) return { dns, uris };
  const entry = /(DNS|URI|IP Address|email|othername|DirName|Registered ID):("(?:[^"\\]|\\.)*"|[^,]*)(?:, |$)/g;
  for (const match of san.matchAll(entry)) {
    const raw = match[2]!;
    const value = raw.startsWith('"') ? (JSON.parse(raw) as string) : raw;
    if (match[1] === 'DNS') dns.push(value);
    else if (match[1] === 'URI') uris.push(value);
  }
  return { dns, uris };
}

/**
 * Node prints the subject one RDN a line in certificate order, the attributes of a multi-valued
 * RDN joined by ` + `. RFC 2253 as OpenSSL writes it (`-nameopt RFC2253`, Envoy's XFCC) reverses
 * every attribute and joins those of one RDN by a bare `+`: RFC 4514 parsers refuse
 * `OU=ops + CN=admin`. A `+` inside a value is always `\+` (see attributes()).
 */
export function rfc2253Subject(subject: string): string {
  return subject.split('\n').filter(Boolean).reverse().map((rdn) => rdn.split(' + ').reverse().join('+')).join(',');
}

/** A certificate's subject or issuer in RFC 2253 form; '' for an empty one (XFCC's `Subject=""`, as Envoy's). */
export function rfc2253Name(cert: X509Certificate, which: 'subject' | 'issuer'): string {
  return rfc2253Subject(nameOf(cert, which));
}

/** rfc2253Name() for a message, which says when the name is empty. */
function describedName(cert: X509Certificate, which: 'subject' | 'issuer'): string {
  return rfc2253Name(cert, which) || EMPTY_NAME;
}

/**
 * The values of one attribute, as the certificate holds them. Node prints one RDN a line, the
 * attributes of a multi-valued RDN joined by ` + `, and values RFC 2253-escaped (`\,`, `\+`,
 * `\\`, a control byte as `\0A`): a `+` inside a value is always `\+`, so ` + ` only joins.
 */
function attributes(subject: string, name: string): string[] {
  return subject
    .split('\n')
    .flatMap((rdn) => rdn.split(' + '))
    .filter((attribute) => attribute.startsWith(name + '='))
    .map((attribute) => unescapeRfc2253(attribute.slice(name.length + 1)));
}

function unescapeRfc2253(value: string): string {
  return value.includes('\\') ? value.replace(/\\(?:([0-9A-Fa-f]{2})|(.))/g, (_, hex: string | undefined, char: string) => (hex ? String.fromCharCode(parseInt(hex, 16)) : char)) : value;
}

function quoteXfccValue(value: string): string {
  return '"' + value.replace(/\\/g, '\\\\').replace(/"/g, '\\"') + '"';
}

/** Values holding `,;=` or quotes must be quoted in XFCC. */
function xfccValue(value: string): string {
  return /[,;="\\\s]/.test(value) ? quoteXfccValue(value) : value;
}

/**
 * RFC 4514's escape for what is not printable ASCII: each UTF-8 byte as `\XX`
 * (what OpenSSL's RFC 2253 output and Envoy do). A header value cannot carry
 * such characters: Node refuses to send them, which once took the process down.
 */
function escapeNonAscii(value: string): string {
  return value.replace(/[^\x20-\x7e]+/g, (run) => [...Buffer.from(run, 'utf8')].map((b) => '\\' + b.toString(16).toUpperCase().padStart(2, '0')).join(''));
}

export function xfccHeaderValue(id: Omit<ClientIdentity, 'xfcc'>): string {
  const parts = [`Hash=${id.fingerprint}`, `Subject=${quoteXfccValue(escapeNonAscii(id.subject))}`];
  for (const uri of id.uris) parts.push(`URI=${xfccValue(escapeNonAscii(uri))}`);
  for (const name of id.dns) parts.push(`DNS=${xfccValue(escapeNonAscii(name))}`);
  return parts.join(';');
}

/**
 * Identities by SHA-256 fingerprint, at most 1,024, the oldest entry evicted
 * first. A client opens many connections with one certificate and each
 * connection holds its identity for its life: one shared, frozen copy saves
 * ~1 KiB per connection.
 */
const IDENTITY_CACHE_SIZE = 1024;
const identities = new Map<string, ClientIdentity>();

export function identityFromCertificate(cert: X509Certificate): ClientIdentity {
  const fingerprint = cert.fingerprint256;
  const known = identities.get(fingerprint);
  if (known) return known;
  const identity = buildIdentity(cert, fingerprint);
  if (identities.size >= IDENTITY_CACHE_SIZE) identities.delete(identities.keys().next().value!);
  identities.set(fingerprint, identity);
  return identity;
}

function buildIdentity(cert: X509Certificate, fingerprint: string): ClientIdentity {
  const { dns, uris } = parseSubjectAltName(cert.subjectAltName);
  const subject = nameOf(cert, 'subject');
  const base = {
    subject: rfc2253Subject(subject),
    cn: attributes(subject, 'CN').at(-1),
    ous: Object.freeze(attributes(subject, 'OU')),
    serial: cert.serialNumber.toLowerCase(),
    fingerprint: fingerprint.replace(/:/g, '').toLowerCase(),
    uris: Object.freeze(uris),
    dns: Object.freeze(dns),
    validTo: cert.validTo,
  };
  return Object.freeze({ ...base, xfcc: xfccHeaderValue(base) });
}

/**
 * `*` matches one path segment, `**` (last) any suffix including none. A wildcard takes no
 * `?`, `#` or `%` (a query, a fragment, an escape such as `%2F`), and admits no URI whose
 * path has a `.`, `..` or empty segment: `spiffe://example.org/ns/a/../admin/sa/x` names
 * ns/admin, so `spiffe://example.org/ns/a/**` must not vouch for it (SPIFFE IDs have none
 * of these).
 */
export function uriPatternMatches(pattern: string, uri: string): boolean {
  if (!pattern.includes('*')) return pattern === uri;
  if (hasDotOrEmptySegment(uri)) return false;
  const source = pattern
    .split(/(\*\*|\*)/)
    .map((part) => (part === '**' ? '[^?#%]*' : part === '*' ? '[^/?#%]*' : part.replace(/[.+?^${}()|[\]\\]/g, '\\$&')))
    .join('');
  return new RegExp(`^${source}$`).test(uri);
}

/** The path's segments between its first and last slash (a trailing slash, `ns/prod/`, is no empty segment). */
function hasDotOrEmptySegment(uri: string): boolean {
  const path = uri.replace(/^[a-z][a-z0-9+.-]*:(?:\/\/[^/?#]*)?/i, '').split(/[?#]/)[0]!;
  return path.split('/').some((segment, i, all) => segment === '.' || segment === '..' || (segment === '' && i > 0 && i < all.length - 1));
}

export function isAllowListEmpty(allow: AllowList): boolean {
  return allow.cn.length + allow.ou.length + allow.dns.length + allow.uri.length + allow.fingerprint.length === 0;
}

/** Allow-lists are OR-ed: one matching rule of any kind admits the client. */
export function isAllowed(id: ClientIdentity, allow: AllowList): boolean {
  if (isAllowListEmpty(allow)) return true;
  return (
    (id.cn !== undefined && allow.cn.includes(id.cn)) ||
    id.ous.some((ou) => allow.ou.includes(ou)) ||
    id.dns.some((name) => allow.dns.includes(name.toLowerCase())) ||
    id.uris.some((uri) => allow.uri.some((pattern) => uriPatternMatches(pattern, uri))) ||
    allow.fingerprint.includes(id.fingerprint)
  );
}
