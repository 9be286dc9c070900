import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freeLoopbackPorts } from '../src/ports.js';
import { runCli, startCli, type LongRunningCli } from './helpers/cli.js';
import { startUpstream } from './helpers/harness.js';
import { ALL_OPTIONS, envVarName, isLinkVariable } from '../src/options.js';
import { PROBE_OPTIONS } from '../src/cli/probe-command.js';
import { entrypointSettings } from '../src/entrypoint-config.js';
import { splitOvmsArgv } from '../src/ovms-args.js';

const ROOT = new URL('../../', import.meta.url);
const readme = readFileSync(new URL('README.md', ROOT), 'utf8');

test('the README command-line reference names every option the product accepts', () => {
  const missing = ALL_OPTIONS.map((o) => `--${o.name}`).filter((flag) => !readme.includes(`\`${flag}\``));
  assert.deepEqual(missing, []);
});

test('CI runs exactly the test command the README gives', () => {
  const ci = readFileSync(new URL('.ci/run', ROOT), 'utf8');
  assert.match(readme, /^npm test\s/m);
  assert.match(ci, /^npm test$/m);
});

/** The Default cell of the README's option table row naming `--name`, without backticks. */
function readmeDefault(name: string): string {
  const row = readme.split('\n').find((line) => line.startsWith('| `--') && line.split('|')[1]!.includes(`\`--${name}\``));
  assert.ok(row, `the README's option table has no row for --${name}`);
  return row.split('|')[2]!.replaceAll('`', '').trim();
}

// The README's table, --help (defaultDescription) and the code each state the defaults; nothing held them together.
test('the defaults the README and --help give are the ones the entrypoint and the proxy apply', () => {
  const { common, restart, hangTimeoutMs, binary, ovmsUser, listeners } = entrypointSettings(splitOvmsArgv(['--port', '9000', '--rest_port', '8000']), {});
  const { limits } = common;
  const applied: Record<string, string | number | boolean> = {
    grpc_bind_address: listeners.grpc!.hosts.join(','),
    rest_bind_address: listeners.rest!.hosts.join(','),
    mtls_grpc_upstream_connections: common.grpcUpstreamConnections,
    mtls_verify_depth: limits.verifyDepth,
    mtls_min_tls_version: limits.minTlsVersion,
    mtls_log_level: common.logLevel,
    mtls_access_log: common.accessLog,
    mtls_grpc_mode: common.grpcMode,
    mtls_rest_mode: common.restMode,
    mtls_shutdown_timeout: common.shutdownTimeoutMs / 1000,
    mtls_handshake_timeout: limits.handshakeTimeoutMs / 1000,
    mtls_upstream_connect_timeout: limits.upstreamConnectTimeoutMs / 1000,
    mtls_idle_timeout: limits.idleTimeoutMs / 1000,
    mtls_max_connections: limits.maxConnections,
    mtls_max_concurrent_streams: limits.maxConcurrentStreams,
    mtls_max_header_size: limits.maxHeaderSize,
    mtls_max_session_memory: limits.maxSessionMemoryMiB,
    mtls_ovms_binary: binary.path,
    mtls_ovms_user: ovmsUser,
    mtls_restart: restart.mode,
    mtls_ovms_hang_timeout: hangTimeoutMs / 1000,
  };
  const firstWord = (text: string) => text.split(/[\s,;(]/)[0];
  for (const [name, value] of Object.entries(applied)) {
    assert.equal(firstWord(readmeDefault(name)), String(value), `README default of --${name}`);
    assert.equal(firstWord(ALL_OPTIONS.find((o) => o.name === name)!.defaultDescription!), String(value), `--help default of --${name}`);
  }
  assert.equal(readmeDefault('mtls_stream_window'), `${limits.streamWindow / 2 ** 20} MiB, ${limits.connectionWindow / 2 ** 20} MiB (bytes, 65535-2147483647)`);
  assert.deepEqual(['mtls_stream_window', 'mtls_connection_window'].map((name) => ALL_OPTIONS.find((o) => o.name === name)!.defaultDescription), [String(limits.streamWindow), String(limits.connectionWindow)]);
});

/**
 * The commands of a README ```sh block under `heading`, as argv arrays: continuation lines joined,
 * `bin/ovms-mtls` dropped, an optional `[...]` part kept when it names a file of the set (or the
 * demo model) and left out otherwise (`[--days N]` is a placeholder, not a value).
 */
function readmeCommands(heading: string): string[][] {
  const section = readme.slice(readme.indexOf(`${heading}\n`));
  const block = /```sh\n([\s\S]*?)```/.exec(section)![1]!.replaceAll('\\\n', ' ');
  return block.split('\n').filter((line) => line.startsWith('bin/ovms-mtls ')).map((line) =>
    line
      .replace(/\[([^\]]*)\]/g, (_, inner: string) => (/certs\/|^--model dummy$/.test(inner) ? inner : ''))
      .trim().split(/\s+/).slice(1));
}

