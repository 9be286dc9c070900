import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { splitOvmsArgv, ovmsGrpcServers, ovmsServeArgv } from '../src/ovms-args.js';
import { ConfigError } from '../src/errors.js';
import { containerTlsDefaults, entrypointSettings } from '../src/entrypoint-config.js';
import { warnServiceLinks } from '../src/cli/lifecycle.js';
import { createLogger } from '../src/log.js';

const JSON_VALUE = '{"NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY"}';

describe('listener options in every OVMS spelling', () => {
  const cases: { name: string; argv: string[]; listeners: Record<string, string> }[] = [
    { name: 'space-separated values', argv: ['--port', '9000', '--rest_port', '8000'], listeners: { port: '9000', rest_port: '8000' } },
    { name: '= values', argv: ['--port=9000', '--rest_port=8000'], listeners: { port: '9000', rest_port: '8000' } },
    { name: 'bind addresses with =', argv: ['--grpc_bind_address=0.0.0.0', '--rest_bind_address=::'], listeners: { grpc_bind_address: '0.0.0.0', rest_bind_address: '::' } },
    { name: 'bind addresses with space', argv: ['--grpc_bind_address', '10.0.0.1,127.0.0.1', '--rest_bind_address', '0.0.0.0'], listeners: { grpc_bind_address: '10.0.0.1,127.0.0.1', rest_bind_address: '0.0.0.0' } },
    { name: 'repeated: the last one wins, across spellings', argv: ['--port=1', '--port', '2', '--grpc_bind_address', 'a', '--grpc_bind_address=b'], listeners: { port: '2', grpc_bind_address: 'b' } },
    { name: 'an empty = value is kept for validation', argv: ['--rest_port='], listeners: { rest_port: '' } },
  ];
  for (const c of cases) {
    test(`${c.name} are taken out of what OVMS gets`, () => {
      const split = splitOvmsArgv(['--model_name', 'resnet', ...c.argv, '--model_path', '/models/resnet']);
      assert.deepEqual(split.listeners, c.listeners);
      assert.deepEqual(split.passthrough, ['--model_name', 'resnet', '--model_path', '/models/resnet']);
      assert.deepEqual(split.mode, { kind: 'serve' });
    });
  }

  test('a listener option without a value is a ConfigError naming it', () => {
    assert.throws(() => splitOvmsArgv(['--port']), (err: unknown) => err instanceof ConfigError && /--port needs a value/.test(err.message));
    assert.throws(() => splitOvmsArgv(['--rest_port', '--port', '1']), /--rest_port needs a value/);
  });

  // Taken for absent, `--grpc_bind_address=$UNSET` bound 0.0.0.0 and `--mtls_crl "$UNSET"` served without revocation checks, without a word.
  test('a blank bind address or text option of ours is refused by name, as in proxy; a later value wins over it, and --help still helps', () => {
    const needsValue = (name: string) => (err: unknown) => err instanceof ConfigError && err.message === `--${name} needs a value (--${name} VALUE or --${name}=VALUE)`;
    for (const blank of [['--grpc_bind_address='], ['--rest_bind_address', ''], ['--mtls_crl', ' '], ['--mtls_client_ca='], ['--mtls_ovms_user=']]) {
      const name = blank[0]!.replace(/^--|=$/g, '');
      assert.throws(() => splitOvmsArgv(['--port', '9000', '--rest_port', '8000', ...blank]), needsValue(name), blank.join(' '));
      assert.throws(() => splitOvmsArgv(['--list_models', ...blank]), needsValue(name), `one-shot: ${blank.join(' ')}`);
    }
    assert.equal(splitOvmsArgv(['--port', '9000', '--grpc_bind_address=', '--grpc_bind_address', '127.0.0.1']).listeners['grpc_bind_address'], '127.0.0.1');
    assert.deepEqual(splitOvmsArgv(['--help', '--grpc_bind_address=']).mode, { kind: 'help' });
  });
});

