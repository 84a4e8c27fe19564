/**
 * A benchmark's command line. `--help` (or `-h`) prints the usage that the script's own header comment
 * gives (the one place it is written) and exits; an option the script does not take, or a value it
 * cannot use, prints what was wrong and points at `--help`, exit status 2, instead of a stack trace.
 */
import * as fs from 'node:fs';
import { parseArgs, type ParseArgsConfig } from 'node:util';

/** The script's header comment (its first `/** … *\/` block), as text. */
function headerOf(file: string): string {
  const match = /\/\*\*([\s\S]*?)\*\//.exec(fs.readFileSync(file, 'utf8'));
  if (match === null) return '';
  return match[1]
    .split('\n')
    .map((line) => line.replace(/^\s*\* ?/, ''))
    .join('\n')
    .trim();
}

function wantsHelp(argv: readonly string[]): boolean {
  return argv.includes('--help') || argv.includes('-h');
}

function printHelpAndExit(): never {
  const script = require.main?.filename;
  console.log(script === undefined ? 'no usage known' : headerOf(script));
  process.exit(0);
}

/** Ends the benchmark: what was wrong with its command line, and where its usage is. */
function usageError(message: string): never {
  console.error(`${message}\n(--help prints the usage)`);
  process.exit(2);
}

/** parseArgs over the script's arguments, strict, with `--help` and usage errors as above. */
export function benchOptions<T extends NonNullable<ParseArgsConfig['options']>>(options: T, allowPositionals = false) {
  const args = process.argv.slice(2);
  if (wantsHelp(args)) printHelpAndExit();
  try {
    return parseArgs({ args, options, strict: true, allowPositionals });
  } catch (err) {
    return usageError(err instanceof Error ? err.message : String(err));
  }
}

/** The script's positional arguments (it takes no options but `--help`). */
export function benchPositionals(): string[] {
  const args = process.argv.slice(2);
  if (wantsHelp(args)) printHelpAndExit();
  const option = args.find((a) => a.startsWith('-') && Number.isNaN(Number(a)));
  if (option !== undefined) usageError(`unknown option ${option}`);
  return args;
}

/** `text` as a number, `fallback` where it is absent; anything not a finite number is a usage error. */
export function numberArg(text: string | undefined, fallback: number, what: string): number {
  if (text === undefined) return fallback;
  const value = Number(text);
  if (text.trim() === '' || !Number.isFinite(value)) usageError(`${what}: not a number: ${text}`);
  return value;
}
