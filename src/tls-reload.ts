/**
 * Reloads the server certificate, key, client CA bundle and CRL on SIGHUP and
 * whenever a file in one of their directories changes, the way ghostunnel and
 * Envoy do. All-or-nothing: the whole set is loaded and validated first; a
 * broken or half-written set leaves the old one serving and is retried on the
 * next change. After a CRL or client CA update, live connections of clients
 * now revoked or no longer trusted are closed - Node (and every mainstream
 * proxy) otherwise lets them run on.
 */
import type { X509Certificate } from 'node:crypto';
import { watch, readlinkSync, statSync, type FSWatcher } from 'node:fs';
import { basename, dirname, isAbsolute, join, sep } from 'node:path';
import { DEFAULTS, type TlsFiles } from './config.js';
import type { Logger } from './log.js';
import type { RunningProxy } from './proxy.js';
import { filesSignature, loadTlsMaterial, type TlsMaterial } from './tls-material.js';
import { RevocationIndex } from './crl-index.js';
import { presentedCertificates } from './client-identity.js';
import { pathToTrust } from './tls-checks.js';

/** `primary`: a worker loading the set its primary validated; `api`: a caller of the library. */
export type ReloadTrigger = 'signal' | 'file' | 'primary' | 'api';

export type ReloadOutcome =
  | { readonly ok: true; readonly trigger: ReloadTrigger; readonly material: TlsMaterial; readonly changed: boolean; readonly revokedConnections: number }
  | { readonly ok: false; readonly trigger: ReloadTrigger; readonly reason: string };

export interface TlsReloaderOptions {
  readonly files: TlsFiles;
  /** The material the proxy started with. */
  readonly current: TlsMaterial;
  readonly proxy: Pick<RunningProxy, 'reloadTls' | 'listeners'>;
  readonly logger: Logger;
  /** How long a revoked client's connection may finish its in-flight calls before it is cut. */
  readonly revokedGraceMs: number;
  readonly debounceMs?: number;
  /** How often the files are looked at while a directory cannot be watched; default DEFAULTS.reloadPollMs. */
  readonly pollMs?: number;
  /** Where a new set comes from; default: the files. A worker's comes from the primary, which read and validated the files. */
  readonly load?: () => Promise<TlsMaterial>;
  /** Every reload attempt, for metrics (reloads, failures) and for whoever shows the current certificate. */
  readonly onReload?: (outcome: ReloadOutcome) => void;
}

/** How many quiet times a reload may wait for after the first change in a watched directory. */
const QUIET_WAIT_CAP = 10;

export class TlsReloader {
  readonly #options: TlsReloaderOptions;
  /** Each watched directory path, with which directory it was when its watch began and the names awaited in it. */
  readonly #watchers = new Map<string, WatchTarget & { readonly watcher: FSWatcher }>();
  #current: TlsMaterial;
  #queue: Promise<unknown> = Promise.resolve();
  /** The reload requested and not started yet. */
  #waiting: { trigger: ReloadTrigger; outcome: Promise<ReloadOutcome> } | undefined;
  #debounce: NodeJS.Timeout | undefined;
  /** When the first directory change not yet reloaded came. */
  #firstChangeAt: number | undefined;
  #watching = false;
  /** Directories whose watch could not be placed (inotify instance or watch limit, EMFILE): the files are polled meanwhile. */
  readonly #unwatched = new Set<string>();
  #poll: NodeJS.Timeout | undefined;
  /** What the files were at the last poll. */
  #polledSignature = '';
  #reloads = 0;
  #failures = 0;
  /** The files of the last failed reload as they stood after it, and why it failed; cleared by a success. */
  #lastFailure: { readonly signature: string; readonly reason: string } | undefined;

  constructor(options: TlsReloaderOptions) {
    this.#options = options;
    this.#current = options.current;
  }

  /** The material new handshakes use now. */
  get material(): TlsMaterial {
    return this.#current;
  }

