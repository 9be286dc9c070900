import { accessSync, statSync, constants as fsConstants } from 'node:fs';
import { join } from 'node:path';
import { X509Certificate, constants as cryptoConstants, createPrivateKey, type KeyObject } from 'node:crypto';
import { createSecureContext, type SecureContextOptions } from 'node:tls';
import { TlsMaterialError } from './errors.js';
import type { TlsFiles } from './config.js';
import { checkTrust, keyDescription, subjectCn, validFrom, validTo, weakSignatureDigest } from './tls-checks.js';
import { PEM_CRL, type CrlInfo } from './crl-index.js';
import { FileKindError, MAX_TLS_FILE_BYTES, readRegularFile, readRegularFileSync } from './regular-file.js';
import { cutShortPemBlock, isEncryptedKey, notPemCertificate, notPemCrl, notPemKey } from './pem-shapes.js';
import { accessDenial } from './access-denial.js';

export { subjectCn, validFrom, validTo };

/** Everything a listener needs to build its TLS context, already validated. */
export interface TlsMaterial {
  readonly files: TlsFiles;
  readonly key: Buffer;
  readonly cert: Buffer;
  readonly ca: Buffer;
  readonly crl?: Buffer | undefined;
  /** `crl` parsed, one entry per CRL in the file; empty without a CRL. */
  readonly crls: readonly CrlInfo[];
  readonly serverCert: X509Certificate;
  /** `cert` parsed: the server certificate first, then the chain the file carries. */
  readonly serverChain: readonly X509Certificate[];
  readonly clientCas: readonly X509Certificate[];
  /** The moment the checks judged the dates against: a worker judges the set at the same moment. */
  readonly validatedAt: Date;
  /**
   * What the files were (filesSignature) just before this set was read from them; undefined for a set made from
   * texts (a worker's, sent by its primary). A watch placed later starts from it, not from the files then.
   */
  readonly filesSignature?: string | undefined;
}

/**
 * TLS 1.2 minimum; only forward-secret AEAD suites (no CBC, no SHA-1 MACs, no
 * RSA key exchange). TLS 1.3 suites are Node's defaults and all qualify.
 */
export const CIPHERS = [
  'TLS_AES_128_GCM_SHA256',
  'TLS_AES_256_GCM_SHA384',
  'TLS_CHACHA20_POLY1305_SHA256',
  'ECDHE-ECDSA-AES128-GCM-SHA256',
  'ECDHE-RSA-AES128-GCM-SHA256',
  'ECDHE-ECDSA-AES256-GCM-SHA384',
  'ECDHE-RSA-AES256-GCM-SHA384',
  'ECDHE-ECDSA-CHACHA20-POLY1305',
  'ECDHE-RSA-CHACHA20-POLY1305',
].join(':');

const PEM_CERT = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g;

type FileRole = 'mtls_cert' | 'mtls_key' | 'mtls_client_ca' | 'mtls_crl';
type FileContents = Record<FileRole, Buffer | undefined>;

/** What `ovms-mtls certs init` names each file: the hint for a path that names something else. */
const SET_FILE_NAMES: Record<FileRole, string> = {
  mtls_cert: 'server.pem',
  mtls_key: 'server.key',
  mtls_client_ca: 'client_cert_ca.pem',
  mtls_crl: 'client_cert_ca.crl',
};

function describeKindError(role: FileRole, path: string, err: FileKindError): TlsMaterialError {
  const where = `--${role}: ${path} ${err.message}`;
  if (err.problem === 'directory') return new TlsMaterialError(`${where} (give the file inside it, such as ${join(path, SET_FILE_NAMES[role])})`);
  if (err.problem === 'too_large') return new TlsMaterialError(`${where} (${role === 'mtls_crl' ? 'a CRL of a million revocations is about 50 MiB' : 'PEM certificates and keys are a few KiB each'}: is it the right file?)`);
  return new TlsMaterialError(`${where} (give the path of the PEM file itself, such as ${SET_FILE_NAMES[role]} of \`ovms-mtls certs init\`; a pipe or device cannot be read again at reload)`);
}

