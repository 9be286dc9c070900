import { test } from 'node:test';
import assert from 'node:assert/strict';
import { collectOptions, parseCommandLine } from '../src/cli/options-parser.js';
import { PROXY_OPTIONS } from '../src/proxy-options.js';
import { PROBE_OPTIONS } from '../src/cli/probe-command.js';
import { ConfigError } from '../src/errors.js';
import type { RawOptions } from '../src/options.js';
import { runCli } from './helpers/cli.js';

/** What `ovms-mtls proxy ARGV` reads from its command line, before config.ts validates it. */
async function proxyOptions(argv: string[]): Promise<RawOptions> {
  return collectOptions(await parseCommandLine(argv, PROXY_OPTIONS, 'usage', 'proxy'), PROXY_OPTIONS, {});
}

function refusal(message: string): (err: unknown) => boolean {
  return (err: unknown) => err instanceof ConfigError && err.message === message;
}

// yargs took `=1` and `=TRUE` as false: `proxy --mtls_access_log=1` turned the access log off.
test('a flag given as --flag=VALUE takes the boolean words of OVMS_MTLS_* and the entrypoint, in any case, and refuses others', async () => {
  for (const word of ['1', 'TRUE', 'True', 'yes', 'on']) assert.equal((await proxyOptions([`--mtls_access_log=${word}`]))['mtls_access_log'], true, word);
  for (const word of ['0', 'FALSE', 'no', 'off']) assert.equal((await proxyOptions([`--mtls_access_log=${word}`]))['mtls_access_log'], false, word);
  assert.equal((await proxyOptions(['--mtls_access_log']))['mtls_access_log'], true);
  await assert.rejects(proxyOptions(['--mtls_access_log=maybe']), refusal("--mtls_access_log: 'maybe' is not true or false: give one of 1, true, yes, on or 0, false, no, off"));
});

// yargs took `--mtls_access_log false` as false but `--mtls_access_log 0` as a stray word, and the entrypoint refuses both.
test('a flag followed by a separate boolean word is refused naming --flag=WORD, as the entrypoint refuses it', async () => {
  for (const word of ['false', 'true', '0', 'off', 'Yes']) {
    const expected = `--mtls_access_log is a flag and takes no separate value: write --mtls_access_log=${word} (or --mtls_access_log alone for true)`;
    await assert.rejects(proxyOptions(['--mtls_access_log', word, '--port', '1']), refusal(expected), word);
  }
  assert.equal((await proxyOptions(['--mtls_access_log', '--port', '1']))['mtls_access_log'], true);
});

// `proxy ... --mtls_crl $CRL` with CRL unset served without revocation checks, admitting revoked clients.
test('a text option given with nothing is refused by name, as in the entrypoint, instead of being taken for absent', async () => {
  for (const argv of [['--mtls_crl'], ['--mtls_crl', ''], ['--mtls_crl', '--port', '1'], ['--grpc_bind_address='], ['--mtls_crl', 'a.crl', '--mtls_crl', ' ']]) {
    const name = argv[0]!.replace(/^--|=$/g, '');
    await assert.rejects(proxyOptions(argv), refusal(`--${name} needs a value (--${name} VALUE or --${name}=VALUE)`), argv.join(' '));
  }
  assert.equal((await proxyOptions(['--mtls_crl', '', '--mtls_crl', 'a.crl']))['mtls_crl'], 'a.crl');
});

// The entrypoint named `--mtls_cert` for `--mtls-cert`; `proxy`, `check`, `probe` and `certs` said only "unknown option".
test('an option written with dashes or capitals is refused naming the option meant, in every command as in the entrypoint', async () => {
  const unknown = (options: string, command = 'proxy') => `unknown option ${options} (see \`ovms-mtls ${command} --help\`)`;
  await assert.rejects(proxyOptions(['--mtls-cert', 'server.pem']), refusal(unknown('--mtls-cert (did you mean --mtls_cert?)')));
  await assert.rejects(proxyOptions(['--REST_PORT=8443']), refusal(unknown('--REST_PORT (did you mean --rest_port?)')));
  await assert.rejects(proxyOptions(['--mtls-cert', 'a', '--Mtls_Key', 'b']), refusal(unknown('--mtls-cert (did you mean --mtls_cert?), --Mtls_Key (did you mean --mtls_key?)')));
  await assert.rejects(parseCommandLine(['--mtls-ca', 'ca.pem'], PROBE_OPTIONS, 'usage', 'probe'), refusal(unknown('--mtls-ca (did you mean --mtls_ca?)', 'probe')));
  // A name no command takes in any spelling, nor close to one, keeps the plain line.
  await assert.rejects(proxyOptions(['--mtls_bogus', 'x']), refusal(unknown('--mtls_bogus')));
});

// Every command said only "unknown option --forc (see `ovms-mtls --help`)", leaving the user to find the typo;
// and that help lists the commands, not their options: the line now names the command's own --help.
test('a misspelt option of certs, check, probe or demo is refused naming the option meant and the command\'s own --help, in one line, exit 2', async () => {
  const cases: [string[], string, string][] = [
    [['certs', 'init', '--dir', 'unwritten', '--forc'], 'unknown option --forc (did you mean --force?)', 'certs init'],
    [['certs', 'client', '--nmae', 'alice'], 'unknown option --nmae (did you mean --name?)', 'certs client'],
    [['check', '--mtls_client-ca', 'ca.pem'], 'unknown option --mtls_client-ca (did you mean --mtls_client_ca?)', 'check'],
    [['probe', '--hots', 'localhost'], 'unknown option --hots (did you mean --host?)', 'probe'],
    [['demo', '--rest-port', '8443'], 'unknown option --rest-port (did you mean --rest_port?)', 'demo'],
  ];
  for (const [argv, message, command] of cases) {
    const res = await runCli(argv);
    assert.equal(res.code, 2, argv.join(' '));
    assert.equal(res.stderr, `ovms-mtls: ${message} (see \`ovms-mtls ${command} --help\`)\n`);
    // The command named there answers with its options, the one misspelt among them.
    const help = await runCli([...command.split(' '), '--help']);
    assert.equal(help.code, 0, `${command} --help`);
    assert.match(help.stdout, new RegExp(`--${/did you mean --(\w+)/.exec(message)![1]}\\b`), `${command} --help`);
  }
});