describe('passthrough arguments', () => {
  test('JSON values, spaces, quotes and unknown OVMS options reach OVMS as the same argv elements', () => {
    const argv = ['--plugin_config', JSON_VALUE, '--model_name', 'my "quoted" model', '--shape=(1,3,224,224)', '--metrics_enable', '--log_level', 'DEBUG', "it's"];
    const split = splitOvmsArgv(['--port', '9000', ...argv]);
    assert.deepEqual(split.passthrough, argv);
  });

  test('an OVMS option left without its value is refused, naming it, instead of taking the --port appended after it', () => {
    // cxxopts gives a value-taking option the next argument whatever it is: last, it would take our `--port`.
    const needsValue = (name: string) => (err: unknown) => err instanceof ConfigError && err.message === `--${name} needs a value (--${name} VALUE or --${name}=VALUE)`;
    assert.throws(() => splitOvmsArgv(['--port', '9000', '--model_name', 'm', '--model_path']), needsValue('model_path'));
    assert.throws(() => splitOvmsArgv(['--rest_port', '8000', '--config_path']), needsValue('config_path'));
    // Followed by one of ours, which we take out: OVMS would see it last all the same.
    assert.throws(() => splitOvmsArgv(['--model_path', '--port', '9000']), needsValue('model_path'));
    assert.throws(() => splitOvmsArgv(['--config_path', '--mtls_access_log', '--port', '9000']), needsValue('config_path'));
    // Followed by another OVMS option, which cxxopts would take as the model path.
    assert.throws(() => splitOvmsArgv(['--port', '9000', '--model_path', '--model_name', 'm']), needsValue('model_path'));
  });

  // All in one Kubernetes args item, the wrapper said "no public port: give --port"; one option so joined reached OVMS, which exits 64 on it.
  test('an option and its value given as ONE argument (a command line as one string) is refused when serving, naming it and the split that works', () => {
    const joined = (arg: string, firstWords: string) => (err: unknown) =>
      err instanceof ConfigError && err.message === `'${arg}' is one argument, from which OVMS reads no option (it would exit 64): give each option and each value as an argument of its own (${firstWords}, ...; in Kubernetes args, one list item each)`;
    const whole = '--model_name resnet --model_path /models/resnet --port 9000 --rest_port 8000';
    assert.throws(() => splitOvmsArgv([whole]), joined(whole, "'--model_name', 'resnet'"));
    assert.throws(() => splitOvmsArgv(['--port', '9000', '--model_name', 'm', '--model_path', '/m', '--rest_port 8000']), joined('--rest_port 8000', "'--rest_port', '8000'"));
    // As a value it is a value (cxxopts gives the option the next argument), and a one-shot run's argv is OVMS's to judge.
    assert.deepEqual(splitOvmsArgv(['--rest_port', '8000', '--extra_quantization_params', '--sym --ratio 1.0']).passthrough, ['--extra_quantization_params', '--sym --ratio 1.0']);
    assert.deepEqual(splitOvmsArgv(['--list_models', '--model_repository_path /models']).passthrough, ['--list_models', '--model_repository_path /models']);
  });

  test('a value that starts with -- but is no option we know is a value, as for cxxopts (optimum-cli arguments)', () => {
    for (const value of ['--sym', '--sym --ratio 1.0 --group-size -1']) {
      const argv = ['--source_model', 'org/model', '--task', 'text_generation', '--extra_quantization_params', value];
      assert.deepEqual(splitOvmsArgv(['--rest_port', '8000', ...argv]).passthrough, argv);
      assert.deepEqual(splitOvmsArgv(['--pull', ...argv]).passthrough, ['--pull', ...argv]);
    }
  });

  test('a last option with its value, in either spelling, or a last OVMS flag, is fine', () => {
    for (const tail of [['--model_path', '/m'], ['--model_path=/m'], ['--config_path='], ['--metrics_enable'], ['--stateful'], ['--low_latency_transformation=false']]) {
      assert.deepEqual(splitOvmsArgv(['--port', '9000', ...tail]).passthrough, tail);
    }
  });

  test('an option ovms-mtls does not know (a newer OVMS) passes with a value, or as a flag in the middle; left last without a value it is refused with the spellings that work', () => {
    assert.deepEqual(splitOvmsArgv(['--port', '9000', '--newer_option', 'v']).passthrough, ['--newer_option', 'v']);
    assert.deepEqual(splitOvmsArgv(['--newer_flag', '--model_name', 'm', '--port', '9000']).passthrough, ['--newer_flag', '--model_name', 'm']);
    assert.deepEqual(splitOvmsArgv(['--port', '9000', '--newer_flag=true']).passthrough, ['--newer_flag=true']);
    assert.throws(() => splitOvmsArgv(['--port', '9000', '--newer_flag']), (err: unknown) => err instanceof ConfigError && /^--newer_flag has no value .*--newer_flag=VALUE.*--newer_flag=true/.test(err.message));
    assert.throws(() => splitOvmsArgv(['--newer_flag', '--port', '9000']), /--newer_flag has no value/);
  });

  // `ovms --config_path c.json --rest_port 8000 --log_level TRACE --verbose_response` was refused as an unknown option left last.
  test("current OVMS flags and options are known: a last --verbose_response is OVMS's flag, a last --api_key_file lacks its value", () => {
    assert.deepEqual(splitOvmsArgv(['--config_path', '/c.json', '--rest_port', '8000', '--log_level', 'TRACE', '--verbose_response']).passthrough, ['--config_path', '/c.json', '--log_level', 'TRACE', '--verbose_response']);
    assert.throws(() => splitOvmsArgv(['--rest_port', '8000', '--verbose_response', 'false']), /--verbose_response=false/);
    for (const option of ['api_key_file', 'allowed_media_domains', 'source_loras', 'num_streams', 'pooling', 'resolution']) {
      assert.throws(() => splitOvmsArgv(['--rest_port', '8000', '--config_path', '/c.json', `--${option}`]), (err: unknown) => err instanceof ConfigError && err.message.startsWith(`--${option} needs a value`));
    }
  });

  test('a one-shot run gets nothing appended: an unknown last option is left to OVMS', () => {
    const split = splitOvmsArgv(['--list_models', '--model_repository_path', '/m', '--newer_flag']);
    assert.deepEqual(split.mode, { kind: 'direct', flag: 'list_models' });
    assert.deepEqual(split.passthrough, ['--list_models', '--model_repository_path', '/m', '--newer_flag']);
  });

  test("a value is the value, as for cxxopts: --model_name -h names a model '-h' and is no request for help", () => {
    const split = splitOvmsArgv(['--port', '9000', '--model_name', '-h']);
    assert.deepEqual(split.mode, { kind: 'serve' });
    assert.deepEqual(split.passthrough, ['--model_name', '-h']);
  });

  test("'--' is refused because OVMS would take what follows as positionals", () => {
    assert.throws(() => splitOvmsArgv(['--port', '1', '--', '--model_name', 'x']), ConfigError);
  });
});

