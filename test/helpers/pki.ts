/**
 * A complete, throw-away PKI for one test process: a server, a client CA with good and bad
 * clients of every kind the proxy must tell apart, and a CRL. EC P-256 throughout because key
 * generation dominates the cost; nothing is cached between processes, so no run depends on
 * another's leftovers.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { createCa, createCrl, issueClientCert, issueServerCert, type Issued } from '../../src/x509.js';
import { caNamesBytes } from '../../src/ca-names.js';

export type { Issued } from '../../src/x509.js';

export interface TestPki {
  dir: string;
  serverCa: Issued;
  server: Issued;
  clientCa: Issued;
  client: Issued;
  otherCa: Issued;
  /** Issued by otherCa, which the proxy does not trust. */
  foreignClient: Issued;
  expiredClient: Issued;
  notYetValidClient: Issued;
  revokedClient: Issued;
  /** EKU serverAuth only: a valid cert from the right CA, but not for client authentication. */
  serverOnlyEkuClient: Issued;
  /** Signed by clientCa. */
  intermediateCa: Issued;
  /** Signed by intermediateCa; certPem holds leaf + intermediate so it can be sent as a chain. */
  chainedClient: Issued;
  /** chainedClient's leaf alone, as a client sends it whose intermediate is in the server's CA bundle. */
  chainedLeafOnly: Issued;
  /** clientCa CRL revoking revokedClient. */
  crlPem: string;
  /**
   * Empty CRL of intermediateCa. Node checks the CRL of every CA in a chain once any CRL is set,
   * so a server trusting chained clients needs `crl: [crlPem, intermediateCrlPem]`.
   */
  intermediateCrlPem: string;
  /** Empty CRL of otherCa, for servers that trust otherCa as well while checking CRLs. */
  otherCaCrlPem: string;
  /**
   * File name -> absolute path of everything written to `dir`: BASE.pem + BASE.key for server,
   * server_ca, client_cert_ca, client, other_ca, intermediate_ca, foreign_client, expired_client,
   * not_yet_valid_client, revoked_client, server_only_eku_client, chained_client; and
   * client_cert_ca.crl, intermediate_ca.crl, other_ca.crl, and client_cert_ca_chain.crl (the
   * client CA's and the intermediate's CRLs in one file: Node's `crl` option reads only the
   * first CRL of a PEM buffer, so a loader must split such a file into an array).
   */
  paths: Record<string, string>;
  cleanup(): Promise<void>;
}

const HOUR_MS = 60 * 60 * 1000;
const DAY_MS = 24 * HOUR_MS;

