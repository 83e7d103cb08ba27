r"""Text read the way it was meant: the one normalisation every model input goes through.

`Post.text()` calls `normalize_text` on the title and on the OCR text, and serving and training
both build model inputs through `Post.text()`, so a router sees the same characters for a post
whether it is being trained on it or scoring it. Evasions that a reader does not see but a
tokenizer does are undone here, in this order:

1. **Invisible and control characters.** Zero-width characters (U+200B, U+200C, U+2060, U+FEFF),
   the soft hyphen, bidi embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069),
   other invisible format characters (U+180E, U+2061-U+2064, U+206A-U+206F, U+FFF9-U+FFFB,
   U+034F, the tag characters U+E0001 and U+E0020-U+E007F that smuggle invisible ASCII, and the
   Hangul fillers U+3164, U+FFA0) are removed, so `fr\u200bee` reads `free`. Removing U+200C
   also drops the zero-width non-joiner of Persian and Indic spellings; the letters stay, and
   the joined spelling is a common informal one.
   Control characters (category Cc): `\n` and `\t` stay, as the separators they are (the
   newline between `Title:` and `OCR:` that `Post.text()` puts there, lines and columns of OCR
   text; every tokenizer reads them as whitespace anyway). Line-break controls become `\n`
   rather than vanish, so that they never glue two words together: `\r\n` and `\r`, `\v`,
   `\f`, U+001C-U+001E, U+0085, and also U+2028, U+2029 (the characters `str.splitlines`
   splits on); U+001F becomes a space. Every other control (NUL, ESC, DEL, C1 controls) is
   removed. Runs of whitespace are not collapsed: the tokenizers handle them, and plain text
   should reach the model unchanged.
2. **Unicode NFKC**: fullwidth `ｆｒｅｅ`, ligatures `ﬁ`, mathematical bold and italic letters
   `𝐟𝐫𝐞𝐞`, circled letters `ⓕ` and superscripts become their plain letters and digits. It runs
   first (it neither makes nor removes a character of step 1), and once more at the end when
   another step changed something, so that a zero-width character between a letter and its
   combining accent does not keep them apart and the result is NFKC.
3. **Joiners and variation selectors outside emoji.** The zero-width joiner U+200D and the
   variation selectors (U+FE00-U+FE0F, U+E0100-U+E01EF) are removed too, except where they make
   an emoji what it shows: a joiner between two emoji stays (`👨\u200d👩\u200d👧` is a family,
   not three people), and a selector after an emoji or a keycap base stays (`❤\ufe0f` keeps
   its U+FE0F). After a letter a selector changes nothing a reader sees (an ideographic
   variant of a Han character at most). Run after NFKC, which turns some emoji-like symbols
   (`🄰`, `™`) into letters.
4. **Small capitals** (`ꜰʀᴇᴇ`, the "fancy text" generators' font) and the IPA letters `ɑ`, `ɡ`
   become plain lowercase Latin letters everywhere: no written language uses them as letters,
   and NFKC leaves them alone (they have no compatibility decomposition).
5. **Look-alike letters of other scripts** (Cyrillic `а` U+0430 for Latin `a`, Greek `ο`,
   Armenian `օ`, ...) become the Latin letter they imitate, but only where they imitate one:

   - in a word that also holds a Latin letter (`frее`, `сruise` with Cyrillic `е`, `с`), where
     the mix of scripts is the attack, every look-alike in the word is folded;
   - in a text that holds Latin letters and no Cyrillic, Greek or Armenian letter outside the
     look-alike table, every look-alike is folded, which also catches a word spelled wholly in
     look-alikes (`рау`, all Cyrillic, in an English post);
   - anywhere else nothing is folded: a text with genuine Russian, Greek or Armenian words
     keeps them, and a text with no Latin letter at all (`сухо`, Russian "dry", wholly made of
     look-alike letters) is left as written.

   The decision is per text, i.e. per title and per OCR text. An attacker who adds a genuine
   Cyrillic word to the text turns the second rule off, not the first.

Why a table written here and not a library: the candidates on PyPI (`confusables` 1.2.0,
`confusable-homoglyphs` 3.3.1, `disarm`) are built on Unicode TR39's `confusables.txt`, whose
skeletons are made for comparing two strings, not for producing text a classifier reads: they
map `m` to `rn`, the digit `1` to `l`, Cyrillic `к` to Latin `ĸ` (kra) and capitals to
lowercase prototypes (Cyrillic `І` to Latin `l`), and they fold every character of every script,
genuine Russian included. `confusables.normalize` also walks the text character by character in
Python, returning every combination of readings; `confusable-homoglyphs` only detects; `disarm`
is a compiled extension. The table below is the part of TR39 we want, checked against its
single-letter Latin targets: letters of Cyrillic, Greek and Armenian that look the same as a
Latin letter in common fonts, each mapped to the Latin letter of the same case. Entries are
written as Unicode names, so a typo fails at import and the table reads without a font that
tells `а` from `a`.

Cost: precompiled regular expressions that scan the text in C and call back into Python only
per match (a removed character, a word that mixes scripts), never per character, and one
`str.translate` with a list (not a dict, whose misses cost a KeyError per character) where a
whole text is folded. Plain ASCII text (the common case) costs one `isascii` and one
`bytes.translate` to find control characters, and comes back unchanged: routers trained before
this module see the same input for it. Other text costs NFKC and one scan unless it has
something to undo. Nothing is truncated here; length caps live in the backbones.
"""

