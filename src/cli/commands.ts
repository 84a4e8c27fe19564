/**
 * Every command's usage text and option schema, in one place: `bfmig --help`, `bfmig <command> --help`
 * and the usage printed after a mistake all come from here, and the README's "Commands" section heads
 * each command with its synopsis (test/cli-args.test.ts checks that they agree).
 */
import { DEFAULT_CERT_DAYS } from './certs';
import type { Command, OptionSchema } from './parse';
import { DEFAULT_RESTORE_TIMEOUT_MS } from './restore';

const command = <O extends OptionSchema>(c: Command<O>): Command<O> => c;

export const INSPECT = command({
  name: 'inspect',
  synopsis: ['inspect <FILE|-> [--json]'],
  summary: ['report what a captured migration stream holds'],
  options: { json: { type: 'boolean' } },
  positionals: ['FILE|-'],
});

const DEMO_OPTIONS = {
  legs: { type: 'string', default: '3' },
  mbit: { type: 'string', default: '100' },
  'delay-ms': { type: 'string', default: '20' },
  'mem-mib': { type: 'string', default: '256' },
  'workload-mib': { type: 'string', default: '64' },
  'rewrite-pct': { type: 'string', default: '0' },
  machine: { type: 'string', default: 'pc-i440fx-7.2' },
  'no-direct': { type: 'boolean' },
  json: { type: 'string' },
} as const;

type DemoDefaulted = { [K in keyof typeof DEMO_OPTIONS]: (typeof DEMO_OPTIONS)[K] extends { default: string } ? K : never }[keyof typeof DEMO_OPTIONS];

/** `[--name default]`, from the schema: the default is written once. */
const demoDefault = (...names: DemoDefaulted[]): string => names.map((name) => `[--${name} ${DEMO_OPTIONS[name].default}]`).join(' ');

export const DEMO = command({
  name: 'demo',
  synopsis: [`demo ${demoDefault('legs', 'mbit', 'delay-ms', 'mem-mib', 'workload-mib', 'rewrite-pct')}`, `${demoDefault('machine')} [--no-direct] [--json FILE]`],
  summary: ['migrate a guest back and forth on this machine through two gateways', 'and a WAN emulator, direct versus through bfmig'],
  options: DEMO_OPTIONS,
  positionals: [],
});

export const GATEWAY = command({
  name: 'gateway',
  synopsis: ['gateway --config FILE [--log-level LEVEL]'],
  summary: ["run a site's gateway (see the README for the YAML keys); --log-level", 'defaults to $BFMIG_LOG_LEVEL, else info'],
  options: { config: { type: 'string' }, 'log-level': { type: 'string' } },
  positionals: [],
});

export const CERTS = command({
  name: 'certs',
  synopsis: [`certs --out DIR --sites site-a,site-b [--days ${DEFAULT_CERT_DAYS}]`],
  summary: [
    "create a CA (or reuse DIR's) and a certificate per site for mutual",
    "TLS between gateways, and print each site's tls: config block",
  ],
  options: { out: { type: 'string' }, sites: { type: 'string' }, days: { type: 'string' } },
  positionals: [],
});

export const RESTORE = command({
  name: 'restore',
  synopsis: [`restore --data DIR --vm NAME --to tcp:HOST:PORT [--timeout ${DEFAULT_RESTORE_TIMEOUT_MS / 1000}]`],
  summary: [
    "rebuild the VM's last retained snapshot into a destination QEMU",
    'started with -incoming and the same machine shape; exits 0 only',
    'once that QEMU has loaded it',
  ],
  options: { data: { type: 'string' }, vm: { type: 'string' }, to: { type: 'string' }, timeout: { type: 'string' } },
  positionals: [],
});

const SNAPSHOTS_OPTIONS = { data: { type: 'string' }, json: { type: 'boolean' } } as const;
const SNAPSHOTS_SUMMARY = ["the retained snapshots in a gateway's store directory"];

export const SNAPSHOTS = command({
  name: 'snapshots',
  synopsis: ['snapshots list|show VM|verify VM|rm VM --data DIR [--json]'],
  summary: SNAPSHOTS_SUMMARY,
  options: SNAPSHOTS_OPTIONS,
  positionals: ['list|show|verify|rm', '[VM]'],
});

