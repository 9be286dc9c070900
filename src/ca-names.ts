/**
 * The list of acceptable CAs the server sends when it asks for a client certificate. Node puts
 * the subject of every CA of --mtls_client_ca in it (SSL_CTX_add_client_CA, which it offers no
 * way to leave out), and TLS gives that list at most 64 KiB: a corporate trust store of a few
 * hundred CAs goes over it, and then OpenSSL fails every handshake with internal_error.
 */
import type { X509Certificate } from 'node:crypto';
import { certificateNames } from './crl-index.js';
import { TlsMaterialError } from './errors.js';

/**
 * TLS 1.2 carries the names in a vector of at most 65,535 bytes; TLS 1.3 in an extension that
 * shares its 65,535 bytes with the signature algorithms (44 bytes with Node 20's OpenSSL: a list
 * of 65,492 bytes already failed every TLS 1.3 handshake), and Go clients refuse a request
 * over 64 KiB. The rest is room for a newer OpenSSL offering more signature algorithms.
 */
export const CA_NAMES_LIMIT = 65_400;

/** Java clients refuse a handshake message over 32 KiB (jdk.tls.maxHandshakeMessageSize); the request adds about 50 bytes to the names. */
export const JAVA_CA_NAMES_LIMIT = 32_700;

/** Bytes the names of `cas` take in the request: each subject's DER with its 2-byte length. */
export function caNamesBytes(cas: readonly X509Certificate[]): number {
  return cas.reduce((sum, ca) => sum + 2 + certificateNames(ca.raw).subjectKey.length / 2, 0);
}

function countOf(cas: readonly X509Certificate[]): string {
  return `${cas.length} CA${cas.length === 1 ? '' : 's'}`;
}

/** Refuses a bundle whose names TLS cannot carry: a proxy serving it would complete no handshake at all. */
export function checkCaNamesFit(cas: readonly X509Certificate[], path: string): void {
  const bytes = caNamesBytes(cas);
  if (bytes <= CA_NAMES_LIMIT) return;
  throw new TlsMaterialError(
    `--mtls_client_ca: ${path}: the names of its ${countOf(cas)} take ${bytes} bytes in the TLS request for a client certificate, which carries at most ${CA_NAMES_LIMIT}: handshakes would fail (internal_error; TLS 1.3 ones from about 65490 bytes, every one past 65535); keep only the CAs that issue your clients' certificates and the CAs above them (a system or browser trust store is no client CA bundle: each of its CAs could issue a client the proxy admits)`,
  );
}

/** What to tell about a bundle whose names Java clients refuse to receive; undefined when they take it. */
export function javaCaNamesMessage(cas: readonly X509Certificate[], path: string): string | undefined {
  const bytes = caNamesBytes(cas);
  if (bytes <= JAVA_CA_NAMES_LIMIT) return undefined;
  return `client CA bundle ${path}: the names of its ${countOf(cas)} take ${bytes} bytes in the TLS request for a client certificate: Java clients refuse a request over 32 KiB ("The size of the handshake message ... exceeds the maximum allowed size (32768)") unless started with -Djdk.tls.maxHandshakeMessageSize=65536; keep only the CAs that issue your clients' certificates and the CAs above them`;
}
