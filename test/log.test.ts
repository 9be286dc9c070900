import { test, describe, mock } from 'node:test';
import assert from 'node:assert/strict';
import fs, { openSync, closeSync, readFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFileSync, spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { accessBufferedDestination, createLogger, type Logger } from '../src/log.js';
import { eventually } from './helpers/ops.js';
import { RepeatBudget } from '../src/repeat-budget.js';

const LOG_MODULE = fileURLToPath(new URL('../src/log.js', import.meta.url));

function events(text: string): string[] {
  return text.split('\n').filter(Boolean).map((l) => `${JSON.parse(l).event}:${JSON.parse(l).n}`);
}

/** A logger writing through accessBufferedDestination to a file of its own. */
function fileLogger(): { logger: Logger; read(): string; close(): void; remove(): void } {
  const dir = mkdtempSync(join(tmpdir(), 'ovms-mtls-log-'));
  const file = join(dir, 'out.log');
  const fd = openSync(file, 'w');
  let open = true;
  return {
    logger: createLogger({ level: 'info', destination: accessBufferedDestination(fd) }),
    read: () => readFileSync(file, 'utf8'),
    close() {
      if (open) closeSync(fd);
      open = false;
    },
    remove: () => rmSync(dir, { recursive: true, force: true }),
  };
}

describe('log destination', () => {
  test('access lines are batched; any other line writes them and itself at once, in order; a quiet buffer is written soon after', async () => {
    const log = fileLogger();
    try {
      const { logger, read } = log;
      logger.info({ event: 'access', n: 1 });
      logger.info({ event: 'relay_access', n: 2 });
      assert.equal(read(), '', 'access lines wait in the buffer');
      logger.warn({ event: 'upstream_error', n: 3 });
      assert.deepEqual(events(read()), ['access:1', 'relay_access:2', 'upstream_error:3']);
      logger.info({ event: 'access', n: 4 });
      await eventually(() => events(read()).at(-1) === 'access:4', 'the periodic flush');
    } finally {
      log.close();
      log.remove();
    }
  });

  test('once nothing waits, nothing more is written: the fd may even be closed', async () => {
    const log = fileLogger();
    try {
      log.logger.info({ event: 'access', n: 1 });
      await eventually(() => events(log.read()).length === 1, 'the flush of the waiting line');
      log.close();
      // Three flush periods: a writer that kept flushing on a timer would now hit the closed fd (EBADF, an uncaught error).
      await new Promise((resolve) => setTimeout(resolve, 750));
      assert.deepEqual(events(log.read()), ['access:1']);
    } finally {
      log.close();
      log.remove();
    }
  });

  test('flushing never syncs the disk (it held the event loop for milliseconds), and leaves nothing behind, long lines included', async () => {
    // sonic-boom reaches fsync through the fs module object, so counting calls there sees every one of them.
    const syncs = [mock.method(fs, 'fsyncSync'), mock.method(fs, 'fsync'), mock.method(fs, 'fdatasyncSync'), mock.method(fs, 'fdatasync')];
    const log = fileLogger();
    try {
      const { logger, read } = log;
      const long = 'x'.repeat(12 * 1024);
      logger.info({ event: 'access', n: 1, path: long });
      for (let n = 2; n <= 20; n++) logger.info({ event: 'access', n });
      logger.warn({ event: 'upstream_error', n: 21 });
      logger.info({ event: 'access', n: 22, path: long });
      logger.info({ event: 'access', n: 23 });
      await eventually(() => events(read()).at(-1) === 'access:23', 'the periodic flush');
      assert.deepEqual(events(read()), Array.from({ length: 23 }, (_, i) => `${i === 20 ? 'upstream_error' : 'access'}:${i + 1}`));
      assert.deepEqual(syncs.map((m) => m.mock.callCount()), [0, 0, 0, 0]);
    } finally {
      for (const m of syncs) m.mock.restore();
      log.close();
      log.remove();
    }
  });

  test('each write is whole lines of at most PIPE_BUF (4096) bytes, or one longer line alone: OVMS shares the stdout pipe and cannot land inside a line', async () => {
    const writes = mock.method(fs, 'writeSync');
    const log = fileLogger();
    try {
      const { logger, read } = log;
      const path = '/v2/models/m/infer'.padEnd(150, 'p');
      for (let n = 1; n <= 60; n++) logger.info({ event: 'access', n, path });
      logger.warn({ event: 'upstream_error', n: 61 });
      logger.info({ event: 'access', n: 62, path: 'x'.repeat(6000) });
      for (let n = 63; n <= 90; n++) logger.info({ event: 'access', n, path });
      await eventually(() => events(read()).at(-1) === 'access:90', 'the periodic flush');
      assert.deepEqual(events(read()), Array.from({ length: 90 }, (_, i) => `${i === 60 ? 'upstream_error' : 'access'}:${i + 1}`));
      const chunks = writes.mock.calls.map((c) => Buffer.from(c.arguments[1] as Buffer | string));
      assert.ok(chunks.length > 0);
      for (const chunk of chunks) {
        const lines = chunk.toString('utf8').split('\n').length - 1;
        assert.equal(chunk.at(-1), 0x0a, 'a write ends with a whole line');
        assert.ok(chunk.length <= 4096 || lines === 1, `a write of ${chunk.length} bytes carries ${lines} lines`);
      }
    } finally {
      writes.mock.restore();
      log.close();
      log.remove();
    }
  });

  test('text beyond ASCII is written as UTF-8, byte for byte, batched or not', () => {
    const log = fileLogger();
    try {
      const { logger, read } = log;
      const subject = 'CN=Zoë Ångström,O=日本 😀';
      const path = '/v2/models/modèle/infer?q=\u2028';
      for (let n = 1; n <= 3; n++) logger.info({ event: 'access', n, subject, path });
      logger.warn({ event: 'upstream_error', n: 4, subject });
      const lines = read().split('\n').filter(Boolean).map((l) => JSON.parse(l) as { n: number; subject: string; path?: string });
      assert.deepEqual(lines.map((l) => [l.n, l.subject, l.path]), [[1, subject, path], [2, subject, path], [3, subject, path], [4, subject, undefined]]);
      assert.ok(!read().includes('\ufffd'), 'no byte sequence was invalid UTF-8');
    } finally {
      log.close();
      log.remove();
    }
  });

  test('a batched line is measured alone: the batch waiting before it is not measured again on every line', () => {
    // sonic-boom's string mode called Buffer.byteLength on the whole pending batch for each line written.
    const measured = mock.method(Buffer, 'byteLength');
    const log = fileLogger();
    try {
      const { logger, read } = log;
      for (let n = 1; n <= 100; n++) logger.info({ event: 'access', n, path: '/v2/models/bench/infer' });
      logger.warn({ event: 'upstream_error', n: 101 });
      const lines = read().split('\n').filter(Boolean);
      assert.equal(lines.length, 101);
      const longestLine = Math.max(...lines.map((l) => Buffer.from(l).length + 1));
      const longestMeasured = Math.max(0, ...measured.mock.calls.map((c) => String(c.arguments[0]).length));
      assert.ok(longestMeasured <= longestLine, `measured ${longestMeasured} characters at once, a line is at most ${longestLine} bytes`);
    } finally {
      measured.mock.restore();
      log.close();
      log.remove();
    }
  });

  test('access lines still in the buffer are written when the process exits', () => {
    const script = `import { createLogger } from ${JSON.stringify(LOG_MODULE)};
      const logger = createLogger({ level: 'info' });
      for (let n = 1; n <= 5; n++) logger.info({ event: 'access', n });
      process.exit(3);`;
    let stdout = '';
    try {
      execFileSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (err) {
      stdout = (err as { stdout: string; status: number }).stdout;
      assert.equal((err as { status: number }).status, 3);
    }
    assert.deepEqual(events(stdout), ['access:1', 'access:2', 'access:3', 'access:4', 'access:5']);
  });

  // A program embedding the package makes a logger per proxy it starts (as src/index.ts shows). Each
  // opened a descriptor of its own on a piped stdout and an exit hook, never given back: at the
  // eleventh, Node warned of an EventEmitter leak; and one logger's warning overtook the access
  // lines another still held.
  test('loggers writing to stdout share it: no descriptor or exit hook per logger, and their lines stay in order', () => {
    const script = `import { createLogger } from ${JSON.stringify(LOG_MODULE)};
      import { readdirSync } from 'node:fs';
      const held = () => [readdirSync('/proc/self/fd').length, process.listenerCount('exit')];
      const first = createLogger({ level: 'info' });
      const heldByOne = held();
      const loggers = Array.from({ length: 11 }, () => createLogger({ level: 'info' }));
      if (String(held()) !== String(heldByOne)) process.stderr.write('12 loggers hold [descriptors, exit hooks] ' + held() + ', one held ' + heldByOne + '\\n');
      first.info({ event: 'access', n: 1 });
      loggers.at(-1).warn({ event: 'upstream_error', n: 2 });`;
    // Through `| cat`, stdout is a pipe (FIFO) as under docker or systemd, where a logger opens a descriptor of its own.
    const run = spawnSync('/bin/sh', ['-c', '"$0" --input-type=module -e "$1" | cat', process.execPath, script], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    assert.equal(run.stderr, '');
    assert.deepEqual(events(run.stdout), ['access:1', 'upstream_error:2']);
  });
});

describe('log lines', () => {
  test('each line carries the ISO time it was written, not a stale one (the stamp is formatted once per millisecond)', async () => {
    const lines: string[] = [];
    const logger = createLogger({ level: 'info', destination: { write: (line: string) => lines.push(line) } });
    const timeOf = (line: string) => Date.parse(JSON.parse(line).time as string);
    const before = Date.now();
    logger.info('first');
    logger.info('second');
    const after = Date.now();
    for (const line of lines) {
      assert.match(JSON.parse(line).time, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
      assert.ok(timeOf(line) >= before && timeOf(line) <= after);
    }
    const later = Date.now() + 5;
    while (Date.now() < later) await new Promise((resolve) => setTimeout(resolve, 5));
    logger.info('third');
    assert.ok(timeOf(lines[2]!) >= later);
  });
});

describe('lines repeated at will (repeat-budget.ts)', () => {
  /** A budget of `perWindow` lines per key on a clock the test moves; what it wrote, in order. */
  function budget(perWindow: number, windowMs: number, now: () => number = () => 0) {
    const written: string[] = [];
    const repeats = new RepeatBudget({ perWindow, windowMs }, now);
    const offer = (key: string) => repeats.offer(key, () => written.push(key), (count) => written.push(`${key} x${count}`));
    return { repeats, written, offer };
  }

  test('each key has its own lines in full per window; the next window starts by saying how many of each the last held back', () => {
    let now = 0;
    const { written, offer } = budget(2, 1000, () => now);
    for (let i = 0; i < 5; i++) offer('a');
    offer('b');
    assert.deepEqual(written, ['a', 'a', 'b']);
    now = 1000;
    offer('b');
    assert.deepEqual(written, ['a', 'a', 'b', 'a x3', 'b']);
  });

  test('a window that ends in silence says what it held back once its time is up', async () => {
    const { written, offer } = budget(1, 20, () => performance.now());
    offer('a');
    offer('a');
    offer('a');
    await eventually(() => written.length === 2, 'the summary line');
    assert.deepEqual(written, ['a', 'a x2']);
  });
});