describe('--mtls_* options', () => {
  test('both spellings are ours and never reach OVMS; arrays collect, scalars keep the last', () => {
    const split = splitOvmsArgv([
      '--mtls_cert', '/a.pem', '--mtls_cert=/b.pem', '--mtls_key=/k', '--mtls_allow_cn', 'x', '--mtls_allow_cn=y',
      '--mtls_access_log', '--mtls_restart', 'on-failure', '--model_name', 'm',
    ]);
    assert.deepEqual(split.mtls, { mtls_cert: '/b.pem', mtls_key: '/k', mtls_allow_cn: ['x', 'y'], mtls_access_log: true, mtls_restart: 'on-failure' });
    assert.deepEqual(split.passthrough, ['--model_name', 'm']);
  });

  test('an unknown --mtls_ option is a ConfigError naming it', () => {
    assert.throws(() => splitOvmsArgv(['--mtls_certificate', 'x']), (err: unknown) => err instanceof ConfigError && err.message.includes('--mtls_certificate'));
  });

  // Refused without a hint: `--mtls_cetr` sent the user to --help to find what was misspelt.
  test('a misspelt --mtls_ option, in any spelling, is refused naming the option meant; none when nothing is close or two are as close', () => {
    const refused = (argv: string[], message: string) => assert.throws(() => splitOvmsArgv(argv), (err: unknown) => err instanceof ConfigError && err.message === message);
    refused(['--port', '1', '--mtls_cetr', '/c.pem'], 'unknown option --mtls_cetr (did you mean --mtls_cert? options starting with mtls_ belong to ovms-mtls; see `ovms-mtls --help`)');
    refused(['--mtls_alow_cn=alice', '--port', '1'], 'unknown option --mtls_alow_cn (did you mean --mtls_allow_cn? options starting with mtls_ belong to ovms-mtls; see `ovms-mtls --help`)');
    refused(['--Mtls-Alow-Cn', 'alice'], 'unknown option --Mtls-Alow-Cn (ovms-mtls writes its options in lower case with underscores: --mtls_allow_cn; see `ovms-mtls --help`)');
    refused(['--mtls_nonsense', 'x'], 'unknown option --mtls_nonsense (options starting with mtls_ belong to ovms-mtls; see `ovms-mtls --help`)');
    // Two edits from both --mtls_allow_cn and --mtls_allow_ou: a guess could send the user after the wrong one.
    refused(['--mtls_allow_xx', 'x'], 'unknown option --mtls_allow_xx (options starting with mtls_ belong to ovms-mtls; see `ovms-mtls --help`)');
  });

  test('our option with dashes or capitals is refused naming the spelling that works, not handed to OVMS; OVMS\'s own dashed option passes', () => {
    const refused = (argv: string[], message: string) => assert.throws(() => splitOvmsArgv(argv), (err: unknown) => err instanceof ConfigError && err.message === message);
    refused(['--port', '1', '--mtls-cert', '/c.pem'], 'unknown option --mtls-cert (ovms-mtls writes its options in lower case with underscores: --mtls_cert; see `ovms-mtls --help`)');
    refused(['--MTLS_ALLOW_CN=alice', '--port', '1'], 'unknown option --MTLS_ALLOW_CN (ovms-mtls writes its options in lower case with underscores: --mtls_allow_cn; see `ovms-mtls --help`)');
    refused(['--Mtls-Nonsense', 'x'], 'unknown option --Mtls-Nonsense (ovms-mtls writes its options in lower case with underscores; see `ovms-mtls --help`)');
    assert.deepEqual(splitOvmsArgv(['--pull', '--source_model', 'm', '--weight-format', 'int4']).passthrough, ['--pull', '--source_model', 'm', '--weight-format', 'int4']);
  });

  test('proxy-mode upstream options are refused with the reason', () => {
    assert.throws(() => splitOvmsArgv(['--mtls_grpc_upstream=127.0.0.1:1']), /ovms-mtls proxy/);
  });

  test('a flag followed by a separate true/false is refused, naming the --flag=value spelling; other next arguments stay OVMS\'s', () => {
    // cxxopts flags take a value only after '=': the separate word would turn the flag on and reach OVMS as a stray argument.
    assert.throws(() => splitOvmsArgv(['--port', '1', '--mtls_access_log', 'false']), (err: unknown) => err instanceof ConfigError && err.message.includes('--mtls_access_log=false'));
    assert.throws(() => splitOvmsArgv(['--mtls_ovms_help', 'no']), /--mtls_ovms_help=no/);
    assert.deepEqual(splitOvmsArgv(['--mtls_access_log=false', '--port', '1']).mtls, { mtls_access_log: 'false' });
    assert.deepEqual(splitOvmsArgv(['--mtls_access_log', '--model_name', 'false']).passthrough, ['--model_name', 'false']);
  });

  test('an OVMS flag followed by a separate true/false is refused the same way, before OVMS would exit 64 on the stray word', () => {
    assert.throws(() => splitOvmsArgv(['--port', '1', '--metrics_enable', 'false']), (err: unknown) => err instanceof ConfigError && err.message.includes('--metrics_enable=false'));
    // In the spelling cxxopts reads: OVMS exits 64 on `--allow_credentials=TRUE` or `=yes` ("Argument 'TRUE' failed to parse").
    for (const [word, cxxopts] of [['TRUE', 'true'], ['yes', 'true'], ['on', 'true'], ['1', 'true'], ['NO', 'false'], ['off', 'false']]) {
      const expected = `--allow_credentials is a flag and takes no separate value: write --allow_credentials=${cxxopts} (or --allow_credentials alone for true)`;
      assert.throws(() => splitOvmsArgv(['--allow_credentials', word!, '--rest_port', '2']), (err: unknown) => err instanceof ConfigError && err.message === expected, word);
    }
    assert.deepEqual(splitOvmsArgv(['--metrics_enable', '--rest_port', '2', '--metrics_list', 'ovms_requests_success']).passthrough, ['--metrics_enable', '--metrics_list', 'ovms_requests_success']);
    assert.deepEqual(splitOvmsArgv(['--metrics_enable=false', '--port', '1']).passthrough, ['--metrics_enable=false']);
  });

  test('a value-taking --mtls_ option without a value is a ConfigError', () => {
    assert.throws(() => splitOvmsArgv(['--mtls_cert', '--port', '1']), /--mtls_cert needs a value/);
  });
});

