/**
 * The checks beyond "each file parses": the server chain is in order, the
 * client CAs are usable, and every CRL is signed by its CA and fresh, with
 * one CRL per trusted CA. Startup, reload and `ovms-mtls check` all run them,
 * so each fails with the same one-line message.
 */
import type { X509Certificate } from 'node:crypto';
import { createSecureContext } from 'node:tls';
import { TlsMaterialError } from './errors.js';
import type { TlsFiles } from './config.js';
import { certificateNames, crlsForCa, crlsNamingCa, parseCrlFile, type CrlInfo } from './crl-index.js';
import { x509 } from './x509/peculiar.js';
import { checkCaNamesFit } from './ca-names.js';

export interface TrustInput {
  readonly files: TlsFiles;
  /** The server certificate file: leaf first, then the CAs that signed it. */
  readonly serverChain: readonly X509Certificate[];
  readonly clientCas: readonly X509Certificate[];
  /** The CRL file as latin1 text. */
  readonly crl?: string | undefined;
  readonly now: Date;
}

/**
 * Throws TlsMaterialError with one line naming the flag, the file and the fix.
 * Returns the CRLs it parsed (none without a CRL file), so that nobody parses them again.
 */
export function checkTrust(input: TrustInput): readonly CrlInfo[] {
  checkServerChain(input.serverChain, input.files.cert, input.now);
  checkCaNamesFit(input.clientCas, input.files.clientCa);
  checkClientCaValidity(input.clientCas, input.files.clientCa, input.now);
  const crls = input.crl === undefined ? [] : readCrls(input.crl, input.files.crl!);
  if (input.crl !== undefined) checkCrls(crls, input);
  checkSomeCaAdmits(input.clientCas, crls, input.files.clientCa, input.now);
  return crls;
}

/**
 * Why no client of this CA of the bundle can be admitted at `at`: none when its clients can be.
 * OpenSSL verifies a client chain up to a self-signed CA of the bundle, so every CA on that path
 * counts (an intermediate whose root expired admits nobody), and a CA that leads to no such root
 * admits nobody either (logged client_ca_unanchored); so does one OpenSSL's security level
 * refuses (client_ca_weak). Start, reload, `check` and /readyz all judge a bundle by this.
 */
export function clientCaObstacles(ca: X509Certificate, cas: readonly X509Certificate[], crls: readonly CrlInfo[], at: Date): string[] {
  const path = bundlePath(ca, cas);
  if (!path) return [`client CA ${subjectCn(ca)} leads to no root CA of the bundle (its clients are refused as unknown_ca; append its root, ${commonName(nameOf(ca, 'issuer'))})`];
  return path.flatMap((link) => linkObstacles(link, crls, at, link === ca ? `client CA ${subjectCn(ca)}` : `client CA ${subjectCn(link)} (issuer of client CA ${subjectCn(ca)})`));
}

/** Paths by bundle and CA: a bundle never changes, and each path proves a signature a link (600 a /readyz for a bundle of 600 intermediates). */
const bundlePaths = new WeakMap<readonly X509Certificate[], Map<X509Certificate, X509Certificate[] | undefined>>();

/** pathToTrust([ca], cas), worked out once per bundle. */
function bundlePath(ca: X509Certificate, cas: readonly X509Certificate[]): X509Certificate[] | undefined {
  const paths = bundlePaths.get(cas) ?? new Map<X509Certificate, X509Certificate[] | undefined>();
  bundlePaths.set(cas, paths);
  if (!paths.has(ca)) paths.set(ca, pathToTrust([ca], cas));
  return paths.get(ca);
}

/** What keeps one CA of a client chain from verifying a client at `at`. */
function linkObstacles(link: X509Certificate, crls: readonly CrlInfo[], at: Date, name: string): string[] {
  const validity = caValidity(link, at);
  const stale = crlsForCa(crls, link).filter((crl) => crl.nextUpdate !== undefined && crl.nextUpdate <= at);
  const weakness = securityLevelWeakness(link);
  return [
    ...(validity === 'expired' ? [`${name} expired ${validTo(link).toISOString()}`] : []),
    ...(validity === 'not yet valid' ? [`${name} is not valid before ${validFrom(link).toISOString()}`] : []),
    ...stale.map((crl) => `CRL expired ${crl.nextUpdate!.toISOString()} for ${name} (its clients are refused until it is renewed)`),
    ...(weakness ? [`${name} ${weakness.what}, which OpenSSL refuses at its security level (its clients are refused; reissue it ${weakness.fix})`] : []),
  ];
}

