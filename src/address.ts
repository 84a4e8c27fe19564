/**
 * Moved to src/gateway/address.ts. Kept only for src/restore.ts, which is being changed elsewhere at the
 * same time; once it imports './gateway/address', delete this file. Nothing else may import it.
 */
export { type Endpoint, formatEndpoint, parseEndpoint } from './gateway/address';