describe('modes', () => {
  const cases: { argv: string[]; mode: unknown }[] = [
    { argv: ['--port', '9000'], mode: { kind: 'serve' } },
    { argv: ['--model_name', 'x', '--help'], mode: { kind: 'help' } },
    { argv: ['-h'], mode: { kind: 'help' } },
    { argv: ['--mtls_ovms_help'], mode: { kind: 'ovms-help' } },
    { argv: ['--mtls_ovms_help=false', '--port', '1'], mode: { kind: 'serve' } },
    { argv: ['--version'], mode: { kind: 'version' } },
    { argv: ['--pull', '--source_model', 'OpenVINO/x', '--model_repository_path', '/models'], mode: { kind: 'direct', flag: 'pull' } },
    { argv: ['--list_models', '--model_repository_path', '/models'], mode: { kind: 'direct', flag: 'list_models' } },
    { argv: ['--add_to_config', '--config_path', '/c', '--model_name', 'm'], mode: { kind: 'direct', flag: 'add_to_config' } },
    { argv: ['--remove_from_config', '--config_path', '/c', '--model_name', 'm'], mode: { kind: 'direct', flag: 'remove_from_config' } },
    { argv: ['--configure'], mode: { kind: 'direct', flag: 'configure' } },
    // OVMS decides by presence (result->count("pull"), count("list_models")), not by the value.
    { argv: ['--pull=false', '--source_model', 'OpenVINO/x', '--port', '1'], mode: { kind: 'direct', flag: 'pull' } },
    { argv: ['--list_models=false', '--model_repository_path', '/models'], mode: { kind: 'direct', flag: 'list_models' } },
  ];
  for (const c of cases) {
    test(`${c.argv.join(' ')} is ${JSON.stringify(c.mode)}`, () => {
      assert.deepEqual(splitOvmsArgv(c.argv).mode, c.mode);
    });
  }

  // Taken as true, a mistyped value printed OVMS's help and exited 0 where the user meant to serve.
  test('--mtls_ovms_help and OVMS_MTLS_OVMS_HELP take the boolean words of every flag, and refuse any other value by name', () => {
    const notBoolean = (err: unknown) => err instanceof ConfigError && err.message === "--mtls_ovms_help: 'flase' is not true or false: give one of 1, true, yes, on or 0, false, no, off";
    assert.throws(() => splitOvmsArgv(['--mtls_ovms_help=flase', '--port', '1']), notBoolean);
    assert.throws(() => splitOvmsArgv(['--port', '1'], { OVMS_MTLS_OVMS_HELP: 'flase' }), notBoolean);
    assert.deepEqual(splitOvmsArgv(['--port', '1'], { OVMS_MTLS_OVMS_HELP: 'Off' }).mode, { kind: 'serve' });
    assert.deepEqual(splitOvmsArgv(['--mtls_ovms_help=Yes']).mode, { kind: 'ovms-help' });
    assert.deepEqual(splitOvmsArgv(['--port', '1'], { OVMS_MTLS_OVMS_HELP: '1' }).mode, { kind: 'ovms-help' });
  });

  test('in a non-serving invocation the non-serving flag itself reaches OVMS', () => {
    assert.deepEqual(splitOvmsArgv(['--list_models', '--model_repository_path', '/m']).passthrough, ['--list_models', '--model_repository_path', '/m']);
  });
});