/**
 * A bundle in which no CA can admit a client would serve nobody: refused at start and at reload
 * (the old set keeps serving), as a bundle of expired CAs is. Each CA that cannot alone (a
 * rotation's leftover, the next CA) is only warned about. A bundle of an intermediate without
 * its root, or of a CA OpenSSL finds too weak, started with a warning and refused every client.
 */
function checkSomeCaAdmits(cas: readonly X509Certificate[], crls: readonly CrlInfo[], path: string, at: Date): void {
  if (cas.length === 0) return;
  const obstacles = cas.map((ca) => clientCaObstacles(ca, cas, crls, at));
  if (obstacles.some((found) => found.length === 0)) return;
  throw new TlsMaterialError(`--mtls_client_ca: ${path}: no CA of the bundle can admit a client, so every client would be refused: ${obstacles.flat().join('; ')}`);
}

/**
 * A certificate's subject or issuer name as Node prints it, one RDN a line; '' for an empty
 * name, for which Node gives undefined although its type says string. A certificate that names
 * its holder in subjectAltName alone may have an empty subject (RFC 5280 4.1.2.6; SPIFFE IDs,
 * certificates without a CN), and any client can send one with an empty issuer too: read
 * these names only through here.
 */
export function nameOf(cert: X509Certificate, which: 'subject' | 'issuer'): string {
  return (cert[which] as string | undefined) ?? '';
}

/** How messages name an empty subject or issuer. */
export const EMPTY_NAME = '(empty name)';

/** The CN of a distinguished name as Node prints it (one RDN a line), else the whole name on one line. */
export function commonName(dn: string): string {
  if (dn === '') return EMPTY_NAME;
  return /(?:^|\n)CN=([^\n]*)/.exec(dn)?.[1] ?? dn.replace(/\n/g, ', ');
}

/** The whole name on one line, in certificate order (`CN=x, O=y` as Node lists it). */
export function oneLineName(cert: X509Certificate, which: 'subject' | 'issuer'): string {
  return nameOf(cert, which).replace(/\n/g, ', ') || EMPTY_NAME;
}

/** `validTo` parsed; Node 20 has no `validToDate`. */
export function validTo(cert: X509Certificate): Date {
  return new Date(cert.validTo);
}

export function validFrom(cert: X509Certificate): Date {
  return new Date(cert.validFrom);
}

/** "3 days", "5 h", "12 min", "40 s" from `now` until `until` (0 s if past): enough to notice a certificate about to expire, or a clock a few seconds off. */
export function timeLeft(until: Date, now: Date): string {
  const seconds = Math.max(0, Math.floor((until.getTime() - now.getTime()) / 1000));
  const minutes = Math.floor(seconds / 60);
  if (minutes >= 2 * 24 * 60) return `${Math.floor(minutes / (24 * 60))} days`;
  if (minutes >= 120) return `${Math.floor(minutes / 60)} h`;
  return minutes >= 2 ? `${minutes} min` : `${seconds} s`;
}

export function subjectCn(cert: X509Certificate): string {
  return commonName(nameOf(cert, 'subject'));
}

/** checkIssued() compares names only; verify() proves the issuer's key signed it (false, not a throw, for a key it cannot use). */
export function issuedBy(cert: X509Certificate, issuer: X509Certificate): boolean {
  try {
    return cert.checkIssued(issuer) && cert.verify(issuer.publicKey);
  } catch {
    return false;
  }
}

/** Each intermediate in the file must have issued the certificate before it. */
function checkServerChain(chain: readonly X509Certificate[], path: string, now: Date): void {
  for (let i = 1; i < chain.length; i++) {
    const child = chain[i - 1]!;
    const parent = chain[i]!;
    if (!issuedBy(child, parent)) {
      throw new TlsMaterialError(
        `--mtls_cert: ${path}: certificate #${i + 1} (${subjectCn(parent)}) did not issue certificate #${i} (${subjectCn(child)}); put the server certificate first, then each CA in signing order`,
      );
    }
    if (validTo(parent) <= now) {
      throw new TlsMaterialError(`--mtls_cert: ${path}: chain certificate #${i + 1} (${subjectCn(parent)}) expired on ${validTo(parent).toISOString()} (replace it with the CA's current certificate)`);
    }
  }
}

/**
 * One CA outside its validity among several may be a rotation leftover or the next CA; none within it means
 * no client can connect: OpenSSL refuses a chain whose CA has expired or is not valid yet (CERT_NOT_YET_VALID,
 * which names no CA, so the clients' own certificates get the blame).
 */