import re
import unicodedata
from collections.abc import Iterable

__all__ = ["normalize_text"]


def _char_class(codes: Iterable[int]) -> str:
    """A regex character class body (`a-cx`) matching exactly the given code points."""
    ranges: list[tuple[int, int]] = []
    for code in sorted(set(codes)):
        if ranges and code == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], code)
        else:
            ranges.append((code, code))
    return "".join(
        re.escape(chr(low)) if low == high else f"{re.escape(chr(low))}-{re.escape(chr(high))}"
        for low, high in ranges
    )


def _any_of(characters: Iterable[str]) -> re.Pattern[str]:
    """A pattern matching any one of `characters` (a plain class: the fastest scan `re` has)."""
    return re.compile(f"[{_char_class(map(ord, characters))}]")


# --- step 1: invisible and control characters ----------------------------------------------

_REMOVED = (
    "\u00ad"  # soft hyphen
    "\u034f"  # combining grapheme joiner
    "\u180e"  # Mongolian vowel separator
    "\u200b\u200c"  # zero-width space, zero-width non-joiner
    "\u202a\u202b\u202c\u202d\u202e"  # bidi embeddings and overrides
    "\u2060\u2061\u2062\u2063\u2064"  # word joiner, invisible operators
    "\u2066\u2067\u2068\u2069"  # bidi isolates
    "\u206a\u206b\u206c\u206d\u206e\u206f"  # deprecated format characters
    "\u115f\u1160\u3164\uffa0"  # Hangul fillers (NFKC maps the last two to U+1160)
    "\ufeff"  # zero-width no-break space (byte order mark)
    "\ufff9\ufffa\ufffb"  # interlinear annotation
    "\U000e0001"  # language tag
    + "".join(map(chr, range(0xE0020, 0xE0080)))  # tag space .. cancel tag
)
_LINE_BREAKS = "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_KEPT_CONTROLS = "\n\t"
_CONTROLS = "".join(map(chr, [*range(0x00, 0x20), *range(0x7F, 0xA0)]))


def _strip_replacements() -> dict[str, str]:
    """Step 1: removals, line breaks to `\\n` (`\\r\\n` first to one), U+001F to a space."""
    table = dict.fromkeys(_REMOVED, "")
    table.update(dict.fromkeys((c for c in _CONTROLS if c not in _KEPT_CONTROLS), ""))
    table.update(dict.fromkeys(_LINE_BREAKS, "\n"))
    table["\x1f"] = " "
    return table


_STRIP = _strip_replacements()

# --- step 3: joiners and variation selectors outside emoji ---------------------------------

