import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { CLIENT_PREFACE_BYTES, FrameCursor, GoAwayInserter, gracefulGoAway } from '../src/h2-frames.js';

interface Frame {
  type: number;
  payload: Buffer;
}

function encode(frame: Frame, streamId = 1): Buffer {
  const header = Buffer.alloc(9);
  header.writeUIntBE(frame.payload.length, 0, 3);
  header[3] = frame.type;
  header.writeUInt32BE(streamId, 5);
  return Buffer.concat([header, frame.payload]);
}

function decode(bytes: Buffer): Frame[] {
  const frames: Frame[] = [];
  for (let i = 0; i < bytes.length;) {
    const length = bytes.readUIntBE(i, 3);
    frames.push({ type: bytes[i + 3]!, payload: bytes.subarray(i + 9, i + 9 + length) });
    i += 9 + length;
  }
  return frames;
}

/** Frames whose payload may hold bytes that look like a GOAWAY header, cut into arbitrary chunks. */
const frameArb = fc.record({
  type: fc.constantFrom(0x0, 0x1, 0x4, 0x6, 0x8),
  payload: fc.oneof(fc.uint8Array({ maxLength: 40 }), fc.constant(gracefulGoAway()), fc.uint8Array({ minLength: 0, maxLength: 0 })).map((a) => Buffer.from(a)),
});

function chunked(bytes: Buffer, cuts: number[]): Buffer[] {
  const points = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
  const chunks: Buffer[] = [];
  let last = 0;
  for (const p of [...points, bytes.length]) {
    chunks.push(bytes.subarray(last, p));
    last = p;
  }
  return chunks.filter((c) => c.length > 0);
}

describe('frame headers toward the upstream', () => {
  test('after the client preface, every frame header is seen once, in order, however the bytes are chunked', () => {
    const preface = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n');
    assert.equal(preface.length, CLIENT_PREFACE_BYTES);
    fc.assert(
      fc.property(fc.array(fc.tuple(frameArb, fc.integer({ min: 0, max: 2 ** 31 - 1 })), { maxLength: 12 }), fc.array(fc.nat(), { maxLength: 10 }), (frames, cuts) => {
        const input = Buffer.concat([preface, ...frames.map(([f, id]) => encode(f, id))]);
        const seen: [number, number][] = [];
        const cursor = new FrameCursor({ skip: CLIENT_PREFACE_BYTES, onFrame: (type, id) => seen.push([type, id]) });
        for (const chunk of chunked(input, cuts)) cursor.advance(chunk);
        assert.deepEqual(seen, frames.map(([f, id]) => [f.type, id]));
      }),
      { numRuns: 500 },
    );
  });
});

describe('GOAWAY insertion between upstream frames', () => {
  test('the GOAWAY lands between two whole frames, after the first, however the bytes are chunked', () => {
    fc.assert(
      fc.property(fc.array(frameArb, { minLength: 1, maxLength: 12 }), fc.array(fc.nat(), { maxLength: 10 }), fc.nat(), (frames, cuts, when) => {
        const input = Buffer.concat(frames.map(encode));
        const chunks = chunked(input, cuts);
        const askAt = when % (chunks.length + 1);
        const out: Buffer[] = [];
        const write = (b: Buffer) => out.push(Buffer.from(b));
        const inserter = new GoAwayInserter();
        chunks.forEach((chunk, i) => {
          if (i === askAt) inserter.request(write);
          inserter.pass(chunk, write);
        });
        if (askAt === chunks.length) inserter.request(write);
        // Once every frame has passed, the stream is between frames: the GOAWAY is always out.
        assert.equal(inserter.sent, true);
        const result = decode(Buffer.concat(out));
        assert.equal(result.length, frames.length + 1);
        const at = result.findIndex((f) => f.type === 0x7);
        assert.ok(at >= 1, 'never before the first upstream frame');
        assert.deepEqual(result[at], { type: 0x7, payload: gracefulGoAway().subarray(9) });
        const rest = result.filter((_, i) => i !== at);
        assert.deepEqual(rest.map((f) => [f.type, f.payload.toString('hex')]), frames.map((f) => [f.type, f.payload.toString('hex')]));
      }),
      { numRuns: 500 },
    );
  });

  test('asked twice, it sends one GOAWAY', () => {
    const out: Buffer[] = [];
    const inserter = new GoAwayInserter();
    inserter.pass(encode({ type: 0x4, payload: Buffer.alloc(0) }), (b) => out.push(b));
    inserter.request((b) => out.push(b));
    inserter.request((b) => out.push(b));
    assert.equal(decode(Buffer.concat(out)).filter((f) => f.type === 0x7).length, 1);
  });

  test('the GOAWAY is graceful: last stream id 2^31-1, NO_ERROR, on stream 0', () => {
    const frame = gracefulGoAway();
    assert.equal(frame.readUIntBE(0, 3), 8);
    assert.equal(frame[3], 0x7);
    assert.equal(frame.readUInt32BE(5), 0);
    assert.equal(frame.readUInt32BE(9), 0x7fffffff);
    assert.equal(frame.readUInt32BE(13), 0);
  });
});
