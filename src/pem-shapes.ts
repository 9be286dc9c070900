/**
 * What users hand us instead of the PEM file an option wants, told apart so that the
 * error line says what the file is and how to convert it.
 */
import { X509Certificate, createPrivateKey } from 'node:crypto';
import { readSingleTlv, readTlvs, TAG_INTEGER, TAG_OID } from './x509/der.js';

/** Any PEM private key (PKCS#8, RSA, EC, encrypted): what a mixed-up file holds instead of a certificate or CRL. */
const PEM_PRIVATE_KEY_HEADER = /-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----/;
/** 1.2.840.113549.1.7 (PKCS #7 content types), contents octets. */
const PKCS7_OID_PREFIX = '2a864886f70d0107';

/*
 * What users hand us instead of PEM: an empty file (a secret key that was never filled),
 * DER (Windows, Java keytool) or a PKCS#12 bundle (.pfx/.p12 exports). Each gets the command that converts it.
 */
export function notPemCertificate(bytes: Buffer, path: string, role: string): string {
  if (isBlank(bytes)) return 'is empty (expected a PEM certificate, -----BEGIN CERTIFICATE-----)';
  if (PEM_PRIVATE_KEY_HEADER.test(bytes.toString('latin1'))) return `holds a private key, not a certificate (${keyInsteadOfCertificateHint(role)})`;
  if (isPkcs12(bytes)) return pkcs12Hint(path);
  if (isDerCertificate(bytes)) return `holds a DER (binary) certificate, not PEM (convert it: \`openssl x509 -inform DER -in ${path} -out ${path}.pem\`)`;
  return 'holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)';
}

/** The key file where a certificate belongs: the pair given the wrong way round, or a CA's key for the CA. */
function keyInsteadOfCertificateHint(role: string): string {
  return role === 'mtls_cert' ? '--mtls_cert and --mtls_key swapped?' : `give the certificate (.pem) to --${role}, not its key`;
}

/** A key OpenSSL could not read because it is encrypted (it then asks for a passphrase nobody types, and reports 'interrupted or cancelled'). */
export function isEncryptedKey(pem: Buffer, err: unknown): boolean {
  return /ENCRYPTED/.test(pem.toString('latin1')) || (err as { code?: string }).code === 'ERR_MISSING_PASSPHRASE';
}

export function notPemKey(bytes: Buffer, path: string): string {
  if (isBlank(bytes)) return 'is empty (expected a PEM private key, -----BEGIN PRIVATE KEY-----)';
  if (isPkcs12(bytes)) return pkcs12Hint(path);
  if (isDerKey(bytes)) return `holds a DER (binary) key, not PEM (convert it: \`openssl pkey -inform DER -in ${path} -out ${path}.pem\`)`;
  if (bytes.toString('latin1').includes('-----BEGIN CERTIFICATE-----')) return 'holds a certificate, not a private key (--mtls_cert and --mtls_key swapped?)';
  if (isDerCertificate(bytes)) return 'holds a DER (binary) certificate, not a private key (--mtls_cert and --mtls_key swapped?)';
  return 'is not a PEM private key (expected -----BEGIN PRIVATE KEY-----, or the RSA / EC forms)';
}

function pkcs12Hint(path: string): string {
  return `is a PKCS#12 bundle (.pfx/.p12), not PEM (split it: \`openssl pkcs12 -in ${path} -nokeys -out server.pem\` for --mtls_cert and \`openssl pkcs12 -in ${path} -nocerts -nodes -out server.key\` for --mtls_key)`;
}

function isBlank(bytes: Buffer): boolean {
  return bytes.toString('latin1').trim() === '';
}

function isDerCertificate(bytes: Buffer): boolean {
  try {
    new X509Certificate(bytes);
    return true;
  } catch {
    return false;
  }
}

function isDerKey(bytes: Buffer): boolean {
  return (['pkcs8', 'pkcs1', 'sec1'] as const).some((type) => {
    try {
      createPrivateKey({ key: bytes, format: 'der', type });
      return true;
    } catch {
      return false;
    }
  });
}

/** PFX: SEQUENCE { INTEGER 3, ContentInfo { OID pkcs7-data or pkcs7-signedData, ... }, ... }. */
function isPkcs12(bytes: Buffer): boolean {
  try {
    const [version, content] = readTlvs(readSingleTlv(bytes).value);
    const contentType = content && readTlvs(content.value)[0];
    return version?.tag === TAG_INTEGER && version.value.equals(Buffer.from([3])) && contentType?.tag === TAG_OID && contentType.value.toString('hex').startsWith(PKCS7_OID_PREFIX);
  } catch {
    return false;
  }
}

/** A certificate or a key where the CRL belongs (the files of a set sit side by side) gets told so: a DER hint would send the user converting it. */
export function notPemCrl(text: string): string {
  const instead = '(give the CRL the client CA issues: client_cert_ca.crl of `ovms-mtls certs init`)';
  if (/-----BEGIN CERTIFICATE-----/.test(text)) return `holds a certificate, not a CRL ${instead}`;
  if (PEM_PRIVATE_KEY_HEADER.test(text)) return `holds a private key, not a CRL ${instead}`;
  return 'holds no PEM CRL (expected -----BEGIN X509 CRL-----; convert DER with `openssl crl -inform DER -in FILE -out FILE.pem`)';
}

/**
 * The first certificate of a PEM file given to `--option`, or what the file holds instead, in
 * the words of notPemCertificate (a key, DER, PKCS#12 ...) or that its PEM block is no valid one.
 */
export function firstPemCertificate(bytes: Buffer, path: string, option: string): X509Certificate | string {
  if (!bytes.includes('-----BEGIN CERTIFICATE-----')) return notPemCertificate(bytes, path, option);
  try {
    return new X509Certificate(bytes);
  } catch {
    return 'holds no valid PEM certificate (a damaged or truncated block)';
  }
}

/**
 * The label of the first PEM block with a BEGIN line and no END line before the next block or the
 * end of the file: a file cut short (a paste missing its last lines, an interrupted copy). The block
 * patterns skip such a block, so a lone one was "holds no PEM certificate (expected -----BEGIN
 * CERTIFICATE-----)" of a file starting with that very line, a cut-short CRL "has no CRL for CA #1
 * ... append that CA's CRL", and the last CA of a bundle went missing without a word.
 */
export function cutShortPemBlock(text: string): string | undefined {
  const begins = [...text.matchAll(/-----BEGIN ([A-Z0-9 ]+)-----/g)];
  for (const [i, begin] of begins.entries()) {
    const next = begins[i + 1]?.index ?? text.length;
    const end = text.indexOf(`-----END ${begin[1]}-----`, begin.index);
    if (end === -1 || end > next) return begin[1];
  }
  return undefined;
}