_VARIATION_SELECTORS = "\ufe00-\ufe0f\U000e0100-\U000e01ef"
# Characters an emoji sequence is built of, roughly: arrows, technical and miscellaneous
# symbols, dingbats (U+2190-U+2BFF) and the emoji planes (U+1F000-U+1FAFF, skin tones included).
_EMOJI_CHARACTERS = frozenset(
    chr(code) for block in (range(0x2190, 0x2C00), range(0x1F000, 0x1FB00)) for code in block
)
# What a variation selector may follow: an emoji, one of the few older symbols with an emoji
# presentation that NFKC leaves alone (©, ®, 〰, 〽), or a keycap base (1 U+FE0F U+20E3).
_SELECTOR_BASES = _EMOJI_CHARACTERS | frozenset("\u00a9\u00ae\u3030\u303d0123456789#*")


def _outside_emoji(text: str, at: int, character: str) -> str:
    """The joiner or variation selector at `text[at]` where an emoji needs it, else ''."""
    before = text[at - 1] if at else ""
    if character != "\u200d":
        return character if before in _SELECTOR_BASES else ""
    if before == "\ufe0f":  # an emoji with its presentation selector, then the joiner
        before = text[at - 2] if at >= 2 else ""
    after = text[at + 1 : at + 2]
    return character if before in _EMOJI_CHARACTERS and after in _EMOJI_CHARACTERS else ""


# --- step 4: small capitals and IPA letters, folded everywhere -----------------------------

_SMALL_CAPITALS = "ABCDEFGHIJKLMNOPQRSTUVWYZ"  # Unicode 14 has no small capital X
_LATIN_ONLY = {
    **{
        unicodedata.lookup(f"LATIN LETTER SMALL CAPITAL {letter}"): letter.lower()
        for letter in _SMALL_CAPITALS
    },
    unicodedata.lookup("LATIN SMALL LETTER ALPHA"): "a",
    unicodedata.lookup("LATIN SMALL LETTER SCRIPT G"): "g",
}

# --- step 5: look-alike letters of other scripts --------------------------------------------

