import { readFileSync } from 'node:fs';
import { getAsset, isSea } from 'node:sea';

/** The package version; `unknown` when run outside the package (should not happen). */
export function productVersion(): string {
  try {
    const pkg = JSON.parse(packageJson()) as { version?: string };
    return pkg.version ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

/**
 * The single executable carries package.json as an asset: read it from there, not from the copy it
 * unpacks into the temporary directory, which a read-only container may not have.
 */
function packageJson(): string {
  if (isSea()) return getAsset('package.json', 'utf8');
  return readFileSync(new URL('../../package.json', import.meta.url), 'utf8');
}