function checkClientCaValidity(cas: readonly X509Certificate[], path: string, now: Date): void {
  if (cas.length === 0 || cas.some((ca) => caValidity(ca, now) === 'valid')) return;
  const early = cas.find((ca) => caValidity(ca, now) === 'not yet valid');
  if (early) {
    throw new TlsMaterialError(
      `--mtls_client_ca: ${path}: no CA is valid yet (${subjectCn(early)} is not valid before ${validFrom(early).toISOString()}); every client is refused until then (check the clock of this machine and of the one that made the CA)`,
    );
  }
  const first = cas[0]!;
  throw new TlsMaterialError(`--mtls_client_ca: ${path}: every CA has expired (${subjectCn(first)} on ${validTo(first).toISOString()}); no client certificate can verify (renew the CA; \`ovms-mtls certs init --force\` makes a new dev set)`);
}

export function caValidity(ca: X509Certificate, now: Date): 'valid' | 'expired' | 'not yet valid' {
  if (validTo(ca) <= now) return 'expired';
  return validFrom(ca) > now ? 'not yet valid' : 'valid';
}

function readCrls(pem: string, path: string): CrlInfo[] {
  try {
    return parseCrlFile(pem);
  } catch (err) {
    throw new TlsMaterialError(`--mtls_crl: ${path} is not a valid CRL (${(err as Error).message})`, { cause: err });
  }
}

function checkCrls(crls: readonly CrlInfo[], input: TrustInput): void {
  const path = input.files.crl!;
  for (const crl of crls) {
    checkFreshness(crl, path, input.now);
    refuseDelta(crl, path);
    refuseUnsigned(crl, input);
  }
  input.clientCas.forEach((ca, i) => {
    if (crlsForCa(crls, ca).length > 0) return;
    const named = crlsNamingCa(crls, ca)[0];
    if (!named) {
      throw new TlsMaterialError(
        `--mtls_crl: ${path} has no CRL for CA #${i + 1} (${subjectCn(ca)}) of --mtls_client_ca ${input.files.clientCa}; with CRLs on, every client of that CA is refused (append that CA's CRL to the file)`,
      );
    }
    // refuseUnsigned() let it through: another CA of the bundle with this name signed it.
    const signer = input.clientCas.findIndex((other) => crlsForCa([named], other).length > 0);
    throw new TlsMaterialError(
      `--mtls_crl: ${path} has no CRL for CA #${i + 1} (${subjectCn(ca)}) of --mtls_client_ca ${input.files.clientCa}: CRL #${named.index} names it as its issuer but is signed by the key of CA #${signer + 1}, of the same name (a CA renewed with a new key); with CRLs on, every client of CA #${i + 1} is refused (append its own CRL too, or take it out of the bundle once its clients have moved)`,
    );
  });
}

/** A CRL in the name of a CA of the bundle that no CA of that name signed: an older CA's, or a forgery. */
function refuseUnsigned(crl: CrlInfo, input: TrustInput): void {
  const namesakes = input.clientCas.filter((ca) => crlsNamingCa([crl], ca).length > 0);
  if (namesakes.length === 0 || namesakes.some((ca) => crlsForCa([crl], ca).length > 0)) return;
  throw new TlsMaterialError(
    `--mtls_crl: ${input.files.crl!}: CRL #${crl.index} names ${subjectCn(namesakes[0]!)} as its issuer but is not signed by that CA's key (a CRL of an older CA with the same name?); publish a CRL from the current CA`,
  );
}

/**
 * OpenSSL, as Node drives it, applies no delta CRL as one: it takes the first CRL of an
 * issuer, so a delta after its base is ignored (its revoked clients get in) and a delta alone
 * or first stands in for the full list (the base CRL's revoked clients get in).
 */
function refuseDelta(crl: CrlInfo, path: string): void {
  if (!crl.delta) return;
  throw new TlsMaterialError(
    `--mtls_crl: ${path}: CRL #${crl.index} is a delta CRL (Delta CRL Indicator), which the proxy cannot apply: the revocations of the delta or of its base CRL would be ignored; give only the CA's full CRL (with every revocation), not the delta`,
  );
}

/** An expired CRL makes OpenSSL refuse every client of its CA (CRL_HAS_EXPIRED). */
function checkFreshness(crl: CrlInfo, path: string, now: Date): void {
  if (crl.nextUpdate && crl.nextUpdate <= now) {
    throw new TlsMaterialError(
      `--mtls_crl: ${path}: CRL #${crl.index} expired on ${crl.nextUpdate.toISOString()} (its next update); every client of its CA would be refused - publish a fresh CRL from the CA (for a set made by ovms-mtls certs init: run ovms-mtls certs renew-crl)`,
    );
  }
  if (crl.thisUpdate > now) {
    throw new TlsMaterialError(`--mtls_crl: ${path}: CRL #${crl.index} is not valid before ${crl.thisUpdate.toISOString()} (check the clock)`);
  }
}

