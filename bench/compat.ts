/**
 * The compatibility matrix measured (src/lab/compat/matrix.ts): every row's guest migrated through two
 * gateways, there and back, and the README's table printed from what happened.
 *   node dist/bench/compat.js [--only ID,ID] [--mbit 1000] [--delay-ms 1] [--out FILE.json]
 * Exits 1 when a row does not do what it promises.
 */
import * as fs from 'node:fs';
import { COMPAT_ROWS, COMPAT_TABLE_HEAD, compatPassed, compatTableRow, type CompatOutcome, runCompatRow } from '../src/lab/compat/matrix';
import { benchOptions } from './command-line';

async function main(): Promise<void> {
  const { values } = benchOptions({ only: { type: 'string' }, mbit: { type: 'string' }, 'delay-ms': { type: 'string' }, out: { type: 'string' } });
  const only = values.only?.split(',');
  const rows = COMPAT_ROWS.filter((r) => !only || only.includes(r.id));
  if (rows.length === 0) throw new Error(`no row matches --only ${values.only}; rows: ${COMPAT_ROWS.map((r) => r.id).join(', ')}`);
  const outcomes: CompatOutcome[] = [];
  for (const row of rows) {
    process.stdout.write(`${row.id} ... `);
    const o = await runCompatRow(row, { mbit: values.mbit ? Number(values.mbit) : undefined, delayMs: values['delay-ms'] ? Number(values['delay-ms']) : undefined });
    outcomes.push(o);
    const legs = o.legs.map((l) => `leg ${l.leg}: ${l.wanBytes} WAN bytes${l.postcopyStarted ? ' (postcopy)' : ''}${l.verbatim ? ` (relayed verbatim: ${l.verbatim})` : ''}${l.verified ? '' : ' NOT VERIFIED'}${l.gatewayErrors.map((e) => ` [gateway ${e}]`).join('')}`).join('; ');
    process.stdout.write(`${compatPassed(o) ? 'ok' : 'FAILED'} (${legs})\n`);
    for (const l of o.legs) if (l.failure !== undefined) process.stderr.write(`leg ${l.leg} did not verify:\n${l.failure}\n`);
  }
  console.log(`\n${COMPAT_TABLE_HEAD}\n${outcomes.map(compatTableRow).join('\n')}`);
  if (values.out) fs.writeFileSync(values.out, JSON.stringify({ measured: new Date().toISOString(), outcomes }, null, 2) + '\n');
  if (!outcomes.every(compatPassed)) process.exitCode = 1;
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
