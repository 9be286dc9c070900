/**
 * Says why the process was refused a file (EACCES) in terms an operator can act on. The line
 * used to end in "check the file's owner and mode" whatever the cause: for a key of mode 0644
 * in a directory the process may not enter (mode 0750 of another group, or a Kubernetes secret
 * mount's hidden `..data` directory), that sent people to a file that was fine.
 */
import { accessSync, constants, readlinkSync, statSync, type Stats } from 'node:fs';
import { join, resolve } from 'node:path';

/** Symlinks followed before giving up, as the kernel's own limit (ELOOP). */
const MAX_LINK_HOPS = 40;

/** `cannot be read by uid U (groups G): <why> (<what to do>)`, to follow the path in an error line. */
export function accessDenial(path: string): string {
  const who = processIdentity();
  const shut = closedDirectory(path);
  if (shut !== undefined) return `cannot be read by ${who}: ${directoryRefusal(shut)}`;
  const stats = statOrUndefined(path);
  if (stats === undefined) return `cannot be read by ${who} (check the owner and mode of the file and of the directories on the way)`;
  return `cannot be read by ${who}: the file is ${ownerAndMode(stats)} (give that uid or one of its groups read permission: chown, chgrp or chmod; in Kubernetes, the pod's fsGroup and the volume's defaultMode)`;
}

/**
 * `uid U (groups G) may not create files in DIR (mode, owner): what to do`, for a file this process could not
 * create in `dir` (EACCES): `certs init --dir` said "EACCES: permission denied, open
 * '.../server.pem.4242.1f2e3d4c.tmp'", naming a temp file the user never asked for, and not what to change.
 */
export function writeDenial(dir: string): string {
  const shut = closedDirectory(dir) ?? (searchable(dir) ? undefined : dir);
  const where = shut === undefined ? `create files in ${dir}` : `enter ${shut}`;
  return `${processIdentity()} may not ${where} (${ownerAndMode(statOrUndefined(shut ?? dir))}): give --dir a directory this user may write, or run as its owner`;
}

/** Who a file is judged for other than this process (OVMS's user, as it will run): access(2) answers only for us. */
export interface Identity {
  readonly name: string;
  readonly uid: number;
  /** Its gid and supplementary groups: every group the kernel compares a file's group with. */
  readonly groups: readonly number[];
}

/** Mode bits of the others' class; the group's are these shifted by 3, the owner's by 6. */
export const MAY_READ = 4;
export const MAY_EXECUTE = 1;

export function describeIdentity(who: Identity): string {
  return `${who.name} (uid ${who.uid}, groups ${who.groups.join(',')})`;
}

/**
 * What refuses `who` the access `want` (MAY_READ, MAY_EXECUTE) to `path`: the first directory on the
 * way it may not enter, else the file's own mode; undefined when neither does. Mode bits as the kernel
 * reads them for a process without capabilities (ACLs are not read).
 */
export function refusalFor(path: string, who: Identity, want: number): string | undefined {
  const shut = closedDirectory(path, (dir) => modeAllows(statOrUndefined(dir), who, MAY_EXECUTE));
  if (shut !== undefined) return directoryRefusal(shut);
  const stats = statOrUndefined(path);
  return modeAllows(stats, who, want) ? undefined : `the file is ${ownerAndMode(stats)}`;
}

/** Only the owner's bits count for the owner, only the group's for a member, even where the others' would allow more. */
function modeAllows(stats: Stats | undefined, who: Identity, want: number): boolean {
  if (stats === undefined) return true; // Missing, not refused: the caller's own checks say so.
  const shift = stats.uid === who.uid ? 6 : who.groups.includes(stats.gid) ? 3 : 0;
  return ((stats.mode >> shift) & want) === want;
}

function directoryRefusal(dir: string): string {
  return `the directory ${dir} (${ownerAndMode(statOrUndefined(dir))}) does not let it in (every directory on the way needs x permission for it)`;
}

function processIdentity(): string {
  return `uid ${process.getuid?.() ?? '?'} (groups ${processGroups().join(',') || '?'})`;
}

function processGroups(): number[] {
  const gid = process.getgid?.();
  const groups = process.getgroups?.() ?? [];
  return [...new Set(gid === undefined ? groups : [gid, ...groups])];
}

/** The first directory on the way to `path`, symlinks followed, that this process (or whom `enters` judges for) may not search. */
function closedDirectory(path: string, enters: (dir: string) => boolean = searchable, hops = 0): string | undefined {
  const parts = resolve(path).split('/').filter(Boolean);
  let at = '/';
  for (const [i, part] of parts.entries()) {
    if (!enters(at)) return at;
    const next = join(at, part);
    const target = linkTarget(next);
    if (target !== undefined && hops < MAX_LINK_HOPS) return closedDirectory(resolve(at, target, ...parts.slice(i + 1)), enters, hops + 1);
    at = next;
  }
  return undefined;
}

function searchable(dir: string): boolean {
  try {
    accessSync(dir, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

function linkTarget(path: string): string | undefined {
  try {
    return readlinkSync(path);
  } catch {
    return undefined;
  }
}

function statOrUndefined(path: string): Stats | undefined {
  try {
    return statSync(path);
  } catch {
    return undefined;
  }
}

function ownerAndMode(stats: Stats | undefined): string {
  if (stats === undefined) return 'owner and mode unknown';
  return `mode 0${(stats.mode & 0o7777).toString(8)}, owner uid ${stats.uid}, group ${stats.gid}`;
}
