import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { createHook } from 'node:async_hooks';
import { IdleSweeper, StreamCount, type IdleConnection } from '../src/idle-sweep.js';
import { closedByPeer, unackedBytes } from '../src/client-acks.js';

const MS = 80;

/** A connection that records when it was told, and answers with `again`. */
function connection(again: boolean): IdleConnection & { told: number[]; streams: StreamCount } {
  const told: number[] = [];
  return { streams: new StreamCount(), told, closeIdle: () => (told.push(performance.now()), again) };
}

describe('idle sweeper', () => {
  test('a connection with a stream open is never told, however long; once the stream closes, it is', async () => {
    const sweeper = new IdleSweeper(MS);
    const busy = connection(false);
    busy.streams.opened();
    sweeper.add(busy);
    await sleep(MS * 4);
    assert.deepEqual(busy.told, []);
    busy.streams.closed();
    const closedAt = performance.now();
    while (busy.told.length === 0) await sleep(MS / 4);
    assert.ok(busy.told[0]! - closedAt >= MS - 1, 'not before a whole idle spell');
    sweeper.delete(busy);
  });

  test('told once unless it asks again; asked again, not before another whole idle spell', async () => {
    const sweeper = new IdleSweeper(MS);
    const once = connection(false);
    const twice = connection(true);
    sweeper.add(once);
    sweeper.add(twice);
    while (twice.told.length < 2) await sleep(MS / 4);
    assert.equal(once.told.length, 1);
    assert.ok(twice.told[1]! - twice.told[0]! >= MS - 1);
    sweeper.delete(twice);
  });

  test('one timer for all its connections, stopped when the last one leaves', () => {
    let made = 0;
    const hook = createHook({ init: (_id, type) => void (type === 'Timeout' && made++) }).enable();
    try {
      const sweeper = new IdleSweeper(MS);
      const many = Array.from({ length: 100 }, () => connection(false));
      for (const c of many) sweeper.add(c);
      assert.equal(made, 1, 'one timer for 100 connections');
      for (const c of many) sweeper.delete(c);
      const late = connection(false);
      sweeper.add(late);
      assert.equal(made, 2, 'the first timer stopped with the last connection; the next one starts its own');
      sweeper.delete(late);
    } finally {
      hook.disable();
    }
  });
});

test('unackedBytes reads tx_queue of the asked sockets from /proc/net/tcp text, by inode', () => {
  const text = [
    '  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode',
    '   0: 0100007F:4A6B 0100007F:C350 01 003FA9C0:00000000 01:00000014 00000000     0        0 4842338 1 0000000000000000 20 4 1 10 -1',
    '   1: 0100007F:4A6B 0100007F:C351 01 00000000:00000011 00:00000000 00000000     0        0 4842339 1 0000000000000000 20 4 1 10 -1',
    '   2: 00000000:4A6B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4842340 1 0000000000000000 100 0 0 10 0',
  ].join('\n');
  assert.deepEqual([...unackedBytes(text, new Set(['4842338', '4842339']))], [['4842338', 0x3fa9c0], ['4842339', 0]]);
  assert.equal(unackedBytes(text, new Set(['999'])).size, 0);
  // The digits of a uid (field 8) are no inode: only the 10th field is.
  const uidLike = '   3: 0100007F:4A6B 0100007F:C352 01 00000005:00000000 00:00000000 00000000  4842341        0 7 1 0000000000000000 20 4 1 10 -1';
  assert.deepEqual([...unackedBytes([text, uidLike].join('\n'), new Set(['4842341', '7']))], [['7', 5]]);
});

test('closedByPeer finds a socket whose client closed its side (CLOSE_WAIT, st 08) by inode', () => {
  const text = [
    '  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode',
    '   0: 0100007F:4A6B 0100007F:C350 08 00000000:00000000 00:00000000 00000000     0        0 4842338 1 0000000000000000 20 4 1 10 -1',
    '   1: 0100007F:4A6B 0100007F:C351 01 00000000:00000000 00:00000000 00000000     0        0 4842339 1 0000000000000000 20 4 1 10 -1',
  ].join('\n');
  assert.deepEqual(['4842338', '4842339', '999'].map((inode) => closedByPeer(text, inode)), [true, false, false]);
});
