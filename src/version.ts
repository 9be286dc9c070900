import { readFileSync } from 'node:fs';

/** The package version; `unknown` when run outside the package (should not happen). */
export function productVersion(): string {
  try {
    const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version?: string };
    return pkg.version ?? 'unknown';
  } catch {
    return 'unknown';
  }
}
