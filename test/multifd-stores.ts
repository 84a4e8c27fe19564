import { MemoryPages } from '../src/lab/harness/fuzz';
import type { GuestMemory } from '../src/lab/harness/migration-stream';
import { layoutOf } from '../src/proxy/retained';

/** Both sides' stores of the guest's layout, in memory, holding nothing yet. */
export function stores(memory: GuestMemory): { sender: MemoryPages; receiver: MemoryPages } {
  const sender = new MemoryPages();
  const receiver = new MemoryPages();
  sender.begin(layoutOf(memory.blocks));
  receiver.begin(layoutOf(memory.blocks));
  return { sender, receiver };
}
