#!/usr/bin/env node
// Builds dist/sea/ovms-mtls: one Linux executable (Node's single executable
// application) that runs `ovms-mtls` without Node or node_modules installed.
// Run after `npm run build` (it bundles the compiled dist/ output):
//   1. esbuild bundles bin -> dist/src/cli/main.js and every dependency into one
//      CommonJS script (a SEA main script must be CommonJS and self-contained);
//   2. the .proto files and package.json travel as SEA assets, read from
//      there (src/version.ts, src/demo/protocol.ts), not from files next to
//      the executable;
//   3. node --experimental-sea-config makes the blob, postject injects it into
//      a copy of this machine's node binary.
// Usage: node scripts/build-binary.mjs [--print-output]
import { build } from 'esbuild';
import { execFileSync } from 'node:child_process';
import { copyFileSync, chmodSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import postject from 'postject';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
/** Where the executable lands; the Dockerfile copies it from here. */
export const OUTPUT = 'dist/sea/ovms-mtls';
const WORK = join(ROOT, 'dist/sea');
const ASSETS = ['package.json', 'proto/kserve_v2.proto', 'proto/test_echo.proto'];
const SEA_FUSE = 'NODE_SEA_FUSE_fce680ab2cc467b6e072b8b5df1996b2';

// Runs first in the bundle: decides the directory that stands in for the
// package root in each module's import.meta.url. As a plain script
// (debugging): the repository. In the executable: the executable's own
// directory, and nothing is written at start (every process, cluster workers
// included, runs this): the code reads package.json and the .proto files
// from the SEA assets, writing the protos out only when a command loads them
// (src/demo/protocol.ts), so serving leaves nothing behind in /tmp.
const BANNER = `"use strict";
var __ovmsMtlsRoot = (function () {
  var path = require("node:path");
  var sea; try { sea = require("node:sea"); } catch (e) { sea = undefined; }
  if (!sea || !sea.isSea()) return path.resolve(__dirname, "..", "..");
  return path.dirname(process.execPath);
})();
function __ovmsMtlsUrl(rel) {
  return require("node:url").pathToFileURL(require("node:path").join(__ovmsMtlsRoot, rel)).href;
}
`;

/** Each module's import.meta.url, re-rooted under __ovmsMtlsRoot so relative lookups still work. */
const importMetaUrlPlugin = {
  name: 'import-meta-url',
  setup(b) {
    b.onLoad({ filter: /\.(m?js|cjs)$/ }, (args) => {
      const source = readFileSync(args.path, 'utf8');
      if (!source.includes('import.meta.url')) return undefined;
      const rel = relative(ROOT, args.path).split('\\').join('/');
      // A call to a banner function: esbuild renames a module's own `require`, not banner globals.
      return { contents: source.replaceAll('import.meta.url', `__ovmsMtlsUrl(${JSON.stringify(rel)})`), loader: 'js' };
    });
  },
};

async function bundle(outfile) {
  const result = await build({
    stdin: { contents: "import { main } from './dist/src/cli/main.js';\nmain(process.argv.slice(2));\n", resolveDir: ROOT, sourcefile: 'sea-entry.mjs', loader: 'js' },
    bundle: true,
    platform: 'node',
    format: 'cjs',
    target: 'node20',
    outfile,
    banner: { js: BANNER },
    plugins: [importMetaUrlPlugin],
    logLevel: 'error',
    legalComments: 'none',
  });
  if (result.errors.length > 0) throw new Error('esbuild failed');
}

async function main() {
  if (process.argv.includes('--print-output')) {
    process.stdout.write(OUTPUT + '\n');
    return;
  }
  if (process.platform !== 'linux') throw new Error('build-binary: only Linux executables are supported (the Docker image and systemd unit are Linux)');
  rmSync(WORK, { recursive: true, force: true });
  mkdirSync(WORK, { recursive: true });
  const script = join(WORK, 'ovms-mtls.cjs');
  await bundle(script);
  const blob = join(WORK, 'sea-prep.blob');
  const seaConfig = {
    main: script,
    output: blob,
    disableExperimentalSEAWarning: true,
    // No code cache: V8 rejects it whenever NODE_OPTIONS holds a V8 flag (--max-old-space-size, the one
    // way to size the heap of the executable), and Node then writes "Warning: Code cache data rejected."
    // on stderr in every process, each worker too. It saved about 0.06 s of CPU per process start.
    useCodeCache: false,
    assets: Object.fromEntries(ASSETS.map((name) => [name, join(ROOT, name)])),
  };
  writeFileSync(join(WORK, 'sea-config.json'), JSON.stringify(seaConfig, null, 2));
  execFileSync(process.execPath, ['--experimental-sea-config', join(WORK, 'sea-config.json')], { stdio: 'inherit' });
  const exe = join(ROOT, OUTPUT);
  copyFileSync(process.execPath, exe);
  chmodSync(exe, 0o755);
  await postject.inject(exe, 'NODE_SEA_BLOB', readFileSync(blob), { sentinelFuse: SEA_FUSE });
  process.stdout.write(`build-binary: wrote ${OUTPUT} (node ${process.version}, ${process.arch})\n`);
}

main().catch((err) => {
  process.stderr.write(`build-binary: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exitCode = 1;
});
