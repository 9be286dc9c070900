/**
 * A rolling update on the gRPC port, as users run the proxy in Kubernetes: several replicas in front of one model
 * server, clients configured with every replica's address (grpc-go with a resolver of several addresses, grpcio and
 * grpc-js with an `ipv4:` target of several), a steady stream of ModelInfer calls, several in flight at once, and a
 * ModelStreamInfer stream open across the drain (SIGTERM: proxy.shutdown()) of the replica they use. The drain sends each
 * connection GOAWAY with the last stream it took: a call the client sent after that id was not processed, and gRPC
 * clients send it again on another connection; the replica's listener is closed, so that connection goes to the other.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { once } from 'node:events';
import { createServer as createTcpServer, Socket } from 'node:net';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { clientCredentials, startTestProxy, startUpstream, type StartedProxy } from './helpers/harness.js';
import { inferRequest } from './helpers/grpc-calls.js';
import { buildGoFixture } from './helpers/go-build.js';
import { GRPCIO_SCRIPT, PROTO_DIR, PYTHON, pythonStubs, type PythonStubs } from './helpers/grpcio.js';
import { CommandedClient, failuresOf, type Command, type SteadyOutcome } from './helpers/client-processes.js';
import { eventually } from './helpers/ops.js';
import { kserveClient, type KserveClient } from '../src/demo/grpc-client.js';
import type { ModelServer } from '../src/demo/model-server.js';

const run = promisify(execFile);
const KSERVE = '/inference.GRPCInferenceService';
const GRPC_MODES = ['terminate', 'relay'] as const;
type Mode = (typeof GRPC_MODES)[number];
const POLICIES = ['pick_first', 'round_robin'] as const;
type Policy = (typeof POLICIES)[number];
const WORKERS = 4;
const STREAM_IDS = ['s0', 's1', 's2'];

let pki: TestPki;
let upstream: ModelServer;
let workDir: string;
let goBinary: string;
let descriptors: string;
let stubs: PythonStubs;

interface Failure {
  err: string;
}
type Outcome = SteadyOutcome<Failure>;

/** A steady stream of ModelInfer calls from several workers: its successes so far, and its outcome once stopped. */
interface Steady {
  ok(): number;
  stop(): Promise<Outcome>;
}

/** A ModelStreamInfer call whose first reply is in; resume() sends the rest. Its request ids answered, and its code. */
interface GatedStream {
  resume(): void;
  result: Promise<{ code: string; ids: string[]; message?: string }>;
}

/** A gRPC client configured with both replicas' addresses. */
interface DrainClient {
  stream(): Promise<GatedStream>;
  steady(workers: number): Promise<Steady>;
  close(): void;
}

before(async () => {
  pki = await createTestPki();
  upstream = await startUpstream();
  workDir = await mkdtemp(join(tmpdir(), 'ovms-mtls-grpc-drain-'));
  goBinary = await buildGoFixture('kserve-go-client', workDir, ['golang-google-grpc-dev', 'golang-google-protobuf-dev']);
  descriptors = join(workDir, 'protos.pb');
  await run('protoc', ['-I', PROTO_DIR, '--include_imports', '--descriptor_set_out', descriptors, 'kserve_v2.proto'], { cwd: PROTO_DIR });
  stubs = await pythonStubs();
});

after(async () => {
  await upstream?.close();
  await stubs?.cleanup();
  if (workDir) await rm(workDir, { recursive: true, force: true });
  await pki?.cleanup();
});

