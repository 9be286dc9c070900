/**
 * Node's cluster round-robin (its default on Linux) accepts each connection in the primary and
 * hands it to a worker in an IPC message that carries the socket; the primary closes its own copy
 * only once the worker answers that it took it. A worker that dies before it answers (SIGKILL, the
 * out-of-memory killer, a crash, the pool's kill of a stuck worker, which never answers the one it
 * was handed last) never does, and Node waits for ever: the connection stayed open in the primary,
 * which never reads it, so its client waited for a TLS handshake that never came, and the primary
 * kept a file descriptor and Node's callback (holding the dead worker's objects) for each, for the
 * life of the process: a connection or two per listener each time a busy worker was killed.
 *
 * This watches the hand-offs to one worker and, once it is gone, answers for it. Where another
 * worker still serves that port, the answer is the one a worker that is closing its server gives
 * (not taken): Node's own callback hands the connection to another worker, whose client never
 * knows. A worker answers before it reads a byte of the connection, so one it did not answer for
 * was never read. Where no other worker is left in the round-robin it came from, Node has closed
 * that one's listener and forgotten its queue (a worker that serves the port later opens another),
 * and a connection given back would wait there for ever: the answer is then "taken", on
 * which Node's callback closes the primary's copy. A live worker that closed its server answers "not
 * taken" itself, and the same holds for that answer (#answered). It also takes the worker out of the
 * round-robin as soon as its channel ends (see #leaveRoundRobinAtChannelEnd). The message names are Node's
 * (lib/internal/cluster); were they to change, the watch sees no hand-off and nothing changes from
 * before, which the tests of the pool would show.
 */
import type { ChildProcess } from 'node:child_process';

/** Every internal message of Node's cluster carries this `cmd`. */
const CLUSTER_COMMAND = 'NODE_CLUSTER';

/**
 * The fields of Node's cluster messages read here. To the worker: `act: 'newconn'` hands over a connection
 * on the port of that `key`; a message with `ack` and `key` (and no `errno`) tells it that it now serves that
 * port. From the worker: `ack` answers the message of that `seq`; `act: 'close'` says it no longer serves `key`.
 */
interface ClusterMessage {
  readonly cmd?: unknown;
  readonly act?: unknown;
  readonly seq?: unknown;
  readonly ack?: unknown;
  readonly key?: unknown;
  readonly errno?: unknown;
}

/** The primary's copy of a connection handed over (a libuv TCP handle). */
interface SentHandle {
  close(): void;
}

type Send = (message: unknown, ...rest: unknown[]) => boolean;

/** What became of the connections a dead worker had been handed and had not taken. */
export interface UntakenOutcome {
  /** Given to another worker that serves the same port. */
  readonly handedOn: number;
  /** Closed: no other worker served the port. */
  readonly closed: number;
}

/**
 * One port's round-robin as Node keeps it (a RoundRobinHandle): its listener and queue live from the first worker
 * that serves the port until the last one leaves it, when Node closes both and forgets it; a worker that serves the
 * port later opens a new one. A connection handed out belongs to the one it came from: given back to a round-robin
 * that is gone, it waits in a queue nobody reads, for ever.
 */
class PortRoundRobin {
  /** The watches of the workers in Node's list of the port's workers: they joined it and have not left. */
  readonly members = new Set<HandoffWatch>();
  constructor(readonly key: string) {}
}

export class HandoffWatch {
  /** Each port's round-robin in use, by Node's key; one whose last worker left is replaced by the next one opened. */
  static readonly #roundRobins = new Map<string, PortRoundRobin>();
  readonly #child: ChildProcess;
  /** Connections handed to the worker that it has not answered for yet, by the hand-off's sequence number. */
  readonly #untaken = new Map<number, { readonly handle: SentHandle; readonly roundRobin: PortRoundRobin | undefined }>();
  /** The round-robins that hand this worker connections: as Node's own lists of the ports' workers. */
  readonly #joined = new Set<PortRoundRobin>();

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
    // Node takes a worker out of every round-robin when its channel ends (the event, not the exit, when it comes first).
    child.on('disconnect', () => this.#leaveAll());
    // First, so that a "not taken" answer is seen before Node's own callback acts on it (#answered).
    child.prependListener('internalMessage', (message: ClusterMessage) => {
      if (message?.cmd !== CLUSTER_COMMAND) return;
      if (typeof message.ack === 'number') this.#answered(message.ack, message);
      else if (message.act === 'close' && typeof message.key === 'string') this.#leave(HandoffWatch.#roundRobins.get(message.key));
    });
  }