describe('the argv OVMS is started with', () => {
  test('loopback listeners come last, so that by last-one-wins they override anything', () => {
    assert.deepEqual(ovmsServeArgv(['--model_name', 'm'], { grpc: 41000, rest: 41001 }), [
      '--model_name', 'm', '--port', '41000', '--grpc_bind_address', '127.0.0.1', '--rest_port', '41001', '--rest_bind_address', '127.0.0.1',
    ]);
  });

  test("one shared gRPC connection (terminate mode): OVMS's per-connection stream cap is lifted, merged into the user's channel arguments", () => {
    const shared = { sharedGrpcConnection: true };
    assert.deepEqual(ovmsServeArgv(['--model_name', 'm'], { grpc: 41000 }, shared), [
      '--model_name', 'm', '--port', '41000', '--grpc_channel_arguments', 'grpc.max_concurrent_streams=2147483647', '--grpc_bind_address', '127.0.0.1', '--rest_bind_address', '127.0.0.1',
    ]);
    // Every spelling, the last one as cxxopts keeps it; the merged list comes after it and wins.
    const user = ['--grpc_channel_arguments', 'grpc.http2.min_ping_interval_without_data_ms=1', '--grpc_channel_arguments=grpc.keepalive_time_ms=1000, grpc.max_connection_age_ms=5'];
    const args = ovmsServeArgv(user, { grpc: 41000 }, shared);
    assert.deepEqual(args.slice(0, 3), user);
    assert.equal(args[args.indexOf('--grpc_channel_arguments', 3) + 1], 'grpc.keepalive_time_ms=1000, grpc.max_connection_age_ms=5,grpc.max_concurrent_streams=2147483647');
  });

  test("a stream cap the user set, relay mode (a connection per client) and REST only leave OVMS's channel arguments alone", () => {
    const own = ['--grpc_channel_arguments', 'grpc.max_concurrent_streams = 8'];
    assert.deepEqual(ovmsServeArgv(own, { grpc: 41000 }, { sharedGrpcConnection: true }).filter((a) => a.startsWith('--grpc_channel')), ['--grpc_channel_arguments']);
    assert.ok(!ovmsServeArgv([], { grpc: 41000 }, { sharedGrpcConnection: false }).includes('--grpc_channel_arguments'));
    assert.ok(!ovmsServeArgv([], { rest: 41001 }, { sharedGrpcConnection: true }).includes('--grpc_channel_arguments'));
  });

  test('gRPC only: no REST port is given to OVMS', () => {
    assert.deepEqual(ovmsServeArgv([], { grpc: 41000 }), ['--port', '41000', '--grpc_bind_address', '127.0.0.1', '--rest_bind_address', '127.0.0.1']);
  });

  test('REST only: OVMS gets --port 0, not its own default (9178 in older releases), and its bind address is still loopback', () => {
    assert.deepEqual(ovmsServeArgv([], { rest: 41001 }), ['--port', '0', '--grpc_bind_address', '127.0.0.1', '--rest_port', '41001', '--rest_bind_address', '127.0.0.1']);
  });
});

