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
  if (shut !== undefined) {
    return `cannot be read by ${who}: the directory ${shut} (${ownerAndMode(statOrUndefined(shut))}) does not let it in (every directory on the way needs x permission for it)`;
  }
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

function processIdentity(): string {
  return `uid ${process.getuid?.() ?? '?'} (groups ${processGroups().join(',') || '?'})`;
}

function processGroups(): number[] {
  const gid = process.getgid?.();
  const groups = process.getgroups?.() ?? [];
  return [...new Set(gid === undefined ? groups : [gid, ...groups])];
}

/** The first directory on the way to `path`, symlinks followed, that this process may not search. */
function closedDirectory(path: string, hops = 0): string | undefined {
  const parts = resolve(path).split('/').filter(Boolean);
  let at = '/';
  for (const [i, part] of parts.entries()) {
    if (!searchable(at)) return at;
    const next = join(at, part);
    const target = linkTarget(next);
    if (target !== undefined && hops < MAX_LINK_HOPS) return closedDirectory(resolve(at, target, ...parts.slice(i + 1)), hops + 1);
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
