import { parseEndpoint, formatEndpoint } from '../gateway/address';
import { configSnippets, DEFAULT_CERT_DAYS, issueCerts } from './certs';
import { parseArgs, requireOption, stringOption, UsageError } from './args';
import { runGateway } from './gateway';
import { runSnapshots } from './snapshots';
import { PREDICT_USAGE, runPredict } from './predict';
import { DEFAULT_RESTORE_TIMEOUT_MS, restoreSnapshot } from './restore';
import { formatReport, inspectPath } from './inspect';
import { errorMessage } from '../common/errors';

const USAGE = `usage: bfmig <command> [options]

commands:
  inspect <file|-> [--json]       report what a captured migration stream holds
  demo [--legs 3] [--mbit 100] [--delay-ms 20] [--mem-mib 256] [--workload-mib 64] [--rewrite-pct 0]
       [--no-direct] [--json FILE]
                                  migrate a guest back and forth on this machine through two gateways
                                  and a WAN emulator, direct versus through bfmig
  gateway --config FILE           run a site's gateway (see the README for the YAML keys)
  certs --out DIR --sites site-a,site-b [--days 825]
                                  create a CA (or reuse DIR's) and a certificate per site for mutual
                                  TLS between gateways, and print each site's tls: config block
  restore --data DIR --vm NAME --to tcp:HOST:PORT [--timeout 60]
                                  rebuild the VM's last retained snapshot into a destination QEMU
                                  started with -incoming and the same machine shape; exits 0 only
                                  once that QEMU has loaded it
  snapshots list|show VM|verify VM|rm VM --data DIR [--json]
                                  the retained snapshots in a gateway's store directory
  capture --listen HOST:PORT --out FILE [--forward HOST:PORT]
                                  accept one migration from a source QEMU and write it to FILE,
                                  relaying it to the destination QEMU with --forward
${PREDICT_USAGE}
`;

async function run(argv: readonly string[]): Promise<number> {
  const [command, ...rest] = argv;
  switch (command) {
    case 'inspect': {
      const args = parseArgs(rest, ['json']);
      const path = args.positionals[0];
      if (!path) throw new UsageError('inspect needs a file, or - for standard input');
      const report = await inspectPath(path);
      process.stdout.write(args.options.has('json') ? JSON.stringify(report, null, 2) + '\n' : formatReport(report) + '\n');
      return report.error || !report.identical ? 1 : 0;
    }
    case 'demo': {
      // The demo pulls in the QEMU harness and the WAN emulator (the lab, src/lab/): a gateway never loads it.
      const { runDemo } = await import('../lab/demo/command');
      return runDemo(parseArgs(rest, ['no-direct']));
    }
    case 'predict':
      return runPredict(parseArgs(rest, ['json', 'no-digests']), (text) => process.stdout.write(text));
    case 'restore': {
      const args = parseArgs(rest, []);
      const to = requireOption(args, 'to');
      if (!to.startsWith('tcp:')) throw new UsageError('--to takes tcp:HOST:PORT');
      const timeout = stringOption(args, 'timeout');
      if (timeout !== undefined && !/^[1-9]\d*$/.test(timeout)) throw new UsageError('--timeout takes a whole number of seconds');
      const result = await restoreSnapshot(requireOption(args, 'data'), requireOption(args, 'vm'), parseEndpoint(to.slice(4)), {
        timeoutMs: timeout === undefined ? DEFAULT_RESTORE_TIMEOUT_MS : Number(timeout) * 1000,
      });
      process.stdout.write(`restored snapshot ${result.snapshotId} (${result.origin}): ${result.pages} pages, ${result.bytes} bytes sent; the destination loaded it\n`);
      return 0;
    }
    case 'snapshots': {
      const args = parseArgs(rest, ['json']);
      const [action, vm] = args.positionals;
      return runSnapshots(action, requireOption(args, 'data'), vm, args.options.has('json'), (text) => process.stdout.write(text));
    }
    case 'gateway': {
      const args = parseArgs(rest, []);
      return runGateway(requireOption(args, 'config'), stringOption(args, 'log-level'));
    }
    case 'certs': {
      const args = parseArgs(rest, []);
      const days = stringOption(args, 'days');
      if (days !== undefined && !/^\d+$/.test(days)) throw new UsageError('--days takes a whole number of days');
      const sites = requireOption(args, 'sites').split(',').map((s) => s.trim()).filter((s) => s !== '');
      const issued = issueCerts(requireOption(args, 'out'), sites, days === undefined ? DEFAULT_CERT_DAYS : Number(days));
      process.stdout.write(
        `${issued.ca.created ? 'created CA' : 'reused CA'} ${issued.ca.cert} (keep ${issued.ca.key} off the gateways)\n` +
          issued.sites.map((s) => `issued ${s.cert} for ${s.site}\n`).join('') +
          `\n${configSnippets(issued)}\n`,
      );
      return 0;
    }
    case 'capture': {
      // Lab code, like the demo: loaded only when asked for.
      const { Capture } = await import('../lab/capture');
      const args = parseArgs(rest, []);
      const forward = stringOption(args, 'forward');
      const capture = new Capture({
        listen: parseEndpoint(requireOption(args, 'listen')),
        out: requireOption(args, 'out'),
        ...(forward ? { forward: parseEndpoint(forward) } : {}),
      });
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
    case 'help':
    case '--help':
    case '-h':
      process.stdout.write(USAGE);
      return command === undefined ? 2 : 0;
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
      if (err instanceof UsageError) {
        process.stderr.write(`bfmig: ${err.message}\n\n${USAGE}`);
        process.exitCode = 2;
      } else {
        process.stderr.write(`bfmig: ${errorMessage(err)}\n`);
        process.exitCode = 1;
      }
    },
  );
}
