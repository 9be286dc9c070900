import { x509 } from './peculiar.js';
import { webcrypto } from 'node:crypto';
import { TlsMaterialError } from '../errors.js';
import { publicKeyDerOfPrivateKey, signerFromPem, type Signer } from './keys.js';
import type { Issued } from './types.js';

// Passed explicitly to every @peculiar/x509 call instead of mutating its global provider.
// (@peculiar/x509 types it as the DOM `Crypto`, which this Node-only project does not load.)
export const crypto = webcrypto as unknown as NonNullable<Parameters<typeof x509.X509CertificateGenerator.create>[1]>;

/** A CA ready to sign: its parsed certificate, its key, and the identifier children point back to. */
export interface Authority {
  cert: x509.X509Certificate;
  signer: Signer;
  keyId: string;
}

export async function loadAuthority(issuer: Issued): Promise<Authority> {
  const cert = parseCertificate(issuer.certPem);
  assertIsCa(cert);
  assertKeyMatchesCertificate(cert, issuer.keyPem);
  const signer = await signerFromPem(issuer.keyPem);
  return { cert, signer, keyId: await keyIdOf(cert) };
}

/** Parses the first certificate of a PEM bundle (a chained cert carries its intermediates after it). */
export function parseCertificate(pem: string): x509.X509Certificate {
  try {
    return new x509.X509Certificate(x509.PemConverter.decodeFirst(pem));
  } catch (err) {
    throw new TlsMaterialError(`cannot read certificate: ${(err as Error).message}`, { cause: err });
  }
}

function assertIsCa(cert: x509.X509Certificate): void {
  const constraints = cert.getExtension(x509.BasicConstraintsExtension);
  if (!constraints?.ca) throw new TlsMaterialError(`certificate "${cert.subject}" is not a CA certificate and cannot sign`);
}

function assertKeyMatchesCertificate(cert: x509.X509Certificate, keyPem: string): void {
  const fromKey = publicKeyDerOfPrivateKey(keyPem);
  const fromCert = Buffer.from(cert.publicKey.rawData);
  if (!fromKey.equals(fromCert)) {
    throw new TlsMaterialError(`private key does not belong to certificate "${cert.subject}"`);
  }
}

/** Children's AKI must equal the CA's SKI byte for byte; reuse it rather than recompute a possibly different hash. */
async function keyIdOf(cert: x509.X509Certificate): Promise<string> {
  const ski = cert.getExtension(x509.SubjectKeyIdentifierExtension);
  if (ski) return ski.keyId;
  const computed = await x509.SubjectKeyIdentifierExtension.create(cert.publicKey, false, crypto);
  return computed.keyId;
}
