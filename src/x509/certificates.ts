import { x509 } from './peculiar.js';
import { isIP } from 'node:net';
import { TlsMaterialError } from '../errors.js';
import { crypto, loadAuthority, type Authority } from './authority.js';
import { generateKeyPair, isRsaKey, privateKeyToPem, toPem } from './keys.js';
import type { CaOptions, ExtKeyUsageChoice, Issued, LeafOptions } from './types.js';
import { randomSerialHex, validityPeriod } from './validity.js';

type CryptoKeyPair = Awaited<ReturnType<typeof generateKeyPair>>;

const EKU_OIDS: Record<ExtKeyUsageChoice, string[]> = {
  serverAuth: [x509.ExtendedKeyUsage.serverAuth],
  clientAuth: [x509.ExtendedKeyUsage.clientAuth],
  both: [x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth],
  codeSigning: [x509.ExtendedKeyUsage.codeSigning],
};

/** A root CA (self-signed) or, with `issuer`, an intermediate CA. */
export async function createCa(o: CaOptions): Promise<Issued> {
  const keys = await generateKeyPair(o.key);
  const authority = o.issuer ? await loadAuthority(o.issuer) : undefined;
  const subject = subjectName(o.commonName);
  const ski = await x509.SubjectKeyIdentifierExtension.create(keys.publicKey, false, crypto);
  const extensions = [
    new x509.BasicConstraintsExtension(true, o.pathLen, true),
    new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
    ski,
    // A root names itself as its own authority.
    new x509.AuthorityKeyIdentifierExtension(authority?.keyId ?? ski.keyId),
  ];
  const signing = authority
    ? { issuer: authority.cert.subjectName, signingKey: authority.signer.privateKey, signingAlgorithm: authority.signer.signingAlgorithm }
    : { issuer: subject, signingKey: keys.privateKey, signingAlgorithm: selfSigningAlgorithm(keys) };
  return signCertificate(o, keys, subject, extensions, signing);
}

/** A TLS server certificate: SAN from `dns`/`ips`, EKU serverAuth. */
export function issueServerCert(o: LeafOptions): Promise<Issued> {
  return issueLeaf(o, 'serverAuth');
}

/** A TLS client certificate: SAN from `dns`/`uris` (e.g. SPIFFE IDs), EKU clientAuth. */
export function issueClientCert(o: LeafOptions): Promise<Issued> {
  return issueLeaf(o, 'clientAuth');
}

async function issueLeaf(o: LeafOptions, defaultUsage: ExtKeyUsageChoice): Promise<Issued> {
  const authority = await loadAuthority(o.issuer);
  const keys = await generateKeyPair(o.key);
  const extensions: x509.Extension[] = [
    new x509.BasicConstraintsExtension(false, undefined, true),
    new x509.KeyUsagesExtension(leafKeyUsage(keys), true),
    new x509.ExtendedKeyUsageExtension(EKU_OIDS[o.extKeyUsage ?? defaultUsage], false),
    await x509.SubjectKeyIdentifierExtension.create(keys.publicKey, false, crypto),
    new x509.AuthorityKeyIdentifierExtension(authority.keyId),
  ];
  const san = subjectAltNames(o);
  if (san.length > 0) extensions.push(new x509.SubjectAlternativeNameExtension(san, false));
  return signCertificate(o, keys, subjectName(o.commonName, o.organizationalUnit), extensions, signingBy(authority));
}

// RSA key exchange (TLS 1.2 RSA suites) encrypts with the cert key; EC keys only ever sign.
function leafKeyUsage(keys: CryptoKeyPair): x509.KeyUsageFlags {
  return isRsaKey(keys.privateKey)
    ? x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyEncipherment
    : x509.KeyUsageFlags.digitalSignature;
}

function subjectAltNames(o: LeafOptions): x509.JsonGeneralName[] {
  for (const ip of o.ips ?? []) {
    if (isIP(ip) === 0) throw new TlsMaterialError(`"${ip}" is not an IP address`);
  }
  return [
    ...(o.dns ?? []).map((value) => ({ type: 'dns' as const, value })),
    ...(o.ips ?? []).map((value) => ({ type: 'ip' as const, value: hexOnlyIpv6(value) })),
    ...(o.uris ?? []).map((value) => ({ type: 'url' as const, value })),
  ];
}

/**
 * @peculiar/x509 reads an IPv6 address as hex groups only: a dotted IPv4 tail went into the certificate
 * as other bytes (::ffff:10.0.0.1 as ::ffff:10, 2001:db8::1.2.3.4 as 2001:db8::1, another host), so the
 * tail is written as the two hex groups it stands for.
 */
function hexOnlyIpv6(ip: string): string {
  const dotted = /^(.*:)(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(ip);
  if (!dotted || isIP(ip) !== 6) return ip;
  const [a, b, c, d] = dotted.slice(2).map(Number) as [number, number, number, number];
  const group = (high: number, low: number) => ((high << 8) | low).toString(16);
  return `${dotted[1]}${group(a, b)}:${group(c, d)}`;
}

function subjectName(commonName: string, organizationalUnit?: string): x509.JsonName {
  if (commonName.length === 0) throw new TlsMaterialError('a certificate needs a non-empty common name');
  return organizationalUnit ? [{ OU: [organizationalUnit] }, { CN: [commonName] }] : [{ CN: [commonName] }];
}

interface Signing {
  issuer: x509.Name | x509.JsonName;
  signingKey: CryptoKeyPair['privateKey'];
  signingAlgorithm: Authority['signer']['signingAlgorithm'];
}

function signingBy(authority: Authority): Signing {
  return { issuer: authority.cert.subjectName, signingKey: authority.signer.privateKey, signingAlgorithm: authority.signer.signingAlgorithm };
}

function selfSigningAlgorithm(keys: CryptoKeyPair): Signing['signingAlgorithm'] {
  return isRsaKey(keys.privateKey) ? { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' } : { name: 'ECDSA', hash: 'SHA-256' };
}

async function signCertificate(
  o: CaOptions | LeafOptions,
  keys: CryptoKeyPair,
  subject: x509.JsonName,
  extensions: x509.Extension[],
  signing: Signing,
): Promise<Issued> {
  const cert = await x509.X509CertificateGenerator.create(
    {
      serialNumber: randomSerialHex(),
      subject,
      issuer: signing.issuer,
      ...validityPeriod(o),
      publicKey: keys.publicKey,
      signingKey: signing.signingKey,
      signingAlgorithm: signing.signingAlgorithm,
      extensions,
    },
    crypto,
  );
  return {
    certPem: toPem(cert.rawData, 'CERTIFICATE'),
    keyPem: await privateKeyToPem(keys.privateKey),
    serialHex: cert.serialNumber.toLowerCase(),
  };
}
