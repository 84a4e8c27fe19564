/**
 * Helpers shared by the config parsers (config.ts and security-config.ts): how a parser reports a bad
 * setting, and how it names a YAML value in that report. Imports neither parser, so both can use it.
 */

/** A site's name: the config's `name:`, a peer's certificate name in `allowPeers:` and `peerVms:`, a `bfmig certs` site. */
export const SITE_NAME = /^[A-Za-z0-9._-]{1,64}$/;

/** Reports the setting `key` as wrong and throws (a ConfigError naming the config file). */
export type Fail = (key: string, detail: string) => never;

/** A YAML mapping (not null, not a list). */
export function isMapping(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** A value as an error message names it: `a list`, `the string "x"`, `number 3`. */
export function describe(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'a list';
  if (typeof v === 'object') return 'a mapping';
  if (typeof v === 'string') return `the string ${JSON.stringify(v)}`;
  return `${typeof v} ${String(v)}`;
}
