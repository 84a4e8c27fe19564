/** The rebuilt stream cannot be trusted: the migration must fail rather than go on. */
export class RebuildError extends Error {
  override readonly name = 'RebuildError';
}
