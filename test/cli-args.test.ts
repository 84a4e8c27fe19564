/**
 * The command line of every command, through the compiled CLI (`node bin/bfmig.js`, after `npx tsc`):
 * --help, unknown options, missing and bad values, positionals, and valid lines that fail for other
 * reasons with the exit status and message they always had.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { COMMANDS, SNAPSHOTS_ACTIONS, USAGE } from '../src/cli/commands';
import { synopsisLine, usageOf } from '../src/cli/parse';
import { PACKAGE_ROOT } from '../src/digest/package-root';
import { suiteTempDir } from './temp-dir';

const BFMIG = path.join(PACKAGE_ROOT, 'bin', 'bfmig.js');
const dir = suiteTempDir('bfmig-cli-args-');

function bfmig(args: readonly string[]): { code: number | null; stdout: string; stderr: string } {
  const run = spawnSync(process.execPath, [BFMIG, ...args], { encoding: 'utf8', cwd: dir, timeout: 30_000 });
  return { code: run.status, stdout: run.stdout, stderr: run.stderr };
}

/** Each command as typed, with the usage its --help prints. */
const commands = [...COMMANDS.map((c) => ({ argv: [c.name], command: c })), ...Object.values(SNAPSHOTS_ACTIONS).map((c) => ({ argv: c.name.split(' '), command: c }))];

describe('bfmig <command> --help', () => {
  test.each(commands.flatMap(({ argv, command }) => [
    [[...argv, '--help'], command],
    [[...argv, '-h'], command],
  ]))('%j: usage on stdout, exit 0', (argv, command) => {
    const r = bfmig(argv);
    expect(r).toEqual({ code: 0, stdout: usageOf(command), stderr: '' });
    expect(r.stdout.startsWith(`usage: bfmig ${command.synopsis[0]}\n`)).toBe(true);
  });

  test.each([['--help'], ['-h'], ['help']])('bfmig %s lists every command, exit 0', (flag) => {
    expect(bfmig([flag])).toEqual({ code: 0, stdout: USAGE, stderr: '' });
  });

  test('--help wins over the options around it, also a required one missing', () => {
    expect(bfmig(['predict', '--help'])).toMatchObject({ code: 0, stdout: expect.stringMatching(/^usage: bfmig predict --ram/) });
    expect(bfmig(['gateway', '--confg', 'x', '--help'])).toMatchObject({ code: 0, stdout: expect.stringMatching(/^usage: bfmig gateway/) });
  });
});

describe('mistakes in the command line: exit 2, the message names them, the usage on stderr', () => {
  const cases: Array<[string[], RegExp, string]> = [
    // An unknown option, for every command.
    ...commands.map(({ argv, command }): [string[], RegExp, string] => [[...argv, '--bogus'], new RegExp(`unknown option --bogus for bfmig ${command.name}\\n`), usageOf(command)]),
    [['gateway', '--confg', 'x'], /^bfmig: unknown option --confg for bfmig gateway\n/, usageOf(COMMANDS[2])],
    [['inspect', '-x', 'file'], /unknown option -x for bfmig inspect/, usageOf(COMMANDS[0])],
    // A missing value: at the end, or followed by another option.
    [['gateway', '--config'], /--config needs a value/, usageOf(COMMANDS[2])],
    [['predict', '--ram', '--help'], /--ram needs a value, not "--help"/, usageOf(COMMANDS[7])],
    [['restore', '--data', 'd', '--vm'], /--vm needs a value/, usageOf(COMMANDS[4])],
    [['certs', '--out', 'd', '--sites'], /--sites needs a value/, usageOf(COMMANDS[3])],
    [['capture', '--listen', '127.0.0.1:0', '--out'], /--out needs a value/, usageOf(COMMANDS[6])],
    [['demo', '--legs'], /--legs needs a value/, usageOf(COMMANDS[1])],
    [['snapshots', 'list', '--data'], /--data needs a value/, usageOf(SNAPSHOTS_ACTIONS.list)],
    [['inspect', '--json=yes', 'f'], /--json takes no value/, usageOf(COMMANDS[0])],
    // A missing required option (as before).
    [['gateway'], /--config is required/, usageOf(COMMANDS[2])],
    [['predict', '--ram', '8GiB', '--mbit', '100'], /--rtt-ms is required/, usageOf(COMMANDS[7])],
    // A bad value.
    [['restore', '--data', 'd', '--vm', 'v', '--to', '127.0.0.1:1'], /--to takes tcp:HOST:PORT/, usageOf(COMMANDS[4])],
    [['restore', '--data', 'd', '--vm', 'v', '--to', 'tcp:nowhere'], /--to: "nowhere" is not HOST:PORT/, usageOf(COMMANDS[4])],
    [['restore', '--data', 'd', '--vm', 'v', '--to', 'tcp:127.0.0.1:1', '--timeout', '0'], /--timeout takes a whole number/, usageOf(COMMANDS[4])],
    [['certs', '--out', 'd', '--sites', 'a', '--days', 'x'], /--days takes a whole number/, usageOf(COMMANDS[3])],
    [['capture', '--listen', 'nowhere', '--out', 'f'], /--listen: "nowhere" is not HOST:PORT/, usageOf(COMMANDS[6])],
    [['demo', '--legs', 'x'], /--legs takes a non-negative number, not "x"/, usageOf(COMMANDS[1])],
    [['predict', '--ram', '8GiB', '--mbit', '0', '--rtt-ms', '40'], /--mbit must be above 0/, usageOf(COMMANDS[7])],
    [['predict', '--ram', '8GiB', '--mbit', '1', '--rtt-ms', '40', '--platform', 'x'], /--platform is default, bench or bench-qemu10, not "x"/, usageOf(COMMANDS[7])],
    // Positionals: missing, extra, unknown.
    [['inspect'], /inspect needs FILE\|-/, usageOf(COMMANDS[0])],
    [['inspect', 'a', 'b'], /unexpected argument "b" for bfmig inspect/, usageOf(COMMANDS[0])],
    [['gateway', 'site.yaml'], /unexpected argument "site.yaml" for bfmig gateway/, usageOf(COMMANDS[2])],
    [['snapshots', '--data', 'd'], /snapshots needs list\|show\|verify\|rm/, usageOf(COMMANDS[5])],
    [['snapshots', 'frob', '--data', 'd'], /unknown action "frob" for bfmig snapshots/, usageOf(COMMANDS[5])],
    [['snapshots', 'show', '--data', 'd'], /snapshots show needs VM/, usageOf(SNAPSHOTS_ACTIONS.show)],
    [['snapshots', 'rm', 'vm1', 'vm2', '--data', 'd'], /unexpected argument "vm2" for bfmig snapshots rm/, usageOf(SNAPSHOTS_ACTIONS.rm)],
    [['snapshots', 'list', 'vm1', '--data', 'd'], /unexpected argument "vm1" for bfmig snapshots list/, usageOf(SNAPSHOTS_ACTIONS.list)],
    // No command, an unknown one.
    [[], /a command is needed/, USAGE],
    [['frob'], /unknown command "frob"/, USAGE],
  ];
  test.each(cases)('%j', (argv, message, usage) => {
    const r = bfmig(argv);
    expect(r.code).toBe(2);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/^bfmig: /);
    expect(r.stderr).toMatch(message);
    expect(r.stderr.endsWith(`\n\n${usage}`)).toBe(true);
  });
});

