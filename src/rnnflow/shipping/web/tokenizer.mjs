// The tokenizer.json files rnnflow writes, read in JavaScript: ids equal to Python's
// `tokenizers` for exactly these configurations (src/rnnflow/data/text.py), and no other.
//   model          WordLevel with an unknown token
//   normalizer     Sequence of NFC, then Lowercase when tokenize.lowercase is on
//   pre_tokenizer  char level: Split on Regex "." (Isolated); word level: Whitespace
//   added tokens   <pad> and <unk> (and <s>, </s>), matched in the raw text before normalizing
//   post_processor none, or TemplateProcessing "<s> $A </s>" (tokenize.marks)
// Hugging Face's tokenizers.js (@huggingface/tokenizers 0.2) has no WordLevel model and
// splits non-ASCII words differently, so it does not fit; anything else is refused by name.
// Truncation is Python's: the text is cut to max_len * CHARS_PER_TOKEN code points first,
// then the ids, marks included, to max_len.

const CHARS_PER_TOKEN = { char: 2, word: 64 };
// Oniguruma's Unicode \w (Alphabetic, Mark, Decimal_Number, Connector_Punctuation,
// Join_Control) and \s (White_Space), as the Rust crate compiles its "\w+|[^\w\s]+".
// Equal for every code point assigned in Unicode 14; ones assigned later are letters to the
// browser and punctuation to the Rust crate's older tables.
const W = "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\p{Join_Control}";
const S = "\\p{White_Space}\\t\\n\\v\\f\\r\\u0085";
const WORDS = new RegExp(`[${W}]+|[^${W}${S}]+`, "gu");
const CHARS = /[^\n]|\n+/gu; // "." isolated: each char but \n; a run of \n stays one piece

export class BundleTokenizer {
  constructor(json, maxLen, source = "tokenizer.json") {
    const fail = (what) => {
      throw new Error(`${source}: not a tokenizer rnnflow writes (${what})`);
    };
    if (json.model?.type !== "WordLevel") fail(`model ${json.model?.type}`);
    const steps = json.normalizer?.type === "Sequence" ? json.normalizer.normalizers : [];
    const names = steps.map((s) => s.type).join(",");
    if (names !== "NFC" && names !== "NFC,Lowercase") fail(`normalizer ${names || "none"}`);
    this.lowercase = names === "NFC,Lowercase";
    const pre = json.pre_tokenizer ?? {};
    if (pre.type === "Split" && pre.pattern?.Regex === "." && pre.behavior === "Isolated" && !pre.invert) {
      this.level = "char";
    } else if (pre.type === "Whitespace") {
      this.level = "word";
    } else {
      fail(`pre_tokenizer ${pre.type}`);
    }
    if (!Number.isInteger(maxLen) || maxLen < 1) fail(`max_len ${maxLen}`);
    this.maxLen = maxLen;
    this.vocab = new Map(Object.entries(json.model.vocab));
    this.unk = this.vocab.get(json.model.unk_token);
    if (this.unk === undefined) fail("no unknown token");
    this.added = new Map((json.added_tokens ?? []).map((t) => [t.content, t.id]));
    this.marks = null; // [id of <s>, id of </s>] when every text is wrapped in them
    const post = json.post_processor;
    if (post != null) {
      const single = (post.single ?? []).map((p) => p.SpecialToken?.id ?? `$${p.Sequence?.id}`);
      const [start, end] = ["<s>", "</s>"].map((m) => post.special_tokens?.[m]?.ids ?? []);
      if (post.type !== "TemplateProcessing" || single.join(" ") !== "<s> $A </s>" || start.length !== 1 || end.length !== 1) {
        fail(`post_processor ${post.type} ${single.join(" ")}`);
      }
      this.marks = [start[0], end[0]];
    }
  }

  /** Token ids of one text, as Python's `encode(tok, [text], max_len)[0]`. */
  encode(text) {
    const limit = this.maxLen * CHARS_PER_TOKEN[this.level];
    const cut = Array.from(text).slice(0, limit).join("");
    const ids = this.marks ? [this.marks[0]] : [];
    for (const [piece, addedId] of this.#splitAdded(cut)) {
      if (addedId !== undefined) {
        ids.push(addedId);
        continue;
      }
      for (const token of this.#normalize(piece).match(this.level === "char" ? CHARS : WORDS) ?? []) {
        ids.push(this.vocab.get(token) ?? this.unk);
      }
    }
    if (this.marks) ids.push(this.marks[1]);
    return ids.slice(0, this.maxLen);
  }

  /** A text's own ids: `encode`'s without the marks (a cut text has lost its end mark). */
  ownIds(ids) {
    if (!this.marks) return ids;
    return ids.at(-1) === this.marks[1] ? ids.slice(1, -1) : ids.slice(1);
  }

  // [piece, id of an added token or undefined], leftmost-longest, as tokenizers' AddedVocabulary
  #splitAdded(text) {
    const out = [];
    let start = 0;
    let at = 0;
    while (at < text.length) {
      let hit = "";
      for (const content of this.added.keys()) {
        if (content.length > hit.length && text.startsWith(content, at)) hit = content;
      }
      if (hit) {
        if (at > start) out.push([text.slice(start, at), undefined]);
        out.push([hit, this.added.get(hit)]);
        at += hit.length;
        start = at;
      } else {
        at += 1;
      }
    }
    if (start < text.length) out.push([text.slice(start), undefined]);
    return out;
  }

  #normalize(text) {
    const nfc = text.normalize("NFC");
    // per code point, as Rust's char::to_lowercase (no final-sigma context)
    return this.lowercase ? Array.from(nfc, (c) => c.toLowerCase()).join("") : nfc;
  }
}
