/** A small argv parser: `--name value`, `--flag`, and positionals. */
export interface ParsedArgs {
  positionals: string[];
  options: Map<string, string | true>;
}

export function parseArgs(argv: readonly string[], flags: readonly string[]): ParsedArgs {
  const positionals: string[] = [];
  const options = new Map<string, string | true>();
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg.startsWith('--')) {
      const eq = arg.indexOf('=');
      const name = arg.slice(2, eq < 0 ? undefined : eq);
      if (eq >= 0) options.set(name, arg.slice(eq + 1));
      else if (flags.includes(name)) options.set(name, true);
      else if (i + 1 < argv.length) options.set(name, argv[++i]);
      else throw new UsageError(`--${name} needs a value`);
    } else {
      positionals.push(arg);
    }
  }
  return { positionals, options };
}

export class UsageError extends Error {}

export function stringOption(args: ParsedArgs, name: string): string | undefined {
  const value = args.options.get(name);
  if (value === true) throw new UsageError(`--${name} needs a value`);
  return value;
}

export function requireOption(args: ParsedArgs, name: string): string {
  const value = stringOption(args, name);
  if (value === undefined) throw new UsageError(`--${name} is required`);
  return value;
}
