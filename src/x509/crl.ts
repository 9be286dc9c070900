import { x509 } from './peculiar.js';
import { sign, verify, X509Certificate, type KeyObject } from 'node:crypto';
import { TlsMaterialError } from '../errors.js';
import { crypto, loadAuthority } from './authority.js';
import { contentsStart, dottedOid, encodeSequence, readSingleTlv, readTlvs, tlvEnd, TAG_BIT_STRING, TAG_INTEGER, TAG_OID, TAG_SEQUENCE, type Tlv } from './der.js';
import { toPem } from './keys.js';
import { RevokedSerials } from './revoked-serials.js';
import type { CrlOptions, ParsedCrl } from './types.js';
import { addDays, assertPositiveDays, CLOCK_SKEW_MS } from './validity.js';

const CRL_NUMBER_OID = '2.5.29.20';

/** A v2 CRL signed by `issuer`, PEM-labelled `X509 CRL` (OpenSSL and Node refuse the library's default `CRL`). */
export async function createCrl(o: CrlOptions): Promise<string> {
  const authority = await loadAuthority(o.issuer);
  const now = Date.now();
  const thisUpdate = o.thisUpdate ?? new Date(now - CLOCK_SKEW_MS);
  const days = o.days ?? 1;
  assertPositiveDays(days);
  const crl = await x509.X509CrlGenerator.create(
    {
      issuer: authority.cert.subjectName,
      thisUpdate,
      nextUpdate: o.nextUpdate ?? addDays(new Date(now), days),
      extensions: [
        new x509.AuthorityKeyIdentifierExtension(authority.keyId),
        new x509.Extension(CRL_NUMBER_OID, false, derInteger(BigInt(o.crlNumber ?? 1))),
      ],
      signingKey: authority.signer.privateKey,
      signingAlgorithm: authority.signer.signingAlgorithm,
    },
    crypto,
  );
  const entries = uniqueBySerial(o.revoked ?? []).map((entry) => revokedEntry(entry.serialHex, entry.date ?? thisUpdate));
  const der = withRevokedEntries(Buffer.from(crl.rawData), entries, o.issuer.keyPem, authority.signer.signingAlgorithm);
  return toPem(der, 'X509 CRL');
}

/**
 * The library parses every CRL it makes back through asn1js, which refuses more than 10,000 ASN.1
 * nodes (about 2,400 entries), and checks each entry for duplicates against all before it. So it
 * signs an entry-less CRL, and the entries (without the empty crlEntryExtensions it would add,
 * which strict parsers such as rustls-webpki reject) go in here, after nextUpdate; then it is signed again.
 */
function withRevokedEntries(crlDer: Buffer, entries: Buffer[], keyPem: string, algorithm: { name: string; hash?: unknown }): Buffer {
  if (entries.length === 0) return crlDer;
  const [tbs, signatureAlgorithm] = readTlvs(readSingleTlv(crlDer).value);
  if (!tbs || !signatureAlgorithm) throw new TlsMaterialError('generated CRL is malformed');
  const fields = readTlvs(tbs.value);
  // version, signature, issuer, thisUpdate, then nextUpdate when it is a time; crlExtensions [0] follow.
  const afterTimes = fields.findIndex((field, index) => index > 3 && !TIME_TAGS.has(field.tag));
  fields.splice(afterTimes === -1 ? fields.length : afterTimes, 0, { tag: TAG_SEQUENCE, value: Buffer.concat(entries) });
  const newTbs = encodeSequence(fields);
  const hash = String(algorithm.hash).replace('-', '').toLowerCase();
  // Node's sign() emits ECDSA signatures DER-encoded, as X.509 wants (WebCrypto gives raw r||s).
  const signature = sign(hash, newTbs, { key: keyPem, dsaEncoding: 'der' });
  return encodeSequence([
    readSingleTlv(newTbs),
    signatureAlgorithm,
    { tag: TAG_BIT_STRING, value: Buffer.concat([Buffer.from([0]), signature]) },
  ]);
}

