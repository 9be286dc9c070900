/**
 * Reads a file a user named (TLS material, the files of a certs directory) without trusting what the
 * path names. A FIFO blocks the open until a writer comes (at startup the whole process, at reload a
 * libuv thread that the process's exit then waits for, so SIGTERM never ends it), a character device
 * such as /dev/zero never ends, and a huge file is read whole into memory: each is refused instead,
 * by what it is, before any byte is read.
 */
import { closeSync, constants, fstatSync, openSync, readSync, statSync, type Stats } from 'node:fs';
import { open, stat } from 'node:fs/promises';

/**
 * O_NONBLOCK: a path swapped for a FIFO between the stat and the open (a secret being rewritten)
 * opens at once instead of waiting for a writer; it is then refused by the fstat.
 * O_NOCTTY: a terminal named as a file does not become the process's controlling terminal.
 */
const OPEN_FLAGS = constants.O_RDONLY | (constants.O_NONBLOCK ?? 0) | (constants.O_NOCTTY ?? 0);
const CHUNK_BYTES = 64 * 1024;

/**
 * The cap for PEM files (certificates, keys, CRLs), for every reader of them: far above any real one, as a
 * CRL of 10,000 revocations is about 0.5 MiB (test/large-crl), so this takes over a million. What is
 * larger is the wrong file, and reading it whole would take the memory it names.
 */
export const MAX_TLS_FILE_BYTES = 64 * 1024 * 1024;

/** The path names something other than a regular file, or a larger one than its reader takes; the message says which, starting with "is". */
export class FileKindError extends Error {
  constructor(
    message: string,
    readonly problem: 'directory' | 'not_regular' | 'too_large',
  ) {
    super(message);
  }
}

function describeKind(stats: Stats): string {
  if (stats.isDirectory()) return 'a directory';
  if (stats.isFIFO()) return 'a FIFO (named pipe)';
  if (stats.isCharacterDevice()) return 'a character device';
  if (stats.isBlockDevice()) return 'a block device';
  if (stats.isSocket()) return 'a socket';
  return 'not a regular file';
}

function formatBytes(bytes: number): string {
  const mib = bytes / (1024 * 1024);
  return mib >= 1 ? `${Math.floor(mib)} MiB` : `${bytes} bytes`;
}

function checkKind(stats: Stats, maxBytes: number): void {
  if (!stats.isFile()) throw new FileKindError(`is ${describeKind(stats)}, not a regular file`, stats.isDirectory() ? 'directory' : 'not_regular');
  if (stats.size > maxBytes) throw new FileKindError(`is ${formatBytes(stats.size)}, more than the ${formatBytes(maxBytes)} limit`, 'too_large');
}

/** Chunks of a read that stops one byte past `maxBytes`: a file that grew after its fstat is refused, not read whole. */
class BoundedRead {
  readonly #chunks: Buffer[] = [];
  readonly #expected: number;
  readonly #maxBytes: number;
  #total = 0;

  constructor(expected: number, maxBytes: number) {
    this.#expected = expected;
    this.#maxBytes = maxBytes;
  }

  nextChunk(): Buffer {
    return Buffer.allocUnsafe(Math.min(Math.max(this.#expected - this.#total, CHUNK_BYTES), this.#maxBytes + 1 - this.#total));
  }

  /** False at the end of the file. */
  took(chunk: Buffer, bytesRead: number): boolean {
    if (bytesRead === 0) return false;
    this.#chunks.push(chunk.subarray(0, bytesRead));
    this.#total += bytesRead;
    if (this.#total > this.#maxBytes) throw new FileKindError(`is more than the ${formatBytes(this.#maxBytes)} limit`, 'too_large');
    return true;
  }

  contents(): Buffer {
    return Buffer.concat(this.#chunks, this.#total);
  }
}

/**
 * Stat first: opening some devices acts on them (a watchdog arms, a tape rewinds). Then fstat
 * the opened file, as the path may name another file by then. Errors of the file system
 * (ENOENT, EACCES) pass through as they are.
 */
export function readRegularFileSync(path: string, maxBytes: number): Buffer {
  checkKind(statSync(path), maxBytes);
  const fd = openSync(path, OPEN_FLAGS);
  try {
    const stats = fstatSync(fd);
    checkKind(stats, maxBytes);
    const reading = new BoundedRead(stats.size, maxBytes);
    for (let chunk = reading.nextChunk(); reading.took(chunk, readSync(fd, chunk, 0, chunk.length, null)); chunk = reading.nextChunk());
    return reading.contents();
  } finally {
    closeSync(fd);
  }
}

/** The same, without blocking the event loop: for reloads while serving. */
export async function readRegularFile(path: string, maxBytes: number): Promise<Buffer> {
  checkKind(await stat(path), maxBytes);
  const handle = await open(path, OPEN_FLAGS);
  try {
    const stats = await handle.stat();
    checkKind(stats, maxBytes);
    const reading = new BoundedRead(stats.size, maxBytes);
    for (let chunk = reading.nextChunk(); reading.took(chunk, (await handle.read(chunk, 0, chunk.length, null)).bytesRead); chunk = reading.nextChunk());
    return reading.contents();
  } finally {
    await handle.close();
  }
}
