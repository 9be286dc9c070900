import { test } from 'node:test';
import assert from 'node:assert/strict';
import { freeLoopbackPorts, LoopbackUpstreams } from '../src/ports.js';

test("the entrypoint never chooses one of its own public or admin ports for OVMS, though they were free when chosen and are bound only afterwards", async () => {
  // Ports picked as an operator or a test picks them, free until the listeners bind them; the
  // system offers free ports at random, so without the exclusion some of 400 picks would land on them.
  const ours = await freeLoopbackPorts(300);
  const upstreams = new LoopbackUpstreams({ grpc: true, rest: true }, '127.0.0.1', ours);
  for (let i = 0; i < 200; i += 1) {
    await upstreams.choose();
    const { grpc, rest } = upstreams.current();
    assert.ok(grpc && rest && grpc !== rest);
    assert.ok(!ours.includes(grpc) && !ours.includes(rest), `OVMS was given ${grpc} and ${rest}, one of them ours`);
  }
});

test('freeLoopbackPorts gives distinct ports, none of those it is told to leave out', async () => {
  const except = new Set(await freeLoopbackPorts(100));
  const ports = await freeLoopbackPorts(50, '127.0.0.1', except);
  assert.equal(new Set(ports).size, 50);
  assert.ok(ports.every((port) => !except.has(port)));
});
