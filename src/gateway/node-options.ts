/**
 * Node flags recommended for a gateway process (NODE_OPTIONS). A gateway's garbage is almost all
 * socket read buffers that die young; V8's default young generation (semi-spaces of up to 16 MiB)
 * lets tens of MiB of them wait for collection. With 1 MiB semi-spaces they go sooner, at the same
 * throughput and CPU per GiB (peak RSS measured: docs/testing.md, the 1 GiB throughput run).
 * V8 reads the flag only at start-up, so it must be given to `node` (the Docker image sets it).
 */
export const RECOMMENDED_GATEWAY_NODE_OPTIONS = '--max-semi-space-size=1';
