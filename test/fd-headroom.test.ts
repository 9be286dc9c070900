/** The spare descriptors a proxy process keeps (src/fd-headroom.ts), with the count and the clock the test's own. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { DescriptorHeadroom, openFilesLimit, reservedDescriptors } from '../src/fd-headroom.js';
import { createLogger } from '../src/log.js';
import { LogCapture } from './helpers/harness.js';

/** 64 keeps 16 spare: at most 48 in use. */
const LIMIT = 64;

function headroom(open: { value: number }) {
  const logs = new LogCapture();
  const clock = { ms: 0, counts: 0 };
  const guard = new DescriptorHeadroom(LIMIT, createLogger({ level: 'info', destination: logs }), {
    count: () => {
      clock.counts++;
      return open.value;
    },
    now: () => clock.ms,
  });
  return { guard, logs, clock };
}

test('the soft open-files limit is read from /proc/self/limits; unlimited or absent is none', () => {
  assert.equal(openFilesLimit('Max processes             63704                63704                processes\nMax open files            1024                 524288               files\n'), 1024);
  assert.equal(openFilesLimit('Max open files            unlimited            unlimited            files\n'), undefined);
  assert.equal(openFilesLimit(''), undefined);
  assert.equal(reservedDescriptors(1024), 16);
  assert.equal(reservedDescriptors(1_048_576), 16_384);
});

test('at the limit, a flood of new connections is refused without listing the descriptors for each, with one warning', () => {
  const open = { value: 60 };
  const { guard, logs, clock } = headroom(open);
  const countsAtStart = clock.counts;
  for (let i = 0; i < 1000; i++) assert.equal(guard.admit(new EventEmitter()), false);
  // Listing /proc/self/fd costs ~0.8 µs a descriptor: once per refusal, a flood near a limit of 1,048,576 spun on it.
  assert.equal(clock.counts - countsAtStart, 1);
  const warnings = logs.lines.filter((l) => l.event === 'open_files_exhausted');
  assert.equal(warnings.length, 1);
  assert.match(String(warnings[0]!.msg), /^open-files limit 64 nearly reached .*raise the limit \(ulimit -n/);
  clock.ms += 100;
  open.value = 30;
  assert.equal(guard.admit(new EventEmitter()), true, 'counted again a while later: room again');
  assert.equal(clock.counts - countsAtStart, 2);
});

test('connections that close make room again without a count', () => {
  const open = { value: 45 };
  const { guard, clock } = headroom(open);
  const first = new EventEmitter();
  const second = new EventEmitter();
  assert.equal(guard.admit(first), true);
  open.value = 47;
  assert.equal(guard.admit(second), true);
  open.value = 49;
  assert.equal(guard.admit(new EventEmitter()), false);
  const counts = clock.counts;
  first.emit('close');
  second.emit('close');
  assert.equal(guard.admit(new EventEmitter()), true);
  assert.equal(clock.counts, counts, 'admitted on the estimate, nothing listed');
});
