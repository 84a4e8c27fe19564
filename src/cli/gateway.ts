import { checkTransportSecurity, ConfigError, loadConfig } from '../gateway/config';
import { Gateway } from '../gateway/gateway';
import { createLogger } from '../gateway/log';
import { RECOMMENDED_GATEWAY_NODE_OPTIONS } from '../gateway/node-options';
import { GatewayMetrics } from '../gateway/metrics';

/** `bfmig gateway --config FILE`: runs until SIGTERM/SIGINT, then drains and exits 0. */
export async function runGateway(configPath: string, level = process.env.BFMIG_LOG_LEVEL ?? 'info'): Promise<number> {
  const log = createLogger({ name: 'bfmig', level });
  let gateway: Gateway;
  try {
    const config = loadConfig(configPath);
    const { warn } = checkTransportSecurity(config);
    if (warn) log.warn(warn);
    const flag = RECOMMENDED_GATEWAY_NODE_OPTIONS.split('=')[0];
    if (![...process.execArgv, ...(process.env.NODE_OPTIONS ?? '').split(' ')].some((a) => a.startsWith(flag))) {
      log.info({ recommended: `NODE_OPTIONS=${RECOMMENDED_GATEWAY_NODE_OPTIONS}` }, 'node runs with its default young generation; the recommended option lowers peak memory');
    }
    gateway = new Gateway(config, log.child({ site: config.name }), new GatewayMetrics());
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`bfmig gateway: ${err.message}\n`);
      return 2;
    }
    throw err;
  }
  // The handlers go in before start(): a supervisor may signal as soon as it reads "gateway started".
  const stopped = new Promise<void>((resolve) => {
    const stop = (signal: string): void => {
      log.info({ signal }, 'stopping');
      gateway.stop().then(resolve, resolve);
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
  });
  await gateway.start();
  await stopped;
  return 0;
}
