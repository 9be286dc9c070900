/**
 * What is wrong with the program named by --mtls_ovms_binary, checked before anything listens. The line
 * said "does not exist or is not an executable file" whatever the cause, and a launcher script whose
 * interpreter is missing (`#!/bin/bash` in an image without bash, or a first line ending in a CR, saved
 * on Windows) passed, to fail once the listeners were up: setpriv's "failed to execute run-ovms.sh: No
 * such file or directory" named a file that exists, and the wrapper exited 127.
 */
import { accessSync, closeSync, constants, openSync, readSync, statSync } from 'node:fs';
import { describeIdentity, MAY_EXECUTE, MAY_READ, refusalFor, type Identity } from './access-denial.js';
import type { OvmsBinary } from './entrypoint-config.js';

/** A `#!` line is read up to this: Linux reads no further (BINPRM_BUF_SIZE). */
const SHEBANG_BYTES = 256;

function executable(path: string): boolean {
  try {
    accessSync(path, constants.X_OK);
    return statSync(path).isFile();
  } catch {
    return false;
  }
}

function firstBytes(path: string): string {
  const fd = openSync(path, constants.O_RDONLY | (constants.O_NONBLOCK ?? 0));
  try {
    const buffer = Buffer.alloc(SHEBANG_BYTES);
    return buffer.subarray(0, readSync(fd, buffer, 0, SHEBANG_BYTES, 0)).toString('latin1');
  } finally {
    closeSync(fd);
  }
}

/** The interpreter a script's `#!` line names, as the kernel takes it: up to the first blank, a CR included. */
function interpreterOf(path: string): string | undefined {
  let head: string;
  try {
    head = firstBytes(path);
  } catch {
    return undefined; // Unreadable but executable: the kernel may still run it, and says why if not.
  }
  return /^#![ \t]*([^ \t\n]+)/.exec(head)?.[1];
}

function interpreterProblem(path: string, runAs: Identity | undefined): string | undefined {
  const interpreter = interpreterOf(path);
  if (interpreter === undefined) return undefined;
  if (executable(interpreter)) return runAs && scriptRefusal(path, interpreter, runAs);
  if (interpreter.endsWith('\r')) {
    return `is a script with Windows line endings: its first line names the interpreter '${interpreter.slice(0, -1)}\\r', which no system has (convert it: \`sed -i 's/\\r$//' ${path}\` or dos2unix)`;
  }
  return `is a script whose interpreter ${interpreter} (its first line, #!) does not exist or cannot be run here (install it in the image, or name one that is there, such as #!/bin/sh)`;
}

function fileProblem(path: string): string | undefined {
  let stats;
  try {
    stats = statSync(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    return code === 'ENOENT' ? 'does not exist' : `cannot be examined (${code ?? (err as Error).message})`;
  }
  if (stats.isDirectory()) return 'is a directory, not the executable in it';
  if (!stats.isFile()) return 'is not a regular file';
  if (!executable(path)) return `is not executable (mode 0${(stats.mode & 0o7777).toString(8)}: chmod +x it)`;
  return undefined;
}

/**
 * Root passes access(X_OK) whenever any x bit is set, and the check runs as root: a binary the
 * --mtls_ovms_user may not run (mode 0750 of root's group, in a directory of mode 0700) passed, and
 * setpriv failed with "Permission denied" (exit 126) once the listeners were up. Judged for that user.
 */
function userRefusal(path: string, runAs: Identity, want: number): string | undefined {
  const refusal = refusalFor(path, runAs, want);
  if (refusal === undefined) return undefined;
  const bit = want === MAY_READ ? 'r' : 'x';
  return `${describeIdentity(runAs)}, the --mtls_ovms_user OVMS runs as: ${refusal}; give that user, one of its groups or all ${bit} permission on it (chmod, chgrp or chown), or pass --mtls_ovms_user a user that may`;
}

/** The interpreter must be run by OVMS's user, and reads the script as that user. */
function scriptRefusal(path: string, interpreter: string, runAs: Identity): string | undefined {
  const interpreterRefused = userRefusal(interpreter, runAs, MAY_EXECUTE);
  if (interpreterRefused !== undefined) return `is a script whose interpreter ${interpreter} (its first line, #!) cannot be run by ${interpreterRefused}`;
  const unreadable = userRefusal(path, runAs, MAY_READ);
  return unreadable && `is a script, which its interpreter reads, and it cannot be read by ${unreadable}`;
}

/**
 * Why `path` cannot be run as OVMS, in words to follow the path in an error line; undefined if it can.
 * `given`: by --mtls_ovms_binary; the option is suggested only to a user who did not give it.
 * `runAs`: the user OVMS will run as (ovmsIdentity), when not this process's.
 */
export function ovmsBinaryProblem({ path, given }: OvmsBinary, runAs?: Identity): string | undefined {
  const problem = fileProblem(path);
  if (problem !== undefined) return given ? problem : `${problem} (pass --mtls_ovms_binary PATH to the ovms executable)`;
  const refused = runAs && userRefusal(path, runAs, MAY_EXECUTE);
  if (refused !== undefined) return `cannot be run by ${refused}`;
  return interpreterProblem(path, runAs);
}
