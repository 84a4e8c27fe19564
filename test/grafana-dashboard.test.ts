/**
 * deploy/grafana/bfmig-dashboard.json: it parses, every panel queries something, every query names
 * only metrics the gateway exports, and (where promtool is installed) Prometheus's own parser accepts
 * every query once Grafana's variables are filled in.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { onPath, requireInCi } from './mounts';
import { exportedMetricNames, promqlMetricNames } from './promql-names';
import { testTempDir } from './temp-dir';

const DASHBOARD = path.join(__dirname, '..', 'deploy', 'grafana', 'bfmig-dashboard.json');

interface Panel {
  title: string;
  targets?: Array<{ expr: string }>;
  panels?: Panel[];
}
interface Dashboard {
  panels: Panel[];
  templating: { list: Array<{ name: string; query: { query: string } }> };
}

const dashboard = JSON.parse(fs.readFileSync(DASHBOARD, 'utf8')) as Dashboard;
const panels = dashboard.panels.flatMap((p) => [p, ...(p.panels ?? [])]).filter((p) => p.panels === undefined);
const queries = panels.flatMap((p) => (p.targets ?? []).map((t) => ({ panel: p.title, expr: t.expr })));

/** A query as Prometheus would get it from Grafana: its variables filled in. */
function filledIn(expr: string): string {
  return expr.replace(/\$__rate_interval|\$__range|\$__interval/g, '5m').replace(/\$vm/g, '.*');
}

describe('Grafana dashboard (deploy/grafana)', () => {
  test('every panel has a query, and every query names only metrics the gateway exports', () => {
    expect(panels.length).toBeGreaterThan(10);
    expect(panels.filter((p) => (p.targets ?? []).length === 0).map((p) => p.title)).toEqual([]);
    const known = exportedMetricNames();
    const unknown = queries.flatMap((q) => promqlMetricNames(q.expr).filter((n) => !known.has(n)).map((name) => ({ panel: q.panel, name })));
    expect(unknown).toEqual([]);
    // The VM picker lists the VMs of an exported metric.
    const picker = dashboard.templating.list.find((v) => v.name === 'vm');
    const metric = /^label_values\((\w+), vm\)$/.exec(picker?.query.query ?? '')?.[1];
    expect(metric !== undefined && known.has(metric)).toBe(true);
  });

  const havePromtool = requireInCi(onPath('promtool'), "promtool (Debian's prometheus package, scripts/install-deps.sh)");

  (havePromtool ? test : test.skip)("Prometheus's parser accepts every query", () => {
    const file = path.join(testTempDir('bfmig-grafana-'), 'queries.yml');
    // Each query as a recording rule: promtool check rules parses every expression.
    const rules = queries.map((q, i) => `      - record: dashboard_query_${i}\n        expr: ${JSON.stringify(filledIn(q.expr))}`);
    fs.writeFileSync(file, `groups:\n  - name: dashboard\n    rules:\n${rules.join('\n')}\n`);
    const run = spawnSync('promtool', ['check', 'rules', file], { encoding: 'utf8' });
    expect(`${run.stdout}${run.stderr}`).toContain(`SUCCESS: ${queries.length} rules found`);
    expect(run.status).toBe(0);
  });
});