/** Longer than any chain --mtls_verify_depth admits; only guards the walk. */
const MAX_PATH = 32;

/**
 * Whether `issuer`'s name (and key identifier) is the one `cert` names as its issuer, as
 * OpenSSL picks issuers while building a chain; no signature check, so cheap enough for
 * every handshake of a chain OpenSSL has already verified.
 */
export function namesIssuer(cert: X509Certificate, issuer: X509Certificate): boolean {
  return cert.checkIssued(issuer);
}

/**
 * The chain a handshake would build now, leaf first: each issuer taken from the
 * new client CA bundle when it holds one (so a bundled intermediate the client did
 * not send is checked against the CRLs too), else from what the client sent.
 * Undefined when it ends in no self-signed CA of the bundle: Node sets no partial-chain
 * flag, so OpenSSL trusts an intermediate CA of the bundle only through its root there, and
 * a bundle cut down to the intermediate refuses its clients. `isIssuer` proves each link by
 * its signature unless told otherwise.
 */
export function pathToTrust(
  presented: readonly X509Certificate[],
  cas: readonly X509Certificate[],
  isIssuer: (cert: X509Certificate, issuer: X509Certificate) => boolean = issuedBy,
): X509Certificate[] | undefined {
  const leaf = presented[0];
  if (!leaf) return undefined;
  const path = [leaf];
  let cert = leaf;
  while (path.length < MAX_PATH && !cert.checkIssued(cert)) {
    const issuer = bundleIssuer(cert, cas, isIssuer) ?? presented.find((candidate) => candidate !== cert && isIssuer(cert, candidate));
    if (!issuer || path.some((known) => known.fingerprint256 === issuer.fingerprint256)) break;
    path.push(issuer);
    cert = issuer;
  }
  const anchored = cert.checkIssued(cert) && bundleIndex(cas).fingerprints.has(cert.fingerprint256);
  return anchored ? path : undefined;
}

/**
 * A bundle's CAs by subject Name (DER, hex), and their fingerprints. Every handshake builds its
 * chain's path (--mtls_verify_depth), and looking for each issuer through the whole bundle cost
 * 0.35 ms a handshake with 600 CAs, as much as a good part of the handshake itself.
 */
interface BundleIndex {
  readonly bySubject: ReadonlyMap<string, readonly X509Certificate[]>;
  readonly fingerprints: ReadonlySet<string>;
}

const bundleIndexes = new WeakMap<readonly X509Certificate[], BundleIndex>();

function bundleIndex(cas: readonly X509Certificate[]): BundleIndex {
  const known = bundleIndexes.get(cas);
  if (known) return known;
  const bySubject = new Map<string, X509Certificate[]>();
  for (const ca of cas) {
    const key = nameKey(ca, 'subjectKey');
    if (key !== undefined) bySubject.set(key, [...(bySubject.get(key) ?? []), ca]);
  }
  const index = { bySubject, fingerprints: new Set(cas.map((ca) => ca.fingerprint256)) };
  bundleIndexes.set(cas, index);
  return index;
}

/** The DER of a certificate's issuer or subject Name, hex; undefined for a certificate in BER, which OpenSSL takes and the reader does not. */
function nameKey(cert: X509Certificate, which: 'issuerKey' | 'subjectKey'): string | undefined {
  try {
    return certificateNames(cert.raw)[which];
  } catch {
    return undefined;
  }
}

/**
 * The first CA of the bundle that issued `cert`: among those of the name it gives as its issuer,
 * else among the others (a name spelled otherwise, a PrintableString for a UTF8String, which
 * OpenSSL takes for the same name).
 */
function bundleIssuer(cert: X509Certificate, cas: readonly X509Certificate[], isIssuer: (cert: X509Certificate, issuer: X509Certificate) => boolean): X509Certificate | undefined {
  const key = nameKey(cert, 'issuerKey');
  const named = (key !== undefined && bundleIndex(cas).bySubject.get(key)) || [];
  return named.find((ca) => isIssuer(cert, ca)) ?? cas.find((ca) => !named.includes(ca) && isIssuer(cert, ca));
}

/**
 * The CAs of a client CA bundle that lead to no self-signed CA of the bundle: an intermediate
 * given without its root. Node sets no partial-chain flag, so OpenSSL trusts a client chain only
 * up to a self-signed CA it holds, and every client of such an intermediate is refused as
 * unknown_ca (Go and ghostunnel take an intermediate as a trust anchor: users coming from them
 * hit this).
 */
