import { parseArgs } from 'node:util';
import { parseEndpoint, formatEndpoint } from '../gateway/address';
import { configSnippets, issueCerts } from './certs';
import { CAPTURE, CERTS, DEMO, GATEWAY, INSPECT, PREDICT, RESTORE, SNAPSHOTS, SNAPSHOTS_ACTIONS, STATUS, USAGE } from './commands';
import { type Command, converted, HelpRequest, type OptionSchema, parseCommand, required, usageOf, UsageError } from './parse';
import { runGateway } from './gateway';
import { runSnapshots } from './snapshots';
import { runStatus } from './status';
import { runPredict } from './predict';
import { restoreSnapshot } from './restore';
import { formatReport, inspectPath } from './inspect';
import { errorMessage } from '../common/errors';

/** A demo option's number: finite and not negative. */
function demoNumber(text: string, option: string): number {
  const value = Number(text);
  if (text.trim() === '' || !Number.isFinite(value) || value < 0) throw new UsageError(`--${option} takes a non-negative number, not "${text}"`);
  return value;
}

/**
 * `bfmig snapshots ACTION ...`: the action's command and the arguments without it. Without an action,
 * the group's command, whose parse gives its help or says an action is needed.
 */
function snapshotsAction(argv: readonly string[]): { command: Command<typeof SNAPSHOTS.options>; action?: string; argv: readonly string[] } {
  const { tokens } = parseArgs({ args: [...argv], options: SNAPSHOTS.options, strict: false, allowPositionals: true, tokens: true });
  const first = tokens.find((t) => t.kind === 'positional');
  if (first === undefined || first.kind !== 'positional') return { command: SNAPSHOTS, argv };
  const name = first.value;
  if (!Object.hasOwn(SNAPSHOTS_ACTIONS, name)) throw new UsageError(`unknown action "${name}" for bfmig snapshots (list, show VM, verify VM or rm VM)`, SNAPSHOTS);
  return { command: SNAPSHOTS_ACTIONS[name as keyof typeof SNAPSHOTS_ACTIONS], action: name, argv: argv.filter((_, i) => i !== first.index) };
}

/** The command being run: a UsageError its code raised without naming one is reported with its usage. */
let active: Command | null = null;

function parse<O extends OptionSchema>(command: Command<O>, argv: readonly string[]): ReturnType<typeof parseCommand<O>> {
  active = command;
  return parseCommand(command, argv);
}

