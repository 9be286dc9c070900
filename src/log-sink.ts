/**
 * Where the JSON lines go: a file descriptor that must never hold up the
 * proxy. In a container stdout is a pipe read by the runtime or a log
 * shipper, and that reader can lag, stop or vanish. Through sonic-boom's sync
 * mode a full pipe put the whole event loop to sleep in 100 ms steps, every
 * request waiting behind it, and after a few minutes the retries, recursive,
 * overflowed the stack: the proxy (or its primary, leaving a worker orphaned)
 * died with `RangeError: Maximum call stack size exceeded`.
 *
 * Here a batch the descriptor cannot take now waits in a backlog of bounded
 * size and is retried on a timer; a batch that does not fit is dropped and
 * counted, and once lines flow again the count is reported (`onDropped`).
 * A write error other than "try again" (EPIPE: the reader is gone; ENOSPC)
 * drops that batch and is counted the same way. Traffic never waits on the
 * log, and memory stays bounded.
 */
import fs from 'node:fs';

/** Bytes held while the descriptor takes nothing (over a thousand access lines); beyond it lines are dropped. */
export const BACKLOG_BYTES = 1024 * 1024;
/** How soon a descriptor that took nothing is tried again. */
const RETRY_MS = 50;
/** At exit, how long lines still held may wait for the reader: long enough for one that lags, short enough not to hold a stop. */
const EXIT_WAIT_MS = 1000;
const EXIT_POLL_MS = 10;

interface Batch {
  bytes: Buffer;
  lines: number;
}

type WriteOutcome = 'written' | 'dropped' | Batch;

export interface SinkOptions {
  /** Called once lines are written again after some were dropped: how many, and the error that dropped the last. */
  onDropped?: (lines: number, reason: string) => void;
  backlogBytes?: number;
}

/**
 * A descriptor of our own on the same pipe, non-blocking. The one we inherit
 * shares its flags with every process writing to the pipe (OVMS, the workers):
 * Node makes it non-blocking when process.stdout is created and each Node
 * process makes it blocking again when it exits, and then a write to a full
 * pipe blocked in the kernel (an orphaned worker was seen stuck so for good).
 * Not for a file, whose offset we share with OVMS; not for a socket, which
 * cannot be opened again.
 */
function ownNonBlockingFd(fd: number): number {
  try {
    if (!fs.fstatSync(fd).isFIFO()) return fd;
    return fs.openSync(`/proc/self/fd/${fd}`, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
  } catch {
    // No /proc, or nobody reads the pipe any more (ENXIO): write to it as it is.
    return fd;
  }
}

function sleepMs(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

export class LineSink {
  readonly #fd: number;
  readonly #limit: number;
  readonly #onDropped: ((lines: number, reason: string) => void) | undefined;
  readonly #backlog: Batch[] = [];
  #backlogBytes = 0;
  #retry: NodeJS.Timeout | undefined;
  #dropped = 0;
  #dropReason = '';

  constructor(fd: number, options: SinkOptions = {}) {
    this.#fd = ownNonBlockingFd(fd);
    this.#limit = options.backlogBytes ?? BACKLOG_BYTES;
    this.#onDropped = options.onDropped;
  }

  /** Writes `bytes` (whole lines) now if the descriptor takes them, else holds or drops them; never blocks, never throws. */
  write(bytes: Buffer, lines: number): void {
    if (this.#backlog.length > 0) {
      this.#hold({ bytes, lines });
      return;
    }
    const outcome = this.#tryWrite({ bytes, lines });
    if (outcome === 'written') this.#reportDrops();
    else if (outcome !== 'dropped') this.#hold(outcome);
  }

  /** At exit: what is held gets a short bounded wait for the reader, then is given up. */
  drainBeforeExit(): void {
    clearTimeout(this.#retry);
    this.#retry = undefined;
    const deadline = performance.now() + EXIT_WAIT_MS;
    for (;;) {
      this.#drain();
      clearTimeout(this.#retry);
      this.#retry = undefined;
      if (this.#backlog.length === 0 || performance.now() >= deadline) return;
      sleepMs(EXIT_POLL_MS);
    }
  }

  #hold(batch: Batch): void {
    if (this.#backlogBytes + batch.bytes.length > this.#limit) {
      this.#drop(batch, 'EAGAIN');
      return;
    }
    this.#backlog.push(batch);
    this.#backlogBytes += batch.bytes.length;
    this.#retryLater();
  }

  #retryLater(): void {
    this.#retry ??= setTimeout(() => {
      this.#retry = undefined;
      this.#drain();
    }, RETRY_MS).unref();
  }

  /** Writes held batches in order until the descriptor takes no more. */
  #drain(): void {
    let outcome: WriteOutcome = 'dropped';
    while (this.#backlog.length > 0) {
      const head = this.#backlog[0]!;
      outcome = this.#tryWrite(head);
      if (outcome !== 'written' && outcome !== 'dropped') {
        this.#backlogBytes -= head.bytes.length - outcome.bytes.length;
        this.#backlog[0] = outcome;
        this.#retryLater();
        return;
      }
      this.#backlog.shift();
      this.#backlogBytes -= head.bytes.length;
    }
    if (outcome === 'written') this.#reportDrops();
  }

  /** Written, dropped (an error other than "try again"), or what the descriptor did not take for now (EAGAIN, a partial write). */
  #tryWrite(batch: Batch): WriteOutcome {
    try {
      const written = fs.writeSync(this.#fd, batch.bytes);
      if (written >= batch.bytes.length) return 'written';
      // Only a write over PIPE_BUF, or to a file, can be partial: the line it cut is counted with the rest.
      const bytes = batch.bytes.subarray(written);
      return { bytes, lines: countLines(bytes) };
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? String(err);
      if (code === 'EAGAIN' || code === 'EWOULDBLOCK') return batch;
      this.#drop(batch, code);
      return 'dropped';
    }
  }

  #drop(batch: Batch, reason: string): void {
    this.#dropped += batch.lines;
    this.#dropReason = reason;
  }

  /** Only after a write that went through: the report is itself a line, which must not be dropped again and again. */
  #reportDrops(): void {
    if (this.#dropped === 0 || !this.#onDropped) return;
    const lines = this.#dropped;
    this.#dropped = 0;
    this.#onDropped(lines, this.#dropReason);
  }
}

function countLines(bytes: Buffer): number {
  let lines = 0;
  for (let at = bytes.indexOf(0x0a); at !== -1; at = bytes.indexOf(0x0a, at + 1)) lines++;
  return lines;
}
