/**
 * Throw-away certificates for one bench run, EC P-256 throughout (what the
 * handshake scenario measures): a server certificate for `localhost` and
 * 127.0.0.1, a client CA with an empty CRL, and one client certificate.
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createCa, createCrl, issueClientCert, issueServerCert } from '../src/x509.js';

export interface BenchPki {
  readonly serverCert: string;
  readonly serverKey: string;
  readonly serverCa: string;
  readonly clientCa: string;
  readonly crl: string;
  readonly clientCert: string;
  readonly clientKey: string;
}

export async function writeBenchPki(dir: string): Promise<BenchPki> {
  const [serverCa, clientCa] = await Promise.all([
    createCa({ commonName: 'ovms-mtls bench server CA', days: 2 }),
    createCa({ commonName: 'ovms-mtls bench client CA', days: 2 }),
  ]);
  const [server, client, crl] = await Promise.all([
    issueServerCert({ issuer: serverCa, commonName: 'localhost', dns: ['localhost'], ips: ['127.0.0.1'], days: 2 }),
    issueClientCert({ issuer: clientCa, commonName: 'bench client', organizationalUnit: 'bench', uris: ['spiffe://bench.local/driver'], days: 2 }),
    createCrl({ issuer: clientCa, days: 2 }),
  ]);
  const files: [keyof BenchPki, string, string][] = [
    ['serverCert', 'server.pem', server.certPem],
    ['serverKey', 'server.key', server.keyPem],
    ['serverCa', 'server_ca.pem', serverCa.certPem],
    ['clientCa', 'client_cert_ca.pem', clientCa.certPem],
    ['crl', 'client_cert_ca.crl', crl],
    ['clientCert', 'client.pem', client.certPem],
    ['clientKey', 'client.key', client.keyPem],
  ];
  const paths = {} as Record<keyof BenchPki, string>;
  await Promise.all(
    files.map(async ([role, name, pem]) => {
      paths[role] = join(dir, name);
      // 0644 even for keys: nginx workers (user nobody) never read them, but the
      // master reads them before dropping privileges; this is a throw-away dir.
      await writeFile(paths[role], pem.endsWith('\n') ? pem : pem + '\n', { mode: 0o644 });
    }),
  );
  return paths;
}