# Unicode name -> the Latin letter it looks like, same case.
_LOOKALIKES: dict[str, str] = {
    # Cyrillic, lowercase
    "CYRILLIC SMALL LETTER A": "a",
    "CYRILLIC SMALL LETTER KOMI DE": "d",
    "CYRILLIC SMALL LETTER IE": "e",
    "CYRILLIC SMALL LETTER IO": "\u00eb",  # ё -> ë
    "CYRILLIC SMALL LETTER SHHA": "h",
    "CYRILLIC SMALL LETTER BYELORUSSIAN-UKRAINIAN I": "i",
    "CYRILLIC SMALL LETTER YI": "\u00ef",  # ї -> ï
    "CYRILLIC SMALL LETTER JE": "j",
    "CYRILLIC SMALL LETTER PALOCHKA": "l",
    "CYRILLIC SMALL LETTER O": "o",
    "CYRILLIC SMALL LETTER ER": "p",
    "CYRILLIC SMALL LETTER QA": "q",
    "CYRILLIC SMALL LETTER DZE": "s",
    "CYRILLIC SMALL LETTER ES": "c",
    "CYRILLIC SMALL LETTER IZHITSA": "v",
    "CYRILLIC SMALL LETTER WE": "w",
    "CYRILLIC SMALL LETTER OMEGA": "w",
    "CYRILLIC SMALL LETTER HA": "x",
    "CYRILLIC SMALL LETTER U": "y",
    "CYRILLIC SMALL LETTER STRAIGHT U": "y",
    # Cyrillic, uppercase
    "CYRILLIC CAPITAL LETTER A": "A",
    "CYRILLIC CAPITAL LETTER VE": "B",
    "CYRILLIC CAPITAL LETTER ES": "C",
    "CYRILLIC CAPITAL LETTER IE": "E",
    "CYRILLIC CAPITAL LETTER IO": "\u00cb",  # Ё -> Ë
    "CYRILLIC CAPITAL LETTER EN": "H",
    "CYRILLIC CAPITAL LETTER BYELORUSSIAN-UKRAINIAN I": "I",
    "CYRILLIC CAPITAL LETTER YI": "\u00cf",  # Ї -> Ï
    "CYRILLIC LETTER PALOCHKA": "I",
    "CYRILLIC CAPITAL LETTER JE": "J",
    "CYRILLIC CAPITAL LETTER KA": "K",
    "CYRILLIC CAPITAL LETTER EM": "M",
    "CYRILLIC CAPITAL LETTER O": "O",
    "CYRILLIC CAPITAL LETTER ER": "P",
    "CYRILLIC CAPITAL LETTER QA": "Q",
    "CYRILLIC CAPITAL LETTER DZE": "S",
    "CYRILLIC CAPITAL LETTER TE": "T",
    "CYRILLIC CAPITAL LETTER IZHITSA": "V",
    "CYRILLIC CAPITAL LETTER WE": "W",
    "CYRILLIC CAPITAL LETTER HA": "X",
    "CYRILLIC CAPITAL LETTER U": "Y",
    "CYRILLIC CAPITAL LETTER STRAIGHT U": "Y",
    # Greek, lowercase
    "GREEK SMALL LETTER ALPHA": "a",
    "GREEK LUNATE SIGMA SYMBOL": "c",
    "GREEK SMALL LETTER IOTA": "i",
    "GREEK LETTER YOT": "j",
    "GREEK SMALL LETTER OMICRON": "o",
    "GREEK SMALL LETTER RHO": "p",
    "GREEK SMALL LETTER UPSILON": "u",
    "GREEK SMALL LETTER NU": "v",
    "GREEK SMALL LETTER GAMMA": "y",
    # Greek, uppercase
    "GREEK CAPITAL LETTER ALPHA": "A",
    "GREEK CAPITAL LETTER BETA": "B",
    "GREEK CAPITAL LUNATE SIGMA SYMBOL": "C",
    "GREEK CAPITAL LETTER EPSILON": "E",
    "GREEK CAPITAL LETTER ETA": "H",
    "GREEK CAPITAL LETTER IOTA": "I",
    "GREEK CAPITAL LETTER YOT": "J",
    "GREEK CAPITAL LETTER KAPPA": "K",
    "GREEK CAPITAL LETTER MU": "M",
    "GREEK CAPITAL LETTER NU": "N",
    "GREEK CAPITAL LETTER OMICRON": "O",
    "GREEK CAPITAL LETTER RHO": "P",
    "GREEK CAPITAL LETTER TAU": "T",
    "GREEK CAPITAL LETTER CHI": "X",
    "GREEK CAPITAL LETTER UPSILON": "Y",
    "GREEK CAPITAL LETTER ZETA": "Z",
    # Armenian
    "ARMENIAN SMALL LETTER CO": "g",
    "ARMENIAN SMALL LETTER HO": "h",
    "ARMENIAN SMALL LETTER VO": "n",
    "ARMENIAN SMALL LETTER OH": "o",
    "ARMENIAN SMALL LETTER ZA": "q",
    "ARMENIAN SMALL LETTER SEH": "u",
    "ARMENIAN CAPITAL LETTER OH": "O",
    "ARMENIAN CAPITAL LETTER TIWN": "S",
    "ARMENIAN CAPITAL LETTER SEH": "U",
}
_FOLD = {unicodedata.lookup(name): latin for name, latin in _LOOKALIKES.items()}

# Blocks whose letters outside the table are genuine text in that script.
_LOOKALIKE_SCRIPT_BLOCKS = (
    range(0x0370, 0x0400),  # Greek and Coptic
    range(0x0400, 0x0530),  # Cyrillic, Cyrillic Supplement
    range(0x0530, 0x0590),  # Armenian
    range(0x1C80, 0x1C90),  # Cyrillic Extended-C
    range(0x1F00, 0x2000),  # Greek Extended
    range(0x2DE0, 0x2E00),  # Cyrillic Extended-A
    range(0xA640, 0xA6A0),  # Cyrillic Extended-B
    range(0xFB13, 0xFB18),  # Armenian ligatures
)
_GENUINE = [
    chr(code)
    for block in _LOOKALIKE_SCRIPT_BLOCKS
    for code in block
    if unicodedata.category(chr(code)).startswith("L") and chr(code) not in _FOLD
]
_LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff"
_WORD = r"\w\u0300-\u036f"  # word characters and the common combining accents

