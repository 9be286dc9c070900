/**
 * CRLs and certificates taken apart just enough to answer three questions
 * synchronously (startup validation is synchronous): which CA signed this
 * CRL, is it fresh, and does it revoke this certificate. Issuers are matched
 * by the DER bytes of their Name, as OpenSSL matches them by name.
 */
import type { X509Certificate } from 'node:crypto';
import { dottedOid, encodeTlv, readSingleTlv, readTlvs, TAG_BOOLEAN, TAG_OID, type Tlv } from './x509/der.js';
import type { RevokedSerials } from './x509/revoked-serials.js';
import { crlPemBody, crlSignatureValid, readCrlDer, revokedSerials, TAG_CRL_EXTENSIONS } from './x509/crl.js';

export interface CrlInfo {
  /** 1-based position in the CRL file, for messages. */
  readonly index: number;
  readonly pem: string;
  /** DER of the issuer Name, hex: the key that ties a CRL to its CA. */
  readonly issuerKey: string;
  readonly thisUpdate: Date;
  readonly nextUpdate: Date | undefined;
  readonly revokedSerials: RevokedSerials;
  readonly tbs: Buffer;
  readonly signatureAlgorithm: string;
  readonly signature: Buffer;
  /** Holds a Delta CRL Indicator: only the changes since a base CRL. */
  readonly delta: boolean;
}

/** Each `X509 CRL` block of a PEM file; the one pattern every CRL reader here splits files with. */
export const PEM_CRL = /-----BEGIN X509 CRL-----[\s\S]+?-----END X509 CRL-----/g;

const DELTA_CRL_INDICATOR_OID = '2.5.29.27';

/** Each `X509 CRL` block of a PEM file, parsed; throws (plain Error) on malformed DER. */
export function parseCrlFile(pem: string): CrlInfo[] {
  return (pem.match(PEM_CRL) ?? []).map((block, i) => parseOneCrl(block, i + 1));
}

function parseOneCrl(pem: string, index: number): CrlInfo {
  const crl = readCrlDer(crlPemBody(pem));
  return {
    index,
    pem,
    issuerKey: tlvHex(crl.issuer),
    thisUpdate: crl.thisUpdate,
    nextUpdate: crl.nextUpdate,
    revokedSerials: revokedSerials(crl),
    tbs: crl.tbs,
    signatureAlgorithm: crl.signatureAlgorithm,
    signature: crl.signature,
    delta: extensionsIn(crl.tbsFields, TAG_CRL_EXTENSIONS).some((extension) => extension.oid === DELTA_CRL_INDICATOR_OID),
  };
}

/**
 * The extensions of a TBS: its `wrapperTag` field (a v2 CRL's [0] crlExtensions, a v3
 * certificate's [3] extensions) holds a SEQUENCE of Extension { OID, critical BOOLEAN
 * DEFAULT FALSE, value }.
 */
function extensionsIn(tbsFields: readonly Tlv[], wrapperTag: number): { oid: string; critical: boolean }[] {
  const wrapper = tbsFields.find((field) => field.tag === wrapperTag);
  if (!wrapper) return [];
  return readTlvs(readSingleTlv(wrapper.value).value)
    .map((extension) => readTlvs(extension.value))
    .filter(([oid]) => oid?.tag === TAG_OID)
    .map(([oid, critical]) => ({ oid: dottedOid(oid!.value), critical: critical?.tag === TAG_BOOLEAN && critical.value[0] !== 0 }));
}

/**
 * Issuer and subject Name DER (hex) of a certificate, from its raw DER, and its serial as the CRL
 * index holds serials (the INTEGER's contents octets, leading zero octets left out). Not Node's
 * `serialNumber`: it spells a negative serial `-1234`, which matched no CRL entry, though OpenSSL
 * revokes such a client by its DER value.
 */
export function certificateNames(der: Buffer): { issuerKey: string; subjectKey: string; serialKey: string } {
  const [tbs] = readTlvs(readSingleTlv(der).value);
  if (!tbs) throw new Error('certificate is not a signed structure');
  const fields = readTlvs(tbs.value);
  // [0] EXPLICIT version is optional (absent in v1 certificates).
  const offset = fields[0]?.tag === 0xa0 ? 1 : 0;
  const serial = fields[offset];
  const issuer = fields[offset + 2];
  const subject = fields[offset + 4];
  if (!issuer || !subject) throw new Error('certificate has no issuer or subject');
  return { issuerKey: tlvHex(issuer), subjectKey: tlvHex(subject), serialKey: serial ? withoutLeadingZeros(serial.value).toString('hex') : '' };
}

/** Extensions OpenSSL 3 verifies when critical (X509_supported_extension); any other critical one fails verification. */
const OPENSSL_CRITICAL_EXTENSIONS = new Set([
  '2.16.840.1.113730.1.1', '2.5.29.15', '2.5.29.17', '2.5.29.19', '2.5.29.32', '2.5.29.31', '2.5.29.37',
  '1.3.6.1.5.5.7.1.7', '1.3.6.1.5.5.7.1.8', '1.3.6.1.5.5.7.48.1.5', '2.5.29.36', '1.3.6.1.5.5.7.1.14',
  '2.5.29.30', '2.5.29.33', '2.5.29.54',
]);
const TAG_CERT_EXTENSIONS = 0xa3;

