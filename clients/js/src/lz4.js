// LZ4 block decoder (raw blocks, no frame format), with an optional
// pre-shared dictionary: what LZ4_decompress_safe_usingDict does. Fanout's
// compressed bodies are raw blocks (docs/protocol.md, section 3), which the
// maintained npm lz4 packages either do not decode with a dictionary or
// decode through native/wasm code a browser bundle cannot carry cheaply.

/** A block that does not inflate cleanly. */
export class Lz4Error extends Error {
  constructor(message) {
    super(message);
    this.name = "Lz4Error";
  }
}

const EMPTY = new Uint8Array(0);

/**
 * Inflate one raw LZ4 block.
 *
 * @param {Uint8Array} src the block
 * @param {number} size the exact inflated size (the sender states it)
 * @param {Uint8Array} [dict] the dictionary the block was compressed with
 *   (a match may reach back into its tail)
 * @returns {Uint8Array} exactly `size` bytes
 * @throws {Lz4Error} corrupt block, or it does not inflate to `size`
 */
export function decodeBlock(src, size, dict = EMPTY) {
  const out = new Uint8Array(size);
  const srcEnd = src.length;
  const dictLen = dict.length;
  let ip = 0;
  let op = 0;
  if (srcEnd === 0) throw new Lz4Error("empty block");
  for (;;) {
    const token = src[ip++];
    // Literals.
    let litLen = token >>> 4;
    if (litLen === 15) {
      let b;
      do {
        if (ip >= srcEnd) throw new Lz4Error("truncated literal length");
        b = src[ip++];
        litLen += b;
      } while (b === 255);
    }
    if (litLen > 0) {
      if (ip + litLen > srcEnd) throw new Lz4Error("literals run past the block");
      if (op + litLen > size) throw new Lz4Error("literals run past the stated size");
      if (litLen < 16) {
        for (let i = 0; i < litLen; i++) out[op + i] = src[ip + i];
      } else {
        out.set(src.subarray(ip, ip + litLen), op);
      }
      ip += litLen;
      op += litLen;
    }
    // The last sequence has literals only.
    if (ip === srcEnd) break;
    if (ip + 2 > srcEnd) throw new Lz4Error("truncated match offset");
    const offset = src[ip] | (src[ip + 1] << 8);
    ip += 2;
    if (offset === 0) throw new Lz4Error("match offset 0");
    let matchLen = token & 15;
    if (matchLen === 15) {
      let b;
      do {
        if (ip >= srcEnd) throw new Lz4Error("truncated match length");
        b = src[ip++];
        matchLen += b;
      } while (b === 255);
    }
    matchLen += 4;
    if (op + matchLen > size) throw new Lz4Error("match runs past the stated size");
    let from = op - offset;
    if (from < 0) {
      // Into the dictionary: LZ4 offsets count back from its end.
      if (-from > dictLen) throw new Lz4Error("match offset before the start of the data");
      const dictPos = dictLen + from;
      const fromDict = Math.min(matchLen, -from);
      out.set(dict.subarray(dictPos, dictPos + fromDict), op);
      op += fromDict;
      matchLen -= fromDict;
      from = 0;
    }
    if (matchLen > 0) {
      if (offset >= matchLen) {
        out.copyWithin(op, from, from + matchLen);
        op += matchLen;
      } else {
        // Overlapping copy (a run): byte by byte, on purpose.
        for (let i = 0; i < matchLen; i++) out[op + i] = out[from + i];
        op += matchLen;
      }
    }
  }
  if (op !== size) throw new Lz4Error(`block inflates to ${op} bytes, not the stated ${size}`);
  return out;
}