export async function createTestPki(): Promise<TestPki> {
  const now = Date.now();
  // Distinct CA names matter: OpenSSL finds issuers and CRLs by subject name.
  const [serverCa, clientCa, otherCa] = await Promise.all([
    createCa({ commonName: 'ovms-mtls test server CA' }),
    createCa({ commonName: 'ovms-mtls test client CA' }),
    createCa({ commonName: 'ovms-mtls test other CA' }),
  ]);
  const [server, client, foreignClient, expiredClient, notYetValidClient, revokedClient, serverOnlyEkuClient, intermediateCa] =
    await Promise.all([
      issueServerCert({ issuer: serverCa, commonName: 'localhost', dns: ['localhost'], ips: ['127.0.0.1', '::1'] }),
      issueClientCert({ issuer: clientCa, commonName: 'client', organizationalUnit: 'tests', uris: ['spiffe://test.local/client'] }),
      issueClientCert({ issuer: otherCa, commonName: 'foreign client' }),
      issueClientCert({ issuer: clientCa, commonName: 'expired client', notBefore: new Date(now - 10 * DAY_MS), days: 1 }),
      issueClientCert({ issuer: clientCa, commonName: 'not yet valid client', notBefore: new Date(now + DAY_MS), days: 1 }),
      issueClientCert({ issuer: clientCa, commonName: 'revoked client' }),
      issueClientCert({ issuer: clientCa, commonName: 'server-only EKU client', extKeyUsage: 'serverAuth' }),
      createCa({ commonName: 'ovms-mtls test intermediate CA', issuer: clientCa, pathLen: 0 }),
    ]);
  const [chainedLeaf, crlPem, intermediateCrlPem, otherCaCrlPem] = await Promise.all([
    issueClientCert({ issuer: intermediateCa, commonName: 'chained client' }),
    createCrl({ issuer: clientCa, revoked: [{ serialHex: revokedClient.serialHex }] }),
    createCrl({ issuer: intermediateCa }),
    createCrl({ issuer: otherCa }),
  ]);
  const chainedClient = { ...chainedLeaf, certPem: chainedLeaf.certPem + intermediateCa.certPem };

  const dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-pki-'));
  const paths = await writePkiFiles(dir, {
    server: [server, 'server'],
    serverCa: [serverCa, 'server_ca'],
    clientCa: [clientCa, 'client_cert_ca'],
    client: [client, 'client'],
    otherCa: [otherCa, 'other_ca'],
    foreignClient: [foreignClient, 'foreign_client'],
    expiredClient: [expiredClient, 'expired_client'],
    notYetValidClient: [notYetValidClient, 'not_yet_valid_client'],
    revokedClient: [revokedClient, 'revoked_client'],
    serverOnlyEkuClient: [serverOnlyEkuClient, 'server_only_eku_client'],
    intermediateCa: [intermediateCa, 'intermediate_ca'],
    chainedClient: [chainedClient, 'chained_client'],
  }, {
    client_cert_ca: crlPem,
    intermediate_ca: intermediateCrlPem,
    other_ca: otherCaCrlPem,
    // What a proxy needs to accept chained clients while checking CRLs (see intermediateCrlPem).
    client_cert_ca_chain: crlPem + intermediateCrlPem,
  });

  return {
    dir,
    serverCa,
    server,
    clientCa,
    client,
    otherCa,
    foreignClient,
    expiredClient,
    notYetValidClient,
    revokedClient,
    serverOnlyEkuClient,
    intermediateCa,
    chainedClient,
    chainedLeafOnly: chainedLeaf,
    crlPem,
    intermediateCrlPem,
    otherCaCrlPem,
    paths,
    cleanup: () => rm(dir, { recursive: true, force: true }),
  };
}

/** Writes BASE.pem + BASE.key for each pair and BASE.crl for each CRL; returns name -> path. */
async function writePkiFiles(
  dir: string,
  pairs: Record<string, [Issued, string]>,
  crls: Record<string, string>,
): Promise<Record<string, string>> {
  const files: [string, string, number][] = [];
  for (const [issued, base] of Object.values(pairs)) {
    files.push([`${base}.pem`, issued.certPem, 0o644], [`${base}.key`, issued.keyPem, 0o600]);
  }
  for (const [base, pem] of Object.entries(crls)) files.push([`${base}.crl`, pem, 0o644]);
  const paths: Record<string, string> = {};
  await Promise.all(
    files.map(async ([name, contents, mode]) => {
      paths[name] = join(dir, name);
      await writeFile(paths[name], contents, { mode });
    }),
  );
  return paths;
}

/**
 * CA certificates (self-signed, long names, as corporate CAs' DNs run to a few hundred bytes and
 * bundles to hundreds of CAs) whose names, with `first`'s, take exactly `bytes` in the TLS request
 * for a client certificate: the measure the proxy holds bundles to.
 */
export async function casWithNamesOf(bytes: number, first: Issued): Promise<string> {
  const NAME_BYTES = 2_000;
  const namesOf = (pems: string[]) => caNamesBytes(pems.map((pem) => new X509Certificate(pem)));
  const ca = (i: number, padding: number) => createCa({ commonName: `ovms-mtls test corporate CA ${i} ${'x'.repeat(padding)}` });
  const pems = [first.certPem];
  while (bytes - namesOf(pems) > 2 * NAME_BYTES) pems.push((await ca(pems.length, NAME_BYTES)).certPem);
  // The last name takes what is left: measured once, then grown or shrunk by the difference.
  const guess = await ca(pems.length, NAME_BYTES);
  const last = await ca(pems.length, NAME_BYTES + bytes - namesOf([...pems, guess.certPem]));
  pems.push(last.certPem);
  assert.equal(namesOf(pems), bytes);
  return pems.join('');
}
