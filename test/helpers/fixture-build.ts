/**
 * What the builds of test/fixtures' compiled clients share: where a fixture's sources are, and errors
 * that name the Debian packages to install when the tool is missing or the build fails.
 */
import { execFile, type ExecFileOptions } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const run = promisify(execFile);

export function fixtureSource(fixture: string): string {
  return fileURLToPath(new URL(`../../../test/fixtures/${fixture}`, import.meta.url));
}

/** Runs `tool` with `versionArgs`; throws, naming the packages `needs`, when it cannot. */
export async function requireTool(tool: string, versionArgs: string[], options: ExecFileOptions, needs: readonly string[]): Promise<void> {
  await run(tool, versionArgs, options).catch(() => {
    throw new Error(`${tool} is missing: these tests need Debian's ${needs.join(', ')} (apt-get install -y ${needs.join(' ')}; .ci/run does it)`);
  });
}

/** Runs a build of test/fixtures/`fixture`; throws its errors, naming the packages `needs`, when it fails. */
export async function buildOrExplain(fixture: string, tool: string, args: string[], options: ExecFileOptions, needs: readonly string[]): Promise<void> {
  await run(tool, args, options).catch((err: { stderr?: string }) => {
    throw new Error(`building test/fixtures/${fixture} failed (are ${needs.join(', ')} installed?): ${err.stderr ?? String(err)}`);
  });
}
