/**
 * Certificate authority functions over PEM strings, with no file I/O and no openssl CLI:
 * CAs, server and client certificates, and CRLs, all accepted by OpenSSL 3 and Node's TLS.
 */
export { createCa, issueClientCert, issueServerCert } from './x509/certificates.js';
export { createCrl, isCrlSignedBy, normaliseSerial, parseCrl, parseCrlSerials } from './x509/crl.js';
export { KEY_KINDS } from './x509/types.js';
export { CLOCK_SKEW_MS } from './x509/validity.js';
export type {
  CaOptions,
  CrlOptions,
  ExtKeyUsageChoice,
  Issued,
  KeyKind,
  LeafOptions,
  ParsedCrl,
  RevokedEntry,
  ValidityOptions,
} from './x509/types.js';