export function unanchoredCas(cas: readonly X509Certificate[]): X509Certificate[] {
  return cas.filter((ca) => bundlePath(ca, cas) === undefined);
}

/** What to tell about one of unanchoredCas(): the CA, its missing issuer and what to do. */
export function unanchoredCaMessage(ca: X509Certificate, bundle: string): string {
  return `client CA ${subjectCn(ca)} in ${bundle} is an intermediate CA without its root (${commonName(nameOf(ca, 'issuer'))}) in the bundle: OpenSSL trusts a client chain only up to a self-signed CA of the bundle, so its clients are refused as unknown_ca; append the root CA to ${bundle}`;
}

const WEAK_DIGESTS = new Set(['SHA-1', 'MD5', 'MD4', 'MD2']);

/**
 * What OpenSSL's security level refuses in a certificate of a client chain: a key too small
 * (RSA or DSA under 1024 bits at level 1, Node 20's and 22's default; under 2048 at level 2,
 * Node 24's), or a signature with SHA-1 or MD5 (not checked on a self-signed trust anchor,
 * whose own signature OpenSSL skips). Node names none of these errors.
 */
export function securityLevelWeakness(cert: X509Certificate): Weakness | undefined {
  if (!weaknesses.has(cert)) weaknesses.set(cert, weaknessOf(cert));
  return weaknesses.get(cert);
}

type Weakness = { what: string; fix: string };

/**
 * Verdicts by certificate, reached once: a verdict parses the certificate (about 0.5 ms), and
 * /readyz judges every CA of the bundle at each probe while the process waits (a bundle of 600
 * intermediate CAs took 0.4 s a probe, and every request of the process waited with it).
 */
const weaknesses = new WeakMap<X509Certificate, Weakness | undefined>();

function weaknessOf(cert: X509Certificate): Weakness | undefined {
  if (opensslRefusesKeyOf(cert)) return { what: `has ${keyDescription(cert)}`, fix: 'with a key of 2048 bits or more' };
  const digest = weakSignatureDigest(cert);
  return digest ? { what: `is signed with ${digest}`, fix: 'signed with SHA-256' } : undefined;
}

/** `SHA-1`, `MD5`...: the digest of a signature OpenSSL's security level refuses; undefined for a self-signed certificate, whose own signature it skips. */
export function weakSignatureDigest(cert: X509Certificate): string | undefined {
  if (cert.checkIssued(cert)) return undefined;
  const digest = signatureDigest(cert);
  return digest && WEAK_DIGESTS.has(digest) ? digest : undefined;
}

/**
 * Whether this Node's OpenSSL refuses the certificate's key at its security level, asked of
 * OpenSSL itself (it checks a certificate's key as it loads it): the level, and so the smallest
 * key taken, differs between Node versions (1 up to Node 22, 2 from Node 24), and a fixed
 * "under 1024 bits" let a 1536-bit CA pass unnamed where Node 24 refuses its clients.
 */
function opensslRefusesKeyOf(cert: X509Certificate): boolean {
  try {
    createSecureContext({ cert: cert.toString() });
    return false;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ERR_SSL_EE_KEY_TOO_SMALL';
  }
}

/** "a 1024-bit RSA key", "an EC key on curve secp160r1": what a message about its size names. */
export function keyDescription(cert: X509Certificate): string {
  const { asymmetricKeyType: type = 'unknown', asymmetricKeyDetails: details } = cert.publicKey;
  if (details?.modulusLength !== undefined) return `a ${details.modulusLength}-bit ${type.toUpperCase()} key`;
  return `an ${type.toUpperCase()} key${details?.namedCurve ? ` on curve ${details.namedCurve}` : ''}`;
}

/** `SHA-256`, `SHA-1`...; undefined for a signature without a separate digest (Ed25519) or one the parser does not know. */
function signatureDigest(cert: X509Certificate): string | undefined {
  try {
    return (new x509.X509Certificate(cert.raw).signatureAlgorithm as { hash?: { name?: string } }).hash?.name;
  } catch {
    return undefined;
  }
}

/** What to tell about a CA of the client CA bundle that securityLevelWeakness() finds. */
export function weakClientCaMessage(ca: X509Certificate, bundle: string, weakness: { what: string; fix: string }): string {
  return `client CA ${subjectCn(ca)} in ${bundle} ${weakness.what}, which OpenSSL refuses at its security level: every client whose chain runs through it is refused (verify_failed); reissue it ${weakness.fix}`;
}
