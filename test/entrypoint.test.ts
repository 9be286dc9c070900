import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { chmod, chown, copyFile, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { eventually, sample } from './helpers/ops.js';
import { request as httpsRequest } from 'node:https';
import type { IncomingMessage } from 'node:http';
import { clientCredentials, grpcClients, https1, LogCapture, tlsClientOptions } from './helpers/harness.js';
import { sseEvents } from './helpers/sse.js';
import { checkModelInfer, inferRequest } from './helpers/grpc-calls.js';
import { fakeRuns, FAKE_OVMS, makeFakeExecutable, processGone, startWrapper, streamAcrossSigterm, tlsArgs, type Wrapper } from './helpers/entrypoint.js';
import { kserveClient, unary } from '../src/demo/grpc-client.js';
import { freeLoopbackPorts } from '../src/ports.js';
import { splitOvmsArgv } from '../src/ovms-args.js';
import { entrypointSettings } from '../src/entrypoint-config.js';
import { startServing } from '../src/cli/entrypoint-command.js';
import { PROXY_FATAL_EXIT_CODE, runUntilDone } from '../src/cli/entrypoint-lifecycle.js';
import { createLogger } from '../src/log.js';
import { openFilesLimit } from '../src/fd-headroom.js';
import { DEFAULTS } from '../src/config.js';

/** The image's OVMS, which the entrypoint runs unless --mtls_ovms_binary says otherwise. */
const IMAGE_OVMS_HERE = existsSync(DEFAULTS.ovms.binary);

/** Judging a binary for another user takes files of other owners, and a run as that user. */
const ROOT_ONLY = process.getuid?.() !== 0 && 'needs root';

const JSON_VALUE = '{"NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY"}';

let pki: TestPki;
let dir: string;
let runCounter = 0;

before(async () => {
  makeFakeExecutable();
  pki = await createTestPki();
  dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-entrypoint-'));
});

after(async () => {
  await pki.cleanup();
  await rm(dir, { recursive: true, force: true });
});

interface Started {
  wrapper: Wrapper;
  argvFile: string;
  grpcPort: number;
  restPort: number;
  adminPort: number;
}

/**
 * `ovms-mtls <ovmsArgs> --mtls_* <per-run certs> --mtls_ovms_binary <fake> <extra>`; {grpc}/{rest}/{admin}
 * become free ports, chosen in one go: ports chosen one call at a time were released in between,
 * so the system could hand the admin port out again as a public one.
 */
async function start(ovmsArgs: string[], env: Record<string, string> = {}, extra: string[] = []): Promise<Started> {
  const [grpcPort, restPort, adminPort] = (await freeLoopbackPorts(3)) as [number, number, number];
  runCounter += 1;
  const argvFile = join(dir, `argv-${runCounter}.jsonl`);
  const ports = (a: string) => a.replace('{grpc}', String(grpcPort)).replace('{rest}', String(restPort)).replace('{admin}', String(adminPort));
  // Root here (CI too): stay root unless a test is about users (test/privileges.test.ts).
  const wrapper = startWrapper([...ovmsArgs.map(ports), ...tlsArgs(pki), '--mtls_ovms_binary', FAKE_OVMS, '--mtls_ovms_user', 'root', ...extra.map(ports)], { FAKE_OVMS_ARGV_FILE: argvFile, ...env });
  return { wrapper, argvFile, grpcPort, restPort, adminPort };
}

/** `prlimit --nofile=SOFT:` on a running process: its hard limit stays, so the soft one can be raised again. */
function setSoftOpenFilesLimit(pid: number, soft: string): void {
  const result = spawnSync('prlimit', ['--pid', String(pid), `--nofile=${soft}:`], { encoding: 'utf8' });
  assert.equal(result.status, 0, `prlimit failed: ${result.stderr}`);
}

async function stopWrapper(wrapper: Wrapper): Promise<void> {
  if (wrapper.child.exitCode === null && wrapper.child.signalCode === null) wrapper.child.kill('SIGTERM');
  await wrapper.exited;
}

/** A streamed chat completion through the public REST port (HTTP/1.1): its SSE events as they come. */
async function openChatStream(restPort: number): Promise<AsyncGenerator<string>> {
  const req = httpsRequest({ host: '127.0.0.1', port: restPort, method: 'POST', path: '/v3/chat/completions', agent: false, headers: { 'content-type': 'application/json' }, ...tlsClientOptions(pki) });
  req.end(JSON.stringify({ model: 'dummy-llm', stream: true, messages: [{ role: 'user', content: 'hi' }] }));
  const [res] = (await once(req, 'response')) as [IncomingMessage];
  assert.equal(res.statusCode, 200);
  return sseEvents(res);
}

/** A KServe ServerLive call on a fresh mTLS channel answers live. */
async function assertServerLive(grpcPort: number): Promise<void> {
  const clients = grpcClients(`localhost:${grpcPort}`, pki);
  try {
    assert.equal((await unary(clients.kserve, 'ServerLive', {})).response.live, true);
  } finally {
    clients.close();
  }
}

describe('serving: listeners and the argv OVMS gets', () => {
  test('with both ports in = and repeated spellings, OVMS gets only loopback listeners and the rest of argv intact, and both listeners forward', async () => {
    const s = await start([
      '--port={grpc}', '--grpc_bind_address', 'localhost', '--grpc_bind_address=127.0.0.1', '--rest_port', '{rest}', '--rest_bind_address=127.0.0.1',
      '--plugin_config', JSON_VALUE, '--model_name', 'my "quoted" model', '--metrics_enable',
    ]);
    try {
      await s.wrapper.waitForEvent('ovms_ready');
      const [run] = fakeRuns(s.argvFile);
      assert.deepEqual(run!.argv.slice(0, 5), ['--plugin_config', JSON_VALUE, '--model_name', 'my "quoted" model', '--metrics_enable']);
      assert.equal(run!.options['grpc_bind_address'], '127.0.0.1');
      assert.equal(run!.options['rest_bind_address'], '127.0.0.1');
      assert.notEqual(Number(run!.options['port']), s.grpcPort);
      assert.notEqual(Number(run!.options['rest_port']), s.restPort);
      assert.equal(run!.argv.filter((a) => a.startsWith('--port') || a.startsWith('--rest_port')).length, 2);
      const grpcListening = await s.wrapper.waitForLog((l) => l.event === 'listening' && l['listener'] === 'grpc');
      assert.deepEqual(grpcListening['addresses'], [`127.0.0.1:${s.grpcPort}`]);
      const clients = grpcClients(`localhost:${s.grpcPort}`, pki);
      try {
        await checkModelInfer(clients.kserve);
      } finally {
        clients.close();
      }
      assert.equal((await https1(s.restPort, pki, { path: '/v2/health/ready' })).status, 200);
      assert.ok(s.wrapper.ovmsLines.some((l) => l.includes('Started gRPC server on 127.0.0.1')), 'OVMS output passes through');
    } finally {
      await stopWrapper(s.wrapper);
    }
  });

  test('gRPC only: OVMS gets no REST port and gRPC calls flow', async () => {
    const s = await start(['--port', '{grpc}', '--grpc_bind_address', '127.0.0.1', '--model_name', 'dummy']);
    try {
      await s.wrapper.waitForEvent('ovms_ready');
      const [run] = fakeRuns(s.argvFile);
      assert.equal(run!.options['rest_port'], undefined);
      assert.ok(run!.options['port']);
      await assertServerLive(s.grpcPort);
    } finally {
      await stopWrapper(s.wrapper);
    }
  });

  test('REST only: OVMS gets --port 0 (gRPC off) and REST requests flow', async () => {
    const s = await start(['--rest_port={rest}', '--rest_bind_address', '127.0.0.1']);
    try {
      await s.wrapper.waitForEvent('ovms_ready');
      const [run] = fakeRuns(s.argvFile);
      assert.equal(run!.options['port'], '0');
      assert.equal(run!.options['grpc_bind_address'], '127.0.0.1');
      const res = await https1(s.restPort, pki, { path: '/v2/models/dummy' });
      assert.equal(res.status, 200);
    } finally {
      await stopWrapper(s.wrapper);
    }
  });

  test("OVMS caps gRPC streams per connection at its core count; every client shares the proxy's upstream connection, so the cap is lifted for OVMS and a third client is served while two streams stay open", async () => {
    // OVMS sets grpc.max_concurrent_streams = cores per connection (grpcservermodule.cpp): through one shared
    // connection that would be a cap on all clients together, and two open streams would starve everyone on 2 cores.
    const s = await start(['--port', '{grpc}', '--grpc_bind_address', '127.0.0.1', '--grpc_channel_arguments', 'grpc.max_connection_age_ms=600000'], { FAKE_OVMS_CORES: '2' }, ['--mtls_workers', '1']);
    const fresh = () => kserveClient(`localhost:${s.grpcPort}`, clientCredentials(pki), { 'grpc.use_local_subchannel_pool': 1 });
    await s.wrapper.waitForEvent('ovms_ready');
    const clients = [fresh(), fresh(), fresh()];
    const streams = clients.slice(0, 2).map((client) => client.ModelStreamInfer());
    try {
      for (const [i, stream] of streams.entries()) {
        stream.write({ ...inferRequest(), id: `open-${i}` });
        assert.equal((await stream[Symbol.asyncIterator]().next()).value.infer_response.id, `open-${i}`);
      }
      // The deadline only bounds the failure: without the lifted cap the call waits for a stream to end.
      const live = await unary(clients[2]!, 'ServerLive', {}, new grpc.Metadata(), { deadline: Date.now() + 15_000 });
      assert.equal(live.response.live, true);
      assert.equal(fakeRuns(s.argvFile)[0]!.options['grpc_channel_arguments'], 'grpc.max_connection_age_ms=600000,grpc.max_concurrent_streams=2147483647');
    } finally {
      for (const stream of streams) stream.end();
      for (const client of clients) client.close();
      await stopWrapper(s.wrapper);
    }
  });

  test('REST only with an older OVMS whose --port defaults to 9178: it is told --port 0, so its gRPC port cannot collide with a public port', async () => {
    // The public REST port doubles as the old default here: without --port, OVMS would bind gRPC on it and fail.
    const [rest] = (await freeLoopbackPorts(1)) as [number];
    const s = await start(['--rest_port', String(rest), '--rest_bind_address', '127.0.0.1'], { FAKE_OVMS_DEFAULT_PORT: String(rest) });
    try {
      await s.wrapper.waitForEvent('ovms_ready');
      assert.equal((await https1(rest, pki, { path: '/v2/health/ready' })).status, 200);
    } finally {
      await stopWrapper(s.wrapper);
    }
  });

  test('while OVMS starts, REST answers 503 with Retry-After and gRPC answers UNAVAILABLE; then calls succeed', async () => {
    const gate = join(dir, `gate-${runCounter + 1}`);
    const s = await start(['--port', '{grpc}', '--grpc_bind_address', '127.0.0.1', '--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1'], { FAKE_OVMS_START_GATE_FILE: gate });
    const clients = grpcClients(`localhost:${s.grpcPort}`, pki);
    try {
      await s.wrapper.waitForEvent('ovms_started');
      await s.wrapper.waitForLog((l) => l.event === 'listening' && l['listener'] === 'rest');
      const early = await https1(s.restPort, pki, { path: '/v2/health/ready' });
      assert.equal(early.status, 503);
      assert.ok(early.headers['retry-after']);
      await assert.rejects(unary(clients.kserve, 'ServerLive', {}), (err: grpc.ServiceError) => err.code === grpc.status.UNAVAILABLE);
      await writeFile(gate, '');
      await s.wrapper.waitForEvent('ovms_ready');
      assert.equal((await https1(s.restPort, pki, { path: '/v2/health/ready' })).status, 200);
      assert.equal((await unary(clients.kserve, 'ServerLive', {})).response.live, true);
    } finally {
      clients.close();
      await writeFile(gate, '');
      await stopWrapper(s.wrapper);
    }
  });

  test('the admin listener reports /readyz false while OVMS starts, true once it is ready, and counts the traffic', async () => {
    const gate = join(dir, `gate-admin-${runCounter + 1}`);
    const s = await start(['--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1'], { FAKE_OVMS_START_GATE_FILE: gate }, ['--mtls_admin_port', '{admin}']);
    const { adminPort } = s;
    const admin = (path: string) => fetch(`http://127.0.0.1:${adminPort}${path}`);
    try {
      await s.wrapper.waitForEvent('ovms_started');
      await s.wrapper.waitForLog((l) => l.event === 'listening' && l['listener'] === 'rest');
      const starting = await admin('/readyz');
      assert.equal(starting.status, 503);
      const report = (await starting.json()) as { ready: boolean; checks: Record<string, { ok: boolean; detail: string }> };
      assert.equal(report.ready, false);
      assert.equal(report.checks['upstream']?.detail, 'OVMS is starting');
      assert.equal((await admin('/healthz')).status, 200);
      await writeFile(gate, '');
      await s.wrapper.waitForEvent('ovms_ready');
      const ready = await admin('/readyz');
      assert.equal(ready.status, 200);
      assert.equal(((await ready.json()) as { ready: boolean }).ready, true);
      assert.equal((await https1(s.restPort, pki, { path: '/v2/health/ready' })).status, 200);
      const metrics = await (await admin('/metrics')).text();
      assert.match(metrics, /^ovms_mtls_ovms_up 1$/m);
      assert.match(metrics, /ovms_mtls_requests_total\{[^}]*listener="rest"[^}]*\} [1-9]/);
    } finally {
      await writeFile(gate, '');
      await stopWrapper(s.wrapper);
    }
  });

  test('/readyz stays 503 and ovms_up 0 while OVMS answers on its ports but is still loading its models; both turn once OVMS says ready', async () => {
    const loaded = join(dir, `models-loaded-${runCounter + 1}`);
    const s = await start(
      ['--port', '{grpc}', '--grpc_bind_address', '127.0.0.1', '--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1'],
      { FAKE_OVMS_LOAD_GATE_FILE: loaded },
      ['--mtls_admin_port', '{admin}'],
    );
    const { adminPort } = s;
    const readyz = async () => {
      const res = await fetch(`http://127.0.0.1:${adminPort}/readyz`);
      return { status: res.status, report: (await res.json()) as { checks: Record<string, { ok: boolean; detail: string }> } };
    };
    const ovmsMetrics = async () => (await fetch(`http://127.0.0.1:${adminPort}/metrics`)).text();
    try {
      await s.wrapper.waitForEvent('ovms_ready');
      // Calls are forwarded: OVMS itself answers live, and not ready.
      await assertServerLive(s.grpcPort);
      assert.equal((await https1(s.restPort, pki, { path: '/v2/health/ready' })).status, 503);
      const loading = await readyz();
      assert.equal(loading.status, 503);
      assert.match(loading.report.checks['upstream']!.detail, /not ready yet \(loading models\?\): .*\/v2\/health\/ready answered 503; .*ServerReady: not ready/);
      // Prometheus alone, nothing probing /readyz: ovms_up says what /readyz would.
      assert.equal(sample(await ovmsMetrics(), 'ovms_mtls_ovms_up'), 0, 'OVMS live but not ready is not up');
      await writeFile(loaded, '');
      await eventually(async () => sample(await ovmsMetrics(), 'ovms_mtls_ovms_up') === 1, 'ovms_up 1 once the models are loaded');
      await eventually(async () => (await readyz()).status === 200, '/readyz 200 once the models are loaded');
    } finally {
      await stopWrapper(s.wrapper);
    }
  });

  // Before: "answers but is not ready yet (loading models?)" (gRPC only) and "OVMS is starting" for good (both ports,
  // the REST port speaking HTTP/2 only): a wait for something that never comes, where a server answers on each port.
  const OTHER_PROTOCOL = "answers, but a port speaks the other protocol, which no wait will change (its gRPC and REST servers on each other's ports? the program run as OVMS, --mtls_ovms_binary, must serve gRPC on --port and REST on --rest_port)";
  const restOnGrpcPort = (port: string) => `gRPC 127.0.0.1:${port}: answered, but not in HTTP/2 (ERR_HTTP2_ERROR): is it the model server's gRPC port (OVMS --port)?`;
  const grpcOnRestPort = (port: string) => `REST 127.0.0.1:${port}: answered, but not in HTTP/1.1 (HPE_INVALID_CONSTANT): is it the model server's REST port (OVMS --rest_port)?`;
  for (const [what, ovmsArgs, seen] of [
    ['gRPC only, its port answering HTTP/1.1', ['--port', '{grpc}', '--grpc_bind_address', '127.0.0.1'], (o: Record<string, string>) => restOnGrpcPort(o['port']!)],
    [
      'both ports, each in the other protocol',
      ['--port', '{grpc}', '--grpc_bind_address', '127.0.0.1', '--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1'],
      (o: Record<string, string>) => `${grpcOnRestPort(o['rest_port']!)}; ${restOnGrpcPort(o['port']!)}`,
    ],
  ] as const) {
    test(`/readyz names an OVMS whose ports answer in the other protocol (${what}) as misconfigured, not as loading or starting`, async () => {
      const s = await start([...ovmsArgs], { FAKE_OVMS_SWAP_PORTS: '1' }, ['--mtls_admin_port', '{admin}']);
      const upstreamDetail = async () => ((await (await fetch(`http://127.0.0.1:${s.adminPort}/readyz`)).json()) as { checks: Record<string, { detail: string }> }).checks['upstream']!.detail;
      try {
        // The fake starts its REST server last, whichever port it takes.
        await s.wrapper.waitForOvmsLine((l) => l.includes('Started REST server'));
        const [run] = fakeRuns(s.argvFile);
        const expected = `OVMS (pid ${run!.pid}) ${OTHER_PROTOCOL}: ${seen(run!.options)}`;
        let said = '';
        await eventually(async () => (said = await upstreamDetail()) === expected, 'the other protocol named in /readyz').catch(() => assert.equal(said, expected));
      } finally {
        await stopWrapper(s.wrapper);
      }
    });
  }

  test('a SIGTERM that arrives while the wrapper is still starting drains and exits with OVMS code, instead of killing the wrapper', async () => {
    const s = await start(['--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1']);
    await s.wrapper.waitForLog((l) => l.event === 'listening');
    s.wrapper.child.kill('SIGTERM');
    const result = await s.wrapper.exited;
    // The wrapper was not killed by the signal: it exits with OVMS's status, which is 0, or
    // 128+15 when the signal reached OVMS before OVMS had installed its own handler.
    assert.equal(result.signal, null);
    const stopped = s.wrapper.logs.find((l) => l.event === 'stopped');
    assert.equal(result.code, stopped?.['exitCode']);
    assert.ok(result.code === 0 || result.code === 143, `exit code ${result.code}`);
    assert.ok(s.wrapper.logs.some((l) => l.event === 'signal'));
  });

  test('a public port that cannot be bound is a startup error, and OVMS is never started', async () => {
    const blocker = createServer().listen(0, '127.0.0.1');
    await once(blocker, 'listening');
    const taken = (blocker.address() as { port: number }).port;
    try {
      const s = await start(['--rest_port', String(taken), '--rest_bind_address', '127.0.0.1']);
      const result = await s.wrapper.exited;
      assert.equal(result.code, 2);
      assert.match(s.wrapper.stderr(), new RegExp(String(taken)));
      assert.deepEqual(fakeRuns(s.argvFile), []);
    } finally {
      blocker.close();
    }
  });

  // Custom images start OVMS from a script (environment set-up first); without `exec`, OVMS is the script's child and
  // holds the ports, not the process the wrapper started: OVMS was never seen ready, and every call got 503 for ever.
  test('an OVMS started by a script without exec (--mtls_ovms_binary) is seen ready and serves; on SIGTERM nothing of it is left', async () => {
    const script = join(dir, 'start-ovms.sh');
    await writeFile(script, `#!/bin/sh\nexport SET_UP=1\n'${FAKE_OVMS}' "$@"\n`, { mode: 0o755 });
    const s = await start(['--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1'], {}, ['--mtls_ovms_binary', script]);
    try {
      await eventually(() => s.wrapper.logs.some((l) => l.event === 'ovms_ready'), 'OVMS seen ready', 60_000);
      assert.equal((await https1(s.restPort, pki, { path: '/v2/health/ready' })).status, 200);
      const [run] = fakeRuns(s.argvFile);
      s.wrapper.child.kill('SIGTERM');
      await s.wrapper.exited;
      await eventually(() => processGone(run!.pid), `OVMS pid ${run!.pid} is gone`, 10_000);
    } finally {
      await stopWrapper(s.wrapper);
    }
  });

  test('a loopback port taken between choosing it and OVMS binding it is detected, and OVMS is started again on new ports', async () => {
    const thiefPidFile = join(dir, 'thief.pid');
    const s = await start(['--port', '{grpc}', '--grpc_bind_address', '127.0.0.1'], { FAKE_OVMS_STEAL_PORT_RUNS: '1', FAKE_OVMS_THIEF_PID_FILE: thiefPidFile });
    try {
      const taken = await s.wrapper.waitForEvent('loopback_port_taken');
      await s.wrapper.waitForEvent('ovms_ready');
      const runs = fakeRuns(s.argvFile);
      assert.equal(runs.length, 2);
      assert.equal(Number(runs[0]!.options['port']), taken['port']);
      assert.notEqual(runs[1]!.options['port'], runs[0]!.options['port']);
      await assertServerLive(s.grpcPort);
    } finally {
      await stopWrapper(s.wrapper);
      try {
        process.kill(Number(readFileSync(thiefPidFile, 'utf8')), 'SIGKILL');
      } catch {
        // the thief never started
      }
    }
  });
});

