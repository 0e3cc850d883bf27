// The run's tokenizer.json (a Hugging Face `tokenizers` file) in plain JavaScript: the two
// kinds micro-transformer trains, byte-level BPE (GPT-2's split regex, no prefix space) and
// character level (WordLevel over single characters, unknown -> U+FFFD). Special tokens'
// literal strings in the text are encoded as those tokens, as in Python; decoding skips them.
// Works in the browser and in node (an ES module with no imports).

// GPT-2's pre-tokenizer regex (the one `tokenizers`' ByteLevel uses with use_regex).
const GPT2_SPLIT =
  /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

// Byte -> printable character, GPT-2's byte-level alphabet (and its inverse).
function byteAlphabet() {
  const printable = [];
  for (let b = 33; b <= 126; b++) printable.push(b);
  for (let b = 161; b <= 172; b++) printable.push(b);
  for (let b = 174; b <= 255; b++) printable.push(b);
  const toChar = new Array(256);
  let extra = 0;
  for (let b = 0; b < 256; b++) {
    toChar[b] = printable.includes(b) ? String.fromCodePoint(b)
      : String.fromCodePoint(256 + extra++);
  }
  const toByte = new Map(toChar.map((c, b) => [c, b]));
  return { toChar, toByte };
}

export class Tokenizer {
  /** Build from the parsed JSON of a tokenizer.json. Throws on a kind it cannot reproduce. */
  constructor(spec) {
    const model = spec.model;
    this.kind = model.type === "BPE" ? "bpe" : model.type === "WordLevel" ? "char" : null;
    if (this.kind === null) throw new Error(`unsupported tokenizer model ${model.type}`);
    this.vocab = new Map(Object.entries(model.vocab));
    this.special = new Map(); // literal -> id (split out of the text before anything else)
    this.skip = new Set(); // ids decoding drops (special added tokens)
    for (const t of spec.added_tokens ?? []) {
      this.vocab.set(t.content, t.id);
      this.special.set(t.content, t.id);
      if (t.special) this.skip.add(t.id);
    }
    this.idToToken = new Map();
    for (const [tok, id] of this.vocab) this.idToToken.set(id, tok);
    this.specialsByLength = [...this.special.keys()].sort((a, b) => b.length - a.length);
    if (this.kind === "bpe") {
      const pre = spec.pre_tokenizer ?? {};
      if (pre.type !== "ByteLevel" || pre.add_prefix_space || pre.use_regex === false
          || spec.normalizer) {
        throw new Error("only byte-level BPE with GPT-2's split regex is supported");
      }
      this.ranks = new Map();
      (model.merges ?? []).forEach((m, i) => {
        const [a, b] = typeof m === "string" ? m.split(" ") : m;
        this.ranks.set(a + " " + b, i);
      });
      this.bytes = byteAlphabet();
      this.cache = new Map();
    } else {
      this.unkId = this.vocab.get(model.unk_token);
    }
    this.eosTokenId = this.vocab.get("<|endoftext|>");
  }

  /** Token ids of `text` (no special tokens added). */
  encode(text) {
    const ids = [];
    for (const [piece, specialId] of this.splitSpecial(text)) {
      if (specialId !== undefined) ids.push(specialId);
      else if (this.kind === "bpe") this.encodeBpe(piece, ids);
      else for (const ch of piece) ids.push(this.vocab.get(ch) ?? this.unkId);
    }
    return ids;
  }

  /** Text of `ids`, special tokens skipped (what `Tokenizer.decode` gives in Python). */
  decode(ids) {
    const tokens = ids.filter((id) => !this.skip.has(id)).map((id) => this.idToToken.get(id)
                                                                       ?? "");
    if (this.kind === "char") return tokens.join("");
    const bytes = [];
    for (const ch of tokens.join("")) {
      const b = this.bytes.toByte.get(ch);
      if (b !== undefined) bytes.push(b);
    }
    return new TextDecoder("utf-8").decode(new Uint8Array(bytes));
  }

  // [[piece, undefined] | ["", specialId]] in order: leftmost, then longest, special literal.
  *splitSpecial(text) {
    let start = 0;
    while (start < text.length) {
      let best = -1;
      let bestTok = null;
      for (const tok of this.specialsByLength) {
        const at = text.indexOf(tok, start);
        if (at !== -1 && (best === -1 || at < best)) {
          best = at;
          bestTok = tok;
        }
      }
      if (best === -1) {
        yield [text.slice(start), undefined];
        return;
      }
      if (best > start) yield [text.slice(start, best), undefined];
      yield ["", this.special.get(bestTok)];
      start = best + bestTok.length;
    }
  }

  encodeBpe(text, ids) {
    for (const match of text.matchAll(GPT2_SPLIT)) {
      const word = match[0];
      let wordIds = this.cache.get(word);
      if (wordIds === undefined) {
        wordIds = this.bpeWord(word);
        if (this.cache.size < 10000) this.cache.set(word, wordIds);
      }
      for (const id of wordIds) ids.push(id);
    }
  }

  // One pre-token: its UTF-8 bytes as alphabet characters, merged pair by pair, lowest rank
  // first (ties: leftmost), until no known merge is left.
  bpeWord(word) {
    let parts = [];
    for (const b of new TextEncoder().encode(word)) parts.push(this.bytes.toChar[b]);
    while (parts.length > 1) {
      let bestRank = Infinity;
      let bestAt = -1;
      for (let i = 0; i < parts.length - 1; i++) {
        const rank = this.ranks.get(parts[i] + " " + parts[i + 1]);
        if (rank !== undefined && rank < bestRank) {
          bestRank = rank;
          bestAt = i;
        }
      }
      if (bestAt === -1) break;
      const a = parts[bestAt];
      const b = parts[bestAt + 1];
      const merged = [];
      for (let i = 0; i < parts.length; i++) {
        if (i < parts.length - 1 && parts[i] === a && parts[i + 1] === b) {
          merged.push(a + b);
          i++;
        } else {
          merged.push(parts[i]);
        }
      }
      parts = merged;
    }
    return parts.map((p) => {
      const id = this.vocab.get(p);
      if (id === undefined) throw new Error(`token ${p} is not in the vocabulary`);
      return id;
    });
  }
}
