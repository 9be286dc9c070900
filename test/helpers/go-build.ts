/**
 * Builds the Go programs of test/fixtures (a grpc-go client, a net/http client) with Debian's
 * golang-go in GOPATH mode: no module proxy, no network.
 */
import { execFile } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** Reused across runs: a cold build of grpc-go takes ~15 s on two cores, a warm one ~1 s. */
const GO_CACHE = join(tmpdir(), 'ovms-mtls-go-build-cache');

/** GOPATH mode against Debian's Go sources, `workDir` as HOME and first GOPATH entry. */
export function goEnv(workDir: string): NodeJS.ProcessEnv {
  return {
    PATH: process.env.PATH, HOME: workDir, GO111MODULE: 'off', GOPATH: `${join(workDir, 'gopath')}:/usr/share/gocode`,
    GOCACHE: GO_CACHE, GOPROXY: 'off', GOFLAGS: '', CGO_ENABLED: '0',
  };
}

/**
 * Builds test/fixtures/`fixture` into `workDir`; the binary's path. `packages`: the Debian packages
 * it needs, named in the error when go is missing or the build fails.
 */
export async function buildGoFixture(fixture: string, workDir: string, packages: readonly string[]): Promise<string> {
  const needs = ['golang-go', ...packages];
  await run('go', ['version'], { env: goEnv(workDir) }).catch(() => {
    throw new Error(`go is missing: these tests need Debian's ${needs.join(', ')} (apt-get install -y ${needs.join(' ')}; .ci/run does it)`);
  });
  await mkdir(GO_CACHE, { recursive: true });
  const binary = join(workDir, fixture);
  const source = fileURLToPath(new URL(`../../../test/fixtures/${fixture}`, import.meta.url));
  await run('go', ['build', '-o', binary, '.'], { cwd: source, env: goEnv(workDir), timeout: 300_000 }).catch((err: { stderr?: string }) => {
    throw new Error(`building test/fixtures/${fixture} failed (are ${needs.join(', ')} installed?): ${err.stderr ?? String(err)}`);
  });
  return binary;
}
