/**
 * How many bytes a client's kernel has taken from ours, from what Linux says of the socket.
 * Node counts what it hands to its own kernel (`bytesWritten`), and the kernel takes up to
 * its send buffer (MBs, autotuned up to net.ipv4.tcp_wmem) whether the client reads or not:
 * a client that stopped reading looked alive while those MBs filled, and one reading slowly
 * looked dead while it read what was already there. /proc/net/tcp{,6} gives each socket's
 * `tx_queue`, the bytes written that the peer has not acknowledged; written minus that is
 * what the client's kernel took.
 */
import { access, readlink } from 'node:fs/promises';
import { readOrEmpty } from './listener-owner.js';

/**
 * `tx_queue` by socket inode, for the inodes asked for, from /proc/net/tcp text. Each inode is found by
 * searching the text, not by splitting every line: with 10,000 connections the table is 1.5 MB, and
 * splitting it all held the event loop for 49 ms at each sweep (3 ms this way).
 */
export function unackedBytes(procNetTcp: string, inodes: ReadonlySet<string>, into = new Map<string, number>()): Map<string, number> {
  for (const inode of inodes) {
    const txQueue = txQueueOf(procNetTcp, inode);
    if (txQueue !== undefined) into.set(inode, txQueue);
  }
  return into;
}

/** The tx_queue of the line whose inode field (the 10th) is `inode`. */
function txQueueOf(procNetTcp: string, inode: string): number | undefined {
  const fields = fieldsOf(procNetTcp, inode);
  if (fields === undefined) return undefined;
  const txQueue = parseInt(fields[4]?.split(':')[0] ?? '', 16);
  return Number.isFinite(txQueue) ? txQueue : undefined;
}

/** TCP_CLOSE_WAIT, the `st` field of a socket whose peer has closed its side (sent FIN). */
const CLOSE_WAIT = '08';

/** Whether the client closed its side of socket `inode` (the kernel got its FIN), from /proc/net/tcp text. */
export function closedByPeer(procNetTcp: string, inode: string): boolean {
  return fieldsOf(procNetTcp, inode)?.[3] === CLOSE_WAIT;
}

/** The fields of the line whose inode field (the 10th) is `inode`: the same digits may stand in another field. */
function fieldsOf(procNetTcp: string, inode: string): string[] | undefined {
  const needle = ` ${inode} `;
  for (let at = procNetTcp.indexOf(needle); at !== -1; at = procNetTcp.indexOf(needle, at + 1)) {
    const start = procNetTcp.lastIndexOf('\n', at) + 1;
    const end = procNetTcp.indexOf('\n', at);
    const fields = procNetTcp.slice(start, end === -1 ? undefined : end).trim().split(/\s+/);
    if (fields[9] === inode) return fields;
  }
  return undefined;
}

/** The inode of the socket on descriptor `fd` of this process; undefined where /proc does not say. */
export async function socketInode(fd: number): Promise<string | undefined> {
  const target = await readlink(`/proc/self/fd/${fd}`).catch(() => '');
  return /^socket:\[(\d+)\]$/.exec(target)?.[1];
}

/** The counts of one client connection's TCP socket, from Node's TCP handle. */
export interface CountedSocket {
  readonly bytesRead: number;
  /** Handed to libuv, including what it still queues because the kernel's send buffer is full. */
  readonly bytesWritten: number;
  /** What libuv still queues. */
  readonly writeQueueSize: number;
  /** The descriptor (the handle has it on Linux). */
  readonly fd: number | undefined;
}

/**
 * Bytes the client sent plus the bytes its kernel acknowledged, given the socket's unacknowledged bytes. With Node's
 * counts from before /proc was read, what the client's kernel took at least: bytes Node wrote while the table was
 * read are in `tx_queue` or not, and what our kernel has taken only grows. Counts taken after counted those bytes
 * as acknowledged when they were not in the table yet. Requiring no write during the read, and reading again (three
 * times) when there was one, left a model server writing more often than /proc is read (every 2 ms) with no sample
 * at all: a client reading slowly was closed as unresponsive while its PING waited behind what its kernel held.
 */
