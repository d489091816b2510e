"""llama.cpp's BPE pre-tokenizers: the name a GGUF file carries (`tokenizer.ggml.pre`), what it means,
and which name a tokenizer.json's pre-tokenizer has.

llama.cpp (src/llama-vocab.cpp) maps each name to a list of regexes. It applies them in order, each
one cutting every piece from the previous step into its matches and the text between them (what
`tokenizers` calls a Split with behavior "isolated"), then maps bytes to GPT-2's byte alphabet and runs
BPE inside each piece. Some names also set `ignore_merges` (a piece that is itself a token is not
merged) and `clean_spaces` (detokenizer cleanup only). The regexes below are llama.cpp's, spelled as
llama.cpp spells them; `onig()` rewrites the few constructs whose meaning under llama.cpp's regex
engine differs from Oniguruma's (what `tokenizers` runs), so a rebuilt tokenizer splits as llama.cpp does:
- llama.cpp matches \\p{...} classes on a "collapsed" copy of the text (one byte per code point: ASCII
  as is, others as a byte per category), so \\p{Lu}, \\p{Ll}, \\p{Lt}, \\p{Lm}, \\p{Lo} all mean any
  letter, and \\p{S} lacks '~' (its ASCII list for symbols is $+<=>^`|);
- std::regex (ECMAScript): \\d is [0-9], and $ is the end of the piece only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from lmstack.checkpoint.gguf.errors import GGUFError
from lmstack.log import logger

# --------------------------------------------------------------------------------- llama.cpp's regexes
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
JAIS2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         + "".join(rf"|\s{{{n}}}(?!\S)" for n in (512, 256, 128, 64, 32, 16, 8, 4)) + r"|\s{1,2}(?!\S)|\s{1}")
SEED_CODER = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)"
              r"|\s+")
BAILINGMOE = (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+")
UFAKZEKA = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
MINICPM5 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
EXAONE_MOE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?"
              r"|\s*[\r\n]|\s+(?!\S)|\s+")
# Tekken (Mistral Nemo) and GPT-4o upper/lower-case words, as llama.cpp approximates them: a "capital"
# is a letter that is not a-z, a "small" letter one that is not A-Z (so a non-ASCII letter is both)
_CAP, _SMALL = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_CAP}*{_SMALL}+|[^\r\n\p{{L}}\p{{N}}]?{_CAP}+{_SMALL}*|\p{{N}}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_CAP}*{_SMALL}+{_CONTRACTIONS}?|[^\r\n\p{{L}}\p{{N}}]?{_CAP}+{_SMALL}*{_CONTRACTIONS}?"
         r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DEEPSEEK3_MAIN = (r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
                  r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DEEPSEEK_LLM_LETTERS = '\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+'
DEEPSEEK_LLM_PUNCT = '\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+'
CJK_HANGUL = '[一-龥ࠀ-一가-\ud7ff]+'
CJK_KANA = '[一-龥\u3040-ゟ゠-ヿ]+'
PORO = ' ?[^(\\s|.,!?…。，、।۔،)]+'

# the HF originals where llama.cpp spells the same split differently (tokenizer.json files carry these)
HF_GPT2 = GPT2 + r"|\s+"
HF_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
HF_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
             r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """What llama.cpp does for one `tokenizer.ggml.pre` name (BPE vocabularies)."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is itself a token becomes that token without merging
    clean_spaces: bool = True  # llama_detokenize's cleanup of " ." / " 's" (HF clean_up_tokenization_spaces)
    hf_regexes: tuple[str, ...] | None = None  # the tokenizer.json spelling, where it is not llama.cpp's
    exact: bool = True  # False: llama.cpp's regexes only approximate the HF original (see TEKKEN)


def _p(*regexes: str, **kw) -> PreTokenizer:
    return PreTokenizer(tuple(regexes), **kw)


_DEEPSEEK_LLM = ("[\r\n]", DEEPSEEK_LLM_LETTERS, DEEPSEEK_LLM_PUNCT, r"\s+$", CJK_HANGUL, r"\p{N}+")
_DEEPSEEK_CODER = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK_HANGUL, r"\p{N}")
_DEEPSEEK3 = (r"\p{N}{1,3}", CJK_KANA, DEEPSEEK3_MAIN)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
_FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]")
_DIGITS_GPT2 = (r"\p{N}", GPT2)