describe('valid command lines that fail, or work, for other reasons: exit status and message as before', () => {
  test('gateway: a config file that is not there stops start-up, exit 2', () => {
    const r = bfmig(['gateway', '--config', path.join(dir, 'missing.yaml'), '--log-level', 'error']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^bfmig gateway: .*missing\.yaml: cannot read config/);
  });

  test('inspect: a file that is not there, exit 1', () => {
    const r = bfmig(['inspect', path.join(dir, 'missing.bin'), '--json']);
    expect(r).toMatchObject({ code: 1, stderr: expect.stringMatching(/^bfmig: ENOENT/) });
  });

  test('inspect: a stream parsed only up to what the codec does not understand: complete false, exit 1', () => {
    // A header, then an unknown section type: the codec stops understanding and relays the rest.
    const file = path.join(dir, 'fallback.mig');
    fs.writeFileSync(file, Buffer.concat([Buffer.from('QEVM'), Buffer.from([0, 0, 0, 3, 0x42, 1, 2, 3])]));
    const r = bfmig(['inspect', file, '--json']);
    expect({ code: r.code, complete: (JSON.parse(r.stdout) as { complete: boolean }).complete }).toEqual({ code: 1, complete: false });
  });

  test('inspect -: standard input, here empty: reported, exit 1', () => {
    const r = bfmig(['inspect', '-']);
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/^stream +0 bytes/);
  });

  test('snapshots: options before or after the action; a VM with nothing retained, exit 1', () => {
    const data = path.join(dir, 'store');
    expect(bfmig(['snapshots', '--data', data, 'list'])).toMatchObject({ code: 0, stdout: `no retained VMs in ${data}\n` });
    expect(bfmig(['snapshots', 'list', '--data', data, '--json'])).toMatchObject({ code: 0, stdout: '[]\n' });
    expect(bfmig(['snapshots', 'show', 'vm1', '--data', data])).toMatchObject({ code: 1, stdout: `no retained snapshot for VM vm1 in ${data}\n` });
    expect(bfmig(['snapshots', '--data', data, 'verify', 'vm1'])).toMatchObject({ code: 1 });
  });

  test('restore: a VM with nothing retained, exit 1', () => {
    const r = bfmig(['restore', '--data', path.join(dir, 'store'), '--vm', 'vm1', '--to', 'tcp:127.0.0.1:9', '--timeout', '5']);
    expect(r).toMatchObject({ code: 1, stderr: expect.stringMatching(/^bfmig: no retained snapshot for VM vm1/) });
  });

  test('certs: a site name it cannot issue for, exit 1', () => {
    const r = bfmig(['certs', '--out', path.join(dir, 'tls'), '--sites', 'bad name']);
    expect(r).toMatchObject({ code: 1, stderr: expect.stringMatching(/^bfmig: site name "bad name" must be/) });
  });

  test('predict: options in any order, --name=value, exit 0', () => {
    const r = bfmig(['predict', '--rtt-ms=40', '--json', '--mbit', '100', '--ram', '1GiB', '--no-digests']);
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ inputs: { ramBytes: 2 ** 30, rateMbit: 100, rttMs: 40, senderHasDigests: false } });
  });
});

test("the README's Commands section heads each command with its synopsis", () => {
  const readme = fs.readFileSync(path.join(PACKAGE_ROOT, 'README.md'), 'utf8');
  const section = readme.slice(readme.indexOf('## Commands\n'), readme.indexOf('\n## ', readme.indexOf('## Commands\n') + 1));
  for (const command of COMMANDS) expect(section).toContain(`### \`${synopsisLine(command)}\`\n`);
});