function progressOf(tcp: CountedSocket, txQueue: number): number {
  return tcp.bytesRead + tcp.bytesWritten - tcp.writeQueueSize - txQueue;
}

function kernelSays(tables: readonly string[], unacked: ReadonlyMap<string, number>, inode: string, tcp: CountedSocket): number | 'gone' | 'closed' {
  const txQueue = unacked.get(inode);
  if (txQueue === undefined) return 'gone';
  return tables.some((table) => closedByPeer(table, inode)) ? 'closed' : progressOf(tcp, txQueue);
}

/** A connection waiting to learn whether its client's kernel took bytes since the last sample. */
export interface AckWatcher {
  tcp(): CountedSocket | undefined;
  /**
   * Bytes the client sent plus the bytes its kernel acknowledged, as the kernel says now; 'gone'
   * when the socket is no longer in the kernel's tables (reset); 'closed' when the client closed its
   * side (FIN); 'sent' when the client sent bytes while /proc was read (Node's counts and the
   * kernel's then do not match, and it is alive anyway).
   */
  sampled(progress: number | 'gone' | 'closed' | 'sent'): void;
}

/**
 * One read of /proc/net/tcp{,6} per idle sweep for every connection that asked (those whose
 * PING has gone unanswered for a sweep: rare, as a live client answers at once). `covers()`
 * turns false where /proc does not tell (not Linux), and callers go back to Node's own counts.
 */
export class ClientAcks {
  #available = true;
  readonly #waiting = new Set<AckWatcher>();
  readonly #inodes = new WeakMap<AckWatcher, string>();
  /** Connections whose socket /proc does not show (no descriptor, or it closed as it was looked up). */
  readonly #unknown = new WeakSet<AckWatcher>();
  #reading = false;

  /** Whether the kernel's count is read for `watcher`; if not, the caller goes by Node's. */
  covers(watcher: AckWatcher): boolean {
    return this.#available && !this.#unknown.has(watcher);
  }

  /** A sample for `watcher` soon (after the current sweep). */
  want(watcher: AckWatcher): void {
    if (!this.#available) return;
    this.#waiting.add(watcher);
    this.#schedule();
  }

  #schedule(): void {
    if (this.#reading) return;
    this.#reading = true;
    setImmediate(() => {
      void this.#sampleAll().finally(() => {
        this.#reading = false;
        if (this.#waiting.size > 0) this.#schedule();
      });
    });
  }

  async #sampleAll(): Promise<void> {
    const watchers = [...this.#waiting];
    this.#waiting.clear();
    const inodes = new Map<AckWatcher, string>();
    for (const watcher of watchers) {
      const inode = await this.#inodeOf(watcher);
      if (inode !== undefined) inodes.set(watcher, inode);
    }
    if (inodes.size === 0) return;
    const before = new Map([...inodes.keys()].map((watcher) => [watcher, watcher.tcp()]));
    const tables = await Promise.all([readOrEmpty('/proc/net/tcp'), readOrEmpty('/proc/net/tcp6')]);
    if (!tables[0] && !tables[1]) {
      this.#available = false;
      return;
    }
    const wanted = new Set(inodes.values());
    const unacked = unackedBytes(tables[1]!, wanted, unackedBytes(tables[0]!, wanted));
    for (const [watcher, inode] of inodes) {
      const [then, now] = [before.get(watcher), watcher.tcp()];
      if (then === undefined || now === undefined) continue;
      if (now.bytesRead !== then.bytesRead) watcher.sampled('sent');
      // Counted from before the read: see progressOf().
      else watcher.sampled(kernelSays(tables, unacked, inode, then));
    }
  }

  async #inodeOf(watcher: AckWatcher): Promise<string | undefined> {
    const known = this.#inodes.get(watcher);
    if (known !== undefined) return known;
    const fd = watcher.tcp()?.fd;
    const inode = fd === undefined ? undefined : await socketInode(fd);
    if (inode === undefined) {
      this.#unknown.add(watcher);
      if (await access('/proc/self/fd').then(() => false, () => true)) this.#available = false;
      return undefined;
    }
    this.#inodes.set(watcher, inode);
    return inode;
  }
}
