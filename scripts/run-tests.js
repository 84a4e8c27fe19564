#!/usr/bin/env node
/**
 * `npm test`: jest twice. First the unit and in-process suites, several at a time (one jest worker per
 * core but one, at least two: they are CPU-bound and independent, and one worker left a core of this
 * project's two idle); then the `*.e2e.test.ts` suites one at a time, since each drives QEMU guests under
 * TCG that take every core there is, and QEMU 7.2's TCG guest panics when a pre-copy drags on.
 *
 * Arguments go to both runs (a test path, `-t name`, ...); with any given, a run that matches no suite
 * passes. Exits with the first failing run's status.
 */
'use strict';
const { spawnSync } = require('node:child_process');
const os = require('node:os');
const path = require('node:path');

const E2E = '\\.e2e\\.test\\.ts$';
/** Every path but the e2e suites' (a pattern given to --testPathPattern would be or-ed with the arguments'). */
const NOT_E2E = `^(?!.*${E2E})`;
const args = process.argv.slice(2);
const jest = path.join(__dirname, '..', 'node_modules', 'jest', 'bin', 'jest.js');
const cores = typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length;
const some = args.length > 0 ? ['--passWithNoTests'] : [];

const runs = [
  ['--testPathIgnorePatterns', E2E, `--maxWorkers=${Math.max(2, cores - 1)}`, ...some, ...args],
  // The e2e suites run in jest's own process, and it exits once they are done (--forceExit): once, with
  // every suite passed, that process spun at 100% CPU for minutes in Node's own clean-up at exit
  // (node::Environment::CleanupHandles, waiting on a request none of the threads still had), and the
  // same suites exited at once in the next run.
  ['--testPathIgnorePatterns', NOT_E2E, '--maxWorkers=1', '--forceExit', ...some, ...args],
];
for (const run of runs) {
  const result = spawnSync(process.execPath, [jest, ...run], { stdio: 'inherit' });
  if (result.status !== 0) process.exit(result.status ?? 1);
}
