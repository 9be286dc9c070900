/** File handling for `ovms-mtls certs`: private keys never world-readable, no half-written files. */
import { randomBytes } from 'node:crypto';
import { chmod, lstat, mkdir, open, readFile, rename, stat, unlink } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { dirname, isAbsolute, join, resolve, sep } from 'node:path';
import { ConfigError } from '../errors.js';
import { FileKindError, MAX_TLS_FILE_BYTES, readRegularFile } from '../regular-file.js';
import { accessDenial, writeDenial } from '../access-denial.js';

export const KEY_MODE = 0o600;
export const PUBLIC_MODE = 0o644;
const DIR_MODE = 0o755;
/** How long a second `certs revoke`/`renew-crl` waits for the first one to finish with the CRL. */
const LOCK_WAIT_MS = 30_000;

export interface PlannedFile {
  name: string;
  contents: string;
  mode: number;
  description: string;
}

export interface WrittenFile {
  name: string;
  path: string;
  mode: number;
  description: string;
}

/** Why a file or directory could not be made (`path` if the error names none), in words to act on where there are any; else Node's own. */
function writeFailure(err: unknown, path: string): string {
  const { code, message } = err as NodeJS.ErrnoException;
  const dir = dirname((err as NodeJS.ErrnoException).path ?? path);
  if (code === 'EACCES' || code === 'EPERM') return writeDenial(dir);
  if (code === 'EROFS') return `${dir} is on a read-only file system (give --dir a writable directory)`;
  return message;
}

export async function ensureDirectory(dir: string): Promise<void> {
  let isDirectory: boolean;
  try {
    await makeDirectories(resolve(dir));
    // Inside the try: a symlink loop passes mkdir (EEXIST) and fails only here, with ELOOP.
    isDirectory = (await stat(dir)).isDirectory();
  } catch (err) {
    throw new ConfigError(`cannot create directory ${dir}: ${writeFailure(err, resolve(dir))}`, { cause: err });
  }
  if (!isDirectory) throw new ConfigError(`${dir} exists and is not a directory`);
}

/**
 * `mkdir -p` one level at a time. Node's own `recursive` retries a level whose mkdir says ENOENT while
 * its parent exists, and so spins for ever under /proc or /sys; here that ENOENT is the answer.
 */
async function makeDirectories(dir: string): Promise<void> {
  const levels = dir.split(sep).filter((part) => part !== '');
  let path: string = sep;
  for (const level of levels) {
    path = join(path, level);
    try {
      await mkdir(path, { mode: DIR_MODE });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
  }
}

/** Refuses before anything is written, so a refused run leaves the directory as it was. */
export async function assertAbsent(dir: string, names: string[]): Promise<void> {
  const existing: string[] = [];
  for (const name of names) {
    if (await exists(join(dir, name))) existing.push(join(dir, name));
  }
  if (existing.length === 0) return;
  const more = existing.length > 1 ? ` (and ${existing.length - 1} more of the files to write)` : '';
  throw new ConfigError(`${existing[0]} already exists${more}; pass --force to overwrite`);
}

/**
 * All files are written to temp files first and renamed into place only once every one of them is on
 * disk: a write that fails (disk full, quota, file size limit) replaces nothing, instead of leaving a new
 * server.pem next to the old server.key, which no proxy can load.
 */
export async function writeFiles(dir: string, files: PlannedFile[]): Promise<WrittenFile[]> {
  const staged: { temp: string; path: string; mode: number }[] = [];
  try {
    for (const file of files) {
      const path = join(dir, file.name);
      staged.push({ temp: await stageFile(path, file.contents, file.mode), path, mode: file.mode });
    }
  } catch (err) {
    await removeTemps(staged);
    const unchanged = files.length > 1 ? `; none of the ${files.length} files was replaced` : '';
    throw new ConfigError(`${(err as Error).message}${unchanged}`, { cause: err });
  }
  for (const [i, file] of staged.entries()) {
    try {
      await rename(file.temp, file.path);
    } catch (err) {
      await removeTemps(staged.slice(i));
      throw new ConfigError(`cannot write ${file.path}: ${(err as Error).message}`, { cause: err });
    }
    await chmod(file.path, file.mode);
  }
  return files.map((file) => ({ name: file.name, path: join(dir, file.name), mode: file.mode, description: file.description }));
}

/**
 * Writes a temp file next to `path` for a later rename, so that a reader (a proxy reloading its certs)
 * sees the old file or the new one, never a torn one. The temp file is created with its final mode, so a
 * key is never readable by others, and chmod'ed again because the process umask may have narrowed it.
 */
async function stageFile(path: string, contents: string, mode: number): Promise<string> {
  const temp = `${path}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
  try {
    const handle = await open(temp, 'wx', mode);
    try {
      await handle.writeFile(contents);
      await handle.chmod(mode);
      await handle.sync();
    } finally {
      await handle.close();
    }
    return temp;
  } catch (err) {
    await unlink(temp).catch(() => undefined);
    throw new Error(`cannot write ${path}: ${writeFailure(err, path)}`, { cause: err });
  }
}

async function removeTemps(staged: { temp: string }[]): Promise<void> {
  await Promise.all(staged.map((file) => unlink(file.temp).catch(() => undefined)));
}

/** Reads a PEM file of the PKI; a missing one means `certs init` has not run for this directory. */
export async function readMaterial(path: string, dir: string): Promise<string> {
  return (await readMaterialBytes(path, dir)).toString('utf8');
}

/** `option`: the flag that named the path (`cert` for `--cert`), for an error line to name it too. */
export async function readMaterialBytes(path: string, dir: string, option?: string): Promise<Buffer> {
  const bytes = await readOptionalBytes(path, option);
  if (bytes === undefined) throw new ConfigError(`${path} not found: run \`ovms-mtls certs init --dir ${dir}\` first`);
  return bytes;
}

