/** Waiting in async tests for what another process (a server, a container) does in its own time. */

/** Polls `condition` until it holds; fails with `why()` after `timeoutMs`. */
export async function eventually(condition: () => Promise<boolean>, timeoutMs: number, why: () => string): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > until) throw new Error(why());
    await new Promise((r) => setTimeout(r, 200));
  }
}