function describeReadError(role: FileRole, path: string, err: NodeJS.ErrnoException): TlsMaterialError {
  if (err instanceof FileKindError) return describeKindError(role, path, err);
  const where = `--${role}: ${path}`;
  switch (err.code) {
    case 'ENOENT':
      return new TlsMaterialError(`${where} does not exist (mount the certificates there or pass --${role} PATH; \`ovms-mtls certs init\` makes a set)`);
    case 'EACCES':
    case 'EPERM':
      return new TlsMaterialError(`${where} ${accessDenial(path)}`);
    // These said "cannot be read (ELOOP)", with nothing on what to change.
    case 'ELOOP':
      return new TlsMaterialError(`${where} is a symbolic link that never reaches a file (a loop, or more than 40 links): point it at the PEM file`);
    case 'ENOTDIR':
      return new TlsMaterialError(`${where} does not exist: a part of the path before its last is a file, not a directory (check the path)`);
    default:
      return new TlsMaterialError(`${where} cannot be read (${err.code ?? err.message})`);
  }
}

function filesToRead(files: TlsFiles): [FileRole, string | undefined][] {
  return [
    ['mtls_cert', files.cert],
    ['mtls_key', files.key],
    ['mtls_client_ca', files.clientCa],
    ['mtls_crl', files.crl],
  ];
}

/** A missing optional CRL (the container default) means no CRL; any other read error is fatal. */
function unreadable(role: FileRole, path: string, files: TlsFiles, err: NodeJS.ErrnoException): TlsMaterialError | undefined {
  if (role === 'mtls_crl' && files.crlOptional && err.code === 'ENOENT') return undefined;
  return describeReadError(role, path, err);
}

/**
 * The files of the set this process cannot read now, one line each (a missing optional CRL is no
 * problem). Started as root, the proxy reads a root-only key, then drops to its user: every reload
 * after that (each certificate rotation) failed, and nothing said so until the first one did.
 */
export function unreadableTlsFiles(files: TlsFiles): string[] {
  const lines: string[] = [];
  for (const [role, path] of filesToRead(files)) {
    if (path === undefined) continue;
    try {
      accessSync(path, fsConstants.R_OK);
    } catch (err) {
      const error = unreadable(role, path, files, err as NodeJS.ErrnoException);
      if (error) lines.push(error.message);
    }
  }
  return lines;
}

function readAllSync(files: TlsFiles): FileContents {
  const out = {} as FileContents;
  for (const [role, path] of filesToRead(files)) {
    out[role] = undefined;
    if (path === undefined) continue;
    try {
      out[role] = readRegularFileSync(path, MAX_TLS_FILE_BYTES);
    } catch (err) {
      const error = unreadable(role, path, files, err as NodeJS.ErrnoException);
      if (error) throw error;
    }
  }
  return out;
}

async function readAll(files: TlsFiles): Promise<FileContents> {
  const out = {} as FileContents;
  for (const [role, path] of filesToRead(files)) {
    out[role] = undefined;
    if (path === undefined) continue;
    try {
      out[role] = await readRegularFile(path, MAX_TLS_FILE_BYTES);
    } catch (err) {
      const error = unreadable(role, path, files, err as NodeJS.ErrnoException);
      if (error) throw error;
    }
  }
  return out;
}

/** Before any parsing: the parsers' own words for a file cut short send the user after something else. */
function refuseCutShort(role: FileRole, path: string, text: string): void {
  const label = cutShortPemBlock(text);
  if (label === undefined) return;
  throw new TlsMaterialError(`--${role}: ${path} is cut short: a -----BEGIN ${label}----- block has no -----END ${label}----- line (copy the whole file again)`);
}

export function parseCertificates(pem: string, role: FileRole, path: string): X509Certificate[] {
  refuseCutShort(role, path, pem);
  const blocks = pem.match(PEM_CERT) ?? [];
  if (blocks.length === 0) throw new TlsMaterialError(`--${role}: ${path} ${notPemCertificate(Buffer.from(pem, 'latin1'), path, role)}`);
  return blocks.map((block, i) => {
    try {
      return new X509Certificate(block);
    } catch {
      throw new TlsMaterialError(`--${role}: ${path}: certificate #${i + 1} is not valid X.509`);
    }
  });
}

function parseKey(pem: Buffer, path: string): KeyObject {
  refuseCutShort('mtls_key', path, pem.toString('latin1'));
  try {
    return createPrivateKey(pem);
  } catch (err) {
    throw new TlsMaterialError(
      isEncryptedKey(pem, err)
        ? `--mtls_key: ${path} is encrypted, and the proxy takes no passphrase (decrypt it: \`openssl pkey -in ${path} -out ${path}.plain\` asks for the passphrase once)`
        : `--mtls_key: ${path} ${notPemKey(pem, path)}`,
    );
  }
}