/** SEQUENCE { userCertificate INTEGER, revocationDate Time }. */
function revokedEntry(serialHex: string, date: Date): Buffer {
  let serial = Buffer.from(normaliseSerial(serialHex), 'hex');
  if (serial[0]! & 0x80) serial = Buffer.concat([Buffer.from([0]), serial]);
  return encodeSequence([
    { tag: TAG_INTEGER, value: serial },
    encodeTime(date),
  ]);
}

/** Serials (lower-case hex) of every certificate the CRL revokes. */
export function parseCrlSerials(crlPem: string): string[] {
  return parseCrl(crlPem).revoked.map((entry) => entry.serialHex);
}

/**
 * Read with our own DER walk, not the library's: asn1js refuses any CRL of more than 10,000
 * ASN.1 nodes (about 2,400 revoked certificates) and recurses per node, and real PKIs publish far more.
 */
export function parseCrl(crlPem: string): ParsedCrl {
  try {
    const crl = readCrlDer(crlPemBody(crlPem));
    const revoked = readTlvs(crl.revoked).map((entry) => {
      const [serial, date] = readTlvs(entry.value);
      return { serialHex: entrySerial(serial), date: readTime(date) };
    });
    const crlNumber = crl.extensions.map((extension) => readTlvs(extension.value)).find(([oid]) => oid?.tag === TAG_OID && dottedOid(oid.value) === CRL_NUMBER_OID)?.at(-1);
    return { revoked, thisUpdate: crl.thisUpdate, nextUpdate: crl.nextUpdate, crlNumber: crlNumber ? readDerInteger(new Uint8Array(crlNumber.value)) : undefined };
  } catch (err) {
    throw new TlsMaterialError(`cannot read CRL: ${(err as Error).message}`, { cause: err });
  }
}

/** The DER of the first `X509 CRL` block of a PEM text. */
export function crlPemBody(pem: string): Buffer {
  const block = /-----BEGIN X509 CRL-----([\s\S]+?)-----END X509 CRL-----/.exec(pem);
  if (!block) throw new Error('no -----BEGIN X509 CRL----- block');
  // Node's base64 decoder skips whitespace itself: stripping it first copied the whole text (50 MiB for a million entries).
  return Buffer.from(block[1]!, 'base64');
}

export const TAG_CRL_EXTENSIONS = 0xa0;

/** A CRL's parts, each read once: what parseCrl, the proxy's CRL index and the signature check need. */
export interface CrlDer {
  /** The TBSCertList as signed (tag and length included). */
  readonly tbs: Buffer;
  readonly tbsFields: readonly Tlv[];
  readonly issuer: Tlv;
  readonly thisUpdate: Date;
  readonly nextUpdate: Date | undefined;
  /** Contents of revokedCertificates (empty when absent): one SEQUENCE { serial, date, extensions? } each, split only by whoever needs them. */
  readonly revoked: Buffer;
  /** crlExtensions: one Extension SEQUENCE each. */
  readonly extensions: readonly Tlv[];
  /** Signature algorithm OID (hex of its contents), a key of SIGNATURE_HASHES when we can check it. */
  readonly signatureAlgorithm: string;
  readonly signature: Buffer;
}

