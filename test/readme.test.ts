import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { ALL_OPTIONS } from '../src/options.js';
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
  const { common, restart, hangTimeoutMs, binary, ovmsUser } = entrypointSettings(splitOvmsArgv(['--port', '9000']), {});
  const { limits } = common;
  const applied: Record<string, string | number | boolean> = {
    mtls_verify_depth: limits.verifyDepth,
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
    mtls_ovms_binary: binary,
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