function checkServerCert(cert: X509Certificate, path: string, now: Date): void {
  if (validTo(cert) <= now) {
    throw new TlsMaterialError(`--mtls_cert: ${path} expired on ${validTo(cert).toISOString()} (renew it; \`ovms-mtls certs init --force\` makes a new dev set)`);
  }
  if (validFrom(cert) > now) {
    throw new TlsMaterialError(`--mtls_cert: ${path} is not valid before ${validFrom(cert).toISOString()} (check the clock)`);
  }
  if (cert.ca) {
    throw new TlsMaterialError(`--mtls_cert: ${path} is a CA certificate; clients (Go, rustls, browsers) refuse CA certificates as server certificates - issue a leaf certificate`);
  }
  if (!allowsServerAuth(cert)) {
    throw new TlsMaterialError(`--mtls_cert: ${path} is not a server certificate (its extended key usage lacks serverAuth, as a client certificate's does); every client refuses it ("unsuitable certificate purpose"): give the server certificate (server.pem of \`ovms-mtls certs init\`)`);
  }
}

const SERVER_AUTH_OID = '1.3.6.1.5.5.7.3.1';
const ANY_EKU_OID = '2.5.29.37.0';

/** OpenSSL clients check the purpose of the server's certificate: an EKU, when present, must name serverAuth. */
function allowsServerAuth(cert: X509Certificate): boolean {
  const eku = cert.keyUsage;
  return !eku || eku.includes(SERVER_AUTH_OID) || eku.includes(ANY_EKU_OID);
}

function checkClientCas(cas: X509Certificate[], path: string): void {
  cas.forEach((ca, i) => {
    if (!ca.ca) {
      throw new TlsMaterialError(
        `--mtls_client_ca: ${path}: certificate #${i + 1} (${subjectCn(ca)}) is not a CA certificate: give the CA that issues the client certificates (client_cert_ca.pem of \`ovms-mtls certs init\`), not a client's or the server's own certificate`,
      );
    }
  });
}

function checkCrlPem(text: string, path: string): void {
  refuseCutShort('mtls_crl', path, text);
  if (text.trim() === '') throw new TlsMaterialError(`--mtls_crl: ${path} is empty (expected a PEM CRL, -----BEGIN X509 CRL-----; leave --mtls_crl out to run without revocation checks)`);
  if (!/-----BEGIN X509 CRL-----/.test(text)) throw new TlsMaterialError(`--mtls_crl: ${path} ${notPemCrl(text)}`);
  try {
    createSecureContext({ crl: text.match(PEM_CRL) ?? [] });
  } catch {
    throw new TlsMaterialError(`--mtls_crl: ${path} is not a valid CRL`);
  }
}

/**
 * What OpenSSL's security level refuses in a server certificate file, and the fix. The smallest key
 * it takes depends on the Node version (its level: RSA 1024 bits up to Node 22, 2048 from Node 24),
 * so the message names the key as it is rather than a size: Node 24 refused a 1024-bit key that was
 * said to be "under 1024 bits".
 */
function opensslPairRefusal(code: string | undefined, serverCert: X509Certificate): string | undefined {
  switch (code) {
    case 'ERR_SSL_EE_KEY_TOO_SMALL':
      return `the server certificate's key (${keyDescription(serverCert)}) is smaller than this Node's OpenSSL accepts at its security level: reissue it with 2048 bits or more (\`ovms-mtls certs init --key rsa2048\`, or the default EC key)`;
    case 'ERR_SSL_CA_KEY_TOO_SMALL':
      return 'a CA certificate of the chain has a key smaller than this Node\'s OpenSSL accepts at its security level: use the CA\'s current certificate, with 2048 bits or more';
    case 'ERR_SSL_CA_MD_TOO_WEAK':
      return 'a certificate of it is signed with a digest OpenSSL refuses (SHA-1 or MD5): reissue it signed with SHA-256';
    default:
      return undefined;
  }
}

/**
 * Each file parses and the key matches, yet OpenSSL may refuse the pair when it builds the TLS
 * context (its security level: weak keys and digests). That came at startup as an internal error
 * with a stack trace (after `check` had said the proxy would start), at a reload as OpenSSL's bare
 * code: build it here, where every reader of the set gets one line naming the file and the fix.
 */
