/**
 * `ovms-mtls check`: load the TLS material exactly as the proxy does at startup
 * (same checks, same messages), then describe what was loaded: how long the
 * server certificate lives, its names, the client CAs and each CRL.
 */
import type { X509Certificate } from 'node:crypto';
import type { TlsFiles } from './config.js';
import { isUserError } from './errors.js';
import { loadTlsMaterialSync, validFrom, validTo, type TlsMaterial } from './tls-material.js';
import { javaCaNamesMessage } from './ca-names.js';
import { crlSignedBy, crlsForCa, certificateNames, type CrlInfo } from './crl-index.js';
import { caValidity, commonName, issuedBy, nameOf, securityLevelWeakness, subjectCn, timeLeft, unanchoredCaMessage, unanchoredCas, weakClientCaMessage } from './tls-checks.js';

export type FindingLevel = 'ok' | 'warn' | 'fail' | 'info';

export interface Finding {
  readonly level: FindingLevel;
  readonly text: string;
}

export interface CheckReport {
  /** True when the proxy would start and serve with this material. */
  readonly ok: boolean;
  readonly findings: readonly Finding[];
}

// OpenSSL's security level 2, the default on Debian and Ubuntu, refuses smaller RSA keys.
const MIN_RSA_BITS = 2048;

export function checkTlsFiles(files: TlsFiles, now = new Date()): CheckReport {
  let material: TlsMaterial;
  try {
    material = loadTlsMaterialSync(files, now);
  } catch (err) {
    if (!isUserError(err)) throw err;
    return { ok: false, findings: [{ level: 'fail', text: err.message }] };
  }
  return { ok: true, findings: [...serverFindings(material, now), ...clientCaFindings(material, now), ...crlFindings(material, now)] };
}

export function formatReport(report: CheckReport): string {
  const lines = report.findings.map((f) => `${f.level.toUpperCase().padEnd(5)} ${f.text.replace(/\n/g, '\n      ')}`);
  lines.push(report.ok ? 'Result: OK - the proxy would start and serve with this material.' : 'Result: FAILED - the proxy would refuse to start with this material.');
  return lines.join('\n') + '\n';
}

function serverFindings(m: TlsMaterial, now: Date): Finding[] {
  const cert = m.serverCert;
  const san = cert.subjectAltName;
  const findings: Finding[] = [
    { level: 'ok', text: `server certificate ${m.files.cert}: ${subjectCn(cert)}, issued by ${issuerCn(cert)}, valid until ${validTo(cert).toISOString()} (${timeLeft(validTo(cert), now)} left)` },
    { level: 'ok', text: `server key ${m.files.key} matches the certificate` },
  ];
  if (san) findings.push({ level: 'info', text: `server names (SAN): ${san}` });
  else findings.push({ level: 'warn', text: `server certificate ${m.files.cert} has no subjectAltName: Go, rustls and browser clients refuse it (\`ovms-mtls certs init --server_name NAME\` makes one with SANs)` });
  const rsaBits = cert.publicKey.asymmetricKeyType === 'rsa' ? cert.publicKey.asymmetricKeyDetails?.modulusLength : undefined;
  if (rsaBits !== undefined && rsaBits < MIN_RSA_BITS) {
    findings.push({ level: 'warn', text: `server certificate ${m.files.cert} has a ${rsaBits}-bit RSA key: OpenSSL clients at security level 2 (Debian's and Ubuntu's default: curl, Python, openssl s_client) refuse it as "key too weak"; reissue it with ${MIN_RSA_BITS} bits or more (\`ovms-mtls certs init --key rsa2048\`, or the default EC key)` });
  }
  const missingIssuer = chainEndNote(m);
  if (missingIssuer) findings.push({ level: 'info', text: missingIssuer });
  return findings;
}

/**
 * A server certificate file without its intermediate loads and serves, but clients that trust only
 * the root fail ("unable to get local issuer certificate"); the proxy cannot tell a root from an
 * intermediate it does not hold, so name the CA clients must trust.
 */
function chainEndNote(m: TlsMaterial): string | undefined {
  const cert = m.serverCert;
  if (m.serverChain.length > 1 || cert.checkIssued(cert)) return undefined;
  return `server certificate file ${m.files.cert} holds no CA certificate: clients must trust ${issuerCn(cert)} itself; if that is an intermediate CA, append it after the server certificate, or clients fail with "unable to get local issuer certificate"`;
}

