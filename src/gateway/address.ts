/** A TCP endpoint written HOST:PORT, with IPv6 hosts in brackets: [::1]:7300. */
export interface Endpoint {
  host: string;
  port: number;
}

export function parseEndpoint(text: string): Endpoint {
  const match = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]\s]+)):(\d{1,5})$/.exec(text.trim());
  if (!match) throw new Error(`"${text}" is not HOST:PORT`);
  const port = Number(match[3]);
  if (port > 65535) throw new Error(`port ${port} in "${text}" is out of range`);
  return { host: match[1] ?? match[2], port };
}

export function formatEndpoint(e: Endpoint): string {
  return e.host.includes(':') ? `[${e.host}]:${e.port}` : `${e.host}:${e.port}`;
}