/** A client process of test/fixtures speaking the JSON-line commands steady, stop, stream and resume. */
function commandedDrainClient(what: string, command: string, args: string[], streamCall: Record<string, unknown>, idsOf: (result: Record<string, unknown>) => string[]): DrainClient {
  const client = new CommandedClient<object, unknown, Outcome>(what, command, args, (id, c: Command) => JSON.stringify({ id, ...c }));
  const steadyCall = { method: `${KSERVE}/ModelInfer`, requests: [inferRequest()] };
  return {
    async stream() {
      let first!: () => void;
      const firstIn = new Promise<void>((resolve) => (first = resolve));
      const { id, done } = client.send({ op: 'stream', call: streamCall }, () => first());
      const result = done.then((line) => {
        const r = line.result as Record<string, unknown> & { code: string; message?: string };
        return { code: r.code, message: r.message, ids: idsOf(r) };
      });
      await Promise.race([firstIn, result]);
      return { resume: () => void client.send({ op: 'resume', target: id }), result };
    },
    async steady(workers) {
      let ok = 0;
      let started!: () => void;
      const running = new Promise<void>((resolve) => (started = resolve));
      const { id, done } = client.send({ op: 'steady', workers, call: steadyCall }, (line) => {
        ok = line.progress as number;
        started();
      });
      await running;
      return {
        ok: () => ok,
        stop: async () => {
          await client.send({ op: 'stop', target: id }).done;
          return (await done).steady as Outcome;
        },
      };
    },
    close: () => client.close(),
  };
}

const streamRequests = STREAM_IDS.map((id) => ({ ...inferRequest(), id }));

function goDrainClient(ports: number[], policy: Policy): DrainClient {
  const identity = ['-cert', pki.paths['client.pem']!, '-key', pki.paths['client.key']!];
  const addrs = ports.map((p) => `127.0.0.1:${p}`).join(',');
  return commandedDrainClient('grpc-go client', goBinary, ['-addrs', addrs, '-lb', policy, '-ca', pki.paths['server_ca.pem']!, ...identity, '-descriptors', descriptors, '-commands'],
    { method: `${KSERVE}/ModelStreamInfer`, requests: streamRequests },
    (r) => ((r.replies ?? []) as { infer_response: { id: string } }[]).map((reply) => reply.infer_response.id));
}

function grpcioDrainClient(ports: number[], policy: Policy): DrainClient {
  const target = `ipv4:${ports.map((p) => `127.0.0.1:${p}`).join(',')}`;
  // CommandedClient runs it with PATH and LANG only: env(1) adds where the stubs are.
  return commandedDrainClient('grpcio client', 'env', [`PYTHONPATH=${stubs.dir}`, PYTHON, GRPCIO_SCRIPT, 'commands', target, pki.paths['server_ca.pem']!, pki.paths['client.pem']!, pki.paths['client.key']!, policy],
    {}, (r) => r.ids as string[]);
}

/** grpc-js in this process, with the same steady stream and stream. */
function grpcJsDrainClient(ports: number[], policy: Policy): DrainClient {
  const target = `ipv4:${ports.map((p) => `127.0.0.1:${p}`).join(',')}`;
  const kserve: KserveClient = kserveClient(target, clientCredentials(pki), {
    'grpc.ssl_target_name_override': 'localhost',
    'grpc.default_authority': 'localhost',
    'grpc.service_config': JSON.stringify({ loadBalancingConfig: [{ [policy]: {} }] }),
  });
  // Set by close(): steady workers end too, so a test that failed half-way leaves none calling.
  let closed = false;
  const infer = () => new Promise<void>((resolve, reject) => {
    kserve.ModelInfer(inferRequest(), new grpc.Metadata(), { deadline: Date.now() + 20_000 }, (err) => (err ? reject(err) : resolve()));
  });
  return {
    async stream() {
      const call = kserve.ModelStreamInfer(new grpc.Metadata(), { deadline: Date.now() + 60_000 });
      const ids: string[] = [];
      let first!: () => void;
      const firstIn = new Promise<void>((resolve) => (first = resolve));
      const result = new Promise<{ code: string; ids: string[]; message?: string }>((resolve) => {
        call.on('data', (reply: { infer_response: { id: string } }) => {
          ids.push(reply.infer_response.id);
          first();
        });
        call.on('status', (status: grpc.StatusObject) => resolve({ code: grpc.status[status.code], message: status.details, ids }));
        call.on('error', () => {});
      });
      call.write(streamRequests[0]);
      await Promise.race([firstIn, result]);
      return {
        resume: () => {
          for (const request of streamRequests.slice(1)) call.write(request);
          call.end();
        },
        result,
      };
    },
    async steady(workers) {
      let stopped = false;
      const outcome: Outcome = { ok: 0, failures: [], statuses: {} };
      const worker = async () => {
        while (!stopped && !closed) {
          await infer().then(() => { outcome.ok += 1; }, (err: grpc.ServiceError) => { outcome.failures!.push({ err: `${grpc.status[err.code]}: ${err.details}` }); });
        }
      };
      const running = Array.from({ length: workers }, worker);
      await eventually(() => outcome.ok >= 20, 'grpc-js made 20 calls');
      return {
        ok: () => outcome.ok,
        stop: async () => {
          stopped = true;
          await Promise.all(running);
          return outcome;
        },
      };
    },
    close: () => {
      closed = true;
      kserve.close();
    },
  };
}

