/**
 * Running as a user instead of root. Started as root, ovms-mtls binds the
 * public ports and reads the TLS key first, then OVMS runs as
 * --mtls_ovms_user and the proxy drops to --mtls_user. Started as anybody
 * else, nothing changes. The nginx example promised this and never did it.
 */
import { readFileSync } from 'node:fs';
import { ConfigError } from './errors.js';

export interface UserAccount {
  readonly name: string;
  readonly uid: number;
  readonly gid: number;
  /** False for a bare numeric id with no /etc/passwd entry: no supplementary groups to look up. */
  readonly inPasswd: boolean;
  /** Its home directory from /etc/passwd; `/` for a bare numeric id, as Docker gives one. */
  readonly home: string;
}

/** Entries of an /etc/passwd text; malformed lines are skipped. */
export function parsePasswd(text: string): UserAccount[] {
  const accounts: UserAccount[] = [];
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const [name, , uid, gid, , home] = line.split(':');
    if (!name || !/^\d+$/.test(uid ?? '') || !/^\d+$/.test(gid ?? '')) continue;
    accounts.push({ name, uid: Number(uid), gid: Number(gid), inPasswd: true, home: home || '/' });
  }
  return accounts;
}

export interface LookupOptions {
  /** The flag that named the user, for the error message. */
  readonly flag: string;
  /** /etc/passwd contents; read from disk when absent. */
  readonly passwd?: string;
}

/**
 * A user by name or numeric uid. Reads /etc/passwd instead of asking NSS:
 * container images keep their users there, and no child process is needed.
 */
export function lookupUser(nameOrUid: string, options: LookupOptions): UserAccount {
  const passwd = options.passwd ?? readPasswd(options.flag);
  const accounts = parsePasswd(passwd);
  const found = accounts.find((a) => a.name === nameOrUid) ?? (/^\d+$/.test(nameOrUid) ? accounts.find((a) => a.uid === Number(nameOrUid)) : undefined);
  if (found) return found;
  if (/^\d+$/.test(nameOrUid)) return { name: nameOrUid, uid: Number(nameOrUid), gid: Number(nameOrUid), inPasswd: false, home: '/' };
  throw new ConfigError(`--${options.flag}: user '${nameOrUid}' does not exist (create it, e.g. \`useradd --system ${nameOrUid}\`, or pass an existing user or numeric uid)`);
}

