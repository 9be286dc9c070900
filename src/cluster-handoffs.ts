/**
 * Node's cluster round-robin (its default on Linux) accepts each connection in the primary and
 * hands it to a worker in an IPC message that carries the socket; the primary closes its own copy
 * only once the worker answers that it took it. A worker that dies before it answers (SIGKILL, the
 * out-of-memory killer, a crash, the pool's kill of a stuck worker, which never answers the one it
 * was handed last) never does, and Node (20) waits for ever: the connection stayed open in the
 * primary, which never reads it, so its client waited for a TLS handshake that never came, and the
 * primary kept a file descriptor and Node's callback (holding the dead worker's objects) for each,
 * for the life of the process: a connection or two per listener each time a busy worker was killed.
 *
 * This watches the hand-offs to one worker and, once it is gone, answers for it the way a worker
 * that took the connection does: Node's own callback then closes the primary's copy and forgets the
 * hand-off. It also takes the worker out of the round-robin as soon as its channel ends (see
 * #leaveRoundRobinAtChannelEnd). The message names are Node's (lib/internal/cluster); were they to
 * change, the watch sees no hand-off and nothing changes from before, which the tests of the pool would show.
 */
import type { ChildProcess } from 'node:child_process';

/** Every internal message of Node's cluster carries this `cmd`. */
const CLUSTER_COMMAND = 'NODE_CLUSTER';

/** The fields of Node's cluster messages read here: `act: 'newconn'` hands a connection over, `ack` answers the message of that `seq`. */
interface ClusterMessage {
  readonly cmd?: unknown;
  readonly act?: unknown;
  readonly seq?: unknown;
  readonly ack?: unknown;
}

/** The primary's copy of a connection handed over (a libuv TCP handle). */
interface SentHandle {
  close(): void;
}

type Send = (message: unknown, ...rest: unknown[]) => boolean;

export class HandoffWatch {
  readonly #child: ChildProcess;
  /** Connections handed to the worker that it has not answered for yet, by the hand-off's sequence number. */
  readonly #untaken = new Map<number, SentHandle>();

  constructor(child: ChildProcess) {
    this.#child = child;
    // A process that could not be started for want of file descriptors (EMFILE) has no channel, so no send: nothing is handed to it.
    if (typeof child.send !== 'function') return;
    const send = child.send.bind(child) as Send;
    const watched: Send = (message, ...rest) => {
      this.#noteSent(message as ClusterMessage, rest[0]);
      return send(message, ...rest);
    };
    child.send = watched as ChildProcess['send'];
    this.#leaveRoundRobinAtChannelEnd(child);
    child.on('internalMessage', (message: ClusterMessage) => {
      if (message?.cmd === CLUSTER_COMMAND && typeof message.ack === 'number') this.#untaken.delete(message.ack);
    });
  }

  /**
   * Once the worker has exited and its channel has closed (no answer can come any more): closes
   * each connection it did not take, and says how many there were. Its client sees the connection
   * close before the handshake, which clients take as a failed connect (and may retry).
   */
  closeUntaken(): number {
    const untaken = [...this.#untaken];
    this.#untaken.clear();
    for (const [seq, handle] of untaken) {
      this.#child.emit('internalMessage', { cmd: CLUSTER_COMMAND, ack: seq, accepted: true });
      // Closed already by Node's callback; this one is for a Node whose callback did not know the answer.
      handle.close();
    }
    return untaken.length;
  }

  /**
   * Node ends the channel with disconnect() when it reads its end (the worker died), but while a socket sent
   * to the worker still awaits its receipt (it was stopped or busy) it holds the 'disconnect' event back until
   * that receipt, which never comes. Cluster takes the worker out of the round-robin at that event, else only
   * at its exit, and a connection accepted in between went to the dead worker if it was free on that port:
   * Node found its channel closed and dropped the connection unclosed, and the client waited for ever. The
   * event is given now instead (once: Node no longer can), and that connection goes to another worker. The
   * pool never disconnects a worker itself (it asks it to drain and exit), so this is always the channel's end.
   */
  #leaveRoundRobinAtChannelEnd(child: ChildProcess): void {
    const disconnect = child.disconnect.bind(child);
    child.disconnect = () => {
      disconnect();
      // Held back: the channel is still there (once it is really disconnected, Node sets it to null and emits the event).
      if (!child.connected && child.channel) child.emit('disconnect');
    };
  }

  #noteSent(message: ClusterMessage, handle: unknown): void {
    if (message?.cmd !== CLUSTER_COMMAND || message.act !== 'newconn' || typeof message.seq !== 'number') return;
    if (isSentHandle(handle)) this.#untaken.set(message.seq, handle);
  }
}

function isSentHandle(handle: unknown): handle is SentHandle {
  return typeof handle === 'object' && handle !== null && typeof (handle as { close?: unknown }).close === 'function';
}
