/**
 * The file-writing side of `ovms-mtls certs ...`: a complete mTLS PKI in one directory, more
 * client certificates from its client CA, and revocation through the CRL. Replaces the nginx
 * example's openssl script (self-signed CA:TRUE server cert without SAN, v1 client cert,
 * world-readable keys). Pure Node: no openssl CLI needed.
 */
import { randomBytes, X509Certificate } from 'node:crypto';
import { readdir } from 'node:fs/promises';
import { resolve } from 'node:path';
import { ConfigError, isUserError } from './errors.js';
import { issuedBy, oneLineName } from './tls-checks.js';
import { firstPemCertificate } from './pem-shapes.js';
import {
  assertAbsent,
  ensureDirectory,
  KEY_MODE,
  PUBLIC_MODE,
  readMaterial,
  readMaterialBytes,
  readOptionalMaterial,
  resolveCertPath,
  withFileLock,
  writeFiles,
  type PlannedFile,
  type WrittenFile,
} from './certs-command/files.js';
import { checkClientName, checkDays, checkDnsName, checkKeyKind, checkUri, serverSubjectAltNames } from './certs-command/validate.js';
import {
  CLOCK_SKEW_MS,
  createCa,
  createCrl,
  isCrlSignedBy,
  issueClientCert,
  issueServerCert,
  normaliseSerial,
  parseCrl,
  type Issued,
  type KeyKind,
} from './x509.js';

export type { WrittenFile } from './certs-command/files.js';
export { parseSanEntry } from './certs-command/validate.js';

/** File names inside the certs directory; the proxy's defaults point at the same names. */
export const CERT_FILES = {
  serverCert: 'server.pem',
  serverKey: 'server.key',
  serverCaCert: 'server_ca.pem',
  serverCaKey: 'server_ca.key',
  clientCaCert: 'client_cert_ca.pem',
  clientCaKey: 'client_cert_ca.key',
  clientCaCrl: 'client_cert_ca.crl',
  clientCert: 'client.pem',
  clientKey: 'client.key',
} as const;

const DAY_MS = 24 * 60 * 60 * 1000;

export interface CertsInitOptions {
  dir: string;
  serverName?: string;
  /** Extra server SAN entries: `DNS:name` or `IP:address`. */
  san?: string[];
  days?: number;
  key?: KeyKind;
  force?: boolean;
}

export interface CertsClientOptions {
  dir: string;
  name: string;
  uri?: string[];
  dns?: string[];
  days?: number;
  key?: KeyKind;
  force?: boolean;
}

export interface CertsRevokeOptions {
  dir: string;
  /** Path of the client certificate to revoke; a bare NAME also finds DIR/NAME.pem. */
  cert: string;
}

export interface CertsReport {
  dir: string;
  files: WrittenFile[];
  /** When the issued certificates (or, for revoke, the new CRL) stop being valid. */
  validUntil: Date;
  /** Lines for the terminal. */
  summary: string;
}

export interface RevokeReport extends CertsReport {
  serialHex: string;
  alreadyRevoked: boolean;
  crlNumber: bigint;
}

export async function certsInit(o: CertsInitOptions): Promise<CertsReport> {
  const dir = resolve(o.dir);
  const days = checkDays(o.days ?? 1);
  const key = checkKeyKind(o.key ?? 'ec');
  const serverName = o.serverName ?? 'localhost';
  const san = serverSubjectAltNames(serverName, o.san ?? []);
  await ensureDirectory(dir);
  if (!o.force) await assertAbsent(dir, Object.values(CERT_FILES));
  const orphaned = await clientsOfClientCa(dir);

  // A random suffix keeps every init's CA names distinct: OpenSSL looks issuers and CRLs up by
  // name, so a client cert from an earlier init must not find a same-named but different CA.
  const runId = randomBytes(4).toString('hex');
  const [serverCa, clientCa] = await Promise.all([
    createCa({ commonName: `ovms-mtls server CA ${runId}`, days, key }),
    createCa({ commonName: `ovms-mtls client CA ${runId}`, days, key }),
  ]);
  // Keys are made after the CAs' (seconds later for RSA 4096), so the same --days would end the
  // leaves and the CRL after their CA; they end with it instead.
  const [server, client, crl] = await Promise.all([
    issueServerCert({ issuer: serverCa, commonName: serverName, days, key, ...san, notAfterCap: notAfterOf(serverCa) }),
    issueClientCert({ issuer: clientCa, commonName: 'client', days, key, notAfterCap: notAfterOf(clientCa) }),
    createCrl({ issuer: clientCa, nextUpdate: earlier(new Date(Date.now() + days * DAY_MS), notAfterOf(clientCa)) }),
  ]);

  const files = await writeFiles(dir, [
    ...pairFiles(CERT_FILES.serverCert, CERT_FILES.serverKey, server, `server certificate (${describeSan(san)})`),
    ...pairFiles(CERT_FILES.serverCaCert, CERT_FILES.serverCaKey, serverCa, 'CA of the server certificate: clients trust this'),
    ...pairFiles(CERT_FILES.clientCaCert, CERT_FILES.clientCaKey, clientCa, 'CA the proxy accepts client certificates from'),
    { name: CERT_FILES.clientCaCrl, contents: crl, mode: PUBLIC_MODE, description: 'CRL of the client CA (no revocations yet)' },
    ...pairFiles(CERT_FILES.clientCert, CERT_FILES.clientKey, client, 'client certificate (CN=client)'),
  ]);
  const validUntil = notAfterOf(server);
  return {
    dir,
    files,
    validUntil,
    summary: summarise(dir, files, validUntil, [
      'The CAs and the CRL expire then too (an expired CRL makes the proxy refuse every client): run `certs init --force` before that.',
      ...oneDayNote(days),
      ...orphanedNote(dir, orphaned),
    ]),
  };
}

