/**
 * The bench's floor for any Node.js proxy (target `node-pipe`): client
 * certificates verified by Node itself, then the decrypted bytes piped to the
 * upstream and back, nothing parsed, logged or counted. Launched by the bench
 * with the proxy's own command line, of which it reads only what it needs.
 * A reference to measure the proxy against, never something to deploy.
 */
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { connect } from 'node:net';
import { createServer, type TLSSocket } from 'node:tls';
import { parseHostPort, type HostPort } from '../src/config.js';

/** Joins a verified client to a fresh upstream connection, both ways, and closes them together. */
function pipeTo(upstream: HostPort): (client: TLSSocket) => void {
  return (client) => {
    const server = connect({ ...upstream, noDelay: true });
    client.setNoDelay(true);
    client.pipe(server).pipe(client);
    client.on('error', () => server.destroy());
    server.on('error', () => client.destroy());
    client.on('close', () => server.destroy());
    server.on('close', () => client.destroy());
  };
}

function main(): void {
  const { values } = parseArgs({
    args: process.argv.slice(3),
    strict: false,
    options: {
      port: { type: 'string' }, grpc_bind_address: { type: 'string' }, rest_port: { type: 'string' }, rest_bind_address: { type: 'string' },
      mtls_grpc_upstream: { type: 'string' }, mtls_rest_upstream: { type: 'string' }, rest_h2c_upstream: { type: 'string' },
      mtls_cert: { type: 'string' }, mtls_key: { type: 'string' }, mtls_client_ca: { type: 'string' },
    },
  });
  const text = (flag: string): string => {
    const value = values[flag];
    if (typeof value !== 'string') throw new Error(`node-pipe: --${flag} is required`);
    return value;
  };
  const tls = { cert: readFileSync(text('mtls_cert')), key: readFileSync(text('mtls_key')), ca: readFileSync(text('mtls_client_ca')), requestCert: true, rejectUnauthorized: true };
  createServer({ ...tls, ALPNProtocols: ['h2'] }, pipeTo(parseHostPort('mtls_grpc_upstream', text('mtls_grpc_upstream')))).listen(Number(text('port')), text('grpc_bind_address'));
  const rest = pipeTo(parseHostPort('mtls_rest_upstream', text('mtls_rest_upstream')));
  const restH2 = pipeTo(parseHostPort('rest_h2c_upstream', text('rest_h2c_upstream')));
  // HTTP/2 clients of the REST port go to the upstream's h2c REST server, as the proxy's terminating path would.
  createServer({ ...tls, ALPNProtocols: ['h2', 'http/1.1'] }, (client) => (client.alpnProtocol === 'h2' ? restH2 : rest)(client)).listen(Number(text('rest_port')), text('rest_bind_address'));
}

// An exit, not a kill: `--cpu-prof` writes its profile on the way out.
process.on('SIGTERM', () => process.exit(0));
try {
  main();
} catch (err) {
  process.stderr.write(`${(err as Error).message}\n`);
  process.exit(2);
}