describe('exit codes and signals', () => {
  test("OVMS failing with code 3 makes the wrapper exit 3 (not xargs's 123)", async () => {
    const s = await start(['--port', '{grpc}', '--grpc_bind_address', '127.0.0.1'], { FAKE_OVMS_EXIT_CODE: '3' });
    assert.deepEqual(await s.wrapper.exited, { code: 3, signal: null });
    assert.equal((await s.wrapper.waitForEvent('ovms_exited'))['code'], 3);
  });

  test('OVMS dying of SIGUSR2 (12) makes the wrapper exit 128+12', async () => {
    const s = await start(['--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1'], { FAKE_OVMS_DIE_SIGNAL: 'SIGUSR2' });
    assert.deepEqual(await s.wrapper.exited, { code: 140, signal: null });
  });

  test('SIGTERM with a gRPC stream in flight: the stream finishes, then the signal reaches OVMS, and the wrapper exits with OVMS code 0', async () => {
    const s = await start(['--port', '{grpc}', '--grpc_bind_address', '127.0.0.1']);
    const clients = grpcClients(`localhost:${s.grpcPort}`, pki);
    try {
      await s.wrapper.waitForEvent('ovms_ready');
      await streamAcrossSigterm(clients.kserve, s.wrapper);
    } finally {
      clients.close();
      await stopWrapper(s.wrapper);
    }
  });

  for (const mode of ['terminate', 'relay'] as const) {
    test(`SIGTERM with a REST SSE stream in flight (--mtls_rest_mode ${mode}): the stream finishes, then OVMS gets the signal, and the wrapper exits with its code 0`, async () => {
      // REST only: as OVMS's HTTP server quits when OVMS is signalled, the stand-in then ends every REST reply at once.
      const gate = join(dir, `sse-gate-${runCounter + 1}`);
      const s = await start(['--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1', '--mtls_rest_mode', mode], { FAKE_OVMS_SSE_GATE_FILE: gate });
      try {
        await s.wrapper.waitForEvent('ovms_ready');
        const events = await openChatStream(s.restPort);
        assert.match((await events.next()).value as string, /"content":"Hello"/);
        s.wrapper.child.kill('SIGTERM');
        await s.wrapper.waitForEvent('signal');
        await writeFile(gate, '');
        const rest: string[] = [];
        for await (const event of events) rest.push(event);
        assert.equal(rest.at(-1), 'data: [DONE]', 'the stream ran to its end');
        assert.equal((await s.wrapper.waitForEvent('ovms_stopping'))['signal'], 'SIGTERM');
        assert.deepEqual(await s.wrapper.exited, { code: 0, signal: null });
        assert.ok(s.wrapper.ovmsLines.some((l) => l.includes('SIGTERM received')));
      } finally {
        await writeFile(gate, '');
        await stopWrapper(s.wrapper);
      }
    });
  }

  test('a stream that never ends and an OVMS that ignores SIGTERM: the drain is cut, OVMS gets SIGTERM then SIGKILL, all within --mtls_shutdown_timeout, and the wrapper exits 128+9', async () => {
    const s = await start(['--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1'], { FAKE_OVMS_SSE_GATE_FILE: join(dir, 'never-opened'), FAKE_OVMS_IGNORE_SIGTERM: '1' }, ['--mtls_shutdown_timeout', '1']);
    await s.wrapper.waitForEvent('ovms_ready');
    const [run] = fakeRuns(s.argvFile);
    const events = await openChatStream(s.restPort);
    await events.next();
    s.wrapper.child.kill('SIGTERM');
    await assert.rejects(async () => {
      for await (const _event of events) { /* until the drain cuts it */ }
    });
    assert.deepEqual(await s.wrapper.exited, { code: 137, signal: null });
    const order = s.wrapper.logs.map((l) => l.event).filter((e) => ['signal', 'shutdown_timeout', 'ovms_stopping', 'ovms_exited'].includes(e as string));
    assert.deepEqual(order, ['signal', 'shutdown_timeout', 'ovms_stopping', 'ovms_exited']);
    // What the drain left of 1 s, at least its share (half): the calls cut in the drain's last part may close before its end.
    const killAfterMs = s.wrapper.logs.find((l) => l.event === 'ovms_stopping')!['killAfterMs'] as number;
    assert.ok(killAfterMs >= 500 && killAfterMs <= 1000, String(killAfterMs));
    assert.ok(s.wrapper.ovmsLines.some((l) => l.includes('ignoring SIGTERM')));
    assert.ok(processGone(run!.pid));
  });

  test('a stopped OVMS (SIGSTOP): /readyz says so and ovms_up is 0, the wrapper leaves it be (no restart), and SIGTERM continues it so it exits by itself with its code, not SIGKILL', async () => {
    const s = await start(['--port', '{grpc}', '--grpc_bind_address', '127.0.0.1', '--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1'], {}, ['--mtls_admin_port', '{admin}', '--mtls_shutdown_timeout', '20']);
    const { adminPort } = s;
    try {
      await s.wrapper.waitForEvent('ovms_ready');
      const [run] = fakeRuns(s.argvFile);
      process.kill(run!.pid, 'SIGSTOP');
      const readyz = await fetch(`http://127.0.0.1:${adminPort}/readyz`);
      assert.equal(readyz.status, 503);
      const report = (await readyz.json()) as { checks: Record<string, { ok: boolean; detail: string }> };
      assert.match(report.checks['upstream']!.detail, new RegExp(`^OVMS \\(pid ${run!.pid}\\) is stopped \\(SIGSTOP or SIGTSTP; it answers nothing until SIGCONT\\): REST .*: no answer within 2000 ms; gRPC .*: no answer within 2000 ms$`));
      assert.match(await (await fetch(`http://127.0.0.1:${adminPort}/metrics`)).text(), /^ovms_mtls_ovms_up 0$/m);
      s.wrapper.child.kill('SIGTERM');
      assert.deepEqual(await s.wrapper.exited, { code: 0, signal: null });
      const exited = s.wrapper.logs.find((l) => l.event === 'ovms_exited')!;
      assert.equal(exited['code'], 0);
      assert.equal(s.wrapper.logs.filter((l) => l.event === 'ovms_started').length, 1);
      assert.ok(processGone(run!.pid));
    } finally {
      await stopWrapper(s.wrapper);
    }
  });

  test('a second SIGINT during the drain (impatient Ctrl-C) ends the wrapper at once, and neither OVMS nor a worker outlives it', async () => {
    const gate = join(dir, `sse-gate-int-${runCounter + 1}`);
    const s = await start(['--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1'], { FAKE_OVMS_SSE_GATE_FILE: gate }, ['--mtls_workers', '2']);
    try {
      await s.wrapper.waitForEvent('ovms_ready');
      const workers = (await s.wrapper.waitForEvent('workers_listening'))['pids'] as number[];
      const [run] = fakeRuns(s.argvFile);
      // A stream in flight holds the drain open, and OVMS is signalled only after the drain.
      const events = await openChatStream(s.restPort);
      await events.next();
      s.wrapper.child.kill('SIGINT');
      await s.wrapper.waitForEvent('signal');
      s.wrapper.child.kill('SIGINT');
      assert.deepEqual(await s.wrapper.exited, { code: null, signal: 'SIGINT' });
      for (const pid of [run!.pid, ...workers]) await eventually(() => processGone(pid), `pid ${pid} is gone`, 10_000);
    } finally {
      await writeFile(gate, '');
    }
  });

  test('--mtls_grpc_mode relay on an OVMS command line: UNAVAILABLE while OVMS starts, relayed once ready, and SIGTERM lets the relayed stream finish and logs its connection', async () => {
    const gate = join(dir, `gate-relay-${runCounter + 1}`);
    const s = await start(['--port', '{grpc}', '--grpc_bind_address', '127.0.0.1', '--mtls_grpc_mode', 'relay', '--mtls_workers', '1'], { FAKE_OVMS_START_GATE_FILE: gate });
    const early = grpcClients(`localhost:${s.grpcPort}`, pki);
    // Connections of their own: grpc-js would reuse the early one, which stays on the terminating path.
    const fresh = () => kserveClient(`localhost:${s.grpcPort}`, clientCredentials(pki), { 'grpc.use_local_subchannel_pool': 1 });
    let kserve: ReturnType<typeof kserveClient> | undefined;
    try {
      await s.wrapper.waitForEvent('ovms_started');
      await s.wrapper.waitForLog((l) => l.event === 'listening' && l['listener'] === 'grpc');
      await assert.rejects(unary(early.kserve, 'ServerLive', {}), (err: grpc.ServiceError) => err.code === grpc.status.UNAVAILABLE);
      await writeFile(gate, '');
      await s.wrapper.waitForEvent('ovms_ready');
      // The worker hears of readiness a moment after the primary: a connection that comes first is served, not relayed.
      await eventually(async () => {
        const probe = fresh();
        await unary(probe, 'ServerLive', {});
        probe.close();
        await new Promise((resolve) => setTimeout(resolve, 50));
        return s.wrapper.logs.some((l) => l.event === 'relay_access' && l['calls'] === 1);
      }, 'a relayed connection');
      kserve = fresh();
      await streamAcrossSigterm(kserve, s.wrapper);
      assert.equal(s.wrapper.logs.some((l) => l.event === 'shutdown_timeout'), false);
      // The streamed connection's line is written before the process exits. Access lines are batched, but the
      // 'signal' line writes those of the probes before itself: every relay line after it is the stream's.
      const signalAt = s.wrapper.logs.findIndex((l) => l.event === 'signal');
      const afterSignal = s.wrapper.logs.slice(signalAt + 1).filter((l) => l.event === 'relay_access');
      assert.ok(signalAt >= 0);
      assert.equal(afterSignal.length, 1);
      assert.equal(afterSignal[0]!['calls'], 1);
    } finally {
      early.close();
      kserve?.close();
      await writeFile(gate, '');
      await stopWrapper(s.wrapper);
    }
  });

  test('an OVMS that ignores SIGTERM gets SIGKILL after --mtls_shutdown_timeout, and the wrapper exits 128+9', async () => {
    const s = await start(['--port', '{grpc}', '--grpc_bind_address', '127.0.0.1'], { FAKE_OVMS_IGNORE_SIGTERM: '1' }, ['--mtls_shutdown_timeout', '0.3']);
    await s.wrapper.waitForEvent('ovms_ready');
    const [run] = fakeRuns(s.argvFile);
    s.wrapper.child.kill('SIGTERM');
    await s.wrapper.waitForOvmsLine((l) => l.includes('ignoring SIGTERM'));
    assert.deepEqual(await s.wrapper.exited, { code: 137, signal: null });
    assert.ok(processGone(run!.pid));
  });

  test('a SIGHUP during the drain reloads the certificates instead of killing the wrapper (and OVMS with it)', async () => {
    // OVMS ignores SIGTERM, so the drain lasts until it exits: the test kills it once the SIGHUP was handled.
    const s = await start(['--port', '{grpc}', '--grpc_bind_address', '127.0.0.1'], { FAKE_OVMS_IGNORE_SIGTERM: '1' });
    try {
      await s.wrapper.waitForEvent('ovms_ready');
      const [run] = fakeRuns(s.argvFile);
      s.wrapper.child.kill('SIGTERM');
      await s.wrapper.waitForOvmsLine((l) => l.includes('ignoring SIGTERM'));
      s.wrapper.child.kill('SIGHUP');
      // A worker's own `reloaded` line (trigger `primary`) may come first.
      await s.wrapper.waitForLog((l) => l.event === 'reloaded' && l['trigger'] === 'signal');
      process.kill(run!.pid, 'SIGKILL');
      assert.deepEqual(await s.wrapper.exited, { code: 137, signal: null });
    } finally {
      s.wrapper.child.kill('SIGKILL');
      await s.wrapper.exited;
    }
  });

  test('SIGKILL of the wrapper leaves no OVMS behind', async () => {
    const s = await start(['--port', '{grpc}', '--grpc_bind_address', '127.0.0.1']);
    await s.wrapper.waitForEvent('ovms_ready');
    const [run] = fakeRuns(s.argvFile);
    assert.equal(processGone(run!.pid), false);
    s.wrapper.child.kill('SIGKILL');
    await s.wrapper.exited;
    await eventually(() => processGone(run!.pid), `OVMS pid ${run!.pid} is gone`, 10_000);
  });

  for (const ending of ['crashes', 'is stopped with SIGTERM'] as const) {
    test(`a helper process OVMS forked does not outlive OVMS when OVMS ${ending}`, async () => {
      const pidFile = join(dir, `helper-${runCounter + 1}.pid`);
      // A crash on a timer could come before the wrapper's readiness probe saw OVMS up (its probes back off to 1 s apart).
      const crashGate = join(dir, `crash-gate-${runCounter + 1}`);
      const crash: Record<string, string> = ending === 'crashes' ? { FAKE_OVMS_CRASH_GATE_FILE: crashGate } : {};
      const s = await start(['--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1'], { FAKE_OVMS_HELPER_PID_FILE: pidFile, ...crash });
      await s.wrapper.waitForEvent('ovms_ready');
      const helper = Number(readFileSync(pidFile, 'utf8'));
      try {
        if (ending === 'crashes') await writeFile(crashGate, '');
        else s.wrapper.child.kill('SIGTERM');
        assert.equal((await s.wrapper.exited).code, ending === 'crashes' ? 1 : 0);
        await eventually(() => processGone(helper), `OVMS's helper pid ${helper} is gone`, 10_000);
      } finally {
        try {
          process.kill(helper, 'SIGKILL');
        } catch {
          // gone, as it should be
        }
      }
    });
  }

  test('a gRPC stream in flight when OVMS is killed ends with UNAVAILABLE naming the model server, not INTERNAL without a status', async () => {
    const s = await start(['--port', '{grpc}', '--grpc_bind_address', '127.0.0.1', '--mtls_restart', 'on-failure', '--mtls_workers', '1']);
    const clients = grpcClients(`localhost:${s.grpcPort}`, pki);
    try {
      await s.wrapper.waitForEvent('ovms_ready');
      const call = clients.kserve.ModelStreamInfer();
      const replies = call[Symbol.asyncIterator]();
      call.write({ ...inferRequest(), id: 'before' });
      assert.equal((await replies.next()).value.infer_response.id, 'before');
      process.kill(fakeRuns(s.argvFile)[0]!.pid, 'SIGKILL');
      await assert.rejects(replies.next(), (err: grpc.ServiceError) => {
        assert.equal(err.code, grpc.status.UNAVAILABLE, err.message);
        assert.match(err.details, /upstream 127\.0\.0\.1:\d+/);
        return true;
      });
    } finally {
      clients.close();
      await stopWrapper(s.wrapper);
    }
  });

  test('with --mtls_restart on-failure a crashed OVMS is started again while the listeners stay up', async () => {
    const s = await start(['--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1', '--mtls_restart', 'on-failure'], { FAKE_OVMS_EXIT_CODE: '5', FAKE_OVMS_FAIL_RUNS: '1' });
    try {
      const restarting = await s.wrapper.waitForEvent('ovms_restarting');
      assert.equal(restarting['attempt'], 1);
      await s.wrapper.waitForEvent('ovms_ready');
      assert.equal(fakeRuns(s.argvFile).length, 2);
      assert.equal((await https1(s.restPort, pki, { path: '/v2/health/live' })).status, 200);
      s.wrapper.child.kill('SIGTERM');
      assert.deepEqual(await s.wrapper.exited, { code: 0, signal: null });
    } finally {
      await stopWrapper(s.wrapper);
    }
  });

  // A wrapper serving many clients can be at its open-files limit when OVMS crashes. The restart's spawn then fails
  // with EMFILE, and the check whether a loopback port was taken meanwhile could not listen either: that error ended
  // the whole wrapper as a proxy failure (exit 70) instead of the restart policy's backoff.
  test('with --mtls_restart on-failure a restart that fails at the open-files limit (EMFILE) backs off as any failure, and OVMS serves again once descriptors are free', async () => {
    const crashGate = join(dir, 'crash-gate-emfile');
    const s = await start(['--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1', '--mtls_restart', 'on-failure', '--mtls_workers', '1'], { FAKE_OVMS_CRASH_GATE_FILE: crashGate });
    const pid = s.wrapper.child.pid!;
    try {
      const first = await s.wrapper.waitForEvent('ovms_ready');
      const limit = openFilesLimit(readFileSync(`/proc/${pid}/limits`, 'utf8'));
      // Below what it holds: no descriptor can be opened, whichever closes meanwhile.
      setSoftOpenFilesLimit(pid, String(readdirSync(`/proc/${pid}/fd`).length - 3));
      await writeFile(crashGate, '');
      await s.wrapper.waitForLog((l) => l.event === 'ovms_exited' && l['code'] === 1);
      await rm(crashGate);
      await s.wrapper.waitForLog((l) => l.event === 'ovms_exited' && l['spawnError'] === 'EMFILE');
      setSoftOpenFilesLimit(pid, limit === undefined ? 'unlimited' : String(limit));
      await s.wrapper.waitForLog((l) => l.event === 'ovms_ready' && l['pid'] !== first['pid']);
      assert.equal((await https1(s.restPort, pki, { path: '/v2/health/live' })).status, 200);
      assert.deepEqual(s.wrapper.logs.filter((l) => l.event === 'proxy_failed'), []);
      s.wrapper.child.kill('SIGTERM');
      assert.deepEqual(await s.wrapper.exited, { code: 0, signal: null });
    } finally {
      await stopWrapper(s.wrapper);
    }
  });

  test('with --mtls_restart on-failure an OVMS that fails at every start is given up after 5 failures in a row: the wrapper exits with its code, its error in the log; /readyz and ovms_up say down meanwhile', async () => {
    const s = await start(['--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1', '--mtls_restart', 'on-failure'], { FAKE_OVMS_EXIT_CODE: '7' }, ['--mtls_admin_port', '{admin}']);
    const { adminPort } = s;
    try {
      await s.wrapper.waitForEvent('ovms_restarting');
      const readyz = await fetch(`http://127.0.0.1:${adminPort}/readyz`);
      assert.equal(readyz.status, 503);
      assert.match(((await readyz.json()) as { checks: Record<string, { detail: string }> }).checks['upstream']!.detail, /^OVMS is (not running|starting)$/);
      assert.match(await (await fetch(`http://127.0.0.1:${adminPort}/metrics`)).text(), /^ovms_mtls_ovms_up 0$/m);
      // The fifth failure ends it: a fifth restart would mean restarting for ever.
      const ending = await s.wrapper.waitForLog((l) => l.event === 'ovms_gave_up' || (l.event === 'ovms_restarting' && l['attempt'] === 5));
      assert.equal(ending.event, 'ovms_gave_up');
      assert.equal(ending['failures'], 5);
      assert.equal(ending['level'], 'error');
      assert.deepEqual(await s.wrapper.exited, { code: 7, signal: null });
      assert.equal(fakeRuns(s.argvFile).length, 5);
      assert.equal(s.wrapper.logs.filter((l) => l.event === 'ovms_restarting').length, 4);
      assert.match(s.wrapper.stderr(), /failing at start as asked/);
    } finally {
      await stopWrapper(s.wrapper);
    }
  });

  test('when the proxy fails fatally, OVMS is stopped (SIGKILL if it ignores SIGTERM) and the exit code is 70', async () => {
    const argvFile = join(dir, 'fatal.jsonl');
    process.env['FAKE_OVMS_ARGV_FILE'] = argvFile;
    process.env['FAKE_OVMS_IGNORE_SIGTERM'] = '1';
    try {
      const [rest] = await freeLoopbackPorts(1);
      const split = splitOvmsArgv(['--rest_port', String(rest), '--rest_bind_address', '127.0.0.1', ...tlsArgs(pki), '--mtls_ovms_binary', FAKE_OVMS, '--mtls_ovms_user', 'root', '--mtls_shutdown_timeout', '0.3']);
      const logs = new LogCapture();
      const { running, logger } = await startServing(entrypointSettings(split, {}), { logger: createLogger({ level: 'info', destination: logs }) });
      await logs.waitFor((l) => l.event === 'ovms_started');
      let failProxy!: (err: Error) => void;
      const fatal = new Promise<never>((_resolve, reject) => (failProxy = reject));
      const done = runUntilDone({ ...running, logger, fatal });
      await logs.waitFor((l) => l.event === 'ovms_ready');
      const [run] = fakeRuns(argvFile);
      failProxy(new Error('listener broke'));
      assert.equal(await done, PROXY_FATAL_EXIT_CODE);
      assert.equal((await logs.waitFor((l) => l.event === 'proxy_failed')).level, 'fatal');
      assert.deepEqual(await running.supervisor.done, { code: null, signal: 'SIGKILL' });
      assert.ok(processGone(run!.pid));
      await running.proxy.shutdown(100);
    } finally {
      delete process.env['FAKE_OVMS_ARGV_FILE'];
      delete process.env['FAKE_OVMS_IGNORE_SIGTERM'];
    }
  });
});