/**
 * The client certificates `certs client` wrote to `dir` under its current client CA: `init --force`
 * replaces that CA, and these files, left in place beside the new set, would no longer get in.
 */
async function clientsOfClientCa(dir: string): Promise<string[]> {
  const ca = await certificateIn(resolve(dir, CERT_FILES.clientCaCert));
  if (ca === undefined) return [];
  const ours = new Set<string>(Object.values(CERT_FILES));
  const names = (await readdir(dir)).filter((name) => name.endsWith('.pem') && !ours.has(name)).sort();
  const issued = await Promise.all(
    names.map(async (name) => {
      const cert = await certificateIn(resolve(dir, name));
      return cert !== undefined && issuedBy(cert, ca);
    }),
  );
  return names.filter((_, i) => issued[i]);
}

/** The first certificate of the file at `path`, if it is one that holds any. */
async function certificateIn(path: string): Promise<X509Certificate | undefined> {
  const pem = await readOptionalMaterial(path).catch(() => undefined);
  const cert = pem === undefined ? undefined : firstPemCertificate(Buffer.from(pem), path, 'cert');
  return typeof cert === 'string' ? undefined : cert;
}

function orphanedNote(dir: string, names: string[]): string[] {
  if (names.length === 0) return [];
  const clients = names.map((name) => name.slice(0, -'.pem'.length));
  return [
    `Note: ${names.join(', ')} ${names.length === 1 ? 'was' : 'were'} issued by the client CA this replaced and no longer get${names.length === 1 ? 's' : ''} in: ` +
      `issue ${names.length === 1 ? 'it' : 'them'} again with \`ovms-mtls certs client --dir ${dir} --name ${clients.length === 1 ? clients[0] : 'NAME'} --force\`.`,
  ];
}

export async function certsClient(o: CertsClientOptions): Promise<CertsReport> {
  const dir = resolve(o.dir);
  const name = checkClientName(o.name);
  const days = checkDays(o.days ?? 1);
  const key = checkKeyKind(o.key ?? 'ec');
  const uris = (o.uri ?? []).map(checkUri);
  const dns = (o.dns ?? []).map((value) => checkDnsName(value, '--dns'));
  const certName = `${name}.pem`;
  const keyName = `${name}.key`;
  if (!o.force) await assertAbsent(dir, [certName, keyName]);

  const clientCa = await readClientCa(dir);
  assertCaInValidity(clientCa, dir, 'a certificate');
  const caEnd = notAfterOf(clientCa);
  const askedEnd = Date.now() + days * DAY_MS;
  const client = await signingWith(dir, () => issueClientCert({ issuer: clientCa, commonName: name, days, key, uris, dns, notAfterCap: caEnd }));
  const files = await writeFiles(dir, pairFiles(certName, keyName, client, `client certificate (CN=${name}${describeClientSan(uris, dns)})`));
  const validUntil = notAfterOf(client);
  const asked = o.days === undefined ? undefined : { days, shortMs: askedEnd - caEnd.getTime() };
  // A longer --days cannot help once the CA is what ends the certificate.
  const notes = askedEnd > caEnd.getTime() ? [endsWithCaNote('the certificate', caEnd, dir, asked)] : oneDayNote(days);
  return { dir, files, validUntil, summary: summarise(dir, files, validUntil, notes) };
}

