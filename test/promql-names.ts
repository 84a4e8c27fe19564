/**
 * The metric names a PromQL expression (a rule's, a dashboard query's) refers to, and the names the
 * gateway exports: so that a rule or a panel naming a metric that does not exist fails a test instead
 * of silently matching nothing.
 */
import { GatewayMetrics } from '../src/gateway/metrics';

/** Series Prometheus makes itself for every target. */
const PROMETHEUS_SERIES = ['up', 'scrape_duration_seconds', 'scrape_samples_scraped'];

/** Words of PromQL that are not metric names where they stand (aggregations may be followed by `by (…)` rather than "("). */
const KEYWORDS = new Set([
  ...['and', 'or', 'unless', 'bool', 'offset', 'by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'inf', 'nan', 'Inf', 'NaN'],
  ...['sum', 'min', 'max', 'avg', 'group', 'stddev', 'stdvar', 'count', 'count_values', 'bottomk', 'topk', 'quantile'],
]);

/**
 * Metric names in `expr`: identifiers left once strings, label matchers, ranges, grouping label lists
 * and durations are taken out, other than function names (followed by "(") and keywords.
 */
export function promqlMetricNames(expr: string): string[] {
  const bare = expr
    .replace(/"(?:[^"\\]|\\.)*"/g, '""')
    .replace(/\{[^}]*\}/g, ' ')
    .replace(/\[[^\]]*\]/g, ' ')
    .replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, '$1 ')
    .replace(/\boffset\s+\S+/g, ' ');
  const names = new Set<string>();
  for (const m of bare.matchAll(/(?<![A-Za-z0-9_:.$])[A-Za-z_:][A-Za-z0-9_:]*(?![A-Za-z0-9_:])(?!\s*\()/g)) {
    if (!KEYWORDS.has(m[0])) names.add(m[0]);
  }
  return [...names];
}

/** Every metric name a gateway's /metrics serves (its own and Node's default process metrics), and Prometheus's per-target series. */
export function exportedMetricNames(): Set<string> {
  return new Set([...new GatewayMetrics().registry.getMetricsAsArray().map((m) => m.name), ...PROMETHEUS_SERIES]);
}