function checkOpensslTakesPair(cert: Buffer, key: Buffer, chain: readonly X509Certificate[], files: TlsFiles): void {
  try {
    createSecureContext({ cert, key });
  } catch (err) {
    const { code, message } = err as NodeJS.ErrnoException;
    const why = opensslPairRefusal(code, chain[0]!) ?? `OpenSSL refuses it with --mtls_key ${files.key} (${message})`;
    throw new TlsMaterialError(`--mtls_cert: ${files.cert}: ${why}`);
  }
  // Node 22 and 24 serve a chain signed with SHA-1, which Node 20 refused (CA_MD_TOO_WEAK): every OpenSSL
  // client (curl, Python, Node's own) refuses it still. Refused alike on every Node version.
  if (chain.some((c) => weakSignatureDigest(c) !== undefined)) throw new TlsMaterialError(`--mtls_cert: ${files.cert}: ${opensslPairRefusal('ERR_SSL_CA_MD_TOO_WEAK', chain[0]!)!}`);
}

/** The curves TLS 1.3 signs with (ecdsa_secp256r1_sha256 ...); clients offer no other for a server's key. */
const SERVER_KEY_CURVES: ReadonlySet<string> = new Set(['prime256v1', 'secp384r1', 'secp521r1']);

/**
 * A server key on another curve (secp256k1, P-192) loaded, `check` said OK and the proxy started, and every
 * handshake then failed (curl: "sslv3 alert handshake failure"; the log: no_suitable_signature_algorithm).
 */
function checkClientsCanVerify(serverCert: X509Certificate, file: string): void {
  const curve = serverCert.publicKey.asymmetricKeyDetails?.namedCurve;
  if (curve === undefined || SERVER_KEY_CURVES.has(curve)) return;
  throw new TlsMaterialError(
    `--mtls_cert: ${file} holds ${keyDescription(serverCert)}, with which no TLS client lets a server sign (TLS 1.3 takes P-256, P-384 and P-521; curl, Go and Java offer no other): every handshake would fail; reissue it with a P-256 key (the default of \`ovms-mtls certs init\`) or RSA 2048`,
  );
}

/** A key that fits a later certificate of the file means the chain is upside down (CA first), not a wrong key. */
function keyMismatch(chain: X509Certificate[], privateKey: KeyObject, files: TlsFiles): TlsMaterialError {
  const holder = chain.findIndex((cert) => cert.checkPrivateKey(privateKey));
  if (holder > 0) {
    return new TlsMaterialError(
      `--mtls_cert: ${files.cert}: the key ${files.key} belongs to certificate #${holder + 1} (${subjectCn(chain[holder]!)}), not to certificate #1 (${subjectCn(chain[0]!)}); put the server certificate first, then each CA in signing order`,
    );
  }
  return new TlsMaterialError(`--mtls_key: ${files.key} does not match --mtls_cert ${files.cert} (check you mounted the pair)`);
}

function validate(files: TlsFiles, raw: FileContents, now: Date): TlsMaterial {
  const cert = raw.mtls_cert!;
  const key = raw.mtls_key!;
  const ca = raw.mtls_client_ca!;
  const chain = parseCertificates(cert.toString('latin1'), 'mtls_cert', files.cert);
  const serverCert = chain[0]!;
  const privateKey = parseKey(key, files.key);
  if (!serverCert.checkPrivateKey(privateKey)) throw keyMismatch(chain, privateKey, files);
  checkServerCert(serverCert, files.cert, now);
  // Before OpenSSL's own judgement: Node 24 refuses a P-192 key by its security level, Node 20 and 22 take it,
  // and the curve is the reason on every version.
  checkClientsCanVerify(serverCert, files.cert);
  checkOpensslTakesPair(cert, key, chain, files);
  const clientCas = parseCertificates(ca.toString('latin1'), 'mtls_client_ca', files.clientCa);
  checkClientCas(clientCas, files.clientCa);
  // One latin1 copy of the CRL for every check: a million entries are 50 MiB of text.
  const crlText = raw.mtls_crl?.toString('latin1');
  if (crlText !== undefined) checkCrlPem(crlText, files.crl!);
  const crls = checkTrust({ files, serverChain: chain, clientCas, crl: crlText, now });
  return { files, key, cert, ca, crl: raw.mtls_crl, crls, serverCert, serverChain: chain, clientCas, validatedAt: now };
}

