import { parseSwitchoverTrace } from '../src/lab/vm/switchover-trace';

// Lines as QEMU's log trace backend writes them: 10.0's migrate_transferred has a switchover_bw field that
// 7.2's lacks; either may come with a "PID@SECONDS:" prefix.
const QEMU_10 = [
  'migrate_transferred transferred 15157018 time_spent 140 bandwidth 108264 switchover_bw 0 max_size 54132207',
  'migrate_transferred transferred 28904100 time_spent 111 bandwidth 260397 switchover_bw 0 max_size 130198648',
  'migrate_transferred transferred 38371172 time_spent 103 bandwidth 372535 switchover_bw 0 max_size 186267825',
  'migration_thread_low_pending 162590720',
].join('\n');
const QEMU_72 = [
  'qemu-system-x86_64: warning: some unrelated warning',
  '1234@1796563722.465123:migrate_transferred transferred 9000000 time_spent 100 bandwidth 90000 max_size 45000000',
  '1234@1796563722.565123:migration_thread_low_pending 40960000',
].join('\n');

describe('parseSwitchoverTrace', () => {
  test('reads the rate windows and what was left at the switchover from QEMU 10.0 lines', () => {
    expect(parseSwitchoverTrace(QEMU_10)).toEqual({
      windows: [
        { bytes: 15157018, ms: 140 },
        { bytes: 28904100, ms: 111 },
        { bytes: 38371172, ms: 103 },
      ],
      pendingAtSwitchover: 162590720,
    });
  });

  test("reads QEMU 7.2's lines, prefixed or not, among other stderr", () => {
    expect(parseSwitchoverTrace(QEMU_72)).toEqual({ windows: [{ bytes: 9000000, ms: 100 }], pendingAtSwitchover: 40960000 });
  });

  test('keeps only the last migration of a VM that migrated out twice', () => {
    expect(parseSwitchoverTrace(`${QEMU_72}\n${QEMU_10}`)).toEqual(parseSwitchoverTrace(QEMU_10));
  });

  test('a migration still in its windows has no switchover yet; nothing traced has no windows', () => {
    expect(parseSwitchoverTrace(QEMU_10.split('\n').slice(0, 2).join('\n'))).toEqual({
      windows: [
        { bytes: 15157018, ms: 140 },
        { bytes: 28904100, ms: 111 },
      ],
      pendingAtSwitchover: null,
    });
    expect(parseSwitchoverTrace('qemu-system-x86_64: -trace migrate_transferred: warning\n')).toEqual({ windows: [], pendingAtSwitchover: null });
  });
});
