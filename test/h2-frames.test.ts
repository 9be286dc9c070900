import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { chunked } from './helpers/chunks.js';
import { CLIENT_PREFACE_BYTES, DRAIN_PING_DATA, DrainPingAck, FrameCursor, OpenStreams, SETTINGS_MAX_CONCURRENT_STREAMS, ToClient, gracefulGoAway, withStreamLimit } from '../src/h2-frames.js';

interface Frame {
  type: number;
  flags: number;
  payload: Buffer;
}

function encode(frame: Frame, streamId = 1): Buffer {
  const header = Buffer.alloc(9);
  header.writeUIntBE(frame.payload.length, 0, 3);
  header[3] = frame.type;
  header[4] = frame.flags;
  header.writeUInt32BE(streamId, 5);
  return Buffer.concat([header, frame.payload]);
}

function decode(bytes: Buffer): Frame[] {
  const frames: Frame[] = [];
  for (let i = 0; i < bytes.length;) {
    const length = bytes.readUIntBE(i, 3);
    frames.push({ type: bytes[i + 3]!, flags: bytes[i + 4]!, payload: bytes.subarray(i + 9, i + 9 + length) });
    i += 9 + length;
  }
  return frames;
}

/** Payloads that may hold bytes looking like a GOAWAY frame. */
const payloadArb = fc.oneof(fc.uint8Array({ maxLength: 40 }), fc.constant(gracefulGoAway()), fc.constant(new Uint8Array(0))).map((a) => Buffer.from(a));

/** A frame that stands alone: DATA, RST_STREAM, SETTINGS, PING, WINDOW_UPDATE with any flags. */
const frameArb = fc.record({ type: fc.constantFrom(0x0, 0x3, 0x4, 0x6, 0x8), flags: fc.nat(255), payload: payloadArb });

/** HEADERS then CONTINUATION frames; only the last carries END_HEADERS. Nothing may come between them. */
const headerBlockArb = fc.tuple(fc.array(payloadArb, { minLength: 1, maxLength: 3 }), fc.constantFrom(0x0, 0x1, 0x20)).map(([parts, extra]) =>
  parts.map((payload, i) => ({ type: i === 0 ? 0x1 : 0x9, flags: (i === parts.length - 1 ? 0x4 : 0) | (i === 0 ? extra : 0), payload })));

/** Frames grouped so that a GOAWAY may go between two groups and nowhere else. */
const unitsArb = fc.array(fc.oneof(frameArb.map((f) => [f]), headerBlockArb), { minLength: 1, maxLength: 10 });

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
      { numRuns: 500, includeErrorInReport: true },
    );
  });
});

describe('GOAWAY error codes, for the relay_access line', () => {
  /** A GOAWAY's payload: last stream id, error code, debug data. */
  const goAwayPayload = (code: number, debug: Buffer) => Buffer.concat([Buffer.from([0, 0, 0, 5]), Buffer.from([0, 0, 0, code]), debug]);

  test('each GOAWAY among other frames is reported with its error code and the first 64 bytes of its debug data, however the bytes are chunked', () => {
    const goAwayArb = fc.record({ code: fc.nat(13), debug: fc.uint8Array({ maxLength: 100 }).map((a) => Buffer.from(a)) });
    const unitArb = fc.oneof(frameArb.map((f) => ({ frame: f, goAway: undefined })), goAwayArb.map((g) => ({ frame: { type: 0x7, flags: 0, payload: goAwayPayload(g.code, g.debug) }, goAway: g })));
    fc.assert(
      fc.property(fc.array(unitArb, { maxLength: 8 }), fc.array(fc.nat(), { maxLength: 12 }), (units, cuts) => {
        const seen: [number, string][] = [];
        const cursor = new FrameCursor({ onGoAway: (code, debug) => seen.push([code, debug.toString('hex')]) });
        for (const chunk of chunked(Buffer.concat(units.map((u) => encode(u.frame, 0))), cuts)) cursor.advance(chunk);
        const expected = units.flatMap((u) => (u.goAway ? [[u.goAway.code, u.goAway.debug.subarray(0, 64).toString('hex')] as [number, string]] : []));
        assert.deepEqual(seen, expected);
      }),
      { numRuns: 500, includeErrorInReport: true },
    );
  });

  test('a GOAWAY too short to hold an error code is passed over, and the frames after it still followed', () => {
    const seen: number[] = [];
    const frames: number[] = [];
    const cursor = new FrameCursor({ onGoAway: (code) => seen.push(code), onFrame: (type) => frames.push(type) });
    cursor.advance(Buffer.concat([encode({ type: 0x7, flags: 0, payload: Buffer.alloc(4) }, 0), encode({ type: 0x7, flags: 0, payload: goAwayPayload(11, Buffer.from('too_many_pings')) }, 0), encode({ type: 0x6, flags: 0, payload: Buffer.alloc(8) }, 0)]));
    assert.deepEqual(seen, [11]);
    assert.deepEqual(frames, [0x7, 0x7, 0x6]);
  });
});