/** CertificateList { TBSCertList { version?, signature, issuer, thisUpdate, nextUpdate?, revokedCertificates?, [0] crlExtensions? }, algorithm, signature }. Throws a plain Error on malformed DER. */
export function readCrlDer(der: Buffer): CrlDer {
  const signed = readSingleTlv(der).value;
  const [tbs, algorithm, signature] = readTlvs(signed);
  if (!tbs || tbs.tag !== TAG_SEQUENCE || !algorithm || !signature) throw new Error('CRL is not a signed structure');
  const fields = readTlvs(tbs.value);
  let at = fields[0]?.tag === TAG_INTEGER ? 1 : 0;
  const issuer = fields[at + 1];
  if (!issuer || issuer.tag !== TAG_SEQUENCE) throw new Error('CRL has no issuer name');
  at += 2;
  const thisUpdate = readTime(fields[at++]);
  const nextUpdate = fields[at] && TIME_TAGS.has(fields[at]!.tag) ? readTime(fields[at++]) : undefined;
  const revoked = fields[at]?.tag === TAG_SEQUENCE ? fields[at++]!.value : Buffer.alloc(0);
  const extensions = fields[at]?.tag === TAG_CRL_EXTENSIONS ? readTlvs(readSingleTlv(fields[at]!.value).value) : [];
  return {
    // The TBS is the first TLV of `signed`: a view of its bytes, not a copy of most of the file.
    tbs: signed.subarray(0, tbs.value.byteOffset - signed.byteOffset + tbs.value.length),
    tbsFields: fields,
    issuer,
    thisUpdate,
    nextUpdate,
    revoked,
    extensions,
    signatureAlgorithm: readTlvs(algorithm.value)[0]?.value.toString('hex') ?? '',
    // BIT STRING: the first octet counts unused bits (always 0 for signatures).
    signature: signature.value.subarray(1),
  };
}

/**
 * Serials of every entry, checked as readTlvs checks them. Walks the DER by offsets: a Buffer view
 * and an array per entry made a million-entry CRL take seconds, most of it garbage collection.
 */
export function revokedSerials(crl: Pick<CrlDer, 'revoked'>): RevokedSerials {
  const der = crl.revoked;
  const starts: number[] = [];
  const ends: number[] = [];
  for (let entry = 0; entry < der.length; entry = tlvEnd(der, entry, der.length)) {
    const start = contentsStart(der, entry);
    const end = tlvEnd(der, entry, der.length);
    if (start >= end || der[start] !== TAG_INTEGER) throw new Error('revoked entry has no serial number');
    const serialStart = contentsStart(der, start);
    const serialEnd = tlvEnd(der, start, end);
    if (serialStart === serialEnd) throw new Error('revoked entry has no serial number');
    for (let field = serialEnd; field < end; ) field = tlvEnd(der, field, end);
    let first = serialStart;
    while (first < serialEnd - 1 && der[first] === 0) first++;
    starts.push(first);
    ends.push(serialEnd);
  }
  return new RevokedSerials(der, starts, ends);
}

/** The serial as normaliseSerial writes it (lower-case hex, no leading zero octets), without a regex per entry. */
function entrySerial(serial: Tlv | undefined): string {
  if (serial?.tag !== TAG_INTEGER || serial.value.length === 0) throw new Error('revoked entry has no serial number');
  let start = 0;
  while (start < serial.value.length - 1 && serial.value[start] === 0) start++;
  return serial.value.toString('hex', start);
}

const TAG_UTC_TIME = 0x17;
const TAG_GENERALIZED_TIME = 0x18;
const TIME_TAGS = new Set([TAG_UTC_TIME, TAG_GENERALIZED_TIME]);