/** A README command with the set in `dir` and this run's ports and upstreams in place of the README's. */
function asRun(argv: string[], dir: string, swap: Record<string, string>): string[] {
  return argv.map((arg, i) => swap[arg] ?? (argv[i - 1] === '--dir' && arg === 'certs' ? dir : arg.replace(/^certs\//, `${dir}/`)));
}

// The certificates, check, proxy and probe commands the README gives were checked by nobody: a flag renamed, or a
// placeholder such as `check --mtls_cert ...`, would reach users unnoticed.
test("the README's certs, check, proxy and probe commands, as pasted, make a set, serve it and pass the probe", async () => {
  const dir = await mkdtemp(join(tmpdir(), 'readme-certs-'));
  const upstream = await startUpstream({ grpcPort: 0, restPort: 0 });
  const [grpcPort, restPort] = (await freeLoopbackPorts(2)) as [number, number];
  const swap = {
    '9443': String(grpcPort), '8443': String(restPort),
    '127.0.0.1:9000': `127.0.0.1:${upstream.grpcPort}`, '127.0.0.1:8000': `127.0.0.1:${upstream.restPort}`,
  };
  const certsCommands = readmeCommands('### Certificates, checks, probe');
  const probe = certsCommands.pop()!;
  assert.deepEqual(certsCommands.map((argv) => argv.slice(0, 2).join(' ')), ['certs init', 'certs client', 'certs revoke', 'certs renew-crl', 'check --mtls_cert']);
  assert.equal(probe[0], 'probe');
  let proxy: LongRunningCli | undefined;
  try {
    for (const argv of certsCommands) {
      const result = await runCli(asRun(argv, dir, swap));
      assert.equal(result.code, 0, `${argv.join(' ')}: ${result.stderr}${result.stdout}`);
    }
    const [proxyCommand] = readmeCommands('### Standalone proxy');
    // Loopback only, as every test binds; one worker is enough here.
    proxy = startCli([...asRun(proxyCommand!, dir, swap), '--grpc_bind_address', '127.0.0.1', '--rest_bind_address', '127.0.0.1', '--mtls_workers', '1']);
    const started = proxy;
    const listening = (listener: string) => started.logs.waitFor((line) => line.event === 'listening' && line.listener === listener);
    // A proxy that refuses the README's options exits: the test fails with what it said instead of waiting.
    const exitedEarly = started.exited.then((code) => assert.fail(`the README's proxy command exited (${code}): ${started.stderr()}`));
    await Promise.race([Promise.all([listening('grpc'), listening('rest')]), exitedEarly]);
    const probed = await runCli(asRun(probe, dir, swap));
    assert.equal(probed.code, 0, probed.stdout + probed.stderr);
    assert.match(probed.stdout, /probe: all 7 steps passed/);
  } finally {
    proxy?.child.kill('SIGTERM');
    await proxy?.exited;
    await upstream.close();
    await rm(dir, { recursive: true, force: true });
  }
});

// A renamed or removed option stayed in the prose and examples unnoticed: only the other way (every option named) was checked.
test('every --mtls_ option and OVMS_MTLS_ variable the README, docs and deployment files name is one the commands take', () => {
  const options = new Set([...ALL_OPTIONS, ...PROBE_OPTIONS].map((o) => o.name));
  const variables = new Set(ALL_OPTIONS.map((o) => envVarName(o.name)));
  const files = ['README.md', 'docs/operations.md', 'certs/README.md', 'docker-compose.yml', 'deploy/kubernetes/deployment.yaml', 'deploy/systemd/ovms-mtls.service', 'config/ovms-mtls.env'];
  const unknown = files.flatMap((file) => {
    const text = readFileSync(new URL(file, ROOT), 'utf8');
    const flags = [...text.matchAll(/--(mtls_[a-z_]+)/g)].map((m) => m[1]!).filter((name) => !options.has(name)).map((name) => `--${name}`);
    const envs = [...text.matchAll(/\bOVMS_MTLS_[A-Z_]+\b/g)].map((m) => m[0]).filter((name) => !variables.has(name) && !isLinkVariable(name));
    return [...new Set([...flags, ...envs])].map((name) => `${file}: ${name}`);
  });
  // The README's own examples of a misspelling the commands refuse.
  assert.deepEqual(unknown, ['README.md: --mtls_cetr', 'README.md: OVMS_MTLS_ALOW_CN']);
});