  get counts(): { reloads: number; failures: number } {
    return { reloads: this.#reloads, failures: this.#failures };
  }

  /** Start watching the directories of the files (and of their symlink targets, and those holding a symlink on the way). */
  watch(): void {
    this.#watching = true;
    this.#refreshWatchers();
    this.#catchUpWithFiles();
  }

  /**
   * The proxy reads the files, then starts its listeners (and workers), then watches: a change in between
   * made no event, and the old set served (a new CRL's revoked clients admitted) until the next change or
   * SIGHUP. Files no longer as they were read are taken for a change seen by the watch.
   */
  #catchUpWithFiles(): void {
    const readAs = this.#current.filesSignature;
    if (readAs !== undefined && readAs !== filesSignature(this.#options.files)) this.#onDirectoryEvent();
  }

  /**
   * Reloads now, after the reload running, if any. Never rejects. Requests that come while one
   * waits to start share it, as it reads the files they were made after: a burst (SIGHUPs, the
   * watch and a reloader sidecar at once) ran one reload each, and each one holds up every
   * connection while it checks the CRL. The shared reload applies the set unchanged or not
   * when any of its requests asks (a signal, not a file event).
   */
  reload(trigger: ReloadTrigger): Promise<ReloadOutcome> {
    if (this.#waiting) {
      if (trigger !== 'file') this.#waiting.trigger = trigger;
      return this.#waiting.outcome;
    }
    const outcome = this.#queue.then(() => {
      const { trigger: asked } = this.#waiting!;
      this.#waiting = undefined;
      return this.#reloadOnce(asked);
    });
    this.#waiting = { trigger, outcome };
    this.#queue = outcome;
    return outcome;
  }