const CLIENTS = { 'grpc-go': goDrainClient, grpcio: grpcioDrainClient, 'grpc-js': grpcJsDrainClient } as const;

/** Two replicas of the proxy in front of the one model server. */
async function twoReplicas(mode: Mode): Promise<[StartedProxy, StartedProxy]> {
  const start = () => startTestProxy({ pki, upstream: { grpcPort: upstream.grpcPort! }, grpcMode: mode });
  return [await start(), await start()];
}

/** The calls a replica has served: an access line each (terminate mode), a relay_access line each connection once closed (relay). */
function callsServed(front: StartedProxy): number {
  const lines = front.logs.lines.filter((l) => l.listener === 'grpc');
  return lines.filter((l) => l.event === 'access').length + lines.reduce((sum, l) => sum + (l.event === 'relay_access' ? (l.calls as number) : 0), 0);
}

/** Successes at least `more` past where the stream stood: calls went on. */
async function goesOn(steady: Steady, more: number, what: string): Promise<void> {
  const from = steady.ok();
  await eventually(() => steady.ok() >= from + more, what);
}

/**
 * A TCP relay in front of one replica that can hold back what the replica sends its clients, in order, while what the
 * clients send goes on: so a client sends calls after the drain's GOAWAY went out and before it has read it, as on a
 * real network where the two cross. Nothing is lost: what was held goes out on release(), a close after it.
 */
interface HoldingRelay {
  port: number;
  /** Holds what comes from the replica from now on; takes no more connections (the replica's listener closes in the drain). */
  hold(): void;
  /** Bytes the clients sent since hold(). */
  sentSinceHold(): number;
  release(): void;
  close(): void;
}

