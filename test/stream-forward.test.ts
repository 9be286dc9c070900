/**
 * forward() (src/stream-forward.ts), which carries every gRPC body in terminate mode, against
 * writables with either high-water mark Node gives an HTTP/2 stream: 16 KiB on Node 20, 64 KiB on
 * Node 22 and later. CI runs Node 20, so the 64 KiB case is built here rather than waited for.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { Readable, Writable } from 'node:stream';
import { forward } from '../src/stream-forward.js';
import { settlesWithin } from './helpers/ops.js';

/** --mtls_stream_window at its smallest: one byte under Node 22+'s high-water mark. */
const SMALLEST_STREAM_WINDOW = 65_535;
const CHUNK = 16_384;
const TOTAL = SMALLEST_STREAM_WINDOW + 16 * CHUNK;

/** A sink that takes each chunk a turn later, as a stream waiting for flow-control window does. */
function slowSink(highWaterMark: number): { sink: Writable; received: () => number } {
  let received = 0;
  const sink = new Writable({
    highWaterMark,
    write(chunk: Buffer, _encoding, done) {
      received += chunk.length;
      setImmediate(done);
    },
  });
  return { sink, received: () => received };
}

/**
 * The body as an HTTP/2 client sends it under a window of SMALLEST_STREAM_WINDOW: that many bytes first (all the
 * window lets through before the proxy reads on), then the rest as the window opens.
 */
function source(): Readable {
  const pieces = [SMALLEST_STREAM_WINDOW, ...Array.from({ length: 16 }, () => CHUNK)];
  return new Readable({
    read() {
      const size = pieces.shift();
      this.push(size === undefined ? null : Buffer.alloc(size, pieces.length));
    },
  });
}

for (const highWaterMark of [16_384, 65_536]) {
  test(`a body forwarded with a limit of ${SMALLEST_STREAM_WINDOW} into a writable whose high-water mark is ${highWaterMark} arrives whole (Node 22+'s 64 KiB mark had it paused for a 'drain' that never came)`, async () => {
    const { sink, received } = slowSink(highWaterMark);
    let counted = 0;
    forward(source(), sink, SMALLEST_STREAM_WINDOW, (bytes) => (counted += bytes));
    await settlesWithin(once(sink, 'finish'), 20_000, `all ${TOTAL} bytes written`);
    assert.equal(received(), TOTAL);
    assert.equal(counted, TOTAL);
  });
}