describe('the hang watchdog (--mtls_ovms_hang_timeout)', () => {
  const BOTH_PORTS = ['--port', '{grpc}', '--grpc_bind_address', '127.0.0.1', '--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1'];
  const pause = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

  test('on-failure: an OVMS stopped (SIGSTOP) once ready is ended after the timeout, logged ovms_hung, and started again: a new pid answers, one restart counted', async () => {
    const s = await start(BOTH_PORTS, {}, ['--mtls_ovms_hang_timeout', '2', '--mtls_restart', 'on-failure', '--mtls_admin_port', '{admin}']);
    const { adminPort } = s;
    try {
      await s.wrapper.waitForEvent('ovms_ready');
      const [first] = fakeRuns(s.argvFile);
      process.kill(first!.pid, 'SIGSTOP');
      const hung = await s.wrapper.waitForEvent('ovms_hung');
      assert.equal(hung['pid'], first!.pid);
      assert.equal(hung['state'], 'stopped');
      assert.equal(hung['level'], 'error');
      assert.ok((hung['silentMs'] as number) >= 2000, String(hung['silentMs']));
      assert.match(hung['msg'] as string, /is stopped \(SIGSTOP or SIGTSTP\): no answer for .* s \(--mtls_ovms_hang_timeout\); ending it \(SIGTERM, then SIGKILL\), then restarting it/);
      // SIGCONT came with the SIGTERM: it exits by itself (0), which still counts as a failure.
      await s.wrapper.waitForOvmsLine((l) => l.includes('SIGTERM received'));
      assert.equal((await s.wrapper.waitForEvent('ovms_restarting'))['attempt'], 1);
      const second = await s.wrapper.waitForLog((l) => l.event === 'ovms_ready' && l['pid'] !== first!.pid);
      assert.equal(fakeRuns(s.argvFile)[1]!.pid, second['pid']);
      assert.ok(processGone(first!.pid));
      await assertServerLive(s.grpcPort);
      assert.equal((await https1(s.restPort, pki, { path: '/v2/health/live' })).status, 200);
      assert.equal(sample(await (await fetch(`http://127.0.0.1:${adminPort}/metrics`)).text(), 'ovms_mtls_ovms_restarts_total'), 1);
      assert.equal(s.wrapper.logs.filter((l) => l.event === 'ovms_hung').length, 1);
    } finally {
      await stopWrapper(s.wrapper);
    }
  });

  test('never: an OVMS that deadlocks (running, answering nothing, deaf to SIGTERM) is SIGKILLed and the wrapper exits 124 saying why', async () => {
    const freeze = join(dir, `freeze-${runCounter + 1}`);
    const s = await start(BOTH_PORTS, { FAKE_OVMS_FREEZE_GATE_FILE: freeze }, ['--mtls_ovms_hang_timeout', '2', '--mtls_shutdown_timeout', '2']);
    try {
      await s.wrapper.waitForEvent('ovms_ready');
      const [run] = fakeRuns(s.argvFile);
      await writeFile(freeze, '');
      await s.wrapper.waitForOvmsLine((l) => l.includes('freezing'));
      const hung = await s.wrapper.waitForEvent('ovms_hung');
      assert.equal(hung['pid'], run!.pid);
      assert.equal(hung['state'], 'not_answering');
      assert.match(hung['msg'] as string, /does not answer: .*then exiting with 124 \(--mtls_restart never\) so that the orchestrator restarts the container/);
      assert.deepEqual(await s.wrapper.exited, { code: 124, signal: null });
      const exited = s.wrapper.logs.find((l) => l.event === 'ovms_exited')!;
      assert.equal(exited['signal'], 'SIGKILL');
      const stopped = s.wrapper.logs.find((l) => l.event === 'stopped')!;
      assert.equal(stopped['exitCode'], 124);
      assert.match(stopped['msg'] as string, /OVMS hung/);
      assert.equal(s.wrapper.logs.filter((l) => l.event === 'ovms_started').length, 1);
      assert.ok(processGone(run!.pid));
    } finally {
      await writeFile(freeze, '').catch(() => undefined);
      await stopWrapper(s.wrapper);
    }
  });

  test('an OVMS slow to open its ports and then to load its models (each longer than the timeout) is not killed; once ready and then stopped, it is', async () => {
    const opened = join(dir, `ports-open-${runCounter + 1}`);
    const loaded = join(dir, `models-loaded-${runCounter + 1}`);
    const s = await start(BOTH_PORTS, { FAKE_OVMS_START_GATE_FILE: opened, FAKE_OVMS_LOAD_GATE_FILE: loaded }, ['--mtls_ovms_hang_timeout', '2', '--mtls_admin_port', '{admin}']);
    const { adminPort } = s;
    const readyz = async () => (await fetch(`http://127.0.0.1:${adminPort}/readyz`)).json() as Promise<{ checks: Record<string, { detail: string }> }>;
    try {
      await s.wrapper.waitForEvent('ovms_started');
      // Three timeouts with its ports closed, then three live but loading: the watchdog's checks would have fired in either.
      await pause(3000);
      await writeFile(opened, '');
      await s.wrapper.waitForEvent('ovms_ready');
      await pause(3000);
      assert.match((await readyz()).checks['upstream']!.detail, /answers but is not ready yet \(loading models\?\)/);
      await writeFile(loaded, '');
      await eventually(async () => (await readyz()).checks['upstream']!.detail.startsWith('OVMS ready'), '/readyz says ready');
      assert.equal(s.wrapper.logs.some((l) => l.event === 'ovms_hung'), false);
      const runs = fakeRuns(s.argvFile);
      assert.equal(runs.length, 1);
      // The watchdog was on all along.
      process.kill(runs[0]!.pid, 'SIGSTOP');
      assert.equal((await s.wrapper.waitForEvent('ovms_hung'))['pid'], runs[0]!.pid);
      assert.deepEqual(await s.wrapper.exited, { code: 124, signal: null });
    } finally {
      await writeFile(opened, '').catch(() => undefined);
      await writeFile(loaded, '').catch(() => undefined);
      await stopWrapper(s.wrapper);
    }
  });

  for (const [value, error] of [
    ['-1', "--mtls_ovms_hang_timeout: '-1' is not a number of seconds >= 0"],
    ['soon', "--mtls_ovms_hang_timeout: 'soon' is not a number of seconds >= 0"],
    ['9999999', "--mtls_ovms_hang_timeout: '9999999' is more than 2000000 seconds (23 days), the longest timeout supported"],
  ] as const) {
    test(`--mtls_ovms_hang_timeout ${value} is one line on stderr and exit 2, before anything listens or OVMS is run`, async () => {
      const s = await start(['--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1', `--mtls_ovms_hang_timeout=${value}`]);
      assert.deepEqual(await s.wrapper.exited, { code: 2, signal: null });
      assert.equal(s.wrapper.stderr(), `ovms-mtls: ${error}\n`);
      assert.equal(s.wrapper.logs.filter((l) => l.event === 'listening').length, 0);
      assert.deepEqual(fakeRuns(s.argvFile), []);
    });
  }

  test('OVMS_MTLS_OVMS_HANG_TIMEOUT that is not a number is refused the same way', async () => {
    const s = await start(['--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1'], { OVMS_MTLS_OVMS_HANG_TIMEOUT: '1m' });
    try {
      assert.deepEqual(await Promise.race([s.wrapper.exited, s.wrapper.waitForEvent('listening')]), { code: 2, signal: null });
    } finally {
      await stopWrapper(s.wrapper);
    }
    assert.equal(s.wrapper.stderr(), "ovms-mtls: --mtls_ovms_hang_timeout: '1m' is not a number of seconds >= 0: give 60 for 1m (set by OVMS_MTLS_OVMS_HANG_TIMEOUT in the environment)\n");
  });
});

