import { certsClient, certsInit, certsRenewCrl, certsRevoke, type CertsReport } from '../certs-command.js';
import { parseInteger } from '../config.js';
import { ConfigError } from '../errors.js';
import { optionNeedsValue, type OptionSpec } from '../options.js';
import { KEY_KINDS, type KeyKind } from '../x509.js';
import { parseCommandLine } from './options-parser.js';
import type { Io } from './main.js';

const DEFAULT_DIR = 'certs';

export const CERTS_USAGE = `Usage:
  ovms-mtls certs init   [--dir ${DEFAULT_DIR}] [--server_name localhost] [--san DNS:x,IP:y,...] [--days 1] [--key ${KEY_KINDS.join('|')}] [--force]
  ovms-mtls certs client [--dir ${DEFAULT_DIR}] --name NAME [--uri spiffe://...] [--dns NAME] [--days 1] [--key ${KEY_KINDS.join('|')}] [--force]
  ovms-mtls certs revoke [--dir ${DEFAULT_DIR}] --cert FILE
  ovms-mtls certs renew-crl [--dir ${DEFAULT_DIR}] [--days N]

init    writes a complete mTLS set (server cert + key, the CA clients trust, the client CA + key,
        an empty CRL, one client cert + key) in the file names of the OVMS nginx example.
client  issues another client certificate from the client CA in DIR.
revoke  adds a client certificate to DIR/client_cert_ca.crl; a running proxy reloads it and
        closes that client's open connections.
renew-crl  re-signs DIR/client_cert_ca.crl with fresh dates and the same revocations, for --days
        (default: as long as the CRL it replaces). Run it before the CRL's next update: past it,
        every client is refused. \`ovms-mtls check\` shows the time left.
Certificates are valid for 1 day unless --days says otherwise, and never past the CA that signs
them (a longer --days is cut to the CA's expiry, with a note). No openssl needed.
`;

const DIR: OptionSpec = { name: 'dir', type: 'string', describe: 'Directory of the certificate set', defaultDescription: DEFAULT_DIR };
const DAYS: OptionSpec = { name: 'days', type: 'number', describe: 'Validity in days, 1 to 36500', defaultDescription: '1' };
// No yargs `choices`: its complaint spans several lines; certs-command checks the value in one.
const KEY: OptionSpec = { name: 'key', type: 'string', describe: `Key type: ${KEY_KINDS.join(', ')}`, defaultDescription: 'ec' };
const FORCE: OptionSpec = { name: 'force', type: 'boolean', describe: 'Overwrite existing files' };

const SPECS = {
  init: [
    DIR,
    { name: 'server_name', type: 'string', describe: 'Server certificate CN and first SAN', defaultDescription: 'localhost' },
    { name: 'san', type: 'array', describe: 'Extra server SANs: DNS:name or IP:address (repeatable, comma separated)' },
    DAYS,
    KEY,
    FORCE,
  ],
  client: [
    DIR,
    { name: 'name', type: 'string', describe: 'Client CN; files NAME.pem and NAME.key' },
    { name: 'uri', type: 'array', describe: 'URI SAN, e.g. a SPIFFE ID (repeatable)' },
    { name: 'dns', type: 'array', describe: 'DNS SAN (repeatable)' },
    DAYS,
    KEY,
    FORCE,
  ],
  revoke: [DIR, { name: 'cert', type: 'string', describe: 'Client certificate file to revoke (or NAME of DIR/NAME.pem)' }],
  'renew-crl': [DIR, { ...DAYS, describe: 'Lifetime of the new CRL in days', defaultDescription: 'that of the CRL it replaces' }],
} satisfies Record<string, OptionSpec[]>;

type Subcommand = keyof typeof SPECS;
type Parsed = Record<string, unknown>;

const RUN: Record<Subcommand, (p: Parsed) => Promise<CertsReport>> = {
  init: (p) =>
    certsInit({
      dir: text(p, 'dir') ?? DEFAULT_DIR,
      serverName: text(p, 'server_name'),
      san: list(p, 'san'),
      days: days(p),
      key: text(p, 'key') as KeyKind | undefined,
      force: p['force'] === true,
    }),
  client: (p) =>
    certsClient({
      dir: text(p, 'dir') ?? DEFAULT_DIR,
      name: required(p, 'name', 'the client name, e.g. --name ml-client'),
      uri: list(p, 'uri'),
      dns: list(p, 'dns'),
      days: days(p),
      key: text(p, 'key') as KeyKind | undefined,
      force: p['force'] === true,
    }),
  revoke: (p) => certsRevoke({ dir: text(p, 'dir') ?? DEFAULT_DIR, cert: required(p, 'cert', 'the client certificate file, e.g. --cert certs/client.pem') }),
  'renew-crl': (p) => certsRenewCrl({ dir: text(p, 'dir') ?? DEFAULT_DIR, days: days(p) }),
};

/** `ovms-mtls certs init|client|revoke|renew-crl ...`: prints what was written and returns 0. */
export async function runCertsCommand(argv: readonly string[], io: Io): Promise<number> {
  const [sub, ...rest] = argv;
  if (sub === undefined || sub === '--help' || sub === '-h' || sub === 'help') {
    io.stdout.write(CERTS_USAGE);
    return sub === undefined ? 2 : 0;
  }
  if (!(sub in SPECS)) throw new ConfigError(`certs: unknown subcommand '${sub}' (use init, client, revoke or renew-crl; see \`ovms-mtls certs --help\`)`);
  const subcommand = sub as Subcommand;
  const parsed = await parseCommandLine(rest, SPECS[subcommand], CERTS_USAGE, `certs ${subcommand}`);
  const report = await RUN[subcommand](parsed);
  io.stdout.write(report.summary + '\n');
  return 0;
}

/**
 * Scalars given twice keep the last value, as everywhere else. A flag given with nothing (an unset
 * shell variable, `--days "$DAYS"`) is refused: taking the default instead wrote a 1-day set, or
 * one in ./certs, with exit 0.
 */
function text(p: Parsed, name: string): string | undefined {
  const value = p[name];
  const last: unknown = Array.isArray(value) ? value.at(-1) : value;
  if (last === undefined) return undefined;
  if (String(last).trim() === '') throw optionNeedsValue(name);
  return String(last);
}

function required(p: Parsed, name: string, hint: string): string {
  const value = text(p, name);
  if (value === undefined) throw new ConfigError(`--${name} is required (${hint})`);
  return value;
}

function list(p: Parsed, name: string): string[] {
  const value = p[name];
  if (value === undefined) return [];
  return (Array.isArray(value) ? value : [value]).flatMap((v) => String(v).split(',')).map((v) => v.trim()).filter(Boolean);
}

function days(p: Parsed): number | undefined {
  const value = text(p, 'days');
  return value === undefined ? undefined : parseInteger('days', value, 1, 36500);
}
