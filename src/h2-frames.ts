import type { StreamActivity } from './idle-sweep.js';

/**
 * Just enough HTTP/2 framing for the relay: where frames begin and end in one
 * direction of a connection, read from the 9-byte frame headers alone (RFC 9113
 * section 4.1: 24-bit payload length, type, flags, stream id). Payloads and
 * HPACK are never looked at.
 */
const FRAME_HEADER_BYTES = 9;
const TYPE_DATA = 0x0;
export const TYPE_RST_STREAM = 0x3;
const TYPE_GOAWAY = 0x7;
const TYPE_PUSH_PROMISE = 0x5;
export const TYPE_SETTINGS = 0x4;
const TYPE_PING = 0x6;
const TYPE_CONTINUATION = 0x9;
const FLAG_END_STREAM = 0x1;
const FLAG_END_HEADERS = 0x4;
export const FLAG_ACK = 0x1;
const MAX_STREAM_ID = 0x7fffffff;
const NO_ERROR = 0x0;
export const PROTOCOL_ERROR = 0x1;
export const ENHANCE_YOUR_CALM = 0xb;

/** The client's connection preface (RFC 9113 section 3.4) comes before its first frame. */
export const CLIENT_PREFACE_BYTES = 24;
export const TYPE_HEADERS = 0x1;

export interface FrameCursorOptions {
  /** Bytes before the first frame (the client's preface). */
  readonly skip?: number;
  /** Called with each frame header as it is read. */
  readonly onFrame?: OnFrame;
  /** Called with each GOAWAY's error code and the start of its debug data, once those bytes are in. */
  readonly onGoAway?: OnGoAway;
  /** A frame type whose payload the caller holds back: `advance` returns right after the header of each such frame that has one. */
  readonly stopAfterHeaderOf?: number;
}

export type OnFrame = (type: number, streamId: number, flags: number) => void;
export type OnGoAway = (errorCode: number, debug: Buffer, lastStreamId: number) => void;

/** A GOAWAY's last stream id and error code (RFC 9113 section 6.8), then this much of its debug data: enough for a reason such as C-core's "too_many_pings". */
const GOAWAY_FIXED_BYTES = 8;
const GOAWAY_DEBUG_KEPT = 64;

export class FrameCursor {
  readonly #header = Buffer.alloc(FRAME_HEADER_BYTES);
  readonly #onFrame: OnFrame | undefined;
  readonly #onGoAway: OnGoAway | undefined;
  readonly #stopType: number;
  #stopAfterHeader = false;
  /** The start of a GOAWAY's payload, while its bytes arrive (GOAWAYs are rare: the one payload that is read). */
  #goAway: Buffer | undefined;
  #goAwayFill = 0;
  #skip: number;
  #headerFill = 0;
  #payloadLeft = 0;
  #sawFrame = false;
  /** Inside a header block (HEADERS or PUSH_PROMISE without END_HEADERS, then CONTINUATION): no other frame may come between. */
  #inHeaderBlock = false;

  constructor(options: FrameCursorOptions = {}) {
    this.#skip = options.skip ?? 0;
    this.#onFrame = options.onFrame;
    this.#onGoAway = options.onGoAway;
    this.#stopType = options.stopAfterHeaderOf ?? -1;
  }

  /** What is still to come of the current frame's payload. */
  get payloadLeft(): number {
    return this.#payloadLeft;
  }

  /**
   * Between two frames where another frame may go: after at least one whole frame (a GOAWAY
   * may not precede the peer's SETTINGS) and not inside a header block.
   */
  get atBoundary(): boolean {
    return this.#sawFrame && this.#headerFill === 0 && this.#payloadLeft === 0 && !this.#inHeaderBlock;
  }

  /** Between two frames (or before the first), wherever the last read ended. */
  get betweenFrames(): boolean {
    return this.#skip === 0 && this.#headerFill === 0 && this.#payloadLeft === 0;
  }

