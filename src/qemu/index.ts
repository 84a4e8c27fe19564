export * from './constants';
export * from './errors';
export * from './records';
export { StreamParser, type Framing, type ParserOptions } from './parser';
export { StreamWriter } from './writer';
export { streamOrigin, describeOrigin, type StreamOrigin } from './origin';