_HAS_LOOKALIKE = _any_of(_FOLD)
_HAS_GENUINE = _any_of(_GENUINE)
_HAS_LATIN = re.compile(f"[{_LATIN}]")
# From the first Latin letter of a run to the end of its word, if a look-alike follows in it.
# The class comes first so that `re` skips to Latin letters in C; the look-behind then rejects
# a Latin letter that is not the first of its run.
_LATIN_THEN_LOOKALIKE = re.compile(
    f"[{_LATIN}](?<![{_LATIN}][{_LATIN}])[{_WORD}]*?[{_char_class(map(ord, _FOLD))}][{_WORD}]*"
)


# `str.translate` with a list: an index per code point, no dict lookup and no KeyError for
# the ASCII and Latin letters that make up most of the text; IndexError (a LookupError, which
# `translate` reads as "keep") only for characters past the Armenian block.
def _fold_list() -> list[int | str]:
    table: list[int | str] = list(range(max(map(ord, _FOLD)) + 1))
    for lookalike, latin in _FOLD.items():
        table[ord(lookalike)] = latin
    return table


_FOLD_LIST = _fold_list()


def _fold_run(match: re.Match[str]) -> str:
    return match.group().translate(_FOLD_LIST)


def _fold_lookalikes(text: str) -> str:
    """Step 5: look-alikes to Latin where they imitate Latin (see the module docstring)."""
    if not _HAS_LOOKALIKE.search(text) or not _HAS_LATIN.search(text):
        return text
    if not _HAS_GENUINE.search(text):
        return text.translate(_FOLD_LIST)
    # The words that hold a Latin letter and a look-alike: the look-alikes after the word's
    # Latin letters, then, on the reversed text, those before them.
    text = _LATIN_THEN_LOOKALIKE.sub(_fold_run, text)
    return _LATIN_THEN_LOOKALIKE.sub(_fold_run, text[::-1])[::-1]


# --- all steps -------------------------------------------------------------------------------

# Steps 1, 3 and 4 in one pass: a character in the table is replaced whatever surrounds it, a
# joiner or variation selector is judged by its neighbours in the text as it came.
_CONTEXT_FREE = {**_STRIP, **_LATIN_ONLY}
_ONE_PASS = re.compile(f"[{_char_class(map(ord, _CONTEXT_FREE))}\u200d{_VARIATION_SELECTORS}]")
# Anything steps 1, 3, 4 or 5 might change; text with none of it is done after NFKC. NFKC runs
# first: it maps no character into or out of step 1's set (U+3164 and U+FFA0 become U+1160,
# removed as well), and it makes some of step 4's small capitals out of modifier letters.
_ANYTHING_TO_DO = re.compile(
    f"[{_char_class(map(ord, [*_CONTEXT_FREE, *_FOLD]))}\u200d{_VARIATION_SELECTORS}]"
)
_ASCII_CONTROLS = bytes(ord(c) for c in _CONTROLS[:0x20] + "\x7f" if c not in _KEPT_CONTROLS)


def _one_pass(match: re.Match[str]) -> str:
    character = match.group()
    replacement = _CONTEXT_FREE.get(character)
    if replacement is None:
        return _outside_emoji(match.string, match.start(), character)
    return replacement


def normalize_text(text: str) -> str:
    """`text` as a reader sees it: invisible and control characters out, NFKC, look-alikes folded.

    Idempotent, and the identity on plain ASCII text without control characters other than
    `\\n` and `\\t`. See the module docstring for each step and why.
    """
    if text.isascii():
        raw = text.encode("ascii")
        if len(raw.translate(None, _ASCII_CONTROLS)) == len(raw):
            return text
        return _ONE_PASS.sub(_one_pass, text.replace("\r\n", "\n"))
    text = unicodedata.normalize("NFKC", text)
    if not _ANYTHING_TO_DO.search(text):
        return text
    result = _fold_lookalikes(_ONE_PASS.sub(_one_pass, text.replace("\r\n", "\n")))
    # Removing a character or folding a letter can put a letter next to the combining accent
    # it composes with (e + U+200B + U+0301, Cyrillic е + U+0301 folded to Latin e): compose,
    # so that the result is NFKC and normalising it again changes nothing.
    return text if result == text else unicodedata.normalize("NFKC", result)