describe('non-serving invocations', () => {
  test('--list_models runs OVMS with its arguments and exits with its code; nothing listens', async () => {
    const s = await start(['--list_models', '--model_repository_path', '/models', '--port', '{grpc}'], { FAKE_OVMS_ONESHOT_EXIT_CODE: '4' });
    assert.deepEqual(await s.wrapper.exited, { code: 4, signal: null });
    assert.deepEqual(fakeRuns(s.argvFile).map((r) => r.argv), [['--list_models', '--model_repository_path', '/models']]);
    assert.equal(s.wrapper.logs.filter((l) => l.event === 'listening').length, 0);
  });

  test('--list_models=false is still --list_models, as for OVMS (presence decides): OVMS runs it, nothing listens', async () => {
    const s = await start(['--list_models=false', '--model_repository_path', '/models'], { FAKE_OVMS_ONESHOT_EXIT_CODE: '5' });
    assert.deepEqual(await s.wrapper.exited, { code: 5, signal: null });
    assert.deepEqual(fakeRuns(s.argvFile).map((r) => r.argv), [['--list_models=false', '--model_repository_path', '/models']]);
    assert.equal(s.wrapper.logs.filter((l) => l.event === 'listening').length, 0);
  });

  test('--pull runs OVMS with its arguments untouched, spaces included, and exits with its code', async () => {
    const s = await start(['--pull', '--source_model', 'OpenVINO/model name', '--model_repository_path', '/models']);
    assert.deepEqual(await s.wrapper.exited, { code: 0, signal: null });
    assert.deepEqual(fakeRuns(s.argvFile)[0]!.argv, ['--pull', '--source_model', 'OpenVINO/model name', '--model_repository_path', '/models']);
  });

  // Serving took an empty OVMS_MTLS_OVMS_USER (a manifest's substitution of nothing) for the default user; --list_models looked up user '' and exited 2.
  test('an empty OVMS_MTLS_OVMS_USER means the default user for a one-shot run too, as when serving; --mtls_ovms_user= is refused by both, as every blank text option', async () => {
    const ending = async (env: Record<string, string>, extra: string[] = []) => {
      const argvFile = join(dir, `one-shot-user-${++runCounter}.jsonl`);
      const wrapper = startWrapper(['--list_models', '--model_repository_path', '/models', '--mtls_ovms_binary', FAKE_OVMS, ...extra], { FAKE_OVMS_ARGV_FILE: argvFile, ...env });
      await once(wrapper.child, 'close');
      return { exit: await wrapper.exited, stderr: wrapper.stderr(), uids: fakeRuns(argvFile).map((r) => r.uid) };
    };
    const unset = await ending({});
    assert.deepEqual(await ending({ OVMS_MTLS_OVMS_USER: '' }), unset);
    const needsValue = 'ovms-mtls: --mtls_ovms_user needs a value (--mtls_ovms_user VALUE or --mtls_ovms_user=VALUE)\n';
    assert.deepEqual(await ending({}, ['--mtls_ovms_user=']), { exit: { code: 2, signal: null }, stderr: needsValue, uids: [] });
  });

  // A terminal's Ctrl-C on a plain `ovms --pull` reaches its whole process group; through the wrapper (OVMS in a session of its own) only OVMS got it, and what it had forked ran on.
  test('SIGINT during a one-shot run (Ctrl-C on --pull) reaches what OVMS forked too: nothing runs on, and the wrapper exits 128+2', async () => {
    const helperFile = join(dir, `one-shot-helper-${runCounter + 1}`);
    const s = await start(['--pull', '--source_model', 'm', '--model_repository_path', '/models'], { FAKE_OVMS_ONESHOT_HELPER_PID_FILE: helperFile });
    let helper: number | undefined;
    try {
      await eventually(async () => (await readFile(helperFile, 'utf8').catch(() => '')) !== '', 'the helper OVMS forked');
      helper = Number(readFileSync(helperFile, 'utf8'));
      s.wrapper.child.kill('SIGINT');
      assert.deepEqual(await s.wrapper.exited, { code: 128 + 2, signal: null });
      await eventually(() => processGone(helper!), `the helper (pid ${helper}) to be gone`, 5000);
    } finally {
      if (helper !== undefined && !processGone(helper)) process.kill(helper, 'SIGKILL');
      await stopWrapper(s.wrapper);
    }
  });

  // The wrapper returned with OVMS's code and the converter an OVMS --pull had started ran on, orphaned.
  test('a one-shot OVMS that exits while what it forked still runs (a --pull that crashed mid-conversion): nothing runs on after the wrapper', async () => {
    const helperFile = join(dir, 'one-shot-left-behind.pid');
    const script = join(dir, 'pull-crashes.sh');
    await writeFile(script, `#!/bin/sh\nsleep 300 &\necho $! > '${helperFile}'\nexit 3\n`, { mode: 0o755 });
    const s = await start(['--pull', '--source_model', 'm', '--model_repository_path', '/models'], {}, ['--mtls_ovms_binary', script]);
    let helper: number | undefined;
    try {
      assert.deepEqual(await s.wrapper.exited, { code: 3, signal: null });
      helper = Number(readFileSync(helperFile, 'utf8'));
      await eventually(() => processGone(helper!), `the helper (pid ${helper}) to be gone`, 5000);
    } finally {
      if (helper !== undefined && !processGone(helper)) process.kill(helper, 'SIGKILL');
      await stopWrapper(s.wrapper);
    }
  });

  test("--version prints ours, then OVMS's, with OVMS's exit code", async () => {
    const s = await start(['--version'], { FAKE_OVMS_ONESHOT_EXIT_CODE: '6' });
    assert.deepEqual(await s.wrapper.exited, { code: 6, signal: null });
    assert.match(s.wrapper.ovmsLines[0]!, /^ovms-mtls \d+\.\d+\.\d+/);
    assert.ok(s.wrapper.ovmsLines.some((l) => l.includes('OpenVINO Model Server fake')));
  });

  // It printed ours and exited 0 without a word about OVMS's, whose binary was not there; one given that could not run was passed over too.
  test("--version without the image's OVMS (outside the container) prints ours, then a line on stderr saying why OVMS's is not shown, exit 0; an --mtls_ovms_binary that cannot run is refused, exit 2", { skip: IMAGE_OVMS_HERE && `${DEFAULTS.ovms.binary} exists here` }, async () => {
    const outside = startWrapper(['--version']);
    assert.deepEqual(await outside.exited, { code: 0, signal: null });
    assert.match(outside.ovmsLines.join('\n'), /^ovms-mtls \d+\.\d+\.\d+$/);
    assert.equal(outside.stderr(), `ovms-mtls: OVMS's version is not shown: ${DEFAULTS.ovms.binary} does not exist (pass --mtls_ovms_binary PATH to the ovms executable)\n`);
    const missing = join(dir, 'no-such-ovms');
    const given = startWrapper(['--version', '--mtls_ovms_binary', missing]);
    assert.deepEqual(await given.exited, { code: 2, signal: null });
    assert.deepEqual(given.ovmsLines, []);
    assert.equal(given.stderr(), `ovms-mtls: --mtls_ovms_binary: ${missing} does not exist\n`);
  });

  test("--mtls_ovms_help shows OVMS's own help", async () => {
    const s = await start(['--mtls_ovms_help']);
    assert.deepEqual(await s.wrapper.exited, { code: 0, signal: null });
    assert.deepEqual(fakeRuns(s.argvFile)[0]!.argv, ['--help']);
    assert.ok(s.wrapper.ovmsLines.some((l) => l.includes('usage: ovms')));
  });

  test("OVMS_MTLS_OVMS_HELP shows OVMS's own help as --mtls_ovms_help does, and --mtls_ovms_help=false on the command line wins over it", async () => {
    const s = await start(['--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1'], { OVMS_MTLS_OVMS_HELP: 'true' });
    try {
      assert.deepEqual(await Promise.race([s.wrapper.exited, s.wrapper.waitForEvent('listening')]), { code: 0, signal: null });
    } finally {
      await stopWrapper(s.wrapper);
    }
    assert.deepEqual(fakeRuns(s.argvFile).map((r) => r.argv), [['--help']]);
    const overruled = await start(['--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1', '--mtls_ovms_help=false'], { OVMS_MTLS_OVMS_HELP: 'true' });
    try {
      await overruled.wrapper.waitForEvent('listening');
    } finally {
      await stopWrapper(overruled.wrapper);
    }
  });

  test('a directory as --mtls_ovms_binary is one line on stderr and exit 2, before anything listens or OVMS is run', async () => {
    const s = await start(['--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1'], {}, ['--mtls_ovms_binary', dir]);
    assert.deepEqual(await s.wrapper.exited, { code: 2, signal: null });
    assert.equal(s.wrapper.stderr(), `ovms-mtls: --mtls_ovms_binary: ${dir} is a directory, not the executable in it\n`);
    assert.equal(s.wrapper.logs.filter((l) => l.event === 'listening').length, 0);
  });

  // "does not exist or is not an executable file" for a file that exists; and a launcher script whose interpreter is missing (or
  // whose first line ends in a CR) passed, the listeners came up, and setpriv said "No such file or directory" of the script (exit 127).
  test('an --mtls_ovms_binary that cannot run says why in one line, exit 2, before anything listens or OVMS is run', async () => {
    const script = async (name: string, text: string, mode: number) => {
      const path = join(dir, name);
      await writeFile(path, text, { mode });
      await chmod(path, mode);
      return path;
    };
    const unexecutable = await script('ovms-0644.sh', '#!/bin/sh\nexit 0\n', 0o644);
    const noInterpreter = await script('ovms-bash.sh', '#!/nonexistent/bin/bash\nexec /ovms/bin/ovms "$@"\n', 0o755);
    const crlf = await script('ovms-crlf.sh', '#!/bin/sh\r\nexec /ovms/bin/ovms "$@"\r\n', 0o755);
    const cases: [string, string][] = [
      // The option is not suggested to a user who gave it.
      [join(dir, 'no-such-ovms'), 'does not exist'],
      [unexecutable, 'is not executable (mode 0644: chmod +x it)'],
      [noInterpreter, 'is a script whose interpreter /nonexistent/bin/bash (its first line, #!) does not exist or cannot be run here (install it in the image, or name one that is there, such as #!/bin/sh)'],
      [crlf, `is a script with Windows line endings: its first line names the interpreter '/bin/sh\\r', which no system has (convert it: \`sed -i 's/\\r$//' ${crlf}\` or dos2unix)`],
    ];
    for (const [binary, problem] of cases) {
      const s = await start(['--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1'], {}, ['--mtls_ovms_binary', binary]);
      assert.deepEqual(await s.wrapper.exited, { code: 2, signal: null }, binary);
      assert.equal(s.wrapper.stderr(), `ovms-mtls: --mtls_ovms_binary: ${binary} ${problem}\n`);
      assert.equal(s.wrapper.logs.filter((l) => l.event === 'listening').length, 0);
    }
  });

  test('--mtls_access_log false (separate value) is one line on stderr and exit 2, before anything listens or OVMS is run', async () => {
    const s = await start(['--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1', '--mtls_access_log', 'false']);
    assert.deepEqual(await s.wrapper.exited, { code: 2, signal: null });
    assert.match(s.wrapper.stderr(), /^ovms-mtls: --mtls_access_log is a flag and takes no separate value: write --mtls_access_log=false .*\n$/);
    assert.equal(s.wrapper.logs.filter((l) => l.event === 'listening').length, 0);
    assert.deepEqual(fakeRuns(s.argvFile), []);
  });

  // Taken for absent, the blank address bound the public port on every address (0.0.0.0), without a word.
  test('a blank bind address (--rest_bind_address=, an unset variable) is one line on stderr and exit 2, before anything listens or OVMS is run', async () => {
    const s = await start(['--rest_port', '{rest}', '--rest_bind_address=']);
    try {
      // Without the refusal it serves: the listening line ends the wait instead of the test's timeout.
      const listening = s.wrapper.waitForEvent('listening').then((l) => l, () => undefined);
      assert.deepEqual(await Promise.race([s.wrapper.exited, listening]), { code: 2, signal: null });
      assert.equal(s.wrapper.stderr(), 'ovms-mtls: --rest_bind_address needs a value (--rest_bind_address VALUE or --rest_bind_address=VALUE)\n');
      assert.equal(s.wrapper.logs.filter((l) => l.event === 'listening').length, 0);
      assert.deepEqual(fakeRuns(s.argvFile), []);
    } finally {
      await stopWrapper(s.wrapper);
    }
  });

  test('a last OVMS option without its value (--model_path) is one line on stderr and exit 2, before anything listens or OVMS is run', async () => {
    // Appended after it, our `--port` would become OVMS's model path and the port number a stray argument.
    const s = await start(['--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1', '--model_name', 'm'], {}, ['--model_path']);
    assert.deepEqual(await s.wrapper.exited, { code: 2, signal: null });
    assert.equal(s.wrapper.stderr(), 'ovms-mtls: --model_path needs a value (--model_path VALUE or --model_path=VALUE)\n');
    assert.equal(s.wrapper.logs.filter((l) => l.event === 'listening').length, 0);
    assert.deepEqual(fakeRuns(s.argvFile), []);
  });

  test('an unknown --mtls_ option is one line on stderr and exit 2', async () => {
    const s = await start(['--port', '{grpc}', '--mtls_nonsense', 'x']);
    assert.deepEqual(await s.wrapper.exited, { code: 2, signal: null });
    assert.match(s.wrapper.stderr(), /^ovms-mtls: unknown option --mtls_nonsense .*\n$/);
  });

  // No OVMS option starts so: it went to OVMS as one of its own, with its value. The wrapper served with
  // the other certificates (here the test's; in the container the ones mounted at /certs) until OVMS
  // refused the option, or, without them, said "--mtls_cert: /certs/server.pem does not exist", a path
  // the user never gave.
  test('one of our options written with dashes or capitals (--mtls-cert, --MTLS_KEY=) is one line naming the spelling, exit 2, before anything listens or OVMS is run', async () => {
    for (const [misspelled, right] of [[['--mtls-cert', '/x.pem'], '--mtls_cert'], [['--MTLS_KEY=/x.key'], '--mtls_key']] as const) {
      const s = await start(['--port', '{grpc}', '--grpc_bind_address', '127.0.0.1', '--model_name', 'm', '--model_path', '/m'], {}, [...misspelled]);
      try {
        assert.deepEqual(await s.wrapper.exited, { code: 2, signal: null });
        const name = misspelled[0].split('=')[0];
        assert.equal(s.wrapper.stderr(), `ovms-mtls: unknown option ${name} (ovms-mtls writes its options in lower case with underscores: ${right}; see \`ovms-mtls --help\`)\n`);
        assert.equal(s.wrapper.logs.filter((l) => l.event === 'listening').length, 0);
        assert.deepEqual(fakeRuns(s.argvFile), []);
      } finally {
        await stopWrapper(s.wrapper);
      }
    }
  });
});

