/** Key algorithms we generate. `ec` is P-256: fast to generate and accepted everywhere. */
export type KeyKind = 'ec' | 'rsa2048' | 'rsa3072' | 'rsa4096';

export const KEY_KINDS: readonly KeyKind[] = ['ec', 'rsa2048', 'rsa3072', 'rsa4096'];

/** A certificate with its private key, both PEM, each ending in a newline. */
export interface Issued {
  certPem: string;
  /** PKCS#8 (`-----BEGIN PRIVATE KEY-----`). */
  keyPem: string;
  /** Lower-case hex without separators or leading zero bytes (Node reports the same digits upper-case). */
  serialHex: string;
}

export interface ValidityOptions {
  /** Lifetime in days, counted from `notBefore` when given, else from now. Default 1. */
  days?: number;
  /** Default: now minus 5 minutes, so a peer whose clock is slightly behind accepts the cert. */
  notBefore?: Date;
  /** An end earlier than `days` gives, e.g. the issuing CA's own end: a certificate cannot outlive its issuer. */
  notAfterCap?: Date;
}

export interface CaOptions extends ValidityOptions {
  commonName: string;
  key?: KeyKind;
  /** Signs the new CA, making it an intermediate; omitted means self-signed root. */
  issuer?: Issued;
  pathLen?: number;
}

export type ExtKeyUsageChoice = 'serverAuth' | 'clientAuth' | 'both' | 'codeSigning';

export interface LeafOptions extends ValidityOptions {
  issuer: Issued;
  commonName: string;
  key?: KeyKind;
  dns?: string[];
  ips?: string[];
  uris?: string[];
  organizationalUnit?: string;
  extKeyUsage?: ExtKeyUsageChoice;
}

export interface RevokedEntry {
  serialHex: string;
  /** Default: the CRL's thisUpdate. */
  date?: Date;
}

export interface CrlOptions {
  issuer: Issued;
  revoked?: RevokedEntry[];
  /** Default: now minus 5 minutes (a CRL from the future is rejected as CRL_NOT_YET_VALID). */
  thisUpdate?: Date;
  /** Default: now + `days`. */
  nextUpdate?: Date;
  /** Default 1. */
  days?: number;
  /** Default 1. Must grow with every CRL the CA publishes. */
  crlNumber?: number | bigint;
}

export interface ParsedCrl {
  revoked: { serialHex: string; date: Date }[];
  thisUpdate: Date;
  nextUpdate: Date | undefined;
  crlNumber: bigint | undefined;
}