/** UTCTime YYMMDDHHMMSSZ (50-99 = 19xx) or GeneralizedTime YYYYMMDDHHMMSS[.f]Z, as RFC 5280 writes them. */
function readTime(tlv: Tlv | undefined): Date {
  const text = tlv && TIME_TAGS.has(tlv.tag) ? tlv.value.toString('latin1') : '';
  const match = /^(\d{2}|\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(?:\.(\d+))?Z$/.exec(text);
  const long = tlv?.tag === TAG_GENERALIZED_TIME;
  if (!match || match[1]!.length !== (long ? 4 : 2)) throw new Error(`bad time ${JSON.stringify(text)}`);
  const [, y, mo, d, h, mi, sec, fraction] = match.map(Number) as number[];
  const year = long ? y! : y! < 50 ? 2000 + y! : 1900 + y!;
  const ms = fraction === undefined || Number.isNaN(fraction) ? 0 : Math.floor(Number(`0.${match[7]}`) * 1000);
  return new Date(Date.UTC(year, mo! - 1, d!, h!, mi!, sec!, ms));
}

/** UTCTime through 2049, GeneralizedTime after (RFC 5280 4.1.2.5). */
function encodeTime(date: Date): Tlv {
  const iso = date.toISOString();
  const digits = `${iso.slice(0, 4)}${iso.slice(5, 7)}${iso.slice(8, 10)}${iso.slice(11, 13)}${iso.slice(14, 16)}${iso.slice(17, 19)}Z`;
  const utc = date.getUTCFullYear() >= 1950 && date.getUTCFullYear() < 2050;
  return { tag: utc ? TAG_UTC_TIME : TAG_GENERALIZED_TIME, value: Buffer.from(utc ? digits.slice(2) : digits, 'latin1') };
}

/** Signature algorithm OIDs (hex of the OID contents) -> hash for crypto.verify; null = the key decides (Ed25519). */
const SIGNATURE_HASHES: Record<string, string | null> = {
  '2a8648ce3d0401': 'sha1',
  '2a8648ce3d040302': 'sha256',
  '2a8648ce3d040303': 'sha384',
  '2a8648ce3d040304': 'sha512',
  '2a864886f70d010105': 'sha1',
  '2a864886f70d01010b': 'sha256',
  '2a864886f70d01010c': 'sha384',
  '2a864886f70d01010d': 'sha512',
  '2b6570': null,
  '2b6571': null,
};

/** Whether `publicKey` signed the CRL: undefined when its algorithm is one we cannot check here (RSA-PSS). */
export function crlSignatureValid(crl: Pick<CrlDer, 'tbs' | 'signatureAlgorithm' | 'signature'>, publicKey: KeyObject): boolean | undefined {
  if (!(crl.signatureAlgorithm in SIGNATURE_HASHES)) return undefined;
  try {
    return verify(SIGNATURE_HASHES[crl.signatureAlgorithm] ?? null, crl.tbs, publicKey, crl.signature);
  } catch {
    return false;
  }
}

/** Whether the CRL's signature verifies with the public key of `caCertPem` (false for an algorithm we cannot check). */
export async function isCrlSignedBy(crlPem: string, caCertPem: string): Promise<boolean> {
  return crlSignatureValid(readCrlDer(crlPemBody(crlPem)), new X509Certificate(caCertPem).publicKey) === true;
}

/** A serial in the reader's spelling: lower-case hex in whole bytes, no leading zero byte, so that `8b86c`, `08:B8:6C` and `0008b86c` compare equal. */
export function normaliseSerial(serialHex: string): string {
  const digits = serialHex.replace(/:/g, '').toLowerCase();
  return (digits.length % 2 === 1 ? `0${digits}` : digits).replace(/^(00)+(?=.)/, '');
}

// The library throws on a duplicate serial; revoking twice should simply be a no-op.
function uniqueBySerial<T extends { serialHex: string }>(entries: T[]): T[] {
  const seen = new Set<string>();
  return entries.filter((entry) => {
    const key = normaliseSerial(entry.serialHex);
    if (seen.has(key)) return false;
    seen.add(key);
    return true;
  });
}

/** DER INTEGER for a non-negative value (the library has no CRL Number extension class). */
function derInteger(value: bigint): Uint8Array {
  if (value < 0n) throw new TlsMaterialError(`CRL number must not be negative, got ${value}`);
  let hex = value.toString(16);
  if (hex.length % 2 === 1) hex = `0${hex}`;
  let body = Buffer.from(hex, 'hex');
  if (body[0]! & 0x80) body = Buffer.concat([Buffer.from([0]), body]);
  if (body.length > 127) throw new TlsMaterialError('CRL number is too large');
  return Uint8Array.from([0x02, body.length, ...body]);
}

function readDerInteger(der: Uint8Array): bigint | undefined {
  if (der[0] !== 0x02 || der[1] === undefined || der[1] > 127 || der.length !== der[1] + 2) return undefined;
  const body = Buffer.from(der.subarray(2));
  return body.length === 0 ? undefined : BigInt(`0x${body.toString('hex')}`);
}
