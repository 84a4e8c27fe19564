/**
 * Runs `fn` once `ms` have passed and the event loop has then read what its sockets had received.
 *
 * Node runs expired timers before it polls its sockets. When the loop was held up for longer than `ms`
 * (a synchronous store read, a garbage collection, other sessions' work), a plain timer fires before
 * the bytes that arrived meanwhile are read, and acts on an older picture than the sockets hold: a
 * multifd channel gave up waiting for the main channel's marker that had been in the socket for most
 * of the wait, and a quarter of a back leg's pages crossed whole. An immediate runs after the poll, so
 * a timer that hands over to one sees them.
 */
export function afterTimeAndReads(ms: number, fn: () => void): void {
  setTimeout(() => setImmediate(fn).unref(), ms).unref();
}