function readPasswd(flag: string): string {
  try {
    return readFileSync('/etc/passwd', 'utf8');
  } catch (err) {
    throw new ConfigError(`--${flag}: cannot read /etc/passwd to look the user up (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
  }
}

/** The gids of the /etc/group entries that list `name` as a member. */
export function memberships(name: string, group: string): number[] {
  const gids: number[] = [];
  for (const line of group.split('\n')) {
    const [, , gid, members] = line.split(':');
    if (/^\d+$/.test(gid ?? '') && (members ?? '').split(',').includes(name)) gids.push(Number(gid));
  }
  return gids;
}

/**
 * Every group OVMS has when setpriv runs it as `user` with --init-groups (see spawnCommand): its gid
 * (--regid), then what initgroups(3) gives the passwd entry of its uid (as setpriv looks it up): that
 * entry's gid and the groups listing its name.
 */
export function initGroups(user: UserAccount, files: { readonly passwd?: string; readonly group?: string } = {}): number[] {
  const entry = parsePasswd(files.passwd ?? readPasswd('mtls_ovms_user')).find((account) => account.uid === user.uid) ?? user;
  const member = memberships(entry.name, files.group ?? etcGroupOrNone());
  return [...new Set([user.gid, entry.gid, ...member])];
}

/** An image without /etc/group (a minimal one) gives initgroups(3) no supplementary groups to add, not a reason to refuse. */
function etcGroupOrNone(): string {
  try {
    return readFileSync('/etc/group', 'utf8');
  } catch {
    return '';
  }
}

/**
 * The environment OVMS gets when it runs as `user` after a start as root; undefined: ours as it is.
 * setpriv changes the user, not the environment, and the HOME that docker and Kubernetes set for
 * root (root's home, mode 0700) was OVMS's too: what it or the tools it runs cache under ~
 * (a --pull's Hugging Face downloads) failed with "Permission denied". It gets its user's home, as
 * su and gosu give; a HOME set to anything else was set on purpose and stays.
 */
export function ovmsEnvironment(user: UserAccount | undefined, env: NodeJS.ProcessEnv = process.env, passwd?: string): NodeJS.ProcessEnv | undefined {
  if (!user) return undefined;
  const rootHome = parsePasswd(passwd ?? readPasswd('mtls_ovms_user')).find((account) => account.uid === 0)?.home ?? '/root';
  if (env['HOME'] !== undefined && env['HOME'] !== rootHome) return undefined;
  return { ...env, HOME: user.home };
}

export function isRoot(): boolean {
  return process.getuid?.() === 0;
}

/** Who OVMS and the proxy run as; `undefined` = stay as we are. */
export interface PrivilegePlan {
  readonly ovms?: UserAccount | undefined;
  readonly proxy?: UserAccount | undefined;
}

export interface PlanOptions {
  readonly ovmsUser: string;
  readonly proxyUser: string;
  readonly root: boolean;
  readonly passwd?: string;
}

/**
 * Resolves both users when started as root (a missing user is a startup
 * error); as anybody else there is nothing to drop. `root`/uid 0 means "stay".
 */
export function planPrivileges(options: PlanOptions): PrivilegePlan {
  if (!options.root) return {};
  const resolve = (name: string, flag: string) => {
    const account = lookupUser(name, { flag, ...(options.passwd !== undefined ? { passwd: options.passwd } : {}) });
    return account.uid === 0 ? undefined : account;
  };
  return { ovms: resolve(options.ovmsUser, 'mtls_ovms_user'), proxy: resolve(options.proxyUser, 'mtls_user') };
}

/** Switching users takes both: setgroups/setgid, then setuid (Linux capability numbers). */
const SWITCH_CAPABILITIES = [
  { name: 'CAP_SETGID', bit: 6n, add: 'SETGID' },
  { name: 'CAP_SETUID', bit: 7n, add: 'SETUID' },
] as const;

/** A capability set line of /proc/<pid>/status (`CapEff:\t000001ffffffffff`); undefined when missing. */
function capabilitySet(status: string, field: 'CapEff' | 'CapBnd'): bigint | undefined {
  const hex = new RegExp(`^${field}:\\s*([0-9a-f]+)$`, 'm').exec(status)?.[1];
  return hex === undefined ? undefined : BigInt(`0x${hex}`);
}

/**
 * The switch capabilities a process with this /proc/<pid>/status lacks. The proxy drops with its
 * effective set; OVMS's setpriv, a root exec, gets the bounding set: both must have them.
 */
export function missingSwitchCapabilities(status: string): (typeof SWITCH_CAPABILITIES)[number][] {
  const sets = [capabilitySet(status, 'CapEff'), capabilitySet(status, 'CapBnd')];
  return SWITCH_CAPABILITIES.filter(({ bit }) => sets.some((set) => set !== undefined && (set & (1n << bit)) === 0n));
}

function ownStatus(): string {
  try {
    return readFileSync('/proc/self/status', 'utf8');
  } catch {
    // Not Linux or no /proc: nothing to tell; a failed switch still stops the start.
    return '';
  }
}

/**
 * Root without CAP_SETUID/CAP_SETGID (docker --cap-drop ALL, a Kubernetes securityContext that
 * drops them) cannot run OVMS as its user: setpriv failed, then the proxy's own drop threw an
 * internal error with a stack, after the listeners were up. Refused before anything starts.
 */
export function assertCanSwitchUsers(plan: PrivilegePlan, status: string = ownStatus()): void {
  const target = plan.ovms ?? plan.proxy;
  if (!target) return;
  const missing = missingSwitchCapabilities(status);
  if (missing.length === 0) return;
  const names = missing.map((cap) => cap.name).join(' and ');
  const adds = missing.map((cap) => `--cap-add ${cap.add}`).join(' ');
  throw new ConfigError(
    `--${plan.ovms ? 'mtls_ovms_user' : 'mtls_user'}: started as root without ${names} (e.g. --cap-drop ALL), so it cannot switch to '${target.name}' (uid ${target.uid}): give ${missing.length > 1 ? 'them' : 'it'} back (docker ${adds}, Kubernetes securityContext.capabilities.add), or start it as that user (docker --user ${target.uid}, Kubernetes runAsUser: ${target.uid})`,
  );
}

export type UserOption = 'mtls_ovms_user' | 'mtls_user';

/**
 * The user options given to an entrypoint started as anybody but root, which has nothing to drop:
 * those naming a user other than `uid` (or none there is), which it cannot take.
 */
export function usersNotTaken(given: Partial<Record<UserOption, string>>, uid: number, passwd?: string): UserOption[] {
  return (Object.keys(given) as UserOption[]).filter((flag) => !namesUid(given[flag]!, uid, passwd));
}

function namesUid(nameOrUid: string, uid: number, passwd: string | undefined): boolean {
  try {
    return lookupUser(nameOrUid, { flag: 'mtls_user', ...(passwd !== undefined ? { passwd } : {}) }).uid === uid;
  } catch {
    return false;
  }
}

/**
 * Irreversibly becomes `user`: supplementary groups, then gid, then uid
 * (after setuid we could no longer change the groups). Call after the ports
 * are bound and the keys read.
 */
export function dropPrivileges(user: UserAccount): void {
  // Node has process.initgroups on POSIX; @types/node 20 does not declare it.
  const { initgroups } = process as NodeJS.Process & { initgroups?: (user: string, extraGroup: number) => void };
  if (user.inPasswd && initgroups) initgroups.call(process, user.name, user.gid);
  else process.setgroups!([user.gid]);
  process.setgid!(user.gid);
  process.setuid!(user.uid);
  if (process.getuid!() !== user.uid || process.geteuid!() !== user.uid) {
    throw new Error(`privilege drop to ${user.name} did not take effect`);
  }
}