describe('entrypoint settings', () => {
  test('gRPC terminate opens four upstream connections per gRPC server OVMS runs (GRPC_SERVERS, else --grpc_workers, as OVMS counts them), one for one', () => {
    const connections = (argv: string[], env: NodeJS.ProcessEnv = {}) => entrypointSettings(splitOvmsArgv(['--port', '9000', ...argv]), env).common.grpcUpstreamConnections;
    assert.equal(connections([]), 1);
    assert.equal(connections(['--grpc_workers', '1']), 1);
    assert.equal(connections(['--grpc_workers', '4']), 16);
    assert.equal(connections(['--grpc_workers=2', '--grpc_workers=3']), 12);
    assert.equal(connections(['--grpc_workers', '4'], { GRPC_SERVERS: '6' }), 24);
    assert.equal(connections(['--grpc_workers', '40']), 64);
    // OVMS ignores a GRPC_SERVERS that is no positive number, and starts at least one server.
    assert.equal(connections(['--grpc_workers', '2'], { GRPC_SERVERS: 'many' }), 8);
    assert.equal(connections(['--grpc_workers', '0']), 1);
    // Ours wins, from the command line or the environment.
    assert.equal(connections(['--grpc_workers', '4', '--mtls_grpc_upstream_connections', '1']), 1);
    assert.equal(connections(['--grpc_workers', '4'], { OVMS_MTLS_GRPC_UPSTREAM_CONNECTIONS: '2' }), 2);
    assert.equal(ovmsGrpcServers(['--grpc_workers', '500'], {}), 500);
  });

  test('the nginx example mount points are the TLS defaults; its CRL optional (used whenever the file is there)', () => {
    assert.deepEqual(containerTlsDefaults({}), { cert: '/certs/server.pem', key: '/certs/server.key', clientCa: '/certs/client_cert_ca.pem', crl: '/certs/client_cert_ca.crl', crlOptional: true });
    assert.deepEqual(entrypointSettings(splitOvmsArgv(['--port', '9000']), {}).common.tls, { cert: '/certs/server.pem', key: '/certs/server.key', clientCa: '/certs/client_cert_ca.pem', crl: '/certs/client_cert_ca.crl', crlOptional: true });
  });

  test('a CRL the user names is not optional, also at the default path', () => {
    for (const crl of ['/certs/client_cert_ca.crl', '/elsewhere/ca.crl']) {
      const { tls } = entrypointSettings(splitOvmsArgv(['--port', '9000', '--mtls_crl', crl]), {}).common;
      assert.equal(tls.crl, crl);
      assert.equal(tls.crlOptional, undefined);
    }
  });

  // A Service named ovms-mtls (deploy/kubernetes's) gives every pod OVMS_MTLS_PORT=tcp://IP:PORT: a REST-only pod failed to start, "--port: 'tcp://...' is not a whole number".
  test('Kubernetes service links (OVMS_MTLS_PORT=tcp://10.96.0.12:9000) are no options: passed over with a warning naming them, unless the command line gives the option', () => {
    const links = { OVMS_MTLS_PORT: 'tcp://10.96.0.12:9000', OVMS_MTLS_REST_PORT: 'tcp://10.96.0.13:8000', OVMS_MTLS_ADMIN_PORT: 'tcp://10.96.0.14:9901', OVMS_MTLS_PORT_9000_TCP: 'tcp://10.96.0.12:9000', OVMS_MTLS_SERVICE_PORT: '9000' };
    const settings = entrypointSettings(splitOvmsArgv(['--rest_port', '8000']), links);
    assert.deepEqual(Object.keys(settings.listeners), ['rest']);
    assert.equal(settings.listeners.rest!.port, 8000);
    assert.equal(settings.common.admin, undefined);
    // A port in the variable is still one.
    assert.equal(entrypointSettings(splitOvmsArgv(['--rest_port', '8000']), { OVMS_MTLS_PORT: '9000' }).listeners.grpc!.port, 9000);
    const lines: string[] = [];
    warnServiceLinks(links, ['--rest_port', '8000'], createLogger({ level: 'info', destination: { write: (line: string) => lines.push(line) } }));
    const warned = lines.map((line) => JSON.parse(line) as { event: string; variable: string; msg: string });
    assert.deepEqual(warned.map((l) => [l.event, l.variable]), [['variable_ignored', 'OVMS_MTLS_PORT'], ['variable_ignored', 'OVMS_MTLS_ADMIN_PORT']]);
    assert.match(warned[0]!.msg, /^OVMS_MTLS_PORT=tcp:\/\/10\.96\.0\.12:9000 is the variable Kubernetes sets for a Service of that name \(a service link\), not a value for --port: ignored/);
  });

  // OVMS_MTLS_ALOW_CN=alice was passed over without a word: the allow-list stayed empty and every client the CA vouches for got in.
  test('an OVMS_MTLS_* variable that names no option is refused naming the variable meant; Kubernetes and Docker link variables pass', () => {
    const refused = (env: NodeJS.ProcessEnv, message: string) => assert.throws(() => entrypointSettings(splitOvmsArgv(['--port', '9000']), env), (err: unknown) => err instanceof ConfigError && err.message === message);
    refused({ OVMS_MTLS_ALOW_CN: 'alice' }, "OVMS_MTLS_ALOW_CN is set in the environment but is no option's variable (did you mean OVMS_MTLS_ALLOW_CN, for --mtls_allow_cn?): correct its name, or unset it");
    // A port variable that holds a port, not a service link's tcp://: a typo of ours.
    refused({ OVMS_MTLS_ADMN_PORT: '9901' }, "OVMS_MTLS_ADMN_PORT is set in the environment but is no option's variable (did you mean OVMS_MTLS_ADMIN_PORT, for --mtls_admin_port?): correct its name, or unset it");
    refused({ OVMS_MTLS_NONSENSE: '1' }, "OVMS_MTLS_NONSENSE is set in the environment but is no option's variable (the variables are the options' names, listed by `ovms-mtls --help`): correct its name, or unset it");
    const links = {
      OVMS_MTLS_SERVICE_HOST: '10.96.0.12', OVMS_MTLS_SERVICE_PORT: '9443', OVMS_MTLS_SERVICE_PORT_GRPC: '9443', OVMS_MTLS_PORT_9443_TCP: 'tcp://10.96.0.12:9443',
      OVMS_MTLS_PORT_9443_TCP_PROTO: 'tcp', OVMS_MTLS_PORT_9443_TCP_PORT: '9443', OVMS_MTLS_PORT_9443_TCP_ADDR: '10.96.0.12',
      OVMS_MTLS_ADMIN_SERVICE_HOST: '10.96.0.14', OVMS_MTLS_ADMIN_PORT: 'tcp://10.96.0.14:9901', OVMS_MTLS_METRICS_PORT: 'tcp://10.96.0.15:9902',
      OVMS_MTLS_NAME: '/web/ovms-mtls', OVMS_MTLS_ENV_PATH: '/usr/bin',
    };
    assert.equal(entrypointSettings(splitOvmsArgv(['--port', '9000']), links).listeners.grpc!.port, 9000);
  });

  test('the default CRL is not applied to a client CA given by the user', () => {
    assert.equal(containerTlsDefaults({ mtls_client_ca: '/other/ca.pem' }).crl, undefined);
  });

  test('users default to ovms, the proxy user to the OVMS user; environment values apply under the command line', () => {
    const settings = entrypointSettings(splitOvmsArgv(['--port', '9000', '--mtls_ovms_user', 'model']), { OVMS_MTLS_RESTART: 'on-failure', OVMS_MTLS_OVMS_USER: 'ignored' });
    assert.equal(settings.ovmsUser, 'model');
    assert.equal(settings.proxyUser, 'model');
    assert.equal(settings.restart.mode, 'on-failure');
    assert.deepEqual(settings.listeners.grpc, { port: 9000, hosts: ['0.0.0.0'] });
    assert.equal(settings.listeners.rest, undefined);
    assert.deepEqual(settings.binary, { path: '/ovms/bin/ovms', given: false });
  });

  test('an allow-list or CRL variable set to nothing is refused, unless the command line gives the option; other empty variables count as unset', () => {
    assert.throws(() => entrypointSettings(splitOvmsArgv(['--port', '9000']), { OVMS_MTLS_ALLOW_OU: '' }), /OVMS_MTLS_ALLOW_OU is set but empty: an empty allow-list would admit every client/);
    assert.throws(() => entrypointSettings(splitOvmsArgv(['--port', '9000']), { OVMS_MTLS_CRL: '' }), /OVMS_MTLS_CRL is set but empty/);
    const given = entrypointSettings(splitOvmsArgv(['--port', '9000', '--mtls_allow_ou=ops']), { OVMS_MTLS_ALLOW_OU: '', OVMS_MTLS_RESTART: '' });
    assert.deepEqual(given.common.allow.ou, ['ops']);
    assert.equal(given.restart.mode, 'never');
  });

  test('no public port at all is a ConfigError', () => {
    assert.throws(() => entrypointSettings(splitOvmsArgv(['--model_name', 'x']), {}), /no public port/);
  });

  test('an unknown --mtls_restart value is a ConfigError naming the choices', () => {
    assert.throws(() => entrypointSettings(splitOvmsArgv(['--port', '1', '--mtls_restart', 'always']), {}), /never, on-failure/);
  });
});
