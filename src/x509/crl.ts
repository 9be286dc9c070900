import { x509 } from './peculiar.js';
import { sign } from 'node:crypto';
import { TlsMaterialError } from '../errors.js';
import { crypto, loadAuthority } from './authority.js';
import { encodeSequence, readSingleTlv, readTlvs, TAG_BIT_STRING, TAG_SEQUENCE, type Tlv } from './der.js';
import { toPem } from './keys.js';
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
      entries: uniqueBySerial(o.revoked ?? []).map((entry) => ({
        serialNumber: entry.serialHex,
        revocationDate: entry.date ?? thisUpdate,
      })),
      extensions: [
        new x509.AuthorityKeyIdentifierExtension(authority.keyId),
        new x509.Extension(CRL_NUMBER_OID, false, derInteger(BigInt(o.crlNumber ?? 1))),
      ],
      signingKey: authority.signer.privateKey,
      signingAlgorithm: authority.signer.signingAlgorithm,
    },
    crypto,
  );
  const der = withoutEmptyEntryExtensions(Buffer.from(crl.rawData), o.issuer.keyPem, authority.signer.signingAlgorithm);
  return toPem(der, 'X509 CRL');
}

/**
 * @peculiar/x509 gives every revoked entry an empty `crlEntryExtensions` SEQUENCE. RFC 5280 requires
 * at least one extension when the field is present; OpenSSL tolerates the empty one, stricter DER
 * parsers (rustls-webpki) reject the whole CRL. Drop the empty fields and sign the result again.
 */
function withoutEmptyEntryExtensions(crlDer: Buffer, keyPem: string, algorithm: { name: string; hash?: unknown }): Buffer {
  const [tbs, signatureAlgorithm] = readTlvs(readSingleTlv(crlDer).value);
  if (!tbs || !signatureAlgorithm) throw new TlsMaterialError('generated CRL is malformed');
  const fields = readTlvs(tbs.value);
  // version, signature, issuer come first; the only later SEQUENCE is revokedCertificates.
  const revokedIndex = fields.findIndex((field, index) => index > 2 && field.tag === TAG_SEQUENCE);
  if (revokedIndex === -1) return crlDer;
  fields[revokedIndex] = { tag: TAG_SEQUENCE, value: Buffer.concat(readTlvs(fields[revokedIndex]!.value).map(entryWithoutEmptyExtensions)) };
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

function entryWithoutEmptyExtensions(entry: Tlv): Buffer {
  const parts = readTlvs(entry.value).filter((part) => !(part.tag === TAG_SEQUENCE && part.value.length === 0));
  return encodeSequence(parts);
}

/** Serials (lower-case hex) of every certificate the CRL revokes. */
export function parseCrlSerials(crlPem: string): string[] {
  return parseCrl(crlPem).revoked.map((entry) => entry.serialHex);
}

export function parseCrl(crlPem: string): ParsedCrl {
  const crl = readCrl(crlPem);
  const numberExtension = crl.extensions.find((extension) => extension.type === CRL_NUMBER_OID);
  return {
    revoked: crl.entries.map((entry) => ({ serialHex: normaliseSerial(entry.serialNumber), date: entry.revocationDate })),
    thisUpdate: crl.thisUpdate,
    nextUpdate: crl.nextUpdate,
    crlNumber: numberExtension ? readDerInteger(new Uint8Array(numberExtension.value)) : undefined,
  };
}

/** Whether the CRL's signature verifies with the public key of `caCertPem`. */
export async function isCrlSignedBy(crlPem: string, caCertPem: string): Promise<boolean> {
  const crl = readCrl(crlPem);
  const ca = new x509.X509Certificate(x509.PemConverter.decodeFirst(caCertPem));
  return crl.verify({ publicKey: ca.publicKey }, crypto);
}

export function normaliseSerial(serialHex: string): string {
  return serialHex.replace(/:/g, '').toLowerCase().replace(/^(00)+(?=.)/, '');
}

function readCrl(crlPem: string): x509.X509Crl {
  try {
    return new x509.X509Crl(x509.PemConverter.decodeFirst(crlPem));
  } catch (err) {
    throw new TlsMaterialError(`cannot read CRL: ${(err as Error).message}`, { cause: err });
  }
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
