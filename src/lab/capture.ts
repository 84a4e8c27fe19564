import { createWriteStream, type WriteStream } from 'node:fs';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { type Endpoint, formatEndpoint } from '../gateway/address';

export interface CaptureOptions {
  listen: Endpoint;
  out: string;
  /** Relay to the real destination QEMU as well; its replies (the return path) go back to the source. */
  forward?: Endpoint;
}

export interface CaptureResult {
  bytes: number;
  /** Bytes the destination sent back to the source. */
  returnBytes: number;
  /** Why the capture ended early, if it did. */
  error: string | null;
}

/**
 * Accepts one migration on `listen`, writes every byte the source sends to `out` and, with
 * `forward`, relays the stream to the destination. The source is paused whenever the file or the
 * destination falls behind, so memory stays bounded.
 */
export class Capture {
  private readonly server: Server;
  readonly done: Promise<CaptureResult>;
  private resolveDone!: (r: CaptureResult) => void;

  constructor(private readonly options: CaptureOptions) {
    this.done = new Promise((resolve) => (this.resolveDone = resolve));
    this.server = createServer({ noDelay: true }, (socket) => this.accept(socket));
  }

  /** Starts listening; resolves with the bound endpoint (port 0 picks a free one). */
  listen(): Promise<Endpoint> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.options.listen.port, this.options.listen.host, () => {
        const address = this.server.address();
        if (address === null || typeof address === 'string') return reject(new Error('no TCP address'));
        resolve({ host: address.address, port: address.port });
      });
    });
  }

  close(): void {
    this.server.close();
  }

  private accept(source: Socket): void {
    this.server.close(); // one migration per capture
    const file = createWriteStream(this.options.out);
    let bytes = 0;
    let returnBytes = 0;
    let error: string | null = null;
    let finished = false;
    const finish = (): void => {
      if (finished) return;
      finished = true;
      file.end(() => this.resolveDone({ bytes, returnBytes, error }));
    };
    const destination = this.options.forward ? connect({ ...this.options.forward, noDelay: true }) : null;
    const sinks: (WriteStream | Socket)[] = destination ? [file, destination] : [file];
    let waiting = 0;
    for (const sink of sinks) {
      sink.on('drain', () => {
        if (--waiting === 0) source.resume();
      });
    }
    const fail = (message: string): void => {
      error ??= message;
      source.destroy();
      destination?.destroy();
      finish();
    };
    source.on('data', (chunk: Buffer) => {
      bytes += chunk.length;
      for (const sink of sinks) {
        if (!sink.write(chunk)) waiting++;
      }
      if (waiting > 0) source.pause();
    });
    source.on('end', () => {
      destination?.end();
      if (!destination) finish();
    });
    source.on('error', (e) => fail(`source: ${e.message}`));
    file.on('error', (e) => fail(`file ${this.options.out}: ${e.message}`));
    if (destination) {
      const where = formatEndpoint(this.options.forward as Endpoint);
      destination.on('error', (e) => fail(`destination ${where}: ${e.message}`));
      destination.on('data', (chunk: Buffer) => {
        returnBytes += chunk.length;
        if (!source.write(chunk)) destination.pause();
      });
      source.on('drain', () => destination.resume());
      destination.on('close', () => {
        source.end();
        finish();
      });
    }
  }
}
