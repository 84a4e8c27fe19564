/**
 * What every command shares: its usage text and option schema (a `Command`), and the parse of its
 * arguments with Node's `util.parseArgs` in strict mode. `--help` / `-h` is every command's option.
 */
import { errorMessage } from '../common/errors';
import { parseArgs } from 'node:util';

interface OptionSpec {
  type: 'string' | 'boolean';
  short?: string;
  default?: string;
}

export type OptionSchema = Readonly<Record<string, OptionSpec>>;

/** The parsed options: a string or boolean, always set when the schema gives a default. */
export type OptionValues<O extends OptionSchema> = {
  [K in keyof O]: O[K] extends { type: 'boolean' } ? boolean | undefined : O[K] extends { default: string } ? string : string | undefined;
};

export interface Command<O extends OptionSchema = OptionSchema> {
  /** As typed after `bfmig`: "gateway", "snapshots show". */
  readonly name: string;
  /** The synopsis after `bfmig `, one string per line: the first starts with the name. */
  readonly synopsis: readonly string[];
  /** What the command does, one string per line. */
  readonly summary: readonly string[];
  readonly options: O;
  /** The positionals' names, in order; "[NAME]" marks an optional one. */
  readonly positionals: readonly string[];
}

/** A mistake in the command line: reported with the command's usage, exit status 2. */
export class UsageError extends Error {
  constructor(
    message: string,
    readonly command: Command | null = null,
  ) {
    super(message);
  }
}

/** `--help` or `-h`: the command's usage goes to standard output, exit status 0. */
export class HelpRequest extends Error {
  constructor(readonly command: Command) {
    super(`help for bfmig ${command.name}`);
  }
}

const HELP = { help: { type: 'boolean', short: 'h' } } as const;

/** `usage: bfmig <synopsis>` and the summary: what `bfmig <command> --help` prints. */
export function usageOf(command: Command): string {
  const lead = 'usage: bfmig ';
  const rest = ' '.repeat(lead.length + command.name.length + 1);
  return [lead + command.synopsis[0], ...command.synopsis.slice(1).map((l) => rest + l), '', ...command.summary.map((l) => `  ${l}`), ''].join('\n');
}

/** The synopsis on one line, as the README's "Commands" section heads the command. */
export function synopsisLine(command: Command): string {
  return `bfmig ${command.synopsis.join(' ')}`;
}

/**
 * The options and positionals of `argv` (the words after the command's name). Throws a HelpRequest
 * for `--help` / `-h`, a UsageError naming the option or argument for anything the command does not take.
 */
export function parseCommand<O extends OptionSchema>(command: Command<O>, argv: readonly string[]): { values: OptionValues<O>; positionals: string[] } {
  const options = { ...command.options, ...HELP };
  let parsed: { values: Record<string, string | boolean | undefined>; positionals: string[] };
  try {
    parsed = parseArgs({ args: [...argv], options, strict: true, allowPositionals: true });
  } catch (err) {
    throw diagnose(command, argv, err);
  }
  if (parsed.values.help === true) throw new HelpRequest(command);
  const { positionals } = parsed;
  const required = command.positionals.filter((p) => !p.startsWith('['));
  if (positionals.length < required.length) {
    throw new UsageError(`${command.name} needs ${required.slice(positionals.length).join(' ')}`, command);
  }
  if (positionals.length > command.positionals.length) {
    throw new UsageError(`unexpected argument "${positionals[command.positionals.length]}" for bfmig ${command.name}`, command);
  }
  const { help: _help, ...values } = parsed.values;
  return { values: values as OptionValues<O>, positionals };
}

/** Why strict parsing failed, in words naming the option: Node's own messages vary between releases. */
function diagnose(command: Command, argv: readonly string[], err: unknown): Error {
  const { tokens } = parseArgs({ args: [...argv], options: { ...command.options, ...HELP }, strict: false, allowPositionals: true, tokens: true });
  const options = tokens.flatMap((t) => (t.kind === 'option' ? [t] : []));
  if (options.some((t) => t.name === 'help')) return new HelpRequest(command);
  for (const t of options) {
    const spec = Object.hasOwn(command.options, t.name) ? command.options[t.name] : undefined;
    if (!spec) return new UsageError(`unknown option ${t.rawName} for bfmig ${command.name}`, command);
    if (spec.type === 'string' && t.value === undefined) return new UsageError(`${t.rawName} needs a value`, command);
    if (spec.type === 'string' && !t.inlineValue && t.value !== undefined && t.value.length > 1 && t.value.startsWith('-')) {
      return new UsageError(`${t.rawName} needs a value, not "${t.value}" (write ${t.rawName}=${t.value} if that is the value)`, command);
    }
    if (spec.type === 'boolean' && t.value !== undefined) return new UsageError(`${t.rawName} takes no value`, command);
  }
  return new UsageError(errorMessage(err), command);
}

/** A string option the command cannot do without. */
export function required(value: string | undefined, option: string): string {
  if (value === undefined) throw new UsageError(`--${option} is required`);
  return value;
}

/** A string option's value, converted by `convert`; what it throws becomes a UsageError naming the option. */
export function converted<T>(value: string, option: string, convert: (text: string) => T): T {
  try {
    return convert(value);
  } catch (err) {
    throw new UsageError(`--${option}: ${errorMessage(err)}`);
  }
}