/** Dotted OIDs of the extensions a certificate marks critical that OpenSSL cannot process. */
export function unsupportedCriticalExtensions(der: Buffer): string[] {
  const [tbs] = readTlvs(readSingleTlv(der).value);
  if (!tbs) return [];
  return extensionsIn(readTlvs(tbs.value), TAG_CERT_EXTENSIONS)
    .filter((extension) => extension.critical && !OPENSSL_CRITICAL_EXTENSIONS.has(extension.oid))
    .map((extension) => extension.oid);
}

/** Signature verdicts by CA fingerprint: /readyz asks at each probe, and a CRL of 100,000 entries is megabytes to hash. */
const signatureVerdicts = new WeakMap<CrlInfo, Map<string, boolean | undefined>>();

/**
 * Whether `ca` signed the CRL: true, false, or undefined when the signature
 * algorithm is one we cannot check here (RSA-PSS); OpenSSL still checks it at handshake.
 */
export function crlSignedBy(crl: CrlInfo, ca: X509Certificate): boolean | undefined {
  const verdicts = signatureVerdicts.get(crl) ?? new Map<string, boolean | undefined>();
  signatureVerdicts.set(crl, verdicts);
  if (!verdicts.has(ca.fingerprint256)) verdicts.set(ca.fingerprint256, crlSignatureValid(crl, ca.publicKey));
  return verdicts.get(ca.fingerprint256);
}

/** The CRLs whose issuer name is this CA's subject, whichever key signed them. */
export function crlsNamingCa(crls: readonly CrlInfo[], ca: X509Certificate): CrlInfo[] {
  const { subjectKey } = certificateNames(ca.raw);
  return crls.filter((crl) => crl.issuerKey === subjectKey);
}

/**
 * The CRLs of this CA: its subject as their issuer name, signed by its key (or by an algorithm
 * only OpenSSL checks). A CA renewed with a new key keeps its name, and a bundle holds both
 * during the rotation, each with its own CRL: OpenSSL tells those apart by key, and matched by
 * name alone each CA got the other's CRL too, "not signed by that CA's key", and the set was refused.
 */
export function crlsForCa(crls: readonly CrlInfo[], ca: X509Certificate): CrlInfo[] {
  return crlsNamingCa(crls, ca).filter((crl) => crlSignedBy(crl, ca) !== false);
}

/** A certificate as the peer presented it: its raw DER, from which issuer and serial are read. */
export interface PresentedCertificate {
  readonly raw: Buffer;
}

/** Answers "does any loaded CRL revoke this certificate?", by issuer name + serial, and by the issuer's key when it is known. */
export class RevocationIndex {
  /** Issuer Name DER (hex) -> its CRLs, each holding its serial set (100,000 entries are common: never copied). */
  readonly #byIssuer = new Map<string, CrlInfo[]>();
  readonly #size: number;

  constructor(crls: readonly CrlInfo[]) {
    let size = 0;
    for (const crl of crls) {
      if (crl.revokedSerials.size === 0) continue;
      const own = this.#byIssuer.get(crl.issuerKey) ?? [];
      own.push(crl);
      this.#byIssuer.set(crl.issuerKey, own);
      size += crl.revokedSerials.size;
    }
    this.#size = size;
  }

  /** Revoked entries over all CRLs. */
  get size(): number {
    return this.#size;
  }

  /**
   * `issuer`, when known, is the certificate that signed `cert`: its CRLs are those named by its
   * subject and signed by its key, as checkCrls tied them to it. The issuer field of `cert` may
   * spell that name otherwise (a PrintableString where the CA now writes a UTF8String, other
   * case), which OpenSSL takes for the same name; looked up by those bytes, a revoked client was
   * found in no CRL. Two CAs of one name (a CA renewed with a new key) number their certificates
   * apart: a serial the old one revoked says nothing about the new one's certificate of that serial.
   */
  isRevoked(cert: PresentedCertificate, issuer?: X509Certificate): boolean {
    if (this.#byIssuer.size === 0) return false;
    const { issuerKey, serialKey } = certificateNames(cert.raw);
    const named = this.#byIssuer.get(issuer ? certificateNames(issuer.raw).subjectKey : issuerKey) ?? [];
    const crls = issuer ? named.filter((crl) => crlSignedBy(crl, issuer) !== false) : named;
    return crls.some((crl) => crl.revokedSerials.has(serialKey));
  }

  /** True when any certificate of `path` (leaf first, each followed by its issuer, as pathToTrust builds it) is revoked. */
  revokesAny(path: readonly X509Certificate[]): boolean {
    return path.some((cert, i) => this.isRevoked(cert, path[i + 1]));
  }
}

/** An INTEGER's contents octets without leading zero octets (one kept for zero), as revokedSerials stores each entry. */
function withoutLeadingZeros(contents: Buffer): Buffer {
  let first = 0;
  while (first < contents.length - 1 && contents[first] === 0) first++;
  return contents.subarray(first);
}

function tlvHex(tlv: Tlv): string {
  return encodeTlv(tlv.tag, tlv.value).toString('hex');
}
