/**
 * Builds the Java client of test/fixtures/java-rest-client with Debian's openjdk-17-jdk-headless
 * (javac, standard library only), and turns PEM files into the PKCS12 key store Java loads.
 */
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { buildOrExplain, fixtureSource, requireTool } from './fixture-build.js';

const run = promisify(execFile);
const NEEDS = ['openjdk-17-jdk-headless'];

/** Compiles RestClient.java into `workDir`; the classpath to run it from. */
export async function buildJavaFixture(workDir: string): Promise<string> {
  await requireTool('javac', ['-version'], {}, NEEDS);
  const source = join(fixtureSource('java-rest-client'), 'RestClient.java');
  await buildOrExplain('java-rest-client', 'javac', ['-d', workDir, source], { timeout: 120_000 }, NEEDS);
  return workDir;
}

/**
 * `openssl pkcs12 -export` of a certificate file (leaf first, then any intermediates) and its key, as the
 * README tells Java users; the key store's path, in `dir`, password `changeit`.
 */
export async function pkcs12Of(certPath: string, keyPath: string, dir: string, name: string): Promise<string> {
  const out = join(dir, `${name}.p12`);
  await run('openssl', ['pkcs12', '-export', '-in', certPath, '-inkey', keyPath, '-out', out, '-passout', 'pass:changeit']);
  return out;
}