/** Reads and validates at startup; throws TlsMaterialError with a one-line reason. */
export function loadTlsMaterialSync(files: TlsFiles, now = new Date()): TlsMaterial {
  const signature = filesSignature(files);
  return { ...validate(files, readAllSync(files), now), filesSignature: signature };
}

/** Same checks, for reloads. */
export async function loadTlsMaterial(files: TlsFiles, now = new Date()): Promise<TlsMaterial> {
  const signature = filesSignature(files);
  return { ...validate(files, await readAll(files), now), filesSignature: signature };
}

/** Which file each path names now and its size and modification time: a Kubernetes swap changes the file, an edit in place its time. */
export function filesSignature(files: TlsFiles): string {
  return [files.cert, files.key, files.clientCa, files.crl]
    .map((path) => {
      if (path === undefined) return '';
      try {
        const { dev, ino, size, mtimeMs, ctimeMs } = statSync(path);
        return `${dev}:${ino}:${size}:${mtimeMs}:${ctimeMs}`;
      } catch (err) {
        return (err as NodeJS.ErrnoException).code ?? 'unreadable';
      }
    })
    .join('/');
}

/** The file contents a validated set was made of, as text (latin1 keeps every byte): what the primary sends its workers. */
export interface TlsTexts {
  readonly key: string;
  readonly cert: string;
  readonly ca: string;
  readonly crl?: string | undefined;
  /** validatedAt, in ms: a number survives the IPC channel's JSON. */
  readonly validatedAt: number;
}

export function tlsTexts(material: TlsMaterial): TlsTexts {
  return {
    key: material.key.toString('latin1'),
    cert: material.cert.toString('latin1'),
    ca: material.ca.toString('latin1'),
    crl: material.crl?.toString('latin1'),
    validatedAt: material.validatedAt.getTime(),
  };
}

/**
 * The same checks on contents read elsewhere (a worker gets them from the primary), judged at the
 * moment the primary judged them. At the worker's own moment, a set in force whose CRL (of any CA)
 * had passed its next update since, or whose certificate had expired, failed every worker started
 * to replace one that exited (worker_start_failed, for ever), while the running ones served it.
 */
export function tlsMaterialFromTexts(files: TlsFiles, texts: TlsTexts, now = new Date(texts.validatedAt)): TlsMaterial {
  const bytes = (text: string | undefined) => (text === undefined ? undefined : Buffer.from(text, 'latin1'));
  return validate(files, { mtls_cert: bytes(texts.cert), mtls_key: bytes(texts.key), mtls_client_ca: bytes(texts.ca), mtls_crl: bytes(texts.crl) }, now);
}

/**
 * One array entry per PEM block: Node loads only the first CRL of a buffer,
 * and only the first CA when blocks are not newline-separated.
 */
function pemBlocks(pem: Buffer, pattern: RegExp): string[] {
  return pem.toString('latin1').match(pattern) ?? [];
}

export function secureContextOptions(material: TlsMaterial): SecureContextOptions {
  return {
    key: material.key,
    cert: material.cert,
    ca: pemBlocks(material.ca, PEM_CERT),
    // The blocks parsed at validation, not the file split again for each listener.
    ...(material.crl ? { crl: material.crls.map((crl) => crl.pem) } : {}),
    minVersion: 'TLSv1.2',
    ciphers: CIPHERS,
    honorCipherOrder: true,
    // No session tickets: every connection gets a full handshake and a fresh certificate check
    // against the CRLs in force now. Issuing tickets cost 14 % of a handshake's CPU and 10 KiB
    // per idle connection (bench), and gRPC clients hold their connections anyway.
    // No renegotiation: a TLS 1.2 client could ask for a new handshake on a live connection (three
    // each, Node's limit, then a 400 logged as a malformed request) and present another certificate
    // there that nothing judges; Node refuses it only on the HTTP/2 it serves (RFC 9113 9.2.1), not
    // on HTTP/1.1 nor the gRPC relay's HTTP/2. OpenSSL answers it with a no_renegotiation alert.
    secureOptions: cryptoConstants.SSL_OP_NO_TICKET | cryptoConstants.SSL_OP_NO_RENEGOTIATION,
  };
}
