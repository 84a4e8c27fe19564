/**
 * deploy/prometheus: the rules load in Prometheus's own checker (promtool, Debian's `prometheus`
 * package), their unit tests pass, every alert has a case that fires and one that does not, every
 * recording rule is tested, and every metric a rule names is one the gateway exports.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parse } from 'yaml';
import { exportedMetricNames, promqlMetricNames } from './promql-names';
import { onPath, requireInCi } from './mounts';

const DIR = path.join(__dirname, '..', 'deploy', 'prometheus');
const RULES = path.join(DIR, 'bfmig-rules.yml');
const RULE_TESTS = path.join(DIR, 'bfmig-rules.test.yml');

interface Rule {
  record?: string;
  alert?: string;
  expr: string;
}
interface AlertCase {
  alertname: string;
  exp_alerts: unknown[];
}
interface RuleTests {
  rule_files: string[];
  tests: Array<{ alert_rule_test?: AlertCase[]; promql_expr_test?: Array<{ expr: string }> }>;
}

const rules = (parse(fs.readFileSync(RULES, 'utf8')) as { groups: Array<{ rules: Rule[] }> }).groups.flatMap((g) => g.rules);
const ruleTests = parse(fs.readFileSync(RULE_TESTS, 'utf8')) as RuleTests;

function promtool(...args: string[]): { status: number | null; output: string } {
  const r = spawnSync('promtool', args, { cwd: DIR, encoding: 'utf8' });
  return { status: r.status, output: `${r.stdout}${r.stderr}` };
}

describe('Prometheus rules (deploy/prometheus)', () => {
  test('every metric a rule names is one the gateway exports (or a recording rule of the file)', () => {
    const known = exportedMetricNames();
    for (const r of rules) if (r.record) known.add(r.record);
    const named = rules.flatMap((r) => promqlMetricNames(r.expr).map((name) => ({ rule: r.alert ?? r.record, name })));
    expect(named.length).toBeGreaterThan(rules.length);
    expect(named.filter((n) => !known.has(n.name))).toEqual([]);
    // The check itself tells a wrong name apart.
    expect(promqlMetricNames('sum by (vm) (rate(bfmig_wan_byte_total{vm="x"}[5m])) / on (vm) up offset 1h')).toEqual(['bfmig_wan_byte_total', 'up']);
  });

  test('the unit tests cover every rule: each alert firing and not firing, each recording rule evaluated', () => {
    expect(ruleTests.rule_files).toEqual([path.basename(RULES)]);
    const cases = ruleTests.tests.flatMap((t) => t.alert_rule_test ?? []);
    const exprs = ruleTests.tests.flatMap((t) => t.promql_expr_test ?? []).map((t) => t.expr);
    const alerts = rules.flatMap((r) => (r.alert ? [r.alert] : []));
    expect(alerts).toEqual(expect.arrayContaining(['BfmigGatewayDown', 'BfmigMigrationsFailing', 'BfmigStreamRelayedVerbatim', 'BfmigStoreNearBudget', 'BfmigStoreFull', 'BfmigTlsCertificateExpiring']));
    for (const alert of alerts) {
      const mine = cases.filter((c) => c.alertname === alert);
      expect({ alert, fires: mine.some((c) => c.exp_alerts.length > 0), quiet: mine.some((c) => c.exp_alerts.length === 0) }).toEqual({ alert, fires: true, quiet: true });
    }
    for (const r of rules) if (r.record) expect(exprs.some((e) => promqlMetricNames(e).includes(r.record ?? ''))).toBe(true);
  });

  const havePromtool = requireInCi(onPath('promtool'), "promtool (Debian's prometheus package, scripts/install-deps.sh)");

  (havePromtool ? test : test.skip)('promtool check rules / check config accept the files', () => {
    const rulesCheck = promtool('check', 'rules', RULES);
    expect(rulesCheck.output).toContain(`SUCCESS: ${rules.length} rules found`);
    expect(rulesCheck.status).toBe(0);
    const configCheck = promtool('check', 'config', 'prometheus.yml');
    expect(configCheck.output).toContain('is valid prometheus config file syntax');
    expect(configCheck.status).toBe(0);
  });

  (havePromtool ? test : test.skip)('promtool test rules passes', () => {
    const run = promtool('test', 'rules', RULE_TESTS);
    expect(run.output).toContain('SUCCESS');
    expect(run.output).not.toContain('FAILED');
    expect(run.status).toBe(0);
  });
});
