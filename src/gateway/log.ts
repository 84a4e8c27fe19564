/**
 * Structured logging: one JSON object per line (pino), e.g.
 *   {"level":30,"time":"2025-01-01T00:00:00.000Z","name":"site-a","vm":"vm1","msg":"migration completed"}
 * Pipe through `npx pino-pretty` to read it.
 */
import pino from 'pino';

export type Logger = pino.Logger;

export interface LoggerOptions {
  /** Logged as `name` on every line (e.g. the site name). */
  name: string;
  /** trace | debug | info | warn | error | fatal | silent; default info. */
  level?: string;
  /** Default: stdout. */
  destination?: NodeJS.WritableStream;
}

export function createLogger(opts: LoggerOptions): Logger {
  const level = opts.level ?? 'info';
  if (level !== 'silent' && !(level in pino.levels.values)) {
    throw new Error(
      `unknown log level "${level}" (expected ${[...Object.keys(pino.levels.values), 'silent'].join(', ')})`,
    );
  }
  const options: pino.LoggerOptions = {
    name: opts.name,
    level,
    timestamp: pino.stdTimeFunctions.isoTime,
  };
  return opts.destination ? pino(options, opts.destination) : pino(options);
}