export async function readOptionalMaterial(path: string): Promise<string | undefined> {
  return (await readOptionalBytes(path))?.toString('utf8');
}

async function readOptionalBytes(path: string, option?: string): Promise<Buffer | undefined> {
  try {
    return await readRegularFile(path, MAX_TLS_FILE_BYTES);
  } catch (err) {
    const named = option === undefined ? path : `--${option} ${path}`;
    if (err instanceof FileKindError) throw new ConfigError(`${named} ${err.message} (give the PEM file itself, as \`ovms-mtls certs\` wrote it)`, { cause: err });
    const { code } = err as NodeJS.ErrnoException;
    if (code === 'ENOENT') return undefined;
    if (code === 'EACCES' || code === 'EPERM') throw new ConfigError(`${named} ${accessDenial(path)}`, { cause: err });
    throw new ConfigError(`cannot read ${named}: ${(err as Error).message}`, { cause: err });
  }
}

/** `--cert` is a path; a bare name that is not a file also finds DIR/NAME.pem (as `certs client --name` wrote it). */
export async function resolveCertPath(dir: string, cert: string): Promise<string> {
  const asGiven = resolve(cert);
  if (await exists(asGiven)) return asGiven;
  const candidates = isAbsolute(cert) || cert.includes('/') ? [] : [join(dir, cert), join(dir, `${cert}.pem`)];
  for (const candidate of candidates) {
    if (await exists(candidate)) return candidate;
  }
  throw new ConfigError(`--cert ${cert}: no such file${candidates.length > 0 ? ` (also looked for ${candidates.join(' and ')})` : ''}`);
}

/**
 * Only ENOENT means absent. Any other answer (a --dir that is a file: ENOTDIR; a symlink loop: ELOOP;
 * a name past the system's limit: ENAMETOOLONG) is the user's path to fix, said in one line.
 */
async function exists(path: string): Promise<boolean> {
  try {
    await lstat(path);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw new ConfigError(`cannot check ${path}: ${(err as Error).message} (check the path)`, { cause: err });
  }
}

/**
 * Runs `work` holding PATH.lock (created with O_EXCL, holding our pid). Revoke and renew-crl read the CRL,
 * add to it and write it back: two at once would each write their own revocation onto the same old CRL,
 * and the second rename would drop the first one's revocation while both reported success.
 */
export async function withFileLock<T>(path: string, work: () => Promise<T>): Promise<T> {
  const lock = `${path}.lock`;
  await acquireLock(lock);
  try {
    return await work();
  } finally {
    await unlink(lock).catch(() => undefined);
  }
}

async function acquireLock(lock: string): Promise<void> {
  const deadline = Date.now() + LOCK_WAIT_MS;
  for (let delayMs = 10; ; delayMs = Math.min(delayMs * 2, 250)) {
    if (await tryCreateLock(lock)) return;
    const holder = await lockHolder(lock);
    // A holder killed mid-way leaves its lock behind; removing it automatically could remove a live one.
    if (holder !== undefined && !isRunning(holder)) {
      throw new ConfigError(`${lock} was left by process ${holder}, which no longer runs; remove it if no other certs command is working on this directory, then retry`);
    }
    if (Date.now() >= deadline) {
      const who = holder === undefined ? 'another process' : `process ${holder}`;
      throw new ConfigError(`${lock} is still held by ${who} (another certs revoke or renew-crl on this directory) after ${LOCK_WAIT_MS / 1000} s; retry when it is done`);
    }
    await sleep(delayMs);
  }
}

async function tryCreateLock(lock: string): Promise<boolean> {
  try {
    const handle = await open(lock, 'wx', PUBLIC_MODE);
    try {
      await handle.writeFile(`${process.pid}\n`);
    } finally {
      await handle.close();
    }
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw new ConfigError(`cannot create ${lock}: ${(err as Error).message}`, { cause: err });
  }
}

/** The pid in the lock file; undefined while its creator has not written it yet, or once it is gone. */
async function lockHolder(lock: string): Promise<number | undefined> {
  const text = await readFile(lock, 'utf8').catch(() => '');
  const pid = Number.parseInt(text, 10);
  return Number.isInteger(pid) && pid > 0 ? pid : undefined;
}

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