export async function certsRevoke(o: CertsRevokeOptions): Promise<RevokeReport> {
  const dir = resolve(o.dir);
  const clientCa = await readClientCa(dir);
  assertCaInValidity(clientCa, dir, 'a CRL');
  const certPath = await resolveCertPath(dir, o.cert);
  const target = parseCertToRevoke(certPath, await readMaterialBytes(certPath, dir, 'cert'));
  assertIssuedBy(target, new X509Certificate(clientCa.certPem), certPath);

  const crlPath = resolve(dir, CERT_FILES.clientCaCrl);
  return withFileLock(crlPath, () => revokeInCrl(dir, clientCa, crlPath, certPath, target));
}

/** Reads, extends and rewrites the CRL: only under its lock (see withFileLock). */
async function revokeInCrl(dir: string, clientCa: Issued, crlPath: string, certPath: string, target: X509Certificate): Promise<RevokeReport> {
  const previous = await readPreviousCrl(crlPath, clientCa);
  const serialHex = normaliseSerial(target.serialNumber);
  const subject = oneLineName(target, 'subject');
  const already = previous?.revoked.find((entry) => entry.serialHex === serialHex);
  if (already && previous) {
    const validUntil = previous.nextUpdate ?? previous.thisUpdate;
    const summary = `${certPath} (serial ${serialHex}, ${subject}) was already revoked; ${crlPath} is unchanged. ${revocationDateNote(already.date)}`;
    return { dir, files: [], validUntil, summary, serialHex, alreadyRevoked: true, crlNumber: previous.crlNumber ?? 0n };
  }

  const next = await writeNextCrl(dir, clientCa, previous, [...(previous?.revoked ?? []), { serialHex }], `revokes serial ${serialHex}`);
  const summary = [
    `Revoked ${certPath} (serial ${serialHex}, ${subject}).`,
    ...next.wrote,
    'ovms-mtls reloads the CRL on its own (file watch or SIGHUP), refuses this certificate from then on and closes its open connections.',
  ].join('\n');
  return { dir, files: next.files, validUntil: next.nextUpdate, summary, serialHex, alreadyRevoked: false, crlNumber: next.crlNumber };
}

/**
 * A revocation's date in the CRL is the CRL's thisUpdate, backdated for clock skew as that is: shown
 * as when the user revoked, it read 5 minutes before they did. Said as the CRL's date, with why.
 */
function revocationDateNote(date: Date): string {
  return `The CRL dates the revocation ${date.toISOString()}: \`certs revoke\` dates it, as the CRL itself, ${CLOCK_SKEW_MS / 60_000} minutes before it runs, for machines whose clock is behind this one's.`;
}

export interface CertsRenewCrlOptions {
  dir: string;
  /** Lifetime of the new CRL; by default as long as the one it replaces. */
  days?: number | undefined;
}

/**
 * Re-signs DIR/client_cert_ca.crl with fresh dates and the same revocations.
 * Every CRL has a next update, and once it passes, the proxy (like OpenSSL)
 * refuses every client: this is what to run before then.
 */
export async function certsRenewCrl(o: CertsRenewCrlOptions): Promise<CertsReport & { crlNumber: bigint }> {
  const dir = resolve(o.dir);
  const clientCa = await readClientCa(dir);
  assertCaInValidity(clientCa, dir, 'a CRL');
  const crlPath = resolve(dir, CERT_FILES.clientCaCrl);
  const spanMs = o.days === undefined ? undefined : checkDays(o.days) * DAY_MS;
  return withFileLock(crlPath, async () => {
    const previous = await readPreviousCrl(crlPath, clientCa);
    const revoked = previous?.revoked ?? [];
    const next = await writeNextCrl(dir, clientCa, previous, revoked, `${revoked.length} revoked`, spanMs);
    const summary = [...next.wrote, 'ovms-mtls reloads the CRL on its own (file watch or SIGHUP).'].join('\n');
    return { dir, files: next.files, validUntil: next.nextUpdate, summary, crlNumber: next.crlNumber };
  });
}

/**
 * Writes the CRL after `previous` to DIR: number + 1, issued now, living
 * `spanMs` (default: as long as `previous` did) or until the CA expires if
 * that is sooner. `wrote` is the summary lines.
 */