# Every name of llama.cpp's src/llama-vocab.cpp whose split lmstack reproduces, with its flags there
# (clean_spaces defaults to true for BPE). Names llama.cpp treats alike share a line.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _p(*_DEFAULT),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano"], _p(LLAMA3, ignore_merges=True)),
    **dict.fromkeys(["dbrx", "smaug-bpe"], _p(LLAMA3)),
    # llama.cpp's source groups glm4 with chatglm-bpe, but the llama.cpp that lmstack is tested against
    # (llama-cpp-python 0.3.36) ignores merges for glm4: its ids are the reference
    "glm4": _p(LLAMA3, ignore_merges=True),
    "chatglm-bpe": _p(LLAMA3),
    "jais-2": _p(JAIS2),
    "deepseek-llm": _p(*_DEEPSEEK_LLM, clean_spaces=False),
    "deepseek-coder": _p(*_DEEPSEEK_CODER, clean_spaces=False),
    **dict.fromkeys(["deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"], _p(*_DEEPSEEK3, clean_spaces=False)),
    "falcon": _p(*_FALCON),
    **dict.fromkeys(["gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "jina-es", "jina-de", "gigachat",
                     "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum", "modern-bert"], _p(GPT2, hf_regexes=(HF_GPT2,))),
    **dict.fromkeys(["trillion", "granite-docling"], _p(GPT2, hf_regexes=(HF_GPT2,), clean_spaces=False)),
    **dict.fromkeys(["starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"],
                    _p(*_DIGITS_GPT2, hf_regexes=(r"\p{N}", HF_GPT2))),
    **dict.fromkeys(["smollm", "command-r"], _p(*_DIGITS_GPT2, hf_regexes=(r"\p{N}", HF_GPT2), clean_spaces=False)),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open", "grok-2"],
                    _p(QWEN2, clean_spaces=False)),
    **dict.fromkeys(["stablelm2", "megrez"], _p(QWEN2)),
    "qwen35": _p(QWEN35, clean_spaces=False),
    "laguna": _p(r"[^\n]+|[\n]+", QWEN2, clean_spaces=False),
    **dict.fromkeys(["poro-chat"], _p(PORO, clean_spaces=False)),
    **dict.fromkeys(["bloom", "gpt3-finnish"], _p(PORO)),
    "viking": _p(PORO, r"\p{N}", clean_spaces=False),
    "tekken": _p(TEKKEN, ignore_merges=True, clean_spaces=False, hf_regexes=(HF_TEKKEN,), exact=False),
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _p(GPT4O, clean_spaces=False)),
    "seed-coder": _p(SEED_CODER, clean_spaces=False),
    **dict.fromkeys(["bailingmoe", "bailingmoe2", "llada-moe"], _p(BAILINGMOE, clean_spaces=False)),
    "ufakzeka": _p(UFAKZEKA, clean_spaces=False),
    "minicpm5": _p(r"\p{N}{1,3}", MINICPM5, ignore_merges=True),
    "exaone-moe": _p(EXAONE_MOE, clean_spaces=False),
}

# The name export writes for a split, first match wins: the one llama.cpp's converter gives the family
# that ships it (SmolLM: Digits + ByteLevel, "smollm"; StarCoder the same with clean-up spaces).
EXPORT_ORDER = ("gpt-2", "smollm", "starcoder", "llama-bpe", "smaug-bpe", "qwen2", "stablelm2", "deepseek-llm",
                "deepseek-coder", "deepseek-v3", "falcon", "tekken", "gpt-4o", "poro-chat", "bloom", "viking",
                "jais-2", "seed-coder", "bailingmoe", "ufakzeka", "minicpm5", "exaone-moe", "qwen35", "laguna",
                "default")


# ------------------------------------------------------------------------------------- GGUF -> HF
_ANY_LETTER = re.compile(r"\\p\{L[ultmo]\}")


def onig(regex: str) -> str:
    """llama.cpp's regex -> an Oniguruma regex (what `tokenizers` runs) that splits the same way."""
    if "\\p{" in regex:  # llama.cpp's collapsed-text matching (see the module docstring)
        regex = _ANY_LETTER.sub(r"\\p{L}", regex).replace(r"\p{S}", r"[\p{S}&&[^~]]")
    out, i, depth = [], 0, 0
    while i < len(regex):
        c = regex[i]
        if c == "\\" and i + 1 < len(regex):
            out.append("[0-9]" if regex[i + 1] == "d" else regex[i: i + 2])
            i += 2
            continue
        depth += (c == "[") - (c == "]" and depth > 0)
        out.append(r"\z" if c == "$" and depth == 0 else c)
        i += 1
    return "".join(out)


def spec_for(name: str | None, source: str) -> PreTokenizer:
    """The pre-tokenizer of a GGUF name; a missing name means llama.cpp's 'default' (it warns too)."""
    spec = PRE_TOKENIZERS.get(name or "default")
    if spec is None:
        raise GGUFError(f"{source}: pre-tokenizer {name!r} (tokenizer.ggml.pre) is not supported by lmstack; "
                        f"supported: {sorted(PRE_TOKENIZERS)}")
    return spec


