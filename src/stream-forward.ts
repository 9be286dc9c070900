import type { Readable, Writable } from 'node:stream';

/**
 * Moves a body from `from` into `to`, like `from.pipe(to)`, with two
 * differences that matter for speed (issue #6):
 *
 * - It reads on until `limit` bytes wait in `to`, where pipe() pauses as soon
 *   as `to` passes its 16 KiB high-water mark. Node withholds a paused HTTP/2
 *   stream's WINDOW_UPDATE, so pausing every 16 KiB left MB-sized tensors
 *   waiting on flow control: +20 % calls/s for 2.9 MB gRPC requests.
 * - It adds three listeners per direction where pipe() adds and later removes
 *   about ten, and counts bytes in the same listener.
 *
 * `count` sees every chunk. Returns a function that stops forwarding (what
 * unpipe() was); forwarding also stops by itself once `to` closes.
 */
export function forward(from: Readable, to: Writable, limit: number, count: (bytes: number) => void): () => void {
  const onData = (chunk: Buffer) => {
    count(chunk.length);
    if (to.destroyed) return;
    to.write(chunk);
    // Above the high-water mark write() returned false, so 'drain' will follow.
    if (to.writableLength >= limit) from.pause();
  };
  const onDrain = () => from.resume();
  const onEnd = () => to.end();
  const stop = () => {
    from.off('data', onData);
    from.off('end', onEnd);
    to.off('drain', onDrain);
    to.off('close', stop);
  };
  from.on('data', onData);
  from.once('end', onEnd);
  to.on('drain', onDrain);
  to.once('close', stop);
  return stop;
}