  close(): void {
    this.#watching = false;
    clearTimeout(this.#debounce);
    this.#firstChangeAt = undefined;
    for (const { watcher } of this.#watchers.values()) watcher.close();
    this.#watchers.clear();
    this.#unwatched.clear();
    this.#pollWhileUnwatched();
  }

  async #reloadOnce(trigger: ReloadTrigger): Promise<ReloadOutcome> {
    const { logger, files } = this.#options;
    let material: TlsMaterial;
    try {
      material = await this.#loadSettled();
      checkCrlKept(files, this.#current, material);
      // A directory event for an unrelated file is no reason to rebuild contexts; an explicit request is.
      if (trigger === 'file' && sameMaterial(material, this.#current)) return this.#unchanged(trigger, material);
      this.#options.proxy.reloadTls(material);
    } catch (err) {
      const reason = (err as Error).message;
      if (this.#failedAgainAsBefore(trigger, reason)) {
        logger.debug({ event: 'reload_still_failing', trigger, reason }, 'certificate directory changed; the certificate files are still the set that failed, as they were');
        return { ok: false, trigger, reason };
      }
      this.#failures += 1;
      logger.error({ event: 'reload_failed', trigger, reason }, `TLS reload failed, still serving the previous certificates: ${reason}`);
      return this.#report({ ok: false, trigger, reason });
    } finally {
      if (this.#watching) this.#refreshWatchers();
    }
    this.#current = material;
    this.#lastFailure = undefined;
    this.#reloads += 1;
    const revokedConnections = this.#closeRevoked(material);
    logger.info(
      { event: 'reloaded', trigger, server_cert_valid_to: material.serverCert.validTo, client_cas: material.clientCas.length, revoked_connections: revokedConnections },
      'TLS material reloaded for new connections',
    );
    return this.#report({ ok: true, trigger, material, changed: true, revokedConnections });
  }

  /**
   * The files are the set in use. After a failed set, that is the failure undone (a bad Secret rolled back): said at
   * info, as the failure was said at error, or the last word of the log on TLS stayed an error while all was well.
   */
  #unchanged(trigger: ReloadTrigger, material: TlsMaterial): ReloadOutcome {
    const { logger } = this.#options;
    const failure = this.#lastFailure;
    this.#lastFailure = undefined;
    if (failure) {
      logger.info(
        { event: 'reload_recovered', trigger, previous_reason: failure.reason },
        'certificate files are the set in use again: the set that failed to load is gone, the certificates served never changed',
      );
    } else {
      logger.debug({ event: 'reload_unchanged', trigger }, 'certificate directory changed; TLS material unchanged');
    }
    return this.#report({ ok: true, trigger, material, changed: false, revokedConnections: 0 });
  }

  /**
   * A broken set was logged (and counted) again at each later change in its directory (the kubelet deleting the
   * old version directory, a file written beside it): a second error for the same files. A file event that finds
   * them as they were after the failure, failing alike, is that failure still; a signal or API request is always
   * answered in full.
   */
  #failedAgainAsBefore(trigger: ReloadTrigger, reason: string): boolean {
    const signature = filesSignature(this.#options.files);
    const before = this.#lastFailure;
    this.#lastFailure = { signature, reason };
    return trigger === 'file' && before?.signature === signature && before.reason === reason;
  }

  /**
   * The new set, read again when a file changed while it was read: a Kubernetes secret update (the ..data swap)
   * that lands between the certificate and the key gave a mismatched pair, a `reload_failed` error line and a
   * counted failure, for a rotation that was fine. A set that fails when nothing moved under it is the failure.
   */
  async #loadSettled(): Promise<TlsMaterial> {
    const { files, logger } = this.#options;
    const load = this.#options.load ?? (() => loadTlsMaterial(files));
    for (let attempt = 1; ; attempt++) {
      const before = filesSignature(files);
      try {
        return await load();
      } catch (err) {
        if (attempt >= MAX_READS_WHILE_CHANGING || filesSignature(files) === before) throw err;
        logger.debug({ event: 'reload_reread', reason: (err as Error).message }, 'certificate files changed while being read; reading them again');
      }
    }
  }

  #report(outcome: ReloadOutcome): ReloadOutcome {
    this.#options.onReload?.(outcome);
    return outcome;
  }

  /** A new CRL or client CA bundle only affects new handshakes: find and end the live connections it refuses. */
  #closeRevoked(material: TlsMaterial): number {
    const judge = sweepJudge(liveJudge(material));
    // Many connections share one certificate: judge each presented chain once.
    const verdicts = new Map<string, SweepVerdict | undefined>();
    let closed = 0;
    for (const listener of this.#options.proxy.listeners()) {
      for (const [socket, context] of [...listener.connections]) {
        const chain = presentedCertificates(context.certificate);
        const key = chain.map((cert) => cert.fingerprint256).join('/');
        if (!verdicts.has(key)) verdicts.set(key, judge(chain));
        const verdict = verdicts.get(key);
        if (!verdict || !listener.closeConnection(socket, this.#options.revokedGraceMs)) continue;
        const { identity } = context;
        this.#options.logger.warn(
          { event: 'connection_revoked', reason: verdict.reason, listener: listener.name, remote: context.remoteAddress, subject: identity.subject, serial: identity.serial, ...(verdict.error ? { error: verdict.error } : {}) },
          `closing a live connection: ${SWEEP_MESSAGES[verdict.reason]}`,
        );
        closed += 1;
      }
    }
    return closed;
  }

  /**
   * Watches follow symlink targets, which move when a Kubernetes secret swaps its `..data` link,
   * and directories replaced at the same path: a watch stays on the directory it began on, so
   * after a directory was renamed over or removed and made again, it saw nothing more.
   */
  #refreshWatchers(): void {
    const wanted = watchTargets(this.#options.files);
    for (const [dir, { watcher, identity }] of this.#watchers) {
      const target = wanted.get(dir);
      if (target?.identity === identity) {
        this.#watchers.set(dir, { ...target, watcher });
        continue;
      }
      watcher.close();
      this.#watchers.delete(dir);
    }
    const wasPolling = this.#unwatched.size > 0;
    for (const dir of this.#unwatched) if (!wanted.has(dir)) this.#unwatched.delete(dir);
    for (const [dir, target] of wanted) {
      if (this.#watchers.has(dir)) continue;
      try {
        const watcher = watch(dir, { persistent: false }, (_event, name) => {
          if (this.#awaited(dir, name)) this.#onDirectoryEvent();
        });
        watcher.on('error', () => {
          watcher.close();
          if (this.#watchers.get(dir)?.watcher === watcher) this.#watchers.delete(dir);
        });
        this.#watchers.set(dir, { ...target, watcher });
        this.#unwatched.delete(dir);
      } catch (err) {
        this.#watchFailed(dir, err as Error);
      }
    }
    if (wasPolling && this.#unwatched.size === 0) {
      this.#options.logger.info({ event: 'watch_restored' }, 'watching the certificate directories again; the files are no longer polled');
    }
    this.#pollWhileUnwatched();
  }

  /**
   * A watch fails when the uid's inotify instances (fs.inotify.max_user_instances, 128 by default and
   * shared by every container of that uid on a Kubernetes node) or watches are used up. It said
   * "SIGHUP still reloads", which nobody sends in a pod: rotations were never picked up, and the old
   * certificate served until it expired. The files are polled instead, and the watch tried again.
   */
  #watchFailed(dir: string, err: Error): void {
    if (this.#unwatched.has(dir)) return;
    // Once polling, each new version directory of a secret mount fails the same way: said once. The one that failed
    // before has left the set by then (the rotation replaced it), while the files are still polled: a warning each rotation.
    const level = this.#unwatched.size === 0 && this.#poll === undefined ? 'warn' : 'debug';
    this.#unwatched.add(dir);
    this.#options.logger[level](
      { event: 'watch_failed', dir, reason: err.message },
      `cannot watch ${dir} for certificate changes (${err.message}); looking at the files every ${this.#pollMs() / 1000} s instead until the watch can be placed`,
    );
  }

  #pollMs(): number {
    return this.#options.pollMs ?? DEFAULTS.reloadPollMs;
  }

  #pollWhileUnwatched(): void {
    if (!this.#watching || this.#unwatched.size === 0) {
      clearInterval(this.#poll);
      this.#poll = undefined;
      return;
    }
    if (this.#poll) return;
    this.#polledSignature = filesSignature(this.#options.files);
    this.#poll = setInterval(() => this.#pollFiles(), this.#pollMs()).unref();
  }

  /** Tries the missing watches again, and takes a changed file for a directory event. */
  #pollFiles(): void {
    this.#refreshWatchers();
    const signature = filesSignature(this.#options.files);
    if (signature === this.#polledSignature) return;
    this.#polledSignature = signature;
    this.#onDirectoryEvent();
  }

  /**
   * A change in a directory watched in place of a missing one below it counts only for that one's
   * name: the parent may be busy (/tmp, a volume of other files), and each of its changes was a
   * failed reload.
   */
  #awaited(dir: string, name: string | null): boolean {
    const awaiting = this.#watchers.get(dir)?.awaiting;
    return awaiting === undefined || name === null || awaiting.has(name);
  }

  /**
   * Waits for a quiet time, as writers touch several files, but at most QUIET_WAIT_CAP quiet times after
   * the first change: a directory never quiet (the proxy's log written beside the certificates, under
   * steady traffic) held every rotation back for as long as the writes went on.
   */
  #onDirectoryEvent(): void {
    const quietMs = this.#options.debounceMs ?? DEFAULTS.reloadDebounceMs;
    const now = Date.now();
    this.#firstChangeAt ??= now;
    clearTimeout(this.#debounce);
    this.#debounce = setTimeout(
      () => {
        this.#firstChangeAt = undefined;
        void this.reload('file');
      },
      Math.max(0, Math.min(quietMs, this.#firstChangeAt + quietMs * QUIET_WAIT_CAP - now)),
    );
  }
}

interface WatchTarget {
  /** Which directory it is now (device and inode). */
  readonly identity: string;
  /** For one watched for some of its names only (a missing directory below it, a symlink on the way to a file): those names; undefined, any change counts. */
  readonly awaiting: ReadonlySet<string> | undefined;
}

/**
 * The directories to watch: those of the files, of their targets, and those holding a symlink on the way, for
 * that link's name. A symlinked certificate directory (`certs -> certs.v1`) swapped for a link to a new one
 * changed neither the directory the path names nor the one it resolved to, both the old target: nothing saw
 * it, and the new set was never loaded. One missing right now (removed, to be made again) is watched through
 * the nearest directory above it, which sees it come back.
 */
function watchTargets(files: TlsFiles): Map<string, WatchTarget> {
  const targets = new Map<string, WatchTarget>();
  const want = (dir: string, name: string | undefined) => {
    let at = dir;
    let below = name;
    let identity = directoryIdentity(at);
    while (identity === undefined && dirname(at) !== at) {
      below = basename(at);
      at = dirname(at);
      identity = directoryIdentity(at);
    }
    if (identity !== undefined) targets.set(at, { identity, awaiting: awaitingIn(targets.get(at), below) });
  };
  for (const path of [files.cert, files.key, files.clientCa, files.crl]) {
    if (path === undefined) continue;
    want(dirname(path), undefined);
    const { real, links } = resolveSymlinks(path);
    if (real !== undefined) want(dirname(real), undefined);
    for (const link of links) want(dirname(link), basename(link));
  }
  return targets;
}

/** What a directory's watch waits for once `below` (undefined: the directory itself) is wanted too. */
function awaitingIn(known: WatchTarget | undefined, below: string | undefined): ReadonlySet<string> | undefined {
  if (below === undefined) return undefined;
  if (known === undefined) return new Set([below]);
  return known.awaiting && new Set([...known.awaiting, below]);
}

/** Reads of a set whose files keep changing under each read, before its failure counts: a writer that never settles. */
const MAX_READS_WHILE_CHANGING = 3;

function directoryIdentity(dir: string): string | undefined {
  try {
    const stats = statSync(dir);
    return stats.isDirectory() ? `${stats.dev}:${stats.ino}` : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Resolves `path` one name at a time, as the kernel does: the symlinks it goes through, and where it ends
 * (undefined while a name on the way is missing, mid-swap: the directory watch above sees it come back).
 */
function resolveSymlinks(path: string): { real: string | undefined; links: string[] } {
  const links: string[] = [];
  const names = path.split(sep);
  let at = isAbsolute(path) ? sep : process.cwd();
  while (names.length > 0) {
    const name = names.shift()!;
    if (name === '' || name === '.') continue;
    if (name === '..') {
      at = dirname(at);
      continue;
    }
    const next = join(at, name);
    let target: string;
    try {
      target = readlinkSync(next);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EINVAL') return { real: undefined, links };
      // Not a symlink: go on inside it.
      at = next;
      continue;
    }
    links.push(next);
    if (links.length > MAX_SYMLINKS) return { real: undefined, links };
    names.unshift(...target.split(sep));
    if (isAbsolute(target)) at = sep;
  }
  return { real: at, links };
}

/** Linux's limit on the symlinks followed for one path: more is a loop, which the read refuses. */
const MAX_SYMLINKS = 40;

/**
 * The container's default CRL may appear after start, but once in force its
 * disappearance (a Secret re-created without it) would quietly let every
 * revoked client back in: refuse that set like any broken one.
 */
function checkCrlKept(files: TlsFiles, current: TlsMaterial, next: TlsMaterial): void {
  if (files.crlOptional && current.crl && !next.crl) {
    throw new Error(`--mtls_crl: ${files.crl} is gone; its revocations stay in force (put the CRL back, or restart to run without one)`);
  }
}

function sameMaterial(a: TlsMaterial, b: TlsMaterial): boolean {
  const same = (x: Buffer | undefined, y: Buffer | undefined) => (x === undefined ? y === undefined : y !== undefined && x.equals(y));
  return same(a.key, b.key) && same(a.cert, b.cert) && same(a.ca, b.ca) && same(a.crl, b.crl);
}


export type LiveRefusal = 'revoked' | 'unknown_ca';

/** Why the sweep after a reload closes a live connection: what a new handshake would refuse, or a chain it cannot read. */
interface SweepVerdict {
  readonly reason: LiveRefusal | 'unreadable';
  readonly error?: string;
}

const SWEEP_MESSAGES: Record<SweepVerdict['reason'], string> = {
  revoked: 'its client certificate is revoked by the new CRL',
  unknown_ca: 'its client certificate is not issued by a CA of the new --mtls_client_ca',
  unreadable: 'its client certificate could not be read to check it against the new set (its next handshake is verified as usual)',
};

/**
 * OpenSSL takes certificates in BER (a length in more octets than needed, an indefinite length) that
 * the CRL index cannot read. Such a chain threw out of the reload: the process ended, taking every
 * connection (and, as the entrypoint, OVMS) with it. Unjudged, it is closed like a refused one, as it
 * may be revoked: its client reconnects, and OpenSSL judges that handshake under the new set.
 */
function sweepJudge(judge: ReturnType<typeof liveJudge>): (chain: readonly X509Certificate[]) => SweepVerdict | undefined {
  return (chain) => {
    try {
      const reason = judge(chain);
      return reason ? { reason } : undefined;
    } catch (err) {
      return { reason: 'unreadable', error: (err as Error).message };
    }
  };
}

/** Judges a chain verified under earlier material as a handshake under `material` would. */
export function liveJudge(material: TlsMaterial): (presented: readonly X509Certificate[]) => LiveRefusal | undefined {
  const index = new RevocationIndex(material.crls);
  return (presented) => liveRefusal(presented, material.clientCas, index);
}

/** Why a connection verified at its handshake would be refused by a handshake under the new material. */
function liveRefusal(presented: readonly X509Certificate[], cas: readonly X509Certificate[], index: RevocationIndex): LiveRefusal | undefined {
  const path = pathToTrust(presented, cas);
  if (!path) return 'unknown_ca';
  return index.revokesAny(path) ? 'revoked' : undefined;
}
