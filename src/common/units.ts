/** "200GiB", "512 MiB", "1TB", "4096": bytes. */
export function parseSize(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$/i.exec(text);
  if (!m) throw new Error(`"${text}" is not a size like 200GiB`);
  const unit = (m[2] ?? '').toUpperCase().replace(/B$/, '');
  const powers: Record<string, number> = { '': 0, K: 1, KI: 1, M: 2, MI: 2, G: 3, GI: 3, T: 4, TI: 4 };
  if (!(unit in powers)) throw new Error(`"${text}" has an unknown unit`);
  const base = unit.endsWith('I') || unit === '' ? 1024 : 1000;
  return Math.round(Number(m[1]) * base ** powers[unit]);
}

/** Bytes as people read them: "512 B", "3.2 MiB", "1.5 GiB" (the units parseSize reads back). */
export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}
