/**
 * Builds test/fixtures/rust-rest-client with cargo, offline, against the crates Debian ships as sources
 * (librust-*-dev, in /usr/share/cargo/registry): no crates.io.
 *
 *     node dist/test/helpers/rust-build.js    builds it ahead (.ci/run does, before the suite loads the machine)
 */
import { cp, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { buildOrExplain, fixtureSource, requireTool } from './fixture-build.js';

/** The Debian packages the Rust client needs, with cargo and rustc (rustup's, or Debian's cargo package). */
export const RUST_PACKAGES = ['librust-reqwest-dev', 'librust-tokio-dev', 'librust-serde-json-dev'] as const;

/**
 * Kept across runs, as the Go build cache is: a cold build of reqwest, hyper, rustls and ring takes about
 * 3 minutes of CPU (2m08 user, 52 s system, measured here), a warm one a second.
 */
const BUILD_DIR = join(tmpdir(), 'ovms-mtls-rust-build');

/** Debian's crates in place of crates.io; cargo never goes to the network. */
const CARGO_CONFIG = '[source.crates-io]\nreplace-with = "debian"\n\n[source.debian]\ndirectory = "/usr/share/cargo/registry"\n\n[net]\noffline = true\n';

/** HOME (and RUSTUP_HOME) kept: rustup's cargo finds its toolchain there. */
function cargoEnv(): NodeJS.ProcessEnv {
  return {
    PATH: process.env.PATH, HOME: process.env.HOME, ...(process.env.RUSTUP_HOME ? { RUSTUP_HOME: process.env.RUSTUP_HOME } : {}),
    CARGO_HOME: join(BUILD_DIR, 'cargo-home'), CARGO_TARGET_DIR: join(BUILD_DIR, 'target'),
  };
}

/** Runs `lay` to put a cargo package named `name` in its directory beside the build, then builds it; the binary's path. */
async function buildPackage(name: string, lay: (sources: string) => Promise<void>): Promise<string> {
  const needs = ['cargo', ...RUST_PACKAGES];
  const env = cargoEnv();
  await requireTool('cargo', ['--version'], { env }, needs);
  const sources = join(BUILD_DIR, name);
  await mkdir(env.CARGO_HOME!, { recursive: true });
  await writeFile(join(env.CARGO_HOME!, 'config.toml'), CARGO_CONFIG);
  // A lock from an older run may name crate versions Debian has since replaced.
  await rm(join(sources, 'Cargo.lock'), { force: true });
  await lay(sources);
  await buildOrExplain(name, 'cargo', ['build', '--release', '--offline', '--quiet'], { cwd: sources, env, timeout: 540_000 }, needs);
  return join(env.CARGO_TARGET_DIR!, 'release', name);
}

/**
 * Builds test/fixtures/`fixture` (a cargo package of that name); the binary's path. The sources are
 * copied beside the build, timestamps kept, so that cargo writes its Cargo.lock there and a warm
 * build does nothing.
 */
export function buildRustFixture(fixture: string): Promise<string> {
  return buildPackage(fixture, (sources) => cp(fixtureSource(fixture), sources, { recursive: true, preserveTimestamps: true }));
}

/**
 * Builds `main` (a program, the README's Rust snippet) as package `name` with the dependencies of test/fixtures/`fixture`,
 * whose compiled crates it reuses; the binary's path.
 */
export function buildRustProgram(name: string, main: string, fixture: string): Promise<string> {
  return buildPackage(name, async (sources) => {
    const manifest = await readFile(join(fixtureSource(fixture), 'Cargo.toml'), 'utf8');
    await mkdir(join(sources, 'src'), { recursive: true });
    await writeFile(join(sources, 'Cargo.toml'), manifest.replace(/^name = ".*"$/m, `name = "${name}"`));
    await writeFile(join(sources, 'src', 'main.rs'), main);
  });
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  console.log(await buildRustFixture('rust-rest-client'));
}