/** One CA may sign servers and clients; but the server's issuing CA as the only client CA is often cert-manager's ca.crt taken from the server's secret. */
function serverIssuerNote(ca: X509Certificate, m: TlsMaterial): Finding | undefined {
  if (!m.serverChain.some((cert) => issuedBy(cert, ca))) return undefined;
  return {
    level: 'info',
    text: `client CA ${subjectCn(ca)} also issued the server certificate or its chain: right if it also issues the client certificates; if ${m.files.clientCa} is the ca.crt of the server's secret, clients are refused as unknown_ca (give the CA that issues the client certificates)`,
  };
}

function clientCaFindings(m: TlsMaterial, now: Date): Finding[] {
  const count = `${m.clientCas.length} CA${m.clientCas.length === 1 ? '' : 's'}`;
  const findings: Finding[] = [{ level: 'ok', text: `client CA bundle ${m.files.clientCa}: ${count}` }];
  const javaRefuses = javaCaNamesMessage(m.clientCas, m.files.clientCa);
  if (javaRefuses) findings.push({ level: 'warn', text: javaRefuses });
  const unanchored = new Set(unanchoredCas(m.clientCas));
  for (const ca of m.clientCas) {
    if (unanchored.has(ca)) findings.push({ level: 'warn', text: unanchoredCaMessage(ca, m.files.clientCa) });
    const weakness = securityLevelWeakness(ca);
    if (weakness) findings.push({ level: 'warn', text: weakClientCaMessage(ca, m.files.clientCa, weakness) });
    const shared = serverIssuerNote(ca, m);
    if (shared) findings.push(shared);
    findings.push(clientCaValidityFinding(ca, now));
  }
  return findings;
}

function clientCaValidityFinding(ca: X509Certificate, now: Date): Finding {
  switch (caValidity(ca, now)) {
    case 'expired':
      return { level: 'warn', text: `client CA ${subjectCn(ca)} expired on ${validTo(ca).toISOString()}: its clients are refused` };
    case 'not yet valid':
      return { level: 'warn', text: `client CA ${subjectCn(ca)} is not valid before ${validFrom(ca).toISOString()}: its clients are refused until then (check the clock)` };
    case 'valid':
      return { level: 'info', text: `client CA ${subjectCn(ca)}, valid until ${validTo(ca).toISOString()} (${timeLeft(validTo(ca), now)} left)` };
  }
}

function crlFindings(m: TlsMaterial, now: Date): Finding[] {
  if (!m.crl || !m.files.crl) return [{ level: 'info', text: 'no CRL (--mtls_crl): revocation is not checked' }];
  const { crls } = m;
  const findings: Finding[] = [{ level: 'ok', text: `CRL file ${m.files.crl}: ${crls.length} CRL${crls.length === 1 ? '' : 's'}, one for each trusted CA` }];
  for (const crl of crls) findings.push(describeCrl(crl, m.clientCas, now));
  return findings;
}

function describeCrl(crl: CrlInfo, cas: readonly X509Certificate[], now: Date): Finding {
  const ca = cas.find((candidate) => crlsForCa([crl], candidate).length > 0);
  const next = crl.nextUpdate ? `next update ${crl.nextUpdate.toISOString()} (${timeLeft(crl.nextUpdate, now)} left)` : 'no next update';
  const revoked = `${crl.revokedSerials.size} revoked`;
  if (!ca) {
    return { level: 'info', text: `CRL #${crl.index}: issuer not in the client CA bundle (an intermediate CA clients send?), ${revoked}, ${next}; signature checked by OpenSSL at handshake` };
  }
  const signature = crlSignedBy(crl, ca) === undefined ? 'signature algorithm checked at handshake only' : 'signature ok';
  return { level: 'info', text: `CRL #${crl.index} of ${subjectCn(ca)}: ${revoked}, ${next}, ${signature}` };
}

function issuerCn(cert: X509Certificate): string {
  const { issuerKey, subjectKey } = certificateNames(cert.raw);
  if (issuerKey === subjectKey) return 'itself (self-signed)';
  return commonName(nameOf(cert, 'issuer'));
}