async function writeNextCrl(
  dir: string,
  clientCa: Issued,
  previous: ReturnType<typeof parseCrl> | undefined,
  revoked: NonNullable<Parameters<typeof createCrl>[0]['revoked']>,
  change: string,
  spanMs?: number,
): Promise<{ files: WrittenFile[]; crlNumber: bigint; nextUpdate: Date; wrote: string[] }> {
  const crlNumber = (previous?.crlNumber ?? 0n) + 1n;
  // Whole seconds: the CRL stores no more, and the summary should print what the CRL says.
  const thisUpdate = new Date(Math.floor((Date.now() - CLOCK_SKEW_MS) / 1000) * 1000);
  // Keep the publisher's chosen lifetime: the new CRL lives as long as the one it replaces.
  const span = spanMs ?? (previous?.nextUpdate ? previous.nextUpdate.getTime() - previous.thisUpdate.getTime() : DAY_MS);
  const caEnd = notAfterOf(clientCa);
  const spanEnd = thisUpdate.getTime() + span;
  const nextUpdate = spanEnd > caEnd.getTime() ? caEnd : new Date(spanEnd);
  const pem = await signingWith(dir, () => createCrl({ issuer: clientCa, revoked, thisUpdate, nextUpdate, crlNumber }));
  const files = await writeFiles(dir, [{ name: CERT_FILES.clientCaCrl, contents: pem, mode: PUBLIC_MODE, description: `CRL number ${crlNumber}, ${change}` }]);
  const wrote = [`Wrote ${resolve(dir, CERT_FILES.clientCaCrl)}: CRL number ${crlNumber}, ${revoked.length} revoked, next update ${nextUpdate.toISOString()}.`];
  if (spanEnd > caEnd.getTime()) {
    // Only a --days given is a lifetime asked for; one taken over from the old CRL is not the user's word.
    const asked = spanMs === undefined ? undefined : { days: spanMs / DAY_MS, shortMs: spanEnd - caEnd.getTime() };
    wrote.push(endsWithCaNote("the CRL's next update", caEnd, dir, asked));
  }
  return { files, crlNumber, nextUpdate, wrote };
}

async function readClientCa(dir: string): Promise<Issued> {
  const certPath = resolve(dir, CERT_FILES.clientCaCert);
  const keyPath = resolve(dir, CERT_FILES.clientCaKey);
  return { certPem: await readMaterial(certPath, dir), keyPem: await readMaterial(keyPath, dir), serialHex: '' };
}

/** Turns a bad CA cert/key pair in DIR into a one-line ConfigError naming the files. */
async function signingWith<T>(dir: string, sign: () => Promise<T>): Promise<T> {
  try {
    return await sign();
  } catch (err) {
    if (!isUserError(err)) throw err;
    const files = `${resolve(dir, CERT_FILES.clientCaCert)} and ${resolve(dir, CERT_FILES.clientCaKey)}`;
    throw new ConfigError(`cannot sign with ${files}: ${err.message}`, { cause: err });
  }
}

/**
 * Nothing a CA signs is of use after the CA expires: a certificate stops verifying then, whatever
 * date it carries. So what it signs ends with it, and this line says so instead of letting the holder
 * read a later date than the one that counts. Only a --days asked for is told by how much and how to
 * get longer: without one (the default day, a lifetime taken over) the user asked for no length,
 * and the way to it, a new set, replaces both CAs, so that no client then gets in until given new files.
 */
function endsWithCaNote(what: string, caEnd: Date, dir: string, asked?: { days: number; shortMs: number }): string {
  const ends = `Note: ${what} ends with the client CA, at ${caEnd.toISOString()}`;
  if (asked === undefined) return `${ends}: nothing outlives the CA that signs it.`;
  return (
    `${ends}, ${roughDuration(asked.shortMs)} short of the ${asked.days} day${asked.days === 1 ? '' : 's'} asked: nothing outlives the CA that signs it. ` +
    `For longer, make a new set before then with \`ovms-mtls certs init --dir ${dir} --force\`: ` +
    `it replaces both CAs, so every client then needs the new ${CERT_FILES.serverCaCert} and a new certificate.`
  );
}

/**
 * The largest unit the span fills at least once, counted to the nearest: a CRL asked for 5 days
 * under a CA with 1 day left falls 3 days 23 h short (its thisUpdate is backdated for clock skew),
 * and "3 days short of the 5 days asked" read as 2 days granted.
 */
function roughDuration(ms: number): string {
  const units: [string, number][] = [['day', DAY_MS], ['hour', 60 * 60 * 1000], ['minute', 60 * 1000], ['second', 1000]];
  for (const [unit, size] of units) {
    if (ms < size) continue;
    const count = Math.round(ms / size);
    return `${count} ${unit}${count === 1 ? '' : 's'}`;
  }
  return 'less than a second';
}

