/**
 * Builds the Go programs of test/fixtures (a grpc-go client, a net/http client) with Debian's
 * golang-go in GOPATH mode: no module proxy, no network.
 */
import { execFile } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { buildOrExplain, fixtureSource, requireTool } from './fixture-build.js';
import { PROTO_DIR } from './grpcio.js';

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
  await requireTool('go', ['version'], { env: goEnv(workDir) }, needs);
  await mkdir(GO_CACHE, { recursive: true });
  const binary = join(workDir, fixture);
  await buildOrExplain(fixture, 'go', ['build', '-o', binary, '.'], { cwd: fixtureSource(fixture), env: goEnv(workDir), timeout: 300_000 }, needs);
  return binary;
}

/** The grpc-go client of test/fixtures/kserve-go-client, built into `workDir`, and the descriptor set of the protos it reads. */
export async function buildKserveGoClient(workDir: string): Promise<{ binary: string; descriptors: string }> {
  const binary = await buildGoFixture('kserve-go-client', workDir, ['golang-google-grpc-dev', 'golang-google-protobuf-dev']);
  const descriptors = join(workDir, 'protos.pb');
  await promisify(execFile)('protoc', ['-I', PROTO_DIR, '--include_imports', '--descriptor_set_out', descriptors, 'kserve_v2.proto', 'test_echo.proto'], { cwd: PROTO_DIR });
  return { binary, descriptors };
}
