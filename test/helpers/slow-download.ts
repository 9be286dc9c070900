/** A real client (curl) reading a REST download through the proxy at a set rate. */
import assert from 'node:assert/strict';
import type { TestPki } from './pki.js';
import type { StartedProxy } from './harness.js';
import { runCommand } from './cli.js';

/** curl's client-certificate options for the test PKI. */
export function curlTls(pki: TestPki): string[] {
  return ['--cert', pki.paths['client.pem']!, '--key', pki.paths['client.key']!, '--cacert', pki.paths['server_ca.pem']!];
}

export interface SlowDownload {
  readonly protocol: '--http1.1' | '--http2';
  /** curl --limit-rate. */
  readonly rate: string;
  /** The answer's length. */
  readonly bytes: number;
  /** Default: the stand-in model server's /stream-bytes?n=bytes. */
  readonly path?: string;
  /** The log event a connection closed as unresponsive would have. */
  readonly closedAs: string;
}

/** The download completes whole, its access line has no error, and no connection was closed as unresponsive. */
export async function assertSlowDownloadCompletes(local: Pick<StartedProxy, 'restPort' | 'logs'>, pki: TestPki, download: SlowDownload): Promise<void> {
  const { protocol, rate, bytes, closedAs } = download;
  const path = download.path ?? `/stream-bytes?n=${bytes}`;
  const run = await runCommand('curl', ['-sS', protocol, ...curlTls(pki), '--limit-rate', rate, '-o', '/dev/null', '-w', '%{size_download}', `https://localhost:${local.restPort}${path}`]);
  assert.deepEqual({ code: run.code, stdout: run.stdout, stderr: run.stderr }, { code: 0, stdout: String(bytes), stderr: '' });
  const line = await local.logs.waitFor((l) => l.event === 'access' && String(l.path).startsWith(path.split('?')[0]!));
  assert.equal(line.error, undefined);
  assert.ok(!local.logs.lines.some((l) => l.event === closedAs), 'no connection closed as unresponsive');
}
