/**
 * Errors the user can act on. Each has a stable `code` (for tests and for
 * scripts that parse our output) and a one-line message naming what is wrong,
 * where, and how to fix it. The CLI prints `message` alone, never a stack.
 */
export class OvmsMtlsError extends Error {
  readonly code: string;
  /** What the process exits with: 2, the usage error, unless the input was fine and the start failed anyway. */
  readonly exitCode: number = 2;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
  }
}

/** A flag, environment variable or combination of them is invalid. */
export class ConfigError extends OvmsMtlsError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_CONFIG', message, options);
  }
}

/** A certificate, key, CA bundle or CRL cannot be used. */
export class TlsMaterialError extends OvmsMtlsError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_TLS_MATERIAL', message, options);
  }
}

/** A listener could not bind its address. */
export class ListenError extends OvmsMtlsError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_LISTEN', message, options);
  }
}

/** The OVMS child could not be started or supervised. */
export class ChildProcessError extends OvmsMtlsError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_OVMS_CHILD', message, options);
  }
}

/**
 * The start failed for a reason outside the input (a worker killed before it listened): one line
 * like the others, but exit 70 (EX_SOFTWARE), as a proxy that fails once serving exits.
 */
export class StartFailure extends OvmsMtlsError {
  override readonly exitCode = 70;
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_START', message, options);
  }
}

export function isUserError(err: unknown): err is OvmsMtlsError {
  return err instanceof OvmsMtlsError;
}