/** `bfmig snapshots <action>`: each action's own usage. */
export const SNAPSHOTS_ACTIONS = {
  list: command({ name: 'snapshots list', synopsis: ['snapshots list --data DIR [--json]'], summary: SNAPSHOTS_SUMMARY, options: SNAPSHOTS_OPTIONS, positionals: [] }),
  show: command({ name: 'snapshots show', synopsis: ['snapshots show VM --data DIR'], summary: ["a VM's store metadata, as JSON"], options: SNAPSHOTS_OPTIONS, positionals: ['VM'] }),
  verify: command({
    name: 'snapshots verify',
    synopsis: ['snapshots verify VM --data DIR [--json]'],
    summary: ["re-hash every page the VM's store holds; stop holding corrupted ones (exit status 1)"],
    options: SNAPSHOTS_OPTIONS,
    positionals: ['VM'],
  }),
  rm: command({ name: 'snapshots rm', synopsis: ['snapshots rm VM --data DIR'], summary: ["remove a VM's store (never while it is in use)"], options: SNAPSHOTS_OPTIONS, positionals: ['VM'] }),
} as const;

export const STATUS = command({
  name: 'status',
  synopsis: ['status --gateway HOST:PORT [--watch] [--json]'],
  summary: ["the migrations in flight through a gateway, from its metrics listener's", '/status: progress, rates, saving, what is left; --watch refreshes it'],
  options: { gateway: { type: 'string' }, watch: { type: 'boolean' }, json: { type: 'boolean' } },
  positionals: [],
});

export const CAPTURE = command({
  name: 'capture',
  synopsis: ['capture --listen HOST:PORT --out FILE [--forward HOST:PORT]'],
  summary: ['accept one migration from a source QEMU and write it to FILE,', 'relaying it to the destination QEMU with --forward'],
  options: { listen: { type: 'string' }, out: { type: 'string' }, forward: { type: 'string' } },
  positionals: [],
});

export const PREDICT = command({
  name: 'predict',
  synopsis: [
    'predict --ram 8GiB --mbit 100 --rtt-ms 40 [--changed 1%] [--used 100%] [--dirty-mbps 0] [--hot 100%]',
    '[--downtime-limit-ms 300] [--max-bandwidth 128MiB] [--avail-switchover-bandwidth B] [--no-digests] [--gateway-gbps G]',
    '[--compression RATIO] [--delta-bytes B [--delta-share 100%] [--first-leg-deltas 0%]] [--multifd N] [--platform default|bench|bench-qemu10] [--json]',
  ],
  summary: ['predicted WAN bytes, total time and downtime of a migration, direct', 'and through bfmig, and the break-even point (docs/model.md)'],
  options: {
    ram: { type: 'string' },
    mbit: { type: 'string' },
    'rtt-ms': { type: 'string' },
    changed: { type: 'string' },
    used: { type: 'string' },
    'dirty-mbps': { type: 'string' },
    hot: { type: 'string' },
    'downtime-limit-ms': { type: 'string' },
    'max-bandwidth': { type: 'string' },
    'avail-switchover-bandwidth': { type: 'string' },
    'no-digests': { type: 'boolean' },
    'gateway-gbps': { type: 'string' },
    compression: { type: 'string' },
    'delta-bytes': { type: 'string' },
    'delta-share': { type: 'string' },
    'first-leg-deltas': { type: 'string' },
    multifd: { type: 'string' },
    platform: { type: 'string' },
    json: { type: 'boolean' },
  },
  positionals: [],
});

/** In the order `bfmig --help` lists them. */
export const COMMANDS: readonly Command[] = [INSPECT, DEMO, GATEWAY, CERTS, RESTORE, SNAPSHOTS, CAPTURE, PREDICT, STATUS];

/** `bfmig --help`: every command's synopsis and summary. */
export const USAGE =
  'usage: bfmig <command> [options]     (bfmig <command> --help: that command alone)\n\ncommands:\n' +
  COMMANDS.map((c) => {
    const indent = ' '.repeat(c.name.length + 3);
    const lines = [`  ${c.synopsis[0]}`, ...c.synopsis.slice(1).map((l) => indent + l)];
    const column = ' '.repeat(34);
    const summary = c.summary.map((l) => column + l);
    // A short synopsis takes the summary's first line beside it.
    if (lines.length === 1 && lines[0].length < 32) return [lines[0].padEnd(34) + c.summary[0], ...summary.slice(1)].join('\n');
    return [...lines, ...summary].join('\n');
  }).join('\n') +
  '\n';