async function run(argv: readonly string[]): Promise<number> {
  const [command, ...rest] = argv;
  switch (command) {
    case 'inspect': {
      const { values, positionals } = parse(INSPECT, rest);
      const report = await inspectPath(positionals[0]);
      process.stdout.write(values.json === true ? JSON.stringify(report, null, 2) + '\n' : formatReport(report) + '\n');
      // 0 only for a stream read to its end: one relayed past a Fallback was not understood whole.
      return report.error || !report.identical || !report.complete ? 1 : 0;
    }
    case 'demo': {
      const { values } = parse(DEMO, rest);
      const options = {
        legs: demoNumber(values.legs, 'legs'),
        memMiB: demoNumber(values['mem-mib'], 'mem-mib'),
        workloadMiB: demoNumber(values['workload-mib'], 'workload-mib'),
        rewritePct: demoNumber(values['rewrite-pct'], 'rewrite-pct'),
        rateMbit: demoNumber(values.mbit, 'mbit'),
        delayMs: demoNumber(values['delay-ms'], 'delay-ms'),
        machine: values.machine,
        direct: values['no-direct'] !== true,
        ...(values.json !== undefined ? { json: values.json } : {}),
      };
      // The demo pulls in the QEMU harness and the WAN emulator (the lab, src/lab/): a gateway never loads it.
      const { runDemo } = await import('../lab/demo/command');
      return runDemo(options);
    }
    case 'predict':
      return runPredict(parse(PREDICT, rest).values, (text) => process.stdout.write(text));
    case 'restore': {
      const { values } = parse(RESTORE, rest);
      const to = required(values.to, 'to');
      if (!to.startsWith('tcp:')) throw new UsageError('--to takes tcp:HOST:PORT');
      const endpoint = converted(to.slice(4), 'to', parseEndpoint);
      const timeout = values.timeout;
      if (timeout !== undefined && !/^[1-9]\d*$/.test(timeout)) throw new UsageError('--timeout takes a whole number of seconds');
      const result = await restoreSnapshot(required(values.data, 'data'), required(values.vm, 'vm'), endpoint, {
        ...(timeout !== undefined ? { timeoutMs: Number(timeout) * 1000 } : {}),
      });
      process.stdout.write(`restored snapshot ${result.snapshotId} (${result.origin}): ${result.pages} pages, ${result.bytes} bytes sent; the destination loaded it\n`);
      return 0;
    }
    case 'snapshots': {
      const { command: snapshots, action, argv: actionArgv } = snapshotsAction(rest);
      const { values, positionals } = parse(snapshots, actionArgv);
      return runSnapshots(action, required(values.data, 'data'), positionals[0], values.json === true, (text) => process.stdout.write(text));
    }
    case 'gateway': {
      const { values } = parse(GATEWAY, rest);
      return runGateway(required(values.config, 'config'), values['log-level']);
    }
    case 'status': {
      const { values } = parse(STATUS, rest);
      const at = converted(required(values.gateway, 'gateway'), 'gateway', parseEndpoint);
      return runStatus(at, { watch: values.watch === true, json: values.json === true }, (text) => process.stdout.write(text), process.stdout.isTTY === true);
    }
    case 'certs': {
      const { values } = parse(CERTS, rest);
      const days = values.days;
      if (days !== undefined && !/^\d+$/.test(days)) throw new UsageError('--days takes a whole number of days');
      const sites = required(values.sites, 'sites').split(',').map((s) => s.trim()).filter((s) => s !== '');
      const issued = issueCerts(required(values.out, 'out'), sites, days === undefined ? undefined : Number(days));
      process.stdout.write(
        `${issued.ca.created ? 'created CA' : 'reused CA'} ${issued.ca.cert} (keep ${issued.ca.key} off the gateways)\n` +
          issued.sites.map((s) => `issued ${s.cert} for ${s.site}\n`).join('') +
          `\n${configSnippets(issued)}\n`,
      );
      return 0;
    }
    case 'capture': {
      const { values } = parse(CAPTURE, rest);
      const listen = converted(required(values.listen, 'listen'), 'listen', parseEndpoint);
      const out = required(values.out, 'out');
      const forward = values.forward === undefined ? undefined : converted(values.forward, 'forward', parseEndpoint);
      // Lab code, like the demo: loaded only when asked for.
      const { Capture } = await import('../lab/capture');
      const capture = new Capture({ listen, out, ...(forward ? { forward } : {}) });
      const bound = await capture.listen();
      process.stdout.write(`listening on ${formatEndpoint(bound)}\n`);
      const stop = (): void => {
        capture.close();
        process.exit(1);
      };
      process.once('SIGINT', stop);
      process.once('SIGTERM', stop);
      const result = await capture.done;
      process.stdout.write(
        `captured ${result.bytes} bytes` + (forward ? `, relayed ${result.returnBytes} bytes back` : '') + (result.error ? `; ${result.error}` : '') + '\n',
      );
      return result.error ? 1 : 0;
    }
    case undefined:
      throw new UsageError('a command is needed');
    case 'help':
    case '--help':
    case '-h':
      process.stdout.write(USAGE);
      return 0;
    default:
      throw new UsageError(`unknown command "${command}"`);
  }
}

export function main(argv: readonly string[]): void {
  run(argv).then(
    (code) => {
      process.exitCode = code;
    },
    (err: unknown) => {
      if (err instanceof HelpRequest) {
        process.stdout.write(usageOf(err.command));
        process.exitCode = 0;
      } else if (err instanceof UsageError) {
        const command = err.command ?? active;
        process.stderr.write(`bfmig: ${err.message}\n\n${command ? usageOf(command) : USAGE}`);
        process.exitCode = 2;
      } else {
        process.stderr.write(`bfmig: ${errorMessage(err)}\n`);
        process.exitCode = 1;
      }
    },
  );
}