// The check ran as root, which access(2) lets run anything with an x bit: a binary only root may run (or in a directory
// only root may enter) passed, the listeners came up, then setpriv failed with "Permission denied" (exit 126) as OVMS's user.
describe("an --mtls_ovms_binary judged for the --mtls_ovms_user OVMS runs as, not for root", { skip: ROOT_ONLY }, () => {
  const nobody = 'nobody (uid 65534, groups 65534), the --mtls_ovms_user OVMS runs as';
  let open: string;

  before(async () => {
    open = await mkdtemp(join(tmpdir(), 'ovms-mtls-binary-user-'));
    await chmod(open, 0o755);
    await mkdir(join(open, 'shut'), { mode: 0o700 });
    // A working interpreter, but in a directory only root may enter.
    await copyFile('/bin/sh', join(open, 'shut', 'sh'));
    await chmod(join(open, 'shut', 'sh'), 0o755);
  });
  after(async () => {
    await rm(open, { recursive: true, force: true });
  });

  const script = async (name: string, text: string, mode: number, owner: [number, number] = [0, 0]) => {
    const path = join(open, name);
    await writeFile(path, text);
    await chown(path, ...owner);
    await chmod(path, mode);
    return path;
  };

  test('one it may not run is one line naming the user, what refuses it and what to do, exit 2, before anything listens or OVMS is run', async () => {
    const launcher = `#!/bin/sh\nexec ${FAKE_OVMS} "$@"\n`;
    const ownerOnly = await script('ovms-0700.sh', launcher, 0o700);
    const rootGroup = await script('ovms-0750.sh', launcher, 0o750);
    // Its owner gets the owner's bits (none), though the others' would let it.
    const ownerNoX = await script('ovms-0071.sh', launcher, 0o071, [65534, 65534]);
    const inShut = await script('shut/ovms.sh', launcher, 0o755);
    const shutInterpreter = await script('ovms-shut-sh.sh', `#!${join(open, 'shut', 'sh')}\nexec ${FAKE_OVMS} "$@"\n`, 0o755);
    const unreadable = await script('ovms-0711.sh', launcher, 0o711);
    const fix = (bit: string) => `give that user, one of its groups or all ${bit} permission on it (chmod, chgrp or chown), or pass --mtls_ovms_user a user that may`;
    const shutDir = `the directory ${join(open, 'shut')} (mode 0700, owner uid 0, group 0) does not let it in (every directory on the way needs x permission for it)`;
    const cases: [string, string][] = [
      [ownerOnly, `cannot be run by ${nobody}: the file is mode 0700, owner uid 0, group 0; ${fix('x')}`],
      [rootGroup, `cannot be run by ${nobody}: the file is mode 0750, owner uid 0, group 0; ${fix('x')}`],
      [ownerNoX, `cannot be run by ${nobody}: the file is mode 071, owner uid 65534, group 65534; ${fix('x')}`],
      [inShut, `cannot be run by ${nobody}: ${shutDir}; ${fix('x')}`],
      [shutInterpreter, `is a script whose interpreter ${join(open, 'shut', 'sh')} (its first line, #!) cannot be run by ${nobody}: ${shutDir}; ${fix('x')}`],
      [unreadable, `is a script, which its interpreter reads, and it cannot be read by ${nobody}: the file is mode 0711, owner uid 0, group 0; ${fix('r')}`],
    ];
    for (const [binary, problem] of cases) {
      const s = await start(['--rest_port', '{rest}', '--rest_bind_address', '127.0.0.1'], {}, ['--mtls_ovms_binary', binary, '--mtls_ovms_user', 'nobody']);
      try {
        // Without the check it serves: the listening line ends the wait instead of the test's timeout.
        const listening = s.wrapper.waitForEvent('listening').then((l) => l, () => undefined);
        assert.deepEqual(await Promise.race([s.wrapper.exited, listening]), { code: 2, signal: null }, binary);
        assert.equal(s.wrapper.stderr(), `ovms-mtls: --mtls_ovms_binary: ${binary} ${problem}\n`);
        assert.equal(s.wrapper.logs.filter((l) => l.event === 'listening').length, 0);
        assert.deepEqual(fakeRuns(s.argvFile), []);
      } finally {
        await stopWrapper(s.wrapper);
      }
    }
  });

  test('one it may run through its group, or one only root may run with --mtls_ovms_user root, is run', async () => {
    const argvFile = join(open, 'runs.jsonl');
    await writeFile(argvFile, '', { mode: 0o666 });
    await chmod(argvFile, 0o666);
    const launcher = `#!/bin/sh\nexec ${FAKE_OVMS} "$@"\n`;
    const nogroup = await script('ovms-nogroup-0750.sh', launcher, 0o750, [0, 65534]);
    const rootOnly = await script('ovms-root-0700.sh', launcher, 0o700);
    for (const [binary, user] of [[nogroup, 'nobody'], [rootOnly, 'root']] as const) {
      const wrapper = startWrapper(['--list_models', '--model_repository_path', '/models', '--mtls_ovms_binary', binary, '--mtls_ovms_user', user], { FAKE_OVMS_ARGV_FILE: argvFile });
      assert.deepEqual(await wrapper.exited, { code: 0, signal: null }, wrapper.stderr());
    }
    assert.deepEqual(fakeRuns(argvFile).map((r) => r.uid), [65534, 0]);
  });
});