describe('GOAWAY insertion between upstream frames', () => {
  test('the GOAWAY, and the PING after it, land between two whole frames, after the first, never inside a header block, however the bytes are chunked', () => {
    fc.assert(
      fc.property(unitsArb, fc.array(fc.nat(), { maxLength: 10 }), fc.nat(), (units, cuts, when) => {
        const frames = units.flat();
        const allowed = new Set(units.map((_, i) => units.slice(0, i + 1).flat().length));
        const input = Buffer.concat(frames.map((f) => encode(f)));
        const chunks = chunked(input, cuts);
        const askAt = when % (chunks.length + 1);
        const out: Buffer[] = [];
        const write = (b: Buffer) => out.push(Buffer.from(b));
        const inserter = new ToClient();
        chunks.forEach((chunk, i) => {
          if (i === askAt) inserter.request(write);
          inserter.pass(chunk, write);
        });
        if (askAt === chunks.length) inserter.request(write);
        // Once every frame has passed, the stream is between frames: the GOAWAY is always out.
        assert.equal(inserter.sent, true);
        const result = decode(Buffer.concat(out));
        assert.equal(result.length, frames.length + 2);
        const at = result.findIndex((f) => f.type === 0x7);
        assert.ok(allowed.has(at), `GOAWAY at ${at}, allowed after ${[...allowed].join(',')}`);
        assert.deepEqual(result[at], { type: 0x7, flags: 0, payload: gracefulGoAway().subarray(9) });
        assert.deepEqual(result[at + 1], { type: 0x6, flags: 0, payload: DRAIN_PING_DATA });
        const rest = result.filter((_, i) => i !== at && i !== at + 1);
        assert.deepEqual(rest.map((f) => [f.type, f.flags, f.payload.toString('hex')]), frames.map((f) => [f.type, f.flags, f.payload.toString('hex')]));
      }),
      { numRuns: 500, includeErrorInReport: true },
    );
  });

  test("after the upstream's own GOAWAY none of ours follows (it would raise the last stream id)", () => {
    const out: Buffer[] = [];
    const inserter = new ToClient();
    const theirs = encode({ type: 0x7, flags: 0, payload: Buffer.from('0000000300000000', 'hex') }, 0);
    inserter.pass(Buffer.concat([encode({ type: 0x4, flags: 0, payload: Buffer.alloc(0) }, 0), theirs]), (b) => out.push(b));
    inserter.request((b) => out.push(b));
    assert.equal(inserter.sent, false);
    assert.deepEqual(decode(Buffer.concat(out)).map((f) => f.type), [0x4, 0x7]);
  });

  test("a GOAWAY of ours that is waiting goes out before the upstream's own", () => {
    const out: Buffer[] = [];
    const inserter = new ToClient();
    inserter.request((b) => out.push(b));
    const theirs = encode({ type: 0x7, flags: 0, payload: Buffer.from('0000000300000000', 'hex') }, 0);
    inserter.pass(Buffer.concat([encode({ type: 0x4, flags: 0, payload: Buffer.alloc(0) }, 0), theirs]), (b) => out.push(b));
    const frames = decode(Buffer.concat(out));
    assert.deepEqual(frames.map((f) => f.type), [0x4, 0x7, 0x6, 0x7]);
    assert.equal(frames[1]!.payload.readUInt32BE(0), 0x7fffffff);
    assert.equal(frames[3]!.payload.readUInt32BE(0), 3);
  });

  test('asked twice, it sends one GOAWAY', () => {
    const out: Buffer[] = [];
    const inserter = new ToClient();
    inserter.pass(encode({ type: 0x4, flags: 0, payload: Buffer.alloc(0) }), (b) => out.push(b));
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

describe("the model server's SETTINGS toward the client, with our stream limit", () => {
  const CAP = 100;
  const entry = (id: number, value: number) => {
    const bytes = Buffer.alloc(6);
    bytes.writeUInt16BE(id, 0);
    bytes.writeUInt32BE(value, 2);
    return bytes;
  };
  const entryArb = fc.tuple(fc.constantFrom(1, 2, 3, 3, 4, 5, 6), fc.oneof(fc.nat(2 * CAP), fc.constant(0xffffffff), fc.nat(0xffffffff))).map(([id, value]) => entry(id, value));
  const settingsArb = fc.array(entryArb, { maxLength: 5 }).map((entries): Frame => ({ type: 0x4, flags: 0, payload: Buffer.concat(entries) }));
  /** What the client should get of a frame: a SETTINGS payload's stream limits at most CAP (in its whole 6-byte entries). */
  const expected = (frame: Frame): Frame => {
    if (frame.type !== 0x4) return frame;
    const payload = Buffer.from(frame.payload);
    for (let at = 0; at + 6 <= payload.length; at += 6) if (payload.readUInt16BE(at) === SETTINGS_MAX_CONCURRENT_STREAMS && payload.readUInt32BE(at + 2) > CAP) payload.writeUInt32BE(CAP, at + 2);
    return { ...frame, payload };
  };
  const shown = (frames: readonly Frame[]) => frames.map((f) => [f.type, f.flags, f.payload.toString('hex')]);

  test('each SETTINGS_MAX_CONCURRENT_STREAMS over ours is lowered to it and every other byte passes unchanged, however the bytes are chunked; a GOAWAY of ours still lands between two whole frames', () => {
    fc.assert(
      fc.property(fc.array(fc.oneof(settingsArb.map((f) => [f]), frameArb.map((f) => [f]), headerBlockArb), { minLength: 1, maxLength: 10 }), fc.array(fc.nat(), { maxLength: 10 }), fc.option(fc.nat()), (units, cuts, when) => {
        const frames = units.flat();
        const allowed = new Set(units.map((_, i) => units.slice(0, i + 1).flat().length));
        const chunks = chunked(Buffer.concat(frames.map((f) => encode(f, 0))), cuts);
        const askAt = when === null ? -1 : when % (chunks.length + 1);
        const out: Buffer[] = [];
        const write = (b: Buffer) => out.push(Buffer.from(b));
        const toClient = new ToClient({ maxConcurrentStreams: CAP });
        chunks.forEach((chunk, i) => {
          if (i === askAt) toClient.request(write);
          toClient.pass(chunk, write);
        });
        if (askAt === chunks.length) toClient.request(write);
        const result = decode(Buffer.concat(out));
        const at = result.findIndex((f, i) => f.type === 0x7 && f.payload.equals(gracefulGoAway().subarray(9)) && result[i + 1]?.payload.equals(DRAIN_PING_DATA));
        if (askAt >= 0) assert.ok(allowed.has(at), `GOAWAY at ${at}, allowed after ${[...allowed].join(',')}`);
        const relayed = askAt >= 0 ? result.filter((_, i) => i !== at && i !== at + 1) : result;
        assert.deepEqual(shown(relayed), shown(frames.map(expected)));
      }),
      { numRuns: 1000, includeErrorInReport: true },
    );
  });

  test("the first SETTINGS gets our limit added when it names none (unlimited), lowered when it allows more (by ToClient, as every SETTINGS), and keeps a smaller one and every other setting", () => {
    const frame = (...entries: Buffer[]) => encode({ type: 0x4, flags: 0, payload: Buffer.concat(entries) }, 0);
    const cases: [Buffer, Buffer][] = [
      [frame(), frame(entry(SETTINGS_MAX_CONCURRENT_STREAMS, CAP))],
      [frame(entry(4, 65535)), frame(entry(4, 65535), entry(SETTINGS_MAX_CONCURRENT_STREAMS, CAP))],
      [frame(entry(SETTINGS_MAX_CONCURRENT_STREAMS, 0xffffffff), entry(6, 8192)), frame(entry(SETTINGS_MAX_CONCURRENT_STREAMS, CAP), entry(6, 8192))],
      [frame(entry(6, 8192), entry(SETTINGS_MAX_CONCURRENT_STREAMS, 4)), frame(entry(6, 8192), entry(SETTINGS_MAX_CONCURRENT_STREAMS, 4))],
    ];
    for (const [given, told] of cases) {
      const out: Buffer[] = [];
      new ToClient({ maxConcurrentStreams: CAP }).pass(withStreamLimit(given, CAP), (b) => out.push(Buffer.from(b)));
      assert.equal(Buffer.concat(out).toString('hex'), told.toString('hex'));
    }
  });
});

describe("the client's ACK of the PING after our GOAWAY", () => {
  const ping = (flags: number, data: Buffer) => ({ type: 0x6, flags, payload: data });
  /** PINGs that are not the ACK of ours: the client's own with our data, ACKs of the model server's, a malformed one. */
  const otherPingArb = fc.constantFrom(ping(0, DRAIN_PING_DATA), ping(1, Buffer.from('c-core!!')), ping(1, Buffer.from('ovms-mtl!')), ping(1, DRAIN_PING_DATA.subarray(0, 7)));
  const otherArb = fc.oneof(frameArb, otherPingArb);

  test('is taken out of the bytes, whatever comes around it and however they are chunked; onAck comes after the rest of the read that carried it (a client writes its ACK and the frames after it in one go), before the next read', () => {
    fc.assert(
      fc.property(fc.array(otherArb, { maxLength: 6 }), fc.option(fc.array(otherArb, { maxLength: 6 })), fc.array(fc.nat(), { maxLength: 12 }), (before, after, cuts) => {
        const ours = encode(ping(1, DRAIN_PING_DATA), 0);
        const head = Buffer.concat(before.map((f) => encode(f, 0)));
        const tail = after === null ? Buffer.alloc(0) : Buffer.concat(after.map((f) => encode(f, 0)));
        const input = after === null ? head : Buffer.concat([head, ours, tail]);
        const out: Buffer[] = [];
        let ackAt: number | undefined;
        const catcher = new DrainPingAck();
        let read = 0;
        /** Input bytes up to the end of the read in which the ACK was whole. */
        let readOfTheAck: number | undefined;
        for (const chunk of chunked(input, cuts)) {
          read += chunk.length;
          if (readOfTheAck === undefined && read >= head.length + ours.length) readOfTheAck = read;
          catcher.pass(chunk, (piece) => out.push(Buffer.from(piece)), () => (ackAt = Buffer.concat(out).length));
        }
        const passed = Buffer.concat(out);
        if (after === null) {
          // No ACK: everything passes; nothing is held back once the last frame is whole.
          assert.equal(ackAt, undefined);
          assert.equal(passed.toString('hex'), head.toString('hex'));
        } else {
          assert.equal(ackAt, readOfTheAck! - ours.length);
          assert.equal(passed.toString('hex'), Buffer.concat([head, tail]).toString('hex'));
        }
      }),
      { numRuns: 1000, includeErrorInReport: true },
    );
  });

  test('after it, bytes pass as they come, even ones that look like it', () => {
    const catcher = new DrainPingAck();
    const out: Buffer[] = [];
    const ours = encode(ping(1, DRAIN_PING_DATA), 0);
    catcher.pass(Buffer.concat([ours, ours.subarray(0, 5)]), (piece) => out.push(piece), () => {});
    catcher.pass(ours.subarray(5), (piece) => out.push(piece), () => assert.fail('once only'));
    assert.equal(Buffer.concat(out).toString('hex'), ours.toString('hex'));
  });
});

const [DATA, HEADERS, RST_STREAM, PUSH_PROMISE, WINDOW_UPDATE] = [0x0, 0x1, 0x3, 0x5, 0x8];
const END_STREAM = 0x1;

/** Frames in order: C = from the client, S = from the server; [type, flags, stream id]. */
type Step = ['C' | 'S', number, number, number];

function follow(steps: readonly Step[], streams = new OpenStreams()): OpenStreams {
  for (const [side, type, flags, id] of steps) (side === 'C' ? streams.fromClient : streams.fromServer)(type, id, flags);
  return streams;
}

describe('open streams, from the frame headers of both directions', () => {
  const cases: [string, Step[], number][] = [
    ['a unary call in flight: the client has ended its side, the server not yet', [['C', HEADERS, 0x4, 1], ['C', DATA, END_STREAM, 1], ['S', HEADERS, 0x4, 1], ['S', DATA, 0, 1]], 1],
    ['a unary call answered: both sides sent END_STREAM (the server on its trailers)', [['C', HEADERS, 0x4, 1], ['C', DATA, END_STREAM, 1], ['S', HEADERS, 0x4, 1], ['S', DATA, 0, 1], ['S', HEADERS, 0x4 | END_STREAM, 1]], 0],
    ['a Trailers-Only answer to a request without a body', [['C', HEADERS, 0x4 | END_STREAM, 1], ['S', HEADERS, 0x4 | END_STREAM, 1]], 0],
    ['the server answered first; the client is still sending', [['C', HEADERS, 0x4, 1], ['S', HEADERS, 0x4 | END_STREAM, 1], ['C', DATA, 0, 1]], 1],
    ['then the client ends too', [['C', HEADERS, 0x4, 1], ['S', HEADERS, 0x4 | END_STREAM, 1], ['C', DATA, END_STREAM, 1]], 0],
    ['the client cancels (RST_STREAM)', [['C', HEADERS, 0x4, 1], ['C', RST_STREAM, 0, 1]], 0],
    ['the server refuses (RST_STREAM)', [['C', HEADERS, 0x4, 1], ['S', RST_STREAM, 0, 1]], 0],
    ['client trailers (HEADERS on a known id) open nothing new', [['C', HEADERS, 0x4, 1], ['C', DATA, 0, 1], ['C', HEADERS, 0x4 | END_STREAM, 1]], 1],
    ['END_STREAM means nothing on other frame types', [['C', HEADERS, 0x4, 1], ['C', WINDOW_UPDATE, END_STREAM, 1], ['S', WINDOW_UPDATE, END_STREAM, 1]], 1],
    ['frames of a stream already closed change nothing', [['C', HEADERS, 0x4, 1], ['C', RST_STREAM, 0, 1], ['S', DATA, END_STREAM, 1], ['C', RST_STREAM, 0, 1], ['C', HEADERS, 0x4, 1]], 0],
    ['server-pushed streams are not counted', [['S', PUSH_PROMISE, 0x4, 1], ['S', HEADERS, 0x4, 2]], 0],
    ['several calls at once', [['C', HEADERS, 0x4, 1], ['C', HEADERS, 0x4, 3], ['C', HEADERS, 0x4, 5], ['S', RST_STREAM, 0, 3]], 2],
  ];
  for (const [name, steps, open] of cases) {
    test(`${name}: ${open} open`, () => {
      assert.equal(follow(steps).open, open);
    });
  }

  test('the connection is idle from when its last open stream closed', async () => {
    const streams = follow([['C', HEADERS, 0x4, 1], ['C', HEADERS, 0x4, 3], ['C', RST_STREAM, 0, 1]]);
    const busySince = streams.idleSince;
    await new Promise((resolve) => setTimeout(resolve, 5));
    assert.equal(streams.idleSince, busySince, 'a stream is still open');
    follow([['S', RST_STREAM, 0, 3]], streams);
    assert.ok(streams.idleSince > busySince);
  });

  test('calls still waiting for their answer, up to a last stream id: a stream the server has ended is not one, though the client still sends', () => {
    const streams = follow([['C', HEADERS, 0x4, 1], ['C', HEADERS, 0x4, 3], ['C', HEADERS, 0x4, 5], ['S', HEADERS, 0x4, 1], ['S', HEADERS, 0x4 | END_STREAM, 3]]);
    assert.equal(streams.open, 3);
    assert.equal(streams.unansweredUpTo(2 ** 31 - 1), 2);
    assert.equal(streams.unansweredUpTo(3), 1);
    assert.equal(streams.unansweredUpTo(0), 0);
  });

  test("the streams past the last stream id of the server's GOAWAY are closed: it never processed them, and the client takes them for closed", () => {
    const streams = follow([['C', HEADERS, 0x4, 1], ['C', HEADERS, 0x4, 3], ['C', HEADERS, 0x4, 5], ['C', HEADERS, 0x4, 7]]);
    streams.closeAbove(3);
    assert.equal(streams.open, 2);
    assert.equal(streams.unansweredUpTo(2 ** 31 - 1), 2);
  });

  test('each new stream id is a call; trailers and frames of old ids are not', () => {
    const streams = follow([['C', HEADERS, 0x4, 1], ['C', HEADERS, 0x4 | END_STREAM, 1], ['C', HEADERS, 0x4, 3], ['C', HEADERS, 0x4, 1]]);
    assert.equal(streams.started, 2);
  });
});