  /**
   * Once the worker has exited and its channel has closed (no answer can come any more, and Node has taken it out
   * of the round-robin): gives each connection it did not take to another worker serving that port, or closes it
   * where there is none (its client sees the connection close before the handshake, and may retry).
   */
  settleUntaken(): UntakenOutcome {
    this.#leaveAll();
    const untaken = [...this.#untaken];
    this.#untaken.clear();
    let handedOn = 0;
    for (const [seq, { handle, roundRobin }] of untaken) {
      if (this.#anotherServes(roundRobin)) {
        this.#child.emit('internalMessage', { cmd: CLUSTER_COMMAND, ack: seq, accepted: false });
        handedOn += 1;
        continue;
      }
      this.#child.emit('internalMessage', { cmd: CLUSTER_COMMAND, ack: seq, accepted: true });
      // Closed already by Node's callback; this one is for a Node whose callback did not know the answer.
      handle.close();
    }
    return { handedOn, closed: untaken.length - handedOn };
  }

  /**
   * The worker's answer for a connection handed to it. "Not taken" comes from a worker that closed its server (its own
   * SIGTERM or SIGINT, or the shutdown's drain) after the connection was sent: Node then gives the connection back to the
   * round-robin it came from, and where every worker has left that one (each closed its server in turn), it waited there
   * for ever, unread, even once new workers served the port. Such an answer is read as "taken": Node closes the primary's
   * copy (the worker closed its own), and the client sees its connection close before the handshake, as at a closed port.
   */
  #answered(seq: number, message: ClusterMessage & { accepted?: unknown }): void {
    const sent = this.#untaken.get(seq);
    if (!sent) return;
    this.#untaken.delete(seq);
    if (message.accepted === false && !this.#anotherServes(sent.roundRobin)) (message as { accepted: boolean }).accepted = true;
  }

  /**
   * Whether a connection given back to `roundRobin` goes to a worker: another one in it has its channel open. One whose
   * channel ended is still in Node's list until the event of that end (next tick), and Node drops a connection it hands
   * to it, unclosed.
   */
  #anotherServes(roundRobin: PortRoundRobin | undefined): boolean {
    for (const watch of roundRobin?.members ?? []) if (watch !== this && watch.#child.connected) return true;
    return false;
  }

  #join(key: string): void {
    let roundRobin = HandoffWatch.#roundRobins.get(key);
    if (!roundRobin) HandoffWatch.#roundRobins.set(key, (roundRobin = new PortRoundRobin(key)));
    roundRobin.members.add(this);
    this.#joined.add(roundRobin);
  }

  /** Once its last worker has left, Node has closed the port's round-robin: the next worker to serve the port opens another. */
  #leave(roundRobin: PortRoundRobin | undefined): void {
    if (!roundRobin) return;
    roundRobin.members.delete(this);
    this.#joined.delete(roundRobin);
    if (roundRobin.members.size > 0) return;
    if (HandoffWatch.#roundRobins.get(roundRobin.key) === roundRobin) HandoffWatch.#roundRobins.delete(roundRobin.key);
  }

  #leaveAll(): void {
    for (const roundRobin of [...this.#joined]) this.#leave(roundRobin);
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

  /** A hand-off belongs to the port's round-robin of the moment; a reply without errno to the worker's query joins it to one. */
  #noteSent(message: ClusterMessage, handle: unknown): void {
    if (message?.cmd !== CLUSTER_COMMAND || typeof message.key !== 'string') return;
    const { key } = message;
    if (message.act === 'newconn' && typeof message.seq === 'number' && isSentHandle(handle)) this.#untaken.set(message.seq, { handle, roundRobin: HandoffWatch.#roundRobins.get(key) });
    else if (typeof message.ack === 'number' && !message.errno) this.#join(key);
  }
}

function isSentHandle(handle: unknown): handle is SentHandle {
  return typeof handle === 'object' && handle !== null && typeof (handle as { close?: unknown }).close === 'function';
}
