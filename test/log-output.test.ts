/**
 * The log's reader misbehaving: stdout is a pipe that the container runtime or
 * a log shipper reads, and it can lag, stop or vanish. The proxy must go on
 * serving, within bounded memory, and say how many lines it had to drop.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import type { ClientHttp2Session } from 'node:http2';
import { createInterface } from 'node:readline';
import { closeSync, openSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import type { TestPki } from './helpers/pki.js';
import { startCli } from './helpers/cli.js';
import { h2Session, readyStatus, startUpstreamFixture, type LogLine } from './helpers/harness.js';
import { eventually, settlesWithin } from './helpers/ops.js';
import { freeLoopbackPorts } from '../src/ports.js';
import { accessBufferedDestination, createLogger } from '../src/log.js';
import type { ModelServer } from '../src/demo/model-server.js';

const LOG_MODULE = fileURLToPath(new URL('../src/log.js', import.meta.url));
/** Far above what any step here takes on a loaded machine; only a proxy held up by its log reaches it. */
const HANG_BOUND_MS = 60_000;

/** Runs `script` (an ES module body) with stdout a pipe this process does not read until told. */
function unreadChild(script: string) {
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['pipe', 'pipe', 'pipe'] });
  child.stdout.pause();
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
  return { child, stderr: () => stderr };
}

describe('a log reader that stops', () => {
  test('a logger whose stdout nobody reads does not hold the event loop; what did not fit is dropped, counted, and the rest arrives in order', async () => {
    const total = 8000; // ~2.3 MB of lines: past the pipe (64 KiB) and the bounded backlog (1 MiB)
    const { child, stderr } = unreadChild(`import { createLogger } from ${JSON.stringify(LOG_MODULE)};
      const logger = createLogger({ level: 'info' });
      const path = '/v2/models/m/infer'.padEnd(200, 'p');
      for (let n = 1; n <= ${total}; n++) logger.info({ event: 'access', n, path });
      setImmediate(() => process.stderr.write('event loop turns\\n'));
      process.stdin.on('end', () => process.exit(0)).resume();`);
    try {
      await settlesWithin(eventually(() => stderr().includes('event loop turns'), 'the event loop to turn', HANG_BOUND_MS), HANG_BOUND_MS + 1000, 'the logger');
      const lines: LogLine[] = [];
      createInterface({ input: child.stdout }).on('line', (l) => lines.push(JSON.parse(l) as LogLine));
      child.stdout.resume();
      await eventually(() => lines.some((l) => l.event === 'log_lines_dropped'), 'the count of dropped lines', HANG_BOUND_MS);
      child.stdin.end();
      await once(child, 'close');
      const access = lines.filter((l) => l.event === 'access').map((l) => l['n'] as number);
      const dropped = lines.find((l) => l.event === 'log_lines_dropped')!;
      assert.equal(dropped['level'], 'warn');
      assert.equal(dropped['reason'], 'EAGAIN');
      assert.ok((dropped['lines'] as number) > 0);
      assert.equal(access.length + (dropped['lines'] as number), total, 'every line was written or counted as dropped');
      assert.ok(access.every((n, i) => i === 0 || n > access[i - 1]!), 'the lines written are in order');
      assert.deepEqual(access.slice(0, 3), [1, 2, 3], 'the first lines, which fit, were kept');
    } finally {
      child.kill('SIGKILL');
    }
  });

  test('a full disk (ENOSPC) costs the lines, not an exception where a request was being logged', () => {
    const fd = openSync('/dev/full', 'w');
    try {
      const logger = createLogger({ level: 'info', destination: accessBufferedDestination(fd) });
      for (let n = 1; n <= 100; n++) logger.info({ event: 'access', n });
      logger.warn({ event: 'upstream_error' });
    } finally {
      closeSync(fd);
    }
  });

  test('a reader that is gone (EPIPE) costs no crash: the process goes on and exits as it meant to', async () => {
    const { child, stderr } = unreadChild(`import { createLogger } from ${JSON.stringify(LOG_MODULE)};
      const logger = createLogger({ level: 'info' });
      process.stdin.on('data', () => {
        for (let n = 1; n <= 2000; n++) logger.info({ event: 'access', n });
        logger.warn({ event: 'upstream_error' });
        setTimeout(() => process.exit(7), 300);
      });`);
    try {
      child.stdout.destroy();
      child.stdin.write('go\n');
      const [code] = (await settlesWithin(once(child, 'exit'), HANG_BOUND_MS, 'the process to exit')) as [number | null];
      assert.equal(code, 7, stderr());
      assert.equal(stderr(), '');
    } finally {
      child.kill('SIGKILL');
    }
  });
});

describe('the proxy with a log reader that stops', () => {
  let pki: TestPki;
  let upstream: ModelServer;
  let closeAll: () => Promise<void>;
  before(async () => ({ pki, upstream, close: closeAll } = await startUpstreamFixture()));
  after(() => closeAll());

  for (const workers of [1, 2]) {
    test(`--mtls_workers ${workers}: requests are answered while nobody reads stdout, and their access lines arrive once the reader is back`, async () => {
      const [restPort] = (await freeLoopbackPorts(1)) as [number];
      const cli = startCli([
        'proxy', '--mtls_workers', String(workers), '--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1',
        '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`,
        '--mtls_cert', pki.paths['server.pem']!, '--mtls_key', pki.paths['server.key']!, '--mtls_client_ca', pki.paths['client_cert_ca.pem']!,
      ]);
      const sessions: ClientHttp2Session[] = [];
      try {
        const listening = workers === 1 ? (l: LogLine) => l.event === 'listening' && l['listener'] === 'rest' : (l: LogLine) => l.event === 'workers_listening';
        await settlesWithin(cli.logs.waitFor(listening), HANG_BOUND_MS, 'the proxy to listen');
        sessions.push(...Array.from({ length: 4 }, () => h2Session(restPort, pki)));
        cli.child.stdout!.pause();
        // ~1000 access lines (~350 KB): the pipe takes 64 KiB of them.
        const perSession = 250;
        const answers = await settlesWithin(
          Promise.all(sessions.map(async (session) => {
            const statuses: unknown[] = [];
            for (let i = 0; i < perSession; i++) statuses.push(await readyStatus(session));
            return statuses;
          })),
          HANG_BOUND_MS,
          'the answers while stdout is not read',
        );
        assert.deepEqual(new Set(answers.flat()), new Set([200]));
        cli.child.stdout!.resume();
        await eventually(() => cli.logs.lines.filter((l) => l.event === 'access').length === 4 * perSession, 'every access line once the reader is back', HANG_BOUND_MS);
        assert.equal(cli.logs.lines.filter((l) => l.event === 'log_lines_dropped').length, 0, 'the backlog held them all');
      } finally {
        for (const session of sessions) session.destroy();
        cli.child.kill('SIGKILL');
        await cli.exited;
      }
    });
  }
});
