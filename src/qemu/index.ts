/**
 * The codec's public face. Compiled to CommonJS, every name re-exported here is a getter on this
 * module: code on the data path (src/proxy) imports from the defining modules instead, where an enum
 * member is a plain property load rather than a getter call per access.
 */
export * from './constants';
export * from './errors';
export * from './records';
export { StreamParser, type Framing, type ParserOptions } from './parser';
export { StreamWriter } from './writer';
export { streamOrigin, describeOrigin, type StreamOrigin } from './origin';
export { ReturnPathParser, ReturnPathError, ReturnPathErrorCode, ReturnPathMessage, RETURN_PATH_MAX_BODY, type ReturnPathRecord, type ReturnPathSink } from './return-path';
