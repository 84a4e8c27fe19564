export { WanEmulator, resolveShape, type WanEmulatorOptions, type WanEmulatorStats, type DirectionStats, type ForwardMark } from './emulator';
export { TcpRelay, type TcpRelayOptions, type TcpRelayStats } from './relay';
