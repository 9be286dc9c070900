import { createPrivateKey, createPublicKey, webcrypto, type KeyObject } from 'node:crypto';
import { TlsMaterialError } from '../errors.js';
import type { KeyKind } from './types.js';

type CryptoKey = webcrypto.CryptoKey;
type CryptoKeyPair = webcrypto.CryptoKeyPair;

/** What @peculiar/x509 needs to sign a certificate or CRL with a given key. */
export interface Signer {
  privateKey: CryptoKey;
  signingAlgorithm: webcrypto.Algorithm | webcrypto.EcdsaParams;
}

const RSA_BITS: Record<Exclude<KeyKind, 'ec'>, number> = { rsa2048: 2048, rsa3072: 3072, rsa4096: 4096 };
const RSA_ALGORITHM = { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' } as const;

// Node names curves the OpenSSL way; WebCrypto wants NIST names, and the hash should match the curve size.
const EC_CURVES: Record<string, { namedCurve: string; hash: string }> = {
  prime256v1: { namedCurve: 'P-256', hash: 'SHA-256' },
  secp384r1: { namedCurve: 'P-384', hash: 'SHA-384' },
  secp521r1: { namedCurve: 'P-521', hash: 'SHA-512' },
};

export async function generateKeyPair(kind: KeyKind = 'ec'): Promise<CryptoKeyPair> {
  if (kind === 'ec') {
    return webcrypto.subtle.generateKey({ name: 'ECDSA', namedCurve: 'P-256' }, true, ['sign', 'verify']);
  }
  const bits = RSA_BITS[kind];
  if (bits === undefined) throw new TlsMaterialError(`unknown key type "${String(kind)}": use ec, rsa2048, rsa3072 or rsa4096`);
  return webcrypto.subtle.generateKey(
    { ...RSA_ALGORITHM, modulusLength: bits, publicExponent: new Uint8Array([1, 0, 1]) },
    true,
    ['sign', 'verify'],
  );
}

export function isRsaKey(key: CryptoKey): boolean {
  return key.algorithm.name === RSA_ALGORITHM.name;
}

export async function privateKeyToPem(key: CryptoKey): Promise<string> {
  const der = Buffer.from(await webcrypto.subtle.exportKey('pkcs8', key));
  return toPem(der, 'PRIVATE KEY');
}

/** 64-column base64 with a final newline, so that concatenated PEM files stay loadable. */
export function toPem(der: Uint8Array | ArrayBuffer, label: string): string {
  const base64 = Buffer.from(der instanceof ArrayBuffer ? new Uint8Array(der) : der).toString('base64');
  const lines = base64.match(/.{1,64}/g) ?? [];
  return `-----BEGIN ${label}-----\n${lines.join('\n')}\n-----END ${label}-----\n`;
}

/** Imports a PEM private key (PKCS#8, SEC1 or PKCS#1) for signing. */
export async function signerFromPem(keyPem: string): Promise<Signer> {
  const keyObject = parsePrivateKey(keyPem);
  const pkcs8 = keyObject.export({ format: 'der', type: 'pkcs8' });
  if (keyObject.asymmetricKeyType === 'rsa') {
    const privateKey = await webcrypto.subtle.importKey('pkcs8', pkcs8, RSA_ALGORITHM, false, ['sign']);
    return { privateKey, signingAlgorithm: RSA_ALGORITHM };
  }
  if (keyObject.asymmetricKeyType === 'ec') {
    const curveName = keyObject.asymmetricKeyDetails?.namedCurve ?? '';
    const curve = EC_CURVES[curveName];
    if (!curve) throw new TlsMaterialError(`signing key uses EC curve "${curveName}"; supported: P-256, P-384, P-521`);
    const privateKey = await webcrypto.subtle.importKey('pkcs8', pkcs8, { name: 'ECDSA', namedCurve: curve.namedCurve }, false, ['sign']);
    return { privateKey, signingAlgorithm: { name: 'ECDSA', hash: curve.hash } };
  }
  throw new TlsMaterialError(`signing key type "${keyObject.asymmetricKeyType}" is not supported; use an RSA or EC key`);
}

/** SPKI DER of the public half of a private key, to check that a CA cert and its key belong together. */
export function publicKeyDerOfPrivateKey(keyPem: string): Buffer {
  return createPublicKey(parsePrivateKey(keyPem)).export({ format: 'der', type: 'spki' });
}

function parsePrivateKey(keyPem: string): KeyObject {
  try {
    return createPrivateKey(keyPem);
  } catch (err) {
    throw new TlsMaterialError(`cannot read private key: ${(err as Error).message}`, { cause: err });
  }
}