function earlier(a: Date, b: Date): Date {
  return a < b ? a : b;
}

/**
 * A CA outside its validity signs happily, but nothing it signs verifies: not after it expired,
 * and not before its notBefore (this machine's clock is behind the one that made it). A start
 * within CLOCK_SKEW_MS is let through: the same clock difference our own backdating absorbs.
 */
function assertCaInValidity(ca: Issued, dir: string, signs: 'a certificate' | 'a CRL'): void {
  const cert = new X509Certificate(ca.certPem);
  const path = resolve(dir, CERT_FILES.clientCaCert);
  const now = new Date();
  const expiry = new Date(cert.validTo);
  if (expiry <= now) {
    throw new ConfigError(`${path} expired on ${expiry.toISOString()}: no ${signs.slice(2)} it signs can verify; make a new set with \`ovms-mtls certs init --dir ${dir} --force\``);
  }
  const start = new Date(cert.validFrom);
  if (start.getTime() > now.getTime() + CLOCK_SKEW_MS) {
    throw new ConfigError(
      `${path} is not valid before ${start.toISOString()} and this machine's clock reads ${now.toISOString()}: ${signs} it signs now would not verify until then; set this machine's clock right, or wait`,
    );
  }
}

/** The certificate `revoke --cert` names: a key or a file of no PEM certificate is told apart, as for the proxy's own files. */
function parseCertToRevoke(path: string, bytes: Buffer): X509Certificate {
  const cert = firstPemCertificate(bytes, path, 'cert');
  if (typeof cert === 'string') throw new ConfigError(`--cert ${path} ${cert}`);
  return cert;
}

function assertIssuedBy(cert: X509Certificate, ca: X509Certificate, certPath: string): void {
  if (cert.fingerprint256 === ca.fingerprint256) throw new ConfigError(`${certPath} is the client CA itself, not a client certificate`);
  if (!issuedBy(cert, ca)) {
    throw new ConfigError(`${certPath} was not issued by ${CERT_FILES.clientCaCert} in this directory; its issuer is ${oneLineName(cert, 'issuer')}`);
  }
}

async function readPreviousCrl(crlPath: string, clientCa: Issued): Promise<ReturnType<typeof parseCrl> | undefined> {
  const pem = await readOptionalMaterial(crlPath);
  if (pem === undefined) return undefined;
  try {
    if (!(await isCrlSignedBy(pem, clientCa.certPem))) {
      throw new ConfigError(`${crlPath} is not signed by ${CERT_FILES.clientCaCert}; move it away to start a new CRL`);
    }
    return parseCrl(pem);
  } catch (err) {
    if (err instanceof ConfigError) throw err;
    throw new ConfigError(`${crlPath} cannot be read as a CRL: ${(err as Error).message}`, { cause: err });
  }
}

function pairFiles(certName: string, keyName: string, issued: Issued, description: string): PlannedFile[] {
  return [
    { name: certName, contents: issued.certPem, mode: PUBLIC_MODE, description },
    { name: keyName, contents: issued.keyPem, mode: KEY_MODE, description: `private key of ${certName}` },
  ];
}

function notAfterOf(issued: Issued): Date {
  return new Date(new X509Certificate(issued.certPem).validTo);
}

function describeSan(san: { dns: string[]; ips: string[] }): string {
  return [...san.dns.map((d) => `DNS:${d}`), ...san.ips.map((ip) => `IP:${ip}`)].join(', ');
}

function describeClientSan(uris: string[], dns: string[]): string {
  const names = [...uris.map((u) => `URI:${u}`), ...dns.map((d) => `DNS:${d}`)];
  return names.length > 0 ? `; ${names.join(', ')}` : '';
}

function oneDayNote(days: number): string[] {
  return days === 1 ? ['Note: these certificates expire in 1 day (as in the OVMS nginx example); pass --days N for a longer validity.'] : [];
}

function summarise(dir: string, files: WrittenFile[], validUntil: Date, notes: string[]): string {
  const width = Math.max(...files.map((f) => f.name.length));
  const lines = [
    `Wrote ${files.length} file${files.length === 1 ? '' : 's'} to ${dir}:`,
    ...files.map((f) => `  ${f.name.padEnd(width)}  ${f.mode.toString(8).padStart(4, '0')}  ${f.description}`),
    `Certificates are valid until ${validUntil.toISOString()}.`,
    ...notes,
  ];
  return lines.join('\n');
}