def hf_pre_tokenizer(spec: PreTokenizer):
    """A `tokenizers` pre-tokenizer that splits text as llama.cpp does for `spec`, then byte-maps it."""
    from tokenizers import Regex, pre_tokenizers

    steps = [pre_tokenizers.Split(Regex(onig(r)), behavior="isolated", invert=False) for r in spec.regexes]
    return pre_tokenizers.Sequence(steps + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False,
                                                                      trim_offsets=False)])


# ------------------------------------------------------------------------------------- HF -> GGUF
def _canonical(regexes: tuple[str, ...]) -> tuple[str, ...]:
    """Spellings llama.cpp treats as one split -> one spelling (its custom GPT-2 / Llama-3 splitters
    accept both the HF and its own forms)."""
    return tuple(GPT2 if r == HF_GPT2 else r.replace(HF_CONTRACTIONS, _CONTRACTIONS) for r in regexes)


def _items(node: dict | None) -> list[dict]:
    node = node or {}
    key = "pretokenizers" if "pretokenizers" in node else "normalizers"
    return list(node.get(key, [])) if node.get("type") == "Sequence" else ([node] if node else [])


def split_regexes(tok_json: dict, source: str) -> tuple[str, ...]:
    """A byte-level tokenizer.json's pre-tokenizer as the list of regexes it splits with (isolating
    each match), the form llama.cpp's table has. GGUFError naming the step for anything else."""
    items = _items(tok_json.get("pre_tokenizer"))
    out: list[str] = []
    for i, it in enumerate(items):
        kind = it.get("type")
        last = i == len(items) - 1
        if kind == "Split" and not it.get("invert") and str(it.get("behavior", "")).lower() == "isolated" \
                and "Regex" in (it.get("pattern") or {}):
            out.append(it["pattern"]["Regex"])
        elif kind == "Digits":
            out.append(r"\p{N}" if it.get("individual_digits") else r"\p{N}+")
        elif kind == "ByteLevel" and last and not it.get("add_prefix_space"):
            if it.get("use_regex", True):
                out.append(HF_GPT2)
        else:
            raise GGUFError(f"{source}: pre-tokenizer step {i} ({json_brief(it)}) has no llama.cpp equivalent "
                            "(llama.cpp splits with regexes, isolating matches, then maps bytes); refusing to "
                            "write a GGUF file that llama.cpp would tokenize differently")
    if not items or items[-1].get("type") != "ByteLevel":
        raise GGUFError(f"{source}: a byte-level BPE tokenizer.json must end its pre-tokenizer with ByteLevel "
                        f"(got {[it.get('type') for it in items]})")
    return tuple(out)


def json_brief(node: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in node.items())[:200]


def llama_cpp_name(tok_json: dict, source: str, clean_spaces: bool, merges_reach_every_token) -> str:
    """The `tokenizer.ggml.pre` name under which llama.cpp tokenizes like this tokenizer.json.

    Names match on the split regexes and on `ignore_merges` (checked for effect: when merging already
    turns every vocabulary token into itself, the flag changes nothing); among equal ones the name whose
    clean_spaces matches the folder's clean_up_tokenization_spaces wins, then EXPORT_ORDER. Refuses
    (GGUFError naming the split) where llama.cpp has no name for it."""
    want = _canonical(split_regexes(tok_json, source))
    ignore = bool((tok_json.get("model") or {}).get("ignore_merges", False))
    same_split = [n for n in EXPORT_ORDER if want in (_canonical(PRE_TOKENIZERS[n].regexes),
                                                      _canonical(PRE_TOKENIZERS[n].hf_regexes or ()))]
    if not same_split:
        raise GGUFError(f"{source}: llama.cpp has no pre-tokenizer that splits with {list(want)}; refusing to write "
                        "a GGUF file it would tokenize differently")
    names = [n for n in same_split if PRE_TOKENIZERS[n].ignore_merges == ignore]
    if not names:
        if not merges_reach_every_token():
            raise GGUFError(f"{source}: llama.cpp's pre-tokenizers with this split ({same_split}) have "
                            f"ignore_merges={not ignore}, and this vocabulary has tokens that merging does not "
                            f"reach, so ignore_merges={ignore} changes its ids; no GGUF name fits")
        names = same_split
    name = next((n for n in names if PRE_TOKENIZERS[n].clean_spaces == clean_spaces), names[0])
    if not PRE_TOKENIZERS[name].exact:
        logger.warning("%s: llama.cpp's '%s' pre-tokenizer approximates this tokenizer.json's split (words of "
                       "mixed-case non-ASCII letters split differently)", source, name)
    return name
