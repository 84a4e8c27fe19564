/** One route of a loopback gateway: the source of `vm` connects to `routePort`, its destination listens on `targetPort` at the far site. */
export interface LoopbackRoute {
  vm: string;
  routePort: number;
  targetPort: number;
  /** routes[].siblings, when any. */
  siblings?: readonly string[];
}

/** The YAML of a gateway whose every address is on loopback: for the demo, benchmarks and tests. */
export function loopbackSiteYaml(site: { name: string; data: string; peerPort: number; vm: string; routePort: number; farPeerPort: number; targetPort: number }): string {
  return loopbackMultiRouteYaml({ ...site, routes: [{ vm: site.vm, routePort: site.routePort, targetPort: site.targetPort }] });
}

/** The YAML of a loopback gateway with one route per VM, all to the same far peer. */
export function loopbackMultiRouteYaml(site: { name: string; data: string; peerPort: number; farPeerPort: number; routes: readonly LoopbackRoute[] }): string {
  return [
    `name: ${site.name}`,
    `data: ${site.data}`,
    `peerListen: 127.0.0.1:${site.peerPort}`,
    'routes:',
    ...site.routes.flatMap((r) => [`  - vm: ${r.vm}`, `    listen: 127.0.0.1:${r.routePort}`, `    peer: 127.0.0.1:${site.farPeerPort}`, `    target: 127.0.0.1:${r.targetPort}`, ...(r.siblings?.length ? [`    siblings: [${r.siblings.join(', ')}]`] : [])]),
    // The destinations the far site's routes name: loopback QEMUs.
    'allowTargets:',
    '  - 127.0.0.0/8:*',
    '',
  ].join('\n');
}
