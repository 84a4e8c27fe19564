/** The YAML of a gateway whose every address is on loopback: for the demo, benchmarks and tests. */
export function loopbackSiteYaml(site: { name: string; data: string; peerPort: number; vm: string; routePort: number; farPeerPort: number; targetPort: number }): string {
  return [
    `name: ${site.name}`,
    `data: ${site.data}`,
    `peerListen: 127.0.0.1:${site.peerPort}`,
    'routes:',
    `  - vm: ${site.vm}`,
    `    listen: 127.0.0.1:${site.routePort}`,
    `    peer: 127.0.0.1:${site.farPeerPort}`,
    `    target: 127.0.0.1:${site.targetPort}`,
    '',
  ].join('\n');
}
