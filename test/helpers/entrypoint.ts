/**
 * Runs the built `bin/ovms-mtls` as the OVMS entrypoint with the stand-in
 * OVMS (test/fixtures/fake-ovms.ts) and reads its output back: the
 * product's JSON lines and OVMS's own lines, which must pass through as is.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { BIN, cleanEnv, exitWithOutput } from './cli.js';
import type { TestPki } from './pki.js';
import assert from 'node:assert/strict';
import type { LogLine } from './harness.js';
import type { KserveClient } from '../../src/demo/grpc-client.js';
import { inferRequest } from './grpc-calls.js';

export const FAKE_OVMS = fileURLToPath(new URL('../fixtures/fake-ovms.js', import.meta.url));

/** tsc does not keep the executable bit; the wrapper spawns the fake like a real binary. */
export function makeFakeExecutable(): void {
  chmodSync(FAKE_OVMS, 0o755);
}

export function tlsArgs(pki: TestPki): string[] {
  return [
    '--mtls_cert', pki.paths['server.pem']!, '--mtls_key', pki.paths['server.key']!,
    '--mtls_client_ca', pki.paths['client_cert_ca.pem']!, '--mtls_crl', pki.paths['client_cert_ca.crl']!,
  ];
}

export interface ExitResult {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface Wrapper {
  readonly child: ChildProcess;
  /** The product's JSON lines. */
  readonly logs: LogLine[];
  /** stdout lines that are not JSON: OVMS's own output. */
  readonly ovmsLines: string[];
  stderr(): string;
  readonly exited: Promise<ExitResult>;
  /** Resolves with the first matching JSON line; rejects if the wrapper exits first. */
  waitForLog(match: (l: LogLine) => boolean): Promise<LogLine>;
  waitForEvent(event: string): Promise<LogLine>;
  waitForOvmsLine(match: (line: string) => boolean): Promise<string>;
}

/** `launcher`: what the image puts in front of ovms-mtls, e.g. ['/usr/bin/tini', '--']; the child is then the launcher. */
export function startWrapper(args: readonly string[], env: Record<string, string> = {}, launcher: readonly string[] = []): Wrapper {
  const argv = [...launcher, process.execPath, BIN, ...args];
  const child = spawn(argv[0]!, argv.slice(1), { env: { ...cleanEnv('FAKE_OVMS_'), ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  const logs: LogLine[] = [];
  const ovmsLines: string[] = [];
  let stderr = '';
  const checks = new Set<() => void>();
  child.stderr!.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
  createInterface({ input: child.stdout! }).on('line', (line) => {
    try {
      const parsed = JSON.parse(line) as LogLine;
      if (parsed && typeof parsed === 'object') logs.push(parsed);
      else ovmsLines.push(line);
    } catch {
      ovmsLines.push(line);
    }
    for (const check of [...checks]) check();
  });
  const exited = exitWithOutput(child);
  const waitFor = <T>(find: () => T | undefined, what: string): Promise<T> =>
    new Promise((resolve, reject) => {
      const check = () => {
        const found = find();
        if (found === undefined) return;
        checks.delete(check);
        resolve(found);
      };
      checks.add(check);
      check();
      void exited.then((r) => {
        check();
        if (checks.delete(check)) reject(new Error(`wrapper exited (${r.code ?? r.signal}) before ${what}; stderr: ${stderr}`));
      });
    });
  return {
    child,
    logs,
    ovmsLines,
    stderr: () => stderr,
    exited,
    waitForLog: (match) => waitFor(() => logs.find(match), 'the expected log line'),
    waitForEvent: (event) => waitFor(() => logs.find((l) => l.event === event), `event ${event}`),
    waitForOvmsLine: (match) => waitFor(() => ovmsLines.find(match), 'the expected OVMS line'),
  };
}

export interface FakeRun {
  argv: string[];
  options: Record<string, string>;
  pid: number;
  uid: number;
  gid: number;
  home: string | undefined;
}

export function fakeRuns(argvFile: string): FakeRun[] {
  if (!existsSync(argvFile)) return [];
  return readFileSync(argvFile, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l) as FakeRun);
}

/** Dead = gone or a zombie nobody reaped (PID 1 here does not reap orphans). */
export function processGone(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z');
  } catch {
    return true;
  }
}

const streamRequest = (id: string) => ({ ...inferRequest(), id });

/**
 * A ModelStreamInfer answered before and after the wrapper's SIGTERM; the signal reaches
 * OVMS only once the stream has ended (the drain comes first); then the wrapper exits 0.
 */
export async function streamAcrossSigterm(kserve: KserveClient, wrapper: Wrapper): Promise<void> {
  const call = kserve.ModelStreamInfer();
  const replies = call[Symbol.asyncIterator]();
  call.write(streamRequest('before'));
  assert.equal((await replies.next()).value.infer_response.id, 'before');
  wrapper.child.kill('SIGTERM');
  await wrapper.waitForEvent('signal');
  call.write(streamRequest('during'));
  assert.equal((await replies.next()).value.infer_response.id, 'during');
  assert.equal(wrapper.logs.some((l) => l.event === 'ovms_stopping'), false, 'OVMS is signalled while a stream is in flight');
  call.end();
  assert.equal((await replies.next()).done, true);
  assert.equal((await wrapper.waitForEvent('ovms_stopping'))['signal'], 'SIGTERM');
  await wrapper.waitForOvmsLine((l) => l.includes('SIGTERM received'));
  assert.deepEqual(await wrapper.exited, { code: 0, signal: null });
}