  /**
   * Follows the frames in `chunk`. With `stopAtBoundary`, stops at the first
   * frame boundary strictly inside the chunk and returns its offset; otherwise
   * (or when there is none) consumes it all and returns its length. Also stops
   * right after the header of a `stopAfterHeaderOf` frame with a payload.
   */
  advance(chunk: Buffer, stopAtBoundary = false): number {
    const length = chunk.length;
    let i = 0;
    while (i < length) {
      if (this.#skip > 0) {
        const n = Math.min(this.#skip, length - i);
        this.#skip -= n;
        i += n;
        continue;
      }
      if (this.#payloadLeft > 0) {
        const n = Math.min(this.#payloadLeft, length - i);
        if (this.#goAway !== undefined) this.#keepGoAway(chunk, i, n);
        this.#payloadLeft -= n;
        i += n;
      } else if (this.#headerFill === 0 && length - i >= FRAME_HEADER_BYTES) {
        this.#payloadLeft = chunk.readUIntBE(i, 3);
        this.#frameHeader(chunk[i + 3]!, chunk[i + 4]!, chunk.readUInt32BE(i + 5) & MAX_STREAM_ID);
        i += FRAME_HEADER_BYTES;
      } else {
        const n = Math.min(FRAME_HEADER_BYTES - this.#headerFill, length - i);
        chunk.copy(this.#header, this.#headerFill, i, i + n);
        this.#headerFill += n;
        i += n;
        if (this.#headerFill < FRAME_HEADER_BYTES) continue;
        this.#headerFill = 0;
        this.#payloadLeft = this.#header.readUIntBE(0, 3);
        this.#frameHeader(this.#header[3]!, this.#header[4]!, this.#header.readUInt32BE(5) & MAX_STREAM_ID);
      }
      if (this.#stopAfterHeader) {
        this.#stopAfterHeader = false;
        return i;
      }
      if (this.#payloadLeft === 0 && this.#headerFill === 0) {
        this.#sawFrame = true;
        if (stopAtBoundary && i < length && !this.#inHeaderBlock) return i;
      }
    }
    return length;
  }

  #frameHeader(type: number, flags: number, streamId: number): void {
    if (type === this.#stopType && this.#payloadLeft > 0) this.#stopAfterHeader = true;
    if (type === TYPE_HEADERS || type === TYPE_PUSH_PROMISE || type === TYPE_CONTINUATION) this.#inHeaderBlock = (flags & FLAG_END_HEADERS) === 0;
    else if (type === TYPE_GOAWAY && this.#onGoAway !== undefined && this.#payloadLeft >= GOAWAY_FIXED_BYTES) {
      this.#goAway = Buffer.allocUnsafe(Math.min(this.#payloadLeft, GOAWAY_FIXED_BYTES + GOAWAY_DEBUG_KEPT));
      this.#goAwayFill = 0;
    }
    this.#onFrame?.(type, streamId, flags);
  }

  /** Copies what this read has of the GOAWAY's kept bytes; reports it once they are all in. */
  #keepGoAway(chunk: Buffer, at: number, available: number): void {
    const kept = this.#goAway!;
    const n = Math.min(available, kept.length - this.#goAwayFill);
    chunk.copy(kept, this.#goAwayFill, at, at + n);
    this.#goAwayFill += n;
    if (this.#goAwayFill < kept.length) return;
    this.#goAway = undefined;
    this.#onGoAway!(kept.readUInt32BE(4), kept.subarray(GOAWAY_FIXED_BYTES), kept.readUInt32BE(0) & MAX_STREAM_ID);
  }
}

export interface ToClientOptions {
  /** Sees each of the upstream's frame headers as it goes by. */
  readonly onFrame?: OnFrame;
  /** Sees each of the upstream's GOAWAYs. */
  readonly onGoAway?: OnGoAway;
  /** Our own limit of streams per client: each SETTINGS_MAX_CONCURRENT_STREAMS of the upstream's SETTINGS is lowered to it. */
  readonly maxConcurrentStreams?: number;
}

/** A SETTINGS payload of the upstream's, held back until it is whole. */
interface HeldSettings {
  readonly payload: Buffer;
  fill: number;
}

/**
 * The upstream-to-client direction: passes the upstream's bytes on as they come, but for the
 * payload of a SETTINGS frame, held until whole and its stream limit lowered to ours (its length
 * never changes, so its header has gone before it); when asked, slips a graceful GOAWAY in at
 * the next frame boundary.
 */
export class ToClient {
  readonly #cursor: FrameCursor;
  readonly #onUpstreamFrame: OnFrame | undefined;
  readonly #maxStreams: number | undefined;
  #held: HeldSettings | undefined;
  #pending = false;
  #sent = false;
  /** The upstream's own GOAWAY went by: ours (last stream id 2^31-1) would raise its last stream id, a protocol error. */
  #upstreamWentAway = false;

  constructor(options: ToClientOptions = {}) {
    this.#onUpstreamFrame = options.onFrame;
    this.#maxStreams = options.maxConcurrentStreams;
    const stopAfterHeaderOf = this.#maxStreams === undefined ? undefined : TYPE_SETTINGS;
    this.#cursor = new FrameCursor({ onFrame: (type, id, flags) => this.#onFrame(type, id, flags), onGoAway: options.onGoAway, stopAfterHeaderOf });
  }

  get sent(): boolean {
    return this.#sent;
  }

  /** Between two of the upstream's frames, where a frame of ours may go. */
  get atBoundary(): boolean {
    return this.#cursor.atBoundary;
  }

  /** Sends the GOAWAY now if between frames, else with the next boundary that `pass` crosses. */
  request(write: (chunk: Buffer) => void): void {
    if (this.#sent || this.#pending || this.#upstreamWentAway) return;
    this.#pending = true;
    if (this.#cursor.atBoundary) this.#send(write);
  }

  pass(chunk: Buffer, write: (chunk: Buffer) => void): void {
    if (this.#pending || this.#held) {
      this.#passPiecewise(chunk, write);
      return;
    }
    const at = this.#cursor.advance(chunk);
    if (!this.#held) {
      write(chunk);
      return;
    }
    // A SETTINGS frame header ends at `at`: what came up to there goes, its payload is held.
    write(chunk.subarray(0, at));
    if (at < chunk.length) this.#passPiecewise(chunk.subarray(at), write);
  }

  /** The slow way, for a chunk with a SETTINGS payload in it or a GOAWAY of ours waiting. */
  #passPiecewise(chunk: Buffer, write: (chunk: Buffer) => void): void {
    let at = 0;
    while (at < chunk.length) {
      if (this.#held) {
        at = this.#holdSettings(this.#held, chunk, at, write);
      } else {
        const rest = at === 0 ? chunk : chunk.subarray(at);
        const taken = this.#cursor.advance(rest, this.#pending);
        write(taken === rest.length ? rest : rest.subarray(0, taken));
        at += taken;
      }
      if (this.#pending && this.#cursor.atBoundary) this.#send(write);
    }
  }

  /** Takes what `chunk` has of the held SETTINGS payload from `at`; writes the frame's payload once whole. Returns where its bytes end. */
  #holdSettings(held: HeldSettings, chunk: Buffer, at: number, write: (chunk: Buffer) => void): number {
    const end = Math.min(chunk.length, at + held.payload.length - held.fill);
    chunk.copy(held.payload, held.fill, at, end);
    held.fill += end - at;
    this.#cursor.advance(chunk.subarray(at, end));
    if (held.fill === held.payload.length) {
      this.#held = undefined;
      capConcurrentStreams(held.payload, this.#maxStreams!);
      write(held.payload);
    }
    return end;
  }

  #onFrame(type: number, streamId: number, flags: number): void {
    // Ours, if pending, goes out at the boundary before this frame: the lower id then follows it.
    if (type === TYPE_GOAWAY && !this.#sent) this.#upstreamWentAway = true;
    else if (type === TYPE_SETTINGS && this.#maxStreams !== undefined && this.#cursor.payloadLeft > 0) this.#held = { payload: Buffer.alloc(this.#cursor.payloadLeft), fill: 0 };
    this.#onUpstreamFrame?.(type, streamId, flags);
  }

  #send(write: (chunk: Buffer) => void): void {
    this.#pending = false;
    this.#sent = true;
    write(GOAWAY_THEN_PING);
  }
}

/** The stream limit's identifier in a SETTINGS payload (RFC 9113 6.5.2). */
export const SETTINGS_MAX_CONCURRENT_STREAMS = 0x3;
const SETTING_BYTES = 6;

/** Each SETTINGS_MAX_CONCURRENT_STREAMS entry of a SETTINGS payload: the offset of its value. */
function* streamLimits(payload: Buffer): Generator<number> {
  for (let at = 0; at + SETTING_BYTES <= payload.length; at += SETTING_BYTES) if (payload.readUInt16BE(at) === SETTINGS_MAX_CONCURRENT_STREAMS) yield at + 2;
}

function namesStreamLimit(payload: Buffer): boolean {
  return streamLimits(payload).next().done !== true;
}

/** Lowers each SETTINGS_MAX_CONCURRENT_STREAMS of a SETTINGS payload to `cap`, in place. */
function capConcurrentStreams(payload: Buffer, cap: number): void {
  for (const value of streamLimits(payload)) if (payload.readUInt32BE(value) > cap) payload.writeUInt32BE(cap, value);
}

/**
 * The server's first SETTINGS frame, whole, naming a stream limit: as it is when it names one (ToClient
 * lowers it to ours, as it lowers those of every SETTINGS), else with ours added (6 bytes more, which only
 * the whole frame can take), as naming none there means unlimited (RFC 9113 6.5.2). A later SETTINGS that
 * names none leaves the limit as it was, so only the first needs one.
 */
export function withStreamLimit(frame: Buffer, cap: number): Buffer {
  if (namesStreamLimit(frame.subarray(FRAME_HEADER_BYTES))) return frame;
  const grown = Buffer.alloc(frame.length + SETTING_BYTES);
  frame.copy(grown);
  grown.writeUIntBE(frame.length - FRAME_HEADER_BYTES + SETTING_BYTES, 0, 3);
  grown.writeUInt16BE(SETTINGS_MAX_CONCURRENT_STREAMS, frame.length);
  grown.writeUInt32BE(cap, frame.length + 2);
  return grown;
}

/** An empty SETTINGS frame: a server preface (RFC 9113 3.4), all settings at their defaults. */
export const EMPTY_SETTINGS: Buffer = Buffer.from([0, 0, 0, TYPE_SETTINGS, 0, 0, 0, 0, 0]);

/** The length of a whole frame whose header starts `bytes`. */
export function frameLength(bytes: Buffer): number {
  return FRAME_HEADER_BYTES + bytes.readUIntBE(0, 3);
}

const CLIENT_ENDED = 1;
const SERVER_ENDED = 2;

/**
 * Which client-initiated streams are open (RFC 9113 section 5.1), from the frame
 * headers of both directions: a stream opens with the client's HEADERS on a new
 * id and closes when both sides have sent END_STREAM or either has sent
 * RST_STREAM. Server-pushed streams are not counted (gRPC never pushes).
 */
export class OpenStreams implements StreamActivity {
  /** Open stream id -> which sides have ended it; made with the first stream (most idle connections never have one). */
  #ended: Map<number, number> | undefined;
  #lastClientId = 0;
  #started = 0;
  idleSince = performance.now();

  get open(): number {
    return this.#ended?.size ?? 0;
  }

  /** Streams the client has opened (calls). */
  get started(): number {
    return this.#started;
  }

  /** The highest stream id the client has opened. */
  get lastClientId(): number {
    return this.#lastClientId;
  }

  /** Whether this client frame opens a new stream (a call). */
  opens(type: number, streamId: number): boolean {
    return type === TYPE_HEADERS && streamId > this.#lastClientId && (streamId & 1) === 1;
  }

  readonly fromClient: OnFrame = (type, streamId, flags) => {
    if (this.opens(type, streamId)) {
      this.#lastClientId = streamId;
      this.#started++;
      (this.#ended ??= new Map()).set(streamId, 0);
    }
    this.#frame(type, streamId, flags, CLIENT_ENDED);
  };

  readonly fromServer: OnFrame = (type, streamId, flags) => this.#frame(type, streamId, flags, SERVER_ENDED);

  #frame(type: number, streamId: number, flags: number, side: number): void {
    if (type === TYPE_RST_STREAM) {
      this.#close(streamId);
      return;
    }
    if ((flags & FLAG_END_STREAM) === 0 || (type !== TYPE_HEADERS && type !== TYPE_DATA)) return;
    const ended = this.#ended?.get(streamId);
    if (ended === undefined) return;
    if ((ended | side) === (CLIENT_ENDED | SERVER_ENDED)) this.#close(streamId);
    else this.#ended!.set(streamId, ended | side);
  }

  /** Open streams up to `lastStreamId` that the server has not ended: calls still waiting for (the rest of) their answer. */
  unansweredUpTo(lastStreamId: number): number {
    let unanswered = 0;
    for (const [id, ended] of this.#ended ?? []) if (id <= lastStreamId && (ended & SERVER_ENDED) === 0) unanswered++;
    return unanswered;
  }

  /** The server's GOAWAY: streams past its last stream id it never processed, and the client takes them for closed (RFC 9113 6.8). */
  closeAbove(lastStreamId: number): void {
    for (const id of this.#ended?.keys() ?? []) if (id > lastStreamId) this.#close(id);
  }

  #close(streamId: number): void {
    if (this.#ended?.delete(streamId) && this.#ended.size === 0) this.idleSince = performance.now();
  }
}

/** A GOAWAY frame (RFC 9113 section 6.8). */
export function goAway(lastStreamId: number, errorCode: number): Buffer {
  const frame = Buffer.alloc(FRAME_HEADER_BYTES + 8);
  frame.writeUIntBE(8, 0, 3);
  frame[3] = TYPE_GOAWAY;
  frame.writeUInt32BE(lastStreamId, FRAME_HEADER_BYTES);
  frame.writeUInt32BE(errorCode, FRAME_HEADER_BYTES + 4);
  return frame;
}

/**
 * The opaque data of the PING that follows our GOAWAY (RFC 9113 section 6.7). A client
 * answers PINGs in order with the frames it reads, so what it sent before its ACK it sent
 * before it had read the GOAWAY, and a stream it opens after the ACK is one it was told not
 * to open: C-core's and grpc-go's servers time their final GOAWAY the same way.
 */
export const DRAIN_PING_DATA = Buffer.from('ovms-mtl', 'latin1');
const PING_FRAME_BYTES = FRAME_HEADER_BYTES + 8;

function drainPing(): Buffer {
  const frame = Buffer.alloc(PING_FRAME_BYTES);
  frame.writeUIntBE(8, 0, 3);
  frame[3] = TYPE_PING;
  DRAIN_PING_DATA.copy(frame, FRAME_HEADER_BYTES);
  return frame;
}

const NOTHING_HELD = Buffer.alloc(0);

/**
 * Client-to-upstream bytes once our GOAWAY and its PING have gone out, starting between two
 * frames: takes the client's ACK of that PING out (the upstream never sent the PING, and
 * Node's HTTP/2 server ends a session on an ACK it did not ask for) and says where it was.
 * Holds back at most one frame header, or one PING ACK, split across reads.
 */
export class DrainPingAck {
  /** The start of a frame not judged yet: a header, or a PING ACK, not whole yet. Never passed on. */
  #held: Buffer = NOTHING_HELD;
  /** Bytes left of a frame judged not to be our ACK. */
  #passing = 0;
  #seen = false;

  /** Calls `forward` with what goes on, in order, and `onAck` after the read that carried our ACK: between it and the next read. */
  pass(chunk: Buffer, forward: (piece: Buffer) => void, onAck: () => void): void {
    if (this.#seen) return forward(chunk);
    const bytes = this.#held.length === 0 ? chunk : Buffer.concat([this.#held, chunk]);
    const end = this.#judge(bytes);
    if (this.#seen) {
      if (end > 0) forward(bytes.subarray(0, end));
      // What came in the same read as the ACK, the client wrote with it, in one go: C-core writes the ACK first and then
      // the HEADERS of a call it had started before it read the GOAWAY. Read as 'after the GOAWAY', that call cut off the
      // whole connection, streams in flight included (the drain's whole point), in ~1 of 20 rolling updates under grpcio.
      if (end + PING_FRAME_BYTES < bytes.length) forward(bytes.subarray(end + PING_FRAME_BYTES));
      onAck();
      return;
    }
    // A copy: a few bytes, not the whole read kept alive.
    this.#held = end === bytes.length ? NOTHING_HELD : Buffer.from(bytes.subarray(end));
    if (end > 0) forward(end === bytes.length ? bytes : bytes.subarray(0, end));
  }

  /** Walks the frames of `bytes`: returns where our ACK starts, or where the part to hold back starts (bytes.length for none). */
  #judge(bytes: Buffer): number {
    let at = 0;
    while (at < bytes.length) {
      if (this.#passing > 0) {
        const n = Math.min(this.#passing, bytes.length - at);
        this.#passing -= n;
        at += n;
        continue;
      }
      if (bytes.length - at < FRAME_HEADER_BYTES) return at;
      const length = bytes.readUIntBE(at, 3);
      if (bytes[at + 3] !== TYPE_PING || (bytes[at + 4]! & FLAG_ACK) === 0 || length !== DRAIN_PING_DATA.length) {
        this.#passing = FRAME_HEADER_BYTES + length;
        continue;
      }
      if (bytes.length - at < PING_FRAME_BYTES) return at;
      if (DRAIN_PING_DATA.equals(bytes.subarray(at + FRAME_HEADER_BYTES, at + PING_FRAME_BYTES))) {
        this.#seen = true;
        return at;
      }
      at += PING_FRAME_BYTES;
    }
    return at;
  }
}

/** Our graceful GOAWAY and the PING whose ACK says the client has read it, in one write. */
const GOAWAY_THEN_PING = Buffer.concat([gracefulGoAway(), drainPing()]);

/**
 * The first GOAWAY of a graceful shutdown: last stream id 2^31-1 and
 * NO_ERROR, so the client opens no new streams and lets the ones in flight
 * finish.
 */
export function gracefulGoAway(): Buffer {
  return goAway(MAX_STREAM_ID, NO_ERROR);
}

/**
 * Whether a connection's first frame header is an HTTP/2 server's preface (RFC 9113 section 3.4):
 * a SETTINGS frame, not an acknowledgement, on stream 0, its length a whole number of settings.
 * An HTTP/1.1 server's answer to the client's preface ("HTTP/1.1 400 ...") is not one.
 */
export function isServerPreface(header: Buffer): boolean {
  return header.length >= FRAME_HEADER_BYTES && header[3] === TYPE_SETTINGS && (header[4]! & FLAG_ACK) === 0 && (header.readUInt32BE(5) & MAX_STREAM_ID) === 0 && header.readUIntBE(0, 3) % 6 === 0;
}

/** The bytes an HTTP/2 server's preface is judged from (isServerPreface). */
export const SERVER_PREFACE_HEADER_BYTES = FRAME_HEADER_BYTES;
