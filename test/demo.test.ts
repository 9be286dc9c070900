import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFile } from 'node:child_process';
import { once } from 'node:events';
import { existsSync } from 'node:fs';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';
import { BIN } from './helpers/cli.js';
import { freeLoopbackPorts } from '../src/ports.js';

const run = promisify(execFile);
const ROOT = fileURLToPath(new URL('../../', import.meta.url));

test('demo starts certificates, a model server and the proxy, and every printed command works as pasted', async () => {
  const [grpcPort, restPort] = (await freeLoopbackPorts(2)) as [number, number];
  const child = spawn(process.execPath, [BIN, 'demo', '--port', String(grpcPort), '--rest_port', String(restPort)], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.setEncoding('utf8');
  await new Promise<void>((resolve, reject) => {
    child.stdout.on('data', (c: string) => {
      out += c;
      if (out.includes('Press Ctrl-C')) resolve();
    });
    child.once('exit', (code) => reject(new Error(`demo exited ${code}: ${out}`)));
  });
  try {
    const commands = out.split('\n').map((l) => l.trim()).filter((l) => l.startsWith('curl ') || l.startsWith('bin/ovms-mtls probe'));
    assert.equal(commands.length, 4);
    const [infer, sse, refused, probe] = commands as [string, string, string, string];
    const inferred = JSON.parse((await run('bash', ['-c', infer], { cwd: ROOT })).stdout);
    assert.deepEqual(inferred.outputs[0].data, [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
    assert.match((await run('bash', ['-c', sse], { cwd: ROOT })).stdout, /data: \[DONE\]/);
    await assert.rejects(run('bash', ['-c', refused], { cwd: ROOT }));
    assert.match((await run('bash', ['-c', probe], { cwd: ROOT })).stdout, /ServerReady/);
    const certDir = /Throwaway certificates \(valid 1 day\): (\S+)/.exec(out)![1]!;
    assert.ok(existsSync(certDir));
    child.kill('SIGINT');
    const [code] = await once(child, 'exit');
    assert.equal(code, 0);
    assert.equal(existsSync(certDir), false);
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
  }
});