async function holdingRelay(targetPort: number): Promise<HoldingRelay> {
  let held: (() => void)[] | undefined;
  let sent = 0;
  const toClientInOrder = (send: () => void) => (held ? held.push(send) : send());
  const sockets = new Set<Socket>();
  const server = createTcpServer((client) => {
    const upstream = new Socket();
    upstream.connect(targetPort, '127.0.0.1');
    for (const s of [client, upstream]) {
      s.setNoDelay(true);
      s.on('error', () => {});
      sockets.add(s);
    }
    client.on('data', (chunk: Buffer) => {
      if (held) sent += chunk.length;
      upstream.write(chunk);
    });
    client.on('close', () => upstream.destroy());
    upstream.on('data', (chunk: Buffer) => toClientInOrder(() => client.write(chunk)));
    upstream.on('close', () => toClientInOrder(() => client.end()));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: (server.address() as { port: number }).port,
    hold: () => {
      held = [];
      server.close();
    },
    sentSinceHold: () => sent,
    release: () => {
      const sends = held ?? [];
      held = undefined;
      for (const send of sends) send();
    },
    close: () => {
      server.close();
      for (const s of sockets) s.destroy();
    },
  };
}

for (const mode of GRPC_MODES) {
  describe(`--mtls_grpc_mode ${mode}: a rolling update (drain of one replica, SIGTERM) under real gRPC clients configured with both replicas`, () => {
    for (const [name, makeClient] of Object.entries(CLIENTS)) {
      for (const policy of POLICIES) {
        test(`${name}, ${policy}: no ModelInfer call of a steady stream (${WORKERS} in flight) fails, a ModelStreamInfer stream open across the drain ends intact${policy === 'pick_first' ? ' (it is on the draining replica)' : ''}, calls go on through the other replica`, async () => {
          const [draining, staying] = await twoReplicas(mode);
          const client = makeClient([draining.grpcPort, staying.grpcPort], policy);
          let drained: Promise<void> | undefined;
          try {
            const stream = await client.stream();
            const steady = await client.steady(WORKERS);
            drained = draining.proxy.shutdown(20_000);
            await goesOn(steady, 40, 'calls went on while the replica drained');
            stream.resume();
            const streamed = await stream.result;
            await drained;
            await goesOn(steady, 20, 'calls went on after the drain');
            const outcome = await steady.stop();
            assert.deepEqual(failuresOf(outcome), {}, `calls failed (${outcome.ok} succeeded)`);
            assert.equal(streamed.code, 'OK', streamed.message);
            assert.deepEqual(streamed.ids, STREAM_IDS);
            if (policy === 'pick_first' && mode === 'terminate') {
              assert.ok(draining.logs.lines.some((l) => l.event === 'access' && l.path === `${KSERVE}/ModelStreamInfer` && l.grpcStatus === '0'), 'the draining replica served the stream');
            }
            assert.equal(draining.logs.lines.find((l) => l.event === 'shutdown_timeout'), undefined, 'the drain waited out its timeout');
          } finally {
            client.close();
            await drained?.catch(() => {});
            await draining.proxy.shutdown(1000);
            await staying.proxy.shutdown(1000);
          }
        });
      }

      for (const busy of [true, false]) {
        const connection = busy ? 'a ModelStreamInfer stream open on its connection (ends intact)' : 'its connection idle (the drain closes it at once)';
        test(`${name}, ${connection}: calls it sent after the drain's GOAWAY went out, before it read it, are not lost (${mode === 'terminate' ? 'not taken by the draining replica, sent again to the other' : 'taken: the GOAWAY names the last stream id possible'})`, async () => {
          const [draining, staying] = await twoReplicas(mode);
          const relay = await holdingRelay(draining.grpcPort);
          // pick_first: every call goes to the draining replica (through the relay) while it is there.
          const client = makeClient([relay.port, staying.grpcPort], 'pick_first');
          let drained: Promise<void> | undefined;
          try {
            const stream = busy ? await client.stream() : undefined;
            const warmUp = busy ? 1 : (await (await client.steady(1)).stop()).ok;
            relay.hold();
            drained = draining.proxy.shutdown(20_000);
            const started = client.steady(WORKERS);
            // The calls' HEADERS and DATA (about 100 bytes each) have gone to the replica; its GOAWAY is held.
            await eventually(() => relay.sentSinceHold() >= WORKERS * 90, 'the client sent its calls');
            relay.release();
            const steady = await started;
            stream?.resume();
            const streamed = await stream?.result;
            await drained;
            await goesOn(steady, 20, 'calls went on after the drain');
            const outcome = await steady.stop();
            assert.deepEqual(failuresOf(outcome), {}, `calls failed (${outcome.ok} succeeded)`);
            if (streamed) {
              assert.equal(streamed.code, 'OK', streamed.message);
              assert.deepEqual(streamed.ids, STREAM_IDS);
            }
            // Terminate: nghttp2 took none of them. Relay: its connection carried them (those sent before the release) to the model server.
            if (mode === 'terminate') assert.equal(callsServed(draining), warmUp, 'the draining replica served none of the calls sent after its GOAWAY');
            else assert.ok(callsServed(draining) > warmUp, 'the draining replica served the calls sent after its GOAWAY');
            assert.equal(draining.logs.lines.find((l) => l.event === 'shutdown_timeout'), undefined, 'the drain waited out its timeout');
          } finally {
            client.close();
            relay.close();
            await drained?.catch(() => {});
            await draining.proxy.shutdown(1000);
            await staying.proxy.shutdown(1000);
          }
        });
      }
    }
  });
}
