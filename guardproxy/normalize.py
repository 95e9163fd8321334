"""Input normalization before scoring: the evasion variants of a text must reach the model as the plain text.

``normalize(text)`` is applied by ``guardproxy.encoding`` to every text, in training and at runtime alike, so the
model never sees the difference between ``bomb``, ``ｂｏｍｂ``, ``b\u200bomb``, ``Вomb`` (Cyrillic В), ``b0mb`` and
the base64 of any of them. Each step is cheap (translate tables and linear regexes) because it runs on the request
path; the whole function is a fixpoint iteration so that ``normalize(normalize(x)) == normalize(x)``.

Steps, in order, repeated until nothing changes (at most ``_MAX_PASSES`` times):

0. A text that is one JSON object or array (``{"task": "instructions", "topic": "pipe bomb construction"}``) is read
   as its string values, one a line, in order: the model reads a request split into fields poorly among the quotes
   and braces (that ask 0.03, its values 0.97). One with no string value (``[1, 2, 3]``) stays as written.
1. Unicode tag characters (U+E0020..U+E007E, "ASCII smuggling") become the ASCII they encode, and a run of
   ``_MIN_SELECTOR_BYTES`` or more variation selectors ("emoji smuggling": VS1-VS16 the bytes 0-15, VS17-VS256
   16-255, hidden behind an emoji, or spread a few behind each of a row of emoji) becomes the text its bytes decode
   to as UTF-8 (NUL and bytes that are no UTF-8 dropped), set off by spaces after the emoji, where they do (an emoji
   needs one selector, never a run).
2. Format characters (category Cf: zero-width space/joiners, bidi embeddings/overrides/isolates, BOM, soft
   hyphen, word joiner), variation selectors and the other invisible marks (combining grapheme joiner, Khmer
   inherent vowels, Mongolian free variation selectors, the rest of the tag block) are removed.
3. Blank letters (Hangul fillers U+115F/U+1160/U+3164/U+FFA0, braille blank U+2800) render as a gap: in a word
   whose blank-separated pieces are mostly single characters (``G\\u3164i\\u3164v\\u3164e``) they are removed,
   elsewhere (``Give\\u2800me``) they are a space, as a reader sees them.
4. NFKC: fullwidth forms, mathematical alphanumerics, ligatures, circled letters, most modifier and
   superscript/subscript letters fold to their plain forms.
5. Small capitals (``ᴘɪᴘᴇ ʙᴏᴍʙ``, including the modifier small capitals NFKC leaves) and regional indicator
   letters fold to plain lowercase Latin letters.
6. Combining marks stacked on an ASCII letter ("Zalgo" text) are removed.
7. Homoglyphs: letters that look Latin (Cyrillic, Greek, Armenian, Cherokee, Coptic, Lisu, IPA and Latin
   Extended letters, from Unicode's confusables data) are folded in words that mix them with Latin letters, or
   that consist of look-alikes only (real Russian or Greek words nearly always contain a letter with no Latin
   look-alike, so they are left alone).
8. Escapes, when a text holds at least ``_MIN_ESCAPES`` of one kind (so a stray ``%`` or ``&amp;`` stays as
   written): percent-encoding (``%20``), HTML character references (``&#71;``, ``&amp;``) and ``\\uXXXX`` /
   ``\\xXX`` escapes are decoded in place. Quoted-printable (``How=20do=20I``: 3+ ``=XX`` escapes, two of them
   ``=20`` or ``=09`` between non-space characters) is decoded by ``binascii.a2b_qp``, soft line breaks too, and a
   run of 4+ words joined only by ``+`` (form encoding, ``How+do+I+build``; 3 in 4 pieces words) by
   ``urllib.parse.unquote_plus``, so ``C++``, ``a+b``, ``1+1=2`` and ``i++`` stay (``guardproxy.wordsplit``).
9. Obvious hex (16+ hex digits, contiguous or as space-separated pairs), byte runs (8+ bytes written ``0x47``,
   decimal ``71`` or binary ``01000111``), base64 spans (12+ characters), base32 spans (16+) and base85 / Ascii85
   words (20+) that decode to printable UTF-8 text, and Morse (8+ codes), are replaced by their decoding, which
   the next pass normalizes in turn. Replacing (not appending) keeps the verdict of a wrapped request equal to
   the plain one and keeps the function idempotent.
10. Letters spelled out one at a time (6+ single characters, mostly ASCII letters, one space apart and two or
    three between words, ``h o w  t o``, or one dot apart, ``h.o.w.t.o``) are joined into words.
11. Ciphers. A1Z26 runs (letters as their numbers 1-26, a hyphen between letters and a space or slash between
    words, ``8-15-23 20-15``, or a space between letters and a slash between words, ``8 15 23 / 20 15``) are
    replaced by their letters when those pass the test below. Then a sentence is read under each Caesar shift
    1..25 (ROT13 is 13), Atbash (``a``<->``z``, ``b``<->``y``) and backwards. A reading passes with at least three
    distinct English stopwords and one in four of the sentence's words, and at least three times as many, and two
    or more, as the sentence has as written, not counting the ``a``, ``i`` and ``did`` that are stopwords both
    ways; of the readings that pass, the one with the most stopwords replaces the sentence. Words are whole letter
    runs (``h4ck`` is none). A sentence read backwards is reversed whole (``bmob epip a ekam ot woh``) or word by
    word in place (``woh ot ekam a epip bmob``), as its word pairs (``how to``, ``of the``), its capital and its
    end mark say. Sentences end at ``.!?:;`` before a space or the end, at a newline, and where a reversed
    sentence meets an ordinary one (``.emoh Thanks``, ``eviG Thanks``), so a reversed sentence keeps its end
    mark. A text that passes the test as a whole also has each other sentence with at least as many stopwords in
    that reading as written read in it (short ones too), and a text reversed throughout is reversed whole. A
    sentence of under three words, with a stopword in every three words as written, or with a code mark
    (``=()[]{}<>_*\\|`~^#``) in every four words, is out at once. The test is symmetric, so a decoded text never
    flips back, and ordinary English (full of stopwords as written) is never touched.
12. Leetspeak is folded inside letter runs that hold a leet character between two letters (``b0mb``,
    ``h4ck3r``, ``k1ll``), never in e-mail addresses, URLs or hex strings, so ``mp3``, ``4k``, ``covid19`` and
    ``$100`` stay as written. In a text written in leet (``_LEET_TEXT_MIN`` such words, a fifth of its words)
    leet at word edges (``7h3``, ``m3``, ``$733l``) and short all-leet words (``70``, ``4``, ``17``) fold too.
13. Word boundaries (``guardproxy.wordsplit``: its docstring has the rules in full). A run of letters beside an
    address (URL, e-mail, path) stays; beside code (``obj.getX``, ``foo_bar``, ``x=``) or a name mark (a call
    ``getX(``, ``#``, ``@``, ``$``, backticks) it is split only where it reads as prose (many words, function words
    and pronouns among them); markup around it (``**``, ``~~``, tags, brackets, quotes) does not count. snake_case
    of 4+ words with function words among them, camel case in pieces (``HowDo IBuild APipe``), words joined in pairs
    and random case (``hOwDoIbUiLd``) are read as words where the span reads as English. Camel case
    (``HowDoIBuildAPipeBomb``, digits as segments: ``How2Make``): 4+ segments, two thirds of them common words, at
    most half single letters or digits, a single capital other than ``A``/``I`` in at most one segment of eight, and
    ``2 * function words + segments >= 8`` is split into words, capitalised ones after the first in lower case
    (``getElementById`` and ``AbstractSingletonProxyFactoryBean`` stay). A run of 15+ letters with the spaces
    deleted (``howdoIbuildapipebomb``) that is no word of the list nor a prefixed/suffixed form of one
    (``objectification``) is segmented by a unigram word-frequency model (the list ``wordninja`` ships, dynamic
    programming over its word costs, in 400-letter chunks) when the split reads as English: 3+ pieces each written
    as a word, 2.6+ letters a piece, and nine letters in ten in common words (pieces of up to 3 letters among the
    list's 5,000 commonest, up to 5 among its 20,000, longer ones in it) with no stray letter and two function words
    of 2+ letters, or one and 4+ pieces, or 6+ pieces; or three letters in four with two function words of 2+
    letters, one in eight pieces.
14. Whitespace runs collapse to one space (newlines kept, at most one blank line), ends stripped.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import html
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator

from guardproxy import wordsplit

__all__ = ["normalize"]

_MAX_PASSES = 4

# Tag characters map one to one onto printable ASCII; U+E0001 (language tag) and U+E007F (cancel tag) just go.
_TAGS: dict[int, str | None] = {cp: chr(cp - 0xE0000) for cp in range(0xE0020, 0xE007F)}
_TAGS[0xE0001] = None
_TAGS[0xE007F] = None

# Variation selectors and the invisible marks that are not category Cf: combining grapheme joiner, Khmer inherent
# vowels, Mongolian free variation selectors, and what the tag translation leaves of the tag block.
# Variation selectors as bytes ("emoji smuggling"): a run this long is data, never an emoji's presentation.
_MIN_SELECTOR_BYTES = 4
_SELECTORS = "\ufe00-\ufe0f\U000e0100-\U000e01ef"
# Runs spread over several carriers (a few bytes behind each of a row of emoji) are one payload: selectors, each run
# of them after one carrier character.
_SELECTOR_RUN = re.compile(f"[{_SELECTORS}]+(?:[^{_SELECTORS}\\s][{_SELECTORS}]+)*")
_SELECTOR = re.compile(f"[{_SELECTORS}]")
_INVISIBLE = re.compile("[\ufe00-\ufe0f\U000e0100-\U000e01ef\u034f\u17b4\u17b5\u180b-\u180f\U000e0000-\U000e007f]")

# Letters that render as an empty cell: Hangul choseong/jungseong fillers, Hangul filler and its halfwidth form
# (NFKC maps both to U+1160), braille pattern blank.
_BLANK = "\u115f\u1160\u3164\uffa0\u2800"
_BLANKS = re.compile(f"[{_BLANK}]+")
_BLANK_WORD = re.compile(f"[^\\s]*[{_BLANK}][^\\s]*")

# Upside-down text: the letters turned with the usual mapping (and the few turned capitals and marks that flip
# tools use), the whole text reversed. A span of words made only of what a turned text holds (turned letters,
# the ASCII letters that turn into ASCII ones: b, d, n, p, q, u swap, l, o, s, x, z stay; capitals, digits and
# punctuation) with ``_MIN_TURNED`` turned letters in ``_MIN_TURNED_SPAN`` letters is read turned and reversed.
# English always holds letters with no ASCII turned form (a, e, t, h...), so a phonetic transcription in a
# sentence (``[ɹʌn]``) never forms such a span.
_TURNED_LETTERS = "ɐɔǝɟƃɥᴉɾʞɯɹʇʌʍʎ∀Ɐ\u018e\u2132\u2141\u02e5\u0500\u1d1a\u22a5\u2229\u039b\u2144"
_TURNED = dict(zip(_TURNED_LETTERS + "qpunbd\u00bf\u00a1\u02d9", "acefghijkmrtvwyAAEFGLPRTUVYbdnuqp?!.", strict=True))
_TURNED_TABLE = str.maketrans(_TURNED)
_TURNED_LETTER = re.compile(f"[{_TURNED_LETTERS}]")
_TURNED_WORD = f"[{_TURNED_LETTERS}bdlnopqsuxzA-Z0-9\u00bf\u00a1\u02d9.,;:!?'\"-]+"
_TURNED_SPAN = re.compile(rf"(?<!\S){_TURNED_WORD}(?:[ \t]+{_TURNED_WORD})*(?!\S)")
_MIN_TURNED = 3
_MIN_TURNED_SPAN = 6

# Braille letters (Unicode Braille Patterns as the English grade-1 alphabet), with the capital sign (next letter
# upper case) and the number sign (a-j after it read as 1-9, 0). A run of braille cells is read only when every
# cell is one of those: braille art and other braille codes use the other patterns.
_BRAILLE_LETTERS = "⠁⠃⠉⠙⠑⠋⠛⠓⠊⠚⠅⠇⠍⠝⠕⠏⠟⠗⠎⠞⠥⠧⠺⠭⠽⠵"
_BRAILLE = dict(zip(_BRAILLE_LETTERS, "abcdefghijklmnopqrstuvwxyz", strict=True))
_BRAILLE_DIGITS = dict(zip(_BRAILLE_LETTERS[:10], "1234567890", strict=True))
_BRAILLE_CAPITAL = "⠠"
_BRAILLE_NUMBER = "⠼"
_BRAILLE_RUN = re.compile("[⠁-⣿]+")

# Small capitals (IPA, Phonetic Extensions, Latin Extended-D, and the modifier small capitals once NFKC has made
# them plain small capitals) and regional indicator letters; NFKC leaves all of them as they are. There is no
# small capital X: the evasion writes a plain x.
_SMALL_CAPITALS = dict(zip("ᴀʙᴄᴅᴇꜰɢʜɪꞮᴊᴋʟᴍɴᴏᴘꞯʀꜱᴛᴜᴠᴡʏᴢ", "abcdefghiijklmnopqrstuvwyz", strict=True))
_LETTER_FORMS = str.maketrans({**_SMALL_CAPITALS, **{chr(0x1F1E6 + i): chr(ord("a") + i) for i in range(26)}})
_LETTER_FORM = re.compile(f"[{''.join(_SMALL_CAPITALS)}\U0001f1e6-\U0001f1ff]")

# Combining diacritical marks (the main block and its supplements/extensions) right after an ASCII letter.
_ZALGO = re.compile("(?<=[A-Za-z])[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]+")

# Letters of other scripts that render like Latin ones in common fonts. Upper and lower case kept apart so a
# folded text reads exactly like the plain one (the model's tokenizer lowercases anyway).
_HOMOGLYPHS: dict[str, str] = {
    # Cyrillic
    "А": "A",
    "В": "B",
    "Е": "E",
    "К": "K",
    "М": "M",
    "Н": "H",
    "О": "O",
    "Р": "P",
    "С": "C",
    "Т": "T",
    "Х": "X",
    "У": "Y",
    "І": "I",
    "Ј": "J",
    "Ѕ": "S",
    "Ԛ": "Q",
    "Ԝ": "W",
    "а": "a",
    "е": "e",
    "о": "o",
    "р": "p",
    "с": "c",
    "у": "y",
    "х": "x",
    "і": "i",
    "ј": "j",
    "ѕ": "s",
    "һ": "h",
    "ԁ": "d",
    "ԛ": "q",
    "ԝ": "w",
    "ӏ": "l",
    "ү": "y",
    # Greek
    "Α": "A",
    "Β": "B",
    "Ε": "E",
    "Ζ": "Z",
    "Η": "H",
    "Ι": "I",
    "Κ": "K",
    "Μ": "M",
    "Ν": "N",
    "Ο": "O",
    "Ρ": "P",
    "Τ": "T",
    "Υ": "Y",
    "Χ": "X",
    "α": "a",
    "ι": "i",
    "κ": "k",
    "ν": "v",
    "ο": "o",
    "ρ": "p",
    "υ": "u",
    "ς": "c",  # final sigma: NFKC turns the lunate sigma (U+03F2) into it
    "ϳ": "j",
    # Armenian
    "օ": "o",
    "ս": "u",
    "հ": "h",
    "ո": "n",
}
# More look-alikes, from Unicode's confusables data (UTS #39 confusables.txt, read from the copy the
# confusable_homoglyphs package 3.3.1 ships; not a dependency, these rows are all we take): every letter it confuses
# with one ASCII letter that NFKC leaves, that has no canonical decomposition (an accented letter is the tokenizer's
# to strip) and that is no small capital (step 5 has those): in Latin's own extensions (IPA, Latin Extended-B/D/E),
# Cherokee, Coptic, Lisu and a few historic scripts, and the rare Greek and Cyrillic letters. Letters common in the
# words of a living script stay out: Cyrillic г, Greek γ, Armenian ա (a real word made of them only would change),
# and the Latin letters of living orthographies, Turkish ı, Ewe ɣ and ʋ, Kabiyè ɩ, Khoekhoe ǀ (mixed with ASCII
# letters in every word, so any would change).
_MORE_HOMOGLYPHS = [
    ("ƄƍƦƽɑɡᴑᶃᶌẝỿꞘꞙꞟꞲꞳꞴꬲꬵꬽꭇꭈꭎꭒꭚ", "bgRsagogyfyFfuJXBeforruuy"),  # Latin
    ("ϜϺѡѴѵҽӀԌꙇ", "FMwVvelGi"),  # Greek and Cyrillic
    ("ᎠᎡᎢᎥᎩᎪᎫᎬᎳᎷᎻᎽᏀᏂᏃᏏᏒᏔᏕᏙᏚᏞᏟᏢᏦᏧᏳᏴꭵꮁꮃꮓꮩꮪꮯ", "DRTiYAJEWMHYGhZbRWSVSLCPKdGBirwzvsc"),  # Cherokee
    ("ⲅⲎⲒⲔⲘⲚⲞⲟⲢⲣⲤⲥⲦⲨⲬⳐ", "rHlKMNOoPpCcTYXL"),  # Coptic
    ("ꓐꓑꓒꓓꓔꓖꓗꓙꓚꓜꓝꓟꓠꓡꓢꓣꓦꓧꓪꓫꓬꓮꓰꓲꓳꓴ", "BPdDTGKJCZFMNLSRVHWXYAElOU"),  # Lisu
    (
        "𐊂𐊆𐊇𐊊𐊐𐊒𐊕𐊖𐊗𐊠𐊡𐊢𐊥𐊫𐊰𐊱𐊲𐊴𐋏𐌁𐌂𐌉𐌑𐌕𐌗𐐄𐐕𐐛𐐠𐐬𐐽𐑈𐒴𐓂𐓎𐓪𐓶𐔓𐔖𐔘𐔜𐔝𐔥𐔦𐔧𑢠𑢢𑢣𑢤𑢦𑢩𑢮𑢲𑢵𑢸𑢼𑣀𑣁𑣂𑣃𑣄𑣈𑣗𑣘𑣜",
        "BEFlXOPSTABCFOMTYXHBClMTXOCLSocsROUouNOKCVFLXVFLYEZELOUTvsFizoouy",
    ),  # historic scripts (Lycian, Carian, Old Italic, Deseret, Osage, Elbasan, Warang Citi)
]
_HOMOGLYPHS.update({ch: latin for chars, latins in _MORE_HOMOGLYPHS for ch, latin in zip(chars, latins, strict=True)})
_HOMOGLYPH_TABLE = str.maketrans(_HOMOGLYPHS)
_LETTER_RUN = re.compile(r"[^\W\d_]+")
_ASCII_LETTER = re.compile("[A-Za-z]")

# Escapes count as an encoding only when a text holds this many of one kind.
_MIN_ESCAPES = 3
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_PERCENT_RUN = re.compile(r"(?:%[0-9A-Fa-f]{2})+")
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_ESCAPE = re.compile(r"\\(?:u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|x[0-9A-Fa-f]{2})")
_ESCAPE_RUN = re.compile(r"(?:\\(?:u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|x[0-9A-Fa-f]{2}))+")

# Hex: 8+ bytes, contiguous or as space-separated pairs (word boundaries checked on a match: a lookbehind at
# every position costs twice the scan).
_HEX_SPAN = re.compile(r"(?:0[xX])?[0-9A-Fa-f]{16,}")
_HEX_PAIRS = re.compile(r"[0-9A-Fa-f]{2}(?: [0-9A-Fa-f]{2}){7,}")

_B64_SPAN = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{10,}={0,2}(?![A-Za-z0-9+/=_-])")

# Byte runs, 8+ bytes: ``0x47 0x69``, decimal ``71 105`` and binary ``01000111 01101001`` (spaces or commas between).
_BYTE_SEP = r"(?:, ?| )"
_HEX_BYTES = re.compile(rf"0[xX][0-9A-Fa-f]{{1,2}}(?:{_BYTE_SEP}0[xX][0-9A-Fa-f]{{1,2}}){{7,}}")
_DECIMAL_BYTES = re.compile(rf"[0-9]{{1,3}}(?:{_BYTE_SEP}[0-9]{{1,3}}){{7,}}")
_BINARY_BYTES = re.compile(rf"[01]{{8}}(?:(?:{_BYTE_SEP})?[01]{{8}}){{7,}}")
_HEX_BYTE = re.compile("0[xX]([0-9A-Fa-f]{1,2})")
_BYTE_SEPS = re.compile("[ ,]+")

# Base32 (16+ characters of one case) and base85 / Ascii85 (a word of 20+ printable ASCII characters with at least
# one of the punctuation marks their alphabets add: a long word or a base64 run is neither).
_B32_SPAN = re.compile(r"[A-Za-z2-7]{16,}=*")
_B85_SPAN = re.compile(r"(?<!\S)[!-~]{20,}(?!\S)")
_B85_MARK = re.compile(r"[!-/:-@\[-`{|}~]")

# Morse: 8+ codes of dots and dashes, one space between letters, a slash, a bar or 2+ spaces between words.
_MORSE_CODES = {
    code: ch
    for ch, code in zip(
        "abcdefghijklmnopqrstuvwxyz0123456789.,?'!/()&:;=+-_\"@",
        ".- -... -.-. -.. . ..-. --. .... .. .--- -.- .-.. -- -. --- .--. --.- .-. ... - ..- ...- .-- -..- -.-- --.. "
        "----- .---- ..--- ...-- ....- ..... -.... --... ---.. ----. .-.-.- --..-- ..--.. .----. -.-.-- -..-. -.--. "
        "-.--.- .-... ---... -.-.-. -...- .-.-. -....- ..--.- .-..-. .--.-.".split(),
        strict=True,
    )
}
_MORSE_MARKS = str.maketrans("\u00b7\u2022\u2219_\u2212\u2013\u2014", "...----")
_MORSE_MARK = "[.\u00b7\u2022\u2219_\u2212\u2013\u2014-]"
_MORSE = re.compile(rf"(?<!{_MORSE_MARK}){_MORSE_MARK}{{1,7}}+(?:(?: {{1,3}}| ?[/|] ?){_MORSE_MARK}{{1,7}}+){{7,}}")
_MORSE_WORD_GAP = re.compile(r" ?[/|] ?| {2,}")

# Letters spelled out one at a time: 6+ single characters, three quarters of them ASCII letters, with one space
# between letters (2 or 3 between words: ``h o w  t o``) or one dot between letters (``h.o.w.t.o``).
_SPACED = re.compile(r"(?<!\S)\S(?: {1,3}\S(?!\S))+")
_DOTTED = re.compile(r"(?<![^\W_])[^\s.](?:\.[^\s.]){5,}(?![^\s.])")
_WORD_GAP = re.compile(" {2,}")
_MIN_SPELLED = 6
# Letters spelled out with a punctuation mark or symbol between them (``p-i-p-e``, ``b_o_m_b``, ``g/u/n``,
# ``k.i.l.l``): a whitespace-delimited token of single ASCII letters, one separator character repeated between
# them (two or more of it between words: ``h-o-w--t-o``), maybe the separator after the last letter, spelled
# punctuation (``h-o-m-e-?``) and quotes or brackets around it. Every piece between separators is one letter, so
# ``well-known``, ``e-mail`` and ``x-ray`` never match, and a run needs ``_MIN_SEPARATED`` letters, so ``e-g``,
# ``A/B``, ``i.e.`` and ``U.S.`` stay. Letters in alphabet order (``A,B,C``, ``x-y-z``) are a list, and up to
# ``_ABBREVIATION`` capitals between dots (``P.P.S``, ``J.R.R.``) an abbreviation, unless next to another spelled
# run (``P.I.P.E B.O.M.B``); in a text that spells two words or more with one separator, its two-letter words
# (``d-o``) join too.
_SEPARATOR = r"(?:[^\w\s\"'()\[\]{}<>`]|_)"
_SEPARATED = re.compile(
    rf"(?<!\S)([\"'(\[]?)([A-Za-z]({_SEPARATOR})\3*[A-Za-z](?:\3+[A-Za-z])*)\3?([.,!?;:]?[\"')\]]?[.,!?;:]?)(?!\S)"
)
_MIN_SEPARATED = 3
_ABBREVIATION = 4

# English function words: a sentence that has few as written but many in its ROT13 reading is ROT13.
_STOPWORDS = frozenset(
    "a about after all also an and any are as at be because been but by can could did do does for from had has"
    " have he her him his how i if in into is it its just me my no not now of on one only or our out she so some"
    " than that the their them then there these they this to up us was we were what when where which who why will"
    " with would you your".split()
)
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# Cheap ciphers, as readings of a text: reading k (0..24) shifts every letter k + 1 places on (Caesar; k = 12 is
# ROT13), _ATBASH mirrors the alphabet, _REVERSED reads the text backwards (whole, or each word in place).
_LOWER, _UPPER = "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ATBASH, _REVERSED = 25, 26
_CIPHER_TABLES = [
    str.maketrans(_LOWER + _UPPER, _LOWER[k:] + _LOWER[:k] + _UPPER[k:] + _UPPER[:k]) for k in range(1, 26)
] + [str.maketrans(_LOWER + _UPPER, _LOWER[::-1] + _UPPER[::-1])]
_ROT13 = 12


def _cipher_words() -> dict[str, tuple[int, ...]]:
    """Each written word that some reading turns into a stopword, with those readings."""
    words: dict[str, tuple[int, ...]] = {}
    for stopword in sorted(_STOPWORDS):
        # the written word that a reading decodes to the stopword: the inverse shift (Atbash is its own inverse)
        for reading in range(_REVERSED):
            written = stopword.translate(_CIPHER_TABLES[24 - reading if reading < _ATBASH else _ATBASH])
            words[written] = (*words.get(written, ()), reading)
        words[stopword[::-1]] = (*words.get(stopword[::-1], ()), _REVERSED)
    return words


_CIPHER_WORDS = _cipher_words()
_NEUTRAL = frozenset(w for w in _STOPWORDS if len(w) == 1 or w == w[::-1])
# Sentences end at a run of ``.!?:;`` before a space (or the end) and at a newline: a reversed sentence keeps its
# end mark (``.emoh ta``, ``?thguac``) inside it.
_SENTENCE_END = re.compile(r"[.!?:;]+(?!\S)|\n")
# Where a reversed sentence ends before an ordinary one: after its last word in place (``ta .emoh Thanks``), after
# its first word whole (``eviG Thanks``). The word is checked on a match (a lookbehind at every position costs).
_SEAM = re.compile(r"(?:[.!?]+[A-Za-z]+|[a-z][A-Z])(?=[^\S\n]+[A-Z])")
_END_MARK = re.compile(r"(?<!\S)[.!?]+[A-Za-z]")
_TOKEN = re.compile(r"\S+")
_ALNUM_RUN = re.compile(r"[^\W_]+")
_CODE_MARK = re.compile(r"[=(){}\[\]<>_*\\|`~^#]")
# A1Z26, letters as their numbers 1-26: a hyphen between letters and a space or slash between words
# (``8-15-23 20-15``, ``8-15-23/20-15``), or a space between letters and a slash between words (``8 15 23 / 20 15``).
# Word edges are checked on a match.
_A1Z26_NUMBER = "(?:2[0-6]|1[0-9]|0?[1-9])"
_A1Z26 = re.compile(
    rf"{_A1Z26_NUMBER}(?:-{_A1Z26_NUMBER})+(?:(?: ?/ ?| ){_A1Z26_NUMBER}(?:-{_A1Z26_NUMBER})*){{2,}}"
    rf"|{_A1Z26_NUMBER}(?: {_A1Z26_NUMBER})*(?: ?/ ?{_A1Z26_NUMBER}(?: {_A1Z26_NUMBER})*){{2,}}"
)
_A1Z26_WORD_GAP = re.compile(" ?/ ?| ")
_A1Z26_START = re.compile("[0-9](?:-| ?/ ?| )[0-9]")  # the cheap way out for most texts
_SLASH_GAP = re.compile(" ?/ ?")
# Word pairs common in English in this order, not the other: which way a reversed sentence reads, word by word or
# whole (``woh ot ekam`` or ``ekam ot woh``).
_ORDERED_PAIRS = frozenset(
    tuple(pair.split())
    for pair in (
        "how to,how do,how can,do i,do you,can i,can you,i am,i have,i want,i need,i will,want to,need to,have to,"
        "going to,to make,to get,to be,to do,to the,to a,tell me,give me,show me,help me,me how,me a,me to,of the,"
        "in the,on the,at the,for the,from the,with the,by the,into the,and the,is the,is a,it is,this is,that is,"
        "what is,there is,is there,you are,are you,will be,would be,could be,should i,has been,have been,one of,"
        "out of,such as,in a,for a,with a,of a,as a,and i,if i,if you,so that,at home,a lot,what are,why is,"
        "why do,where is,where can,when i,which is,who is,my own,your own,the best,the same,in my,of my,on my"
    ).split(",")
)

_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"})
_LEET_RUN = re.compile(r"[A-Za-z0-9@$]+")
_LEET_INSIDE = re.compile(r"[A-Za-z][013457@$]+[A-Za-z]")
_LEET_CHAR = re.compile("[013457@$]")
_LEET_TOUCH = re.compile(r"[A-Za-z][013457@$]|[013457@$][A-Za-z]")
# Letters with leet on both ends (``7h3``, ``0n70``): leet as strong as a leet character inside a word.
_LEET_ENDS = re.compile(r"(?<![A-Za-z0-9@$])[013457@$]+[A-Za-z]+[013457@$]+(?![A-Za-z0-9@$])")
_LEET_SHORT = re.compile(r"[\"'(]?[013457@$]{1,3}[.,:;!?\"')]*")
_LETTER = re.compile("[A-Za-z]")
_TRAILING = ".,:;!?\"')"
_LEET_TEXT_MIN = 3
# Hex numbers, hashes and colours (``0x1f3a``, ``d3adb33fcafe0123``, ``#ff00aa``) are not leet.
_HEX = re.compile(r"0[xX][0-9A-Fa-f]+|[0-9A-Fa-f]{8,}")
_HEX_COLOUR = re.compile(r"#(?:[0-9A-Fa-f]{3,4}|[0-9A-Fa-f]{6}|[0-9A-Fa-f]{8})")
_WORD = re.compile(r"\S+")
_ADDRESS = re.compile(r"://|^www\.|@[A-Za-z0-9-]+\.[A-Za-z]")

_SPACES = re.compile(r"[^\S\n]+")
_SPACE_AROUND_NEWLINE = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")


# A request normalises the same short texts several times (a turn for its pass and again for its windows' cut, a
# prompt for each output check of a stream, the recent turns of a window): the results of short ones are kept.
# ~0.15 ms a turn since the ciphers and word splitting (0.08 before); 1,024 of up to 2,000 characters hold 4 MB at
# most in ASCII (16 in the widest scripts), and far less for real turns.
_CACHED_CHARS = 2_000


def normalize(text: str) -> str:
    """Return the canonical form of ``text`` that the guard model scores. Never raises on any ``str``."""
    if len(text) <= _CACHED_CHARS:
        return _normalize_short(text)
    return _normalize(text)


@functools.lru_cache(maxsize=1024)
def _normalize_short(text: str) -> str:
    return _normalize(text)


def _normalize(text: str) -> str:
    for _ in range(_MAX_PASSES):
        result = _pass(text)
        if result == text:
            break
        text = result
    return text


def _read_selectors(m: re.Match[str]) -> str:
    """The text a run of variation selectors carries as bytes (VS1-VS16: 0-15, VS17-VS256: 16-255), with the carrier
    characters between its pieces kept and the text after them, set off by spaces; the carriers alone (as the
    selectors alone read) where there are under ``_MIN_SELECTOR_BYTES`` bytes or they are no UTF-8 text. NUL and
    bytes that are no UTF-8 are dropped (a red team's encoders put them in to break the decoding)."""
    span = m.group()
    carriers = _SELECTOR.sub("", span)
    codes = [ord(ch) for ch in span if _SELECTOR.fullmatch(ch)]
    if len(codes) < _MIN_SELECTOR_BYTES:
        return carriers
    data = bytes(c - 0xFE00 if c <= 0xFE0F else c - 0xE0100 + 16 for c in codes)
    text = data.decode("utf-8", errors="ignore").replace("\x00", "")
    readable = text.strip() and all(ch in "\n\r\t" or unicodedata.category(ch) not in ("Cc", "Cn", "Co") for ch in text)
    return f"{carriers} {text} " if readable else carriers


def _json_values(text: str) -> str:
    """Step 0: the string values of a text that is one JSON object or array, one a line; else ``text``."""
    stripped = text.strip()
    if stripped[:1] not in ("{", "[") or stripped[-1:] not in ("}", "]"):
        return text
    try:
        data = json.loads(stripped)
    except (ValueError, RecursionError):
        return text
    values: list[str] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if item.strip():
                values.append(item)
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))
    return "\n".join(values) if values and isinstance(data, dict | list) else text


def _pass(text: str) -> str:
    if text[:1] in ("{", "[") or text.lstrip()[:1] in ("{", "["):
        text = _json_values(text)
    if not text.isascii():
        text = text.translate(_TAGS)
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
        if _SELECTOR_RUN.search(text):
            text = _SELECTOR_RUN.sub(_read_selectors, text)
        text = _INVISIBLE.sub("", text)
        if _TURNED_LETTER.search(text):
            text = _TURNED_SPAN.sub(_unturn, text)
        if _BRAILLE_RUN.search(text):
            text = _BRAILLE_RUN.sub(_read_braille, text)
        if _BLANKS.search(text):
            text = _BLANK_WORD.sub(_unblank_word, text)
        text = unicodedata.normalize("NFKC", text)
        if _LETTER_FORM.search(text):
            text = text.translate(_LETTER_FORMS)
        text = _ZALGO.sub("", text)
        text = _LETTER_RUN.sub(_fold_homoglyphs, text)
    text = _decode_escapes(text)
    text = wordsplit.decode_quoted_printable(text)
    text = wordsplit.decode_plus_runs(text)
    text = _HEX_SPAN.sub(_decode_hex, text)
    text = _HEX_PAIRS.sub(_decode_hex, text)
    text = _HEX_BYTES.sub(_decode_hex_bytes, text)
    text = _BINARY_BYTES.sub(_decode_binary_bytes, text)
    text = _DECIMAL_BYTES.sub(_decode_decimal_bytes, text)
    text = _B64_SPAN.sub(_decode_base64, text)
    text = _B32_SPAN.sub(_decode_base32, text)
    text = _B85_SPAN.sub(_decode_base85, text)
    text = _MORSE.sub(_decode_morse, text)
    text = _SPACED.sub(_join_spaced, text)
    text = _join_separated(text)
    text = _DOTTED.sub(_join_dotted, text)
    text = _decode_ciphers(text)
    text = _fold_leet(text)
    text = wordsplit.split_words(text)
    text = _SPACES.sub(" ", text)
    text = _SPACE_AROUND_NEWLINE.sub("\n", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def _unblank_word(match: re.Match[str]) -> str:
    pieces = [p for p in _BLANKS.split(match.group(0)) if p]
    # Blanks between single letters spell a word out (``G\u3164i\u3164v\u3164e``); elsewhere they stand where
    # a space would, as a reader sees them.
    if 2 * sum(1 for p in pieces if len(p) == 1) > len(pieces):
        return "".join(pieces)
    return " ".join(pieces)


def _unturn(match: re.Match[str]) -> str:
    span = match.group(0)
    turned = len(_TURNED_LETTER.findall(span))
    if turned < _MIN_TURNED or sum(1 for ch in span if ch.isalpha()) < _MIN_TURNED_SPAN:
        return span
    return span.translate(_TURNED_TABLE)[::-1]


def _read_braille(match: re.Match[str]) -> str:
    run = match.group(0)
    out = []
    capital = number = False
    for cell in run:
        if cell == _BRAILLE_CAPITAL:
            capital = True
        elif cell == _BRAILLE_NUMBER:
            number = True
        elif number and cell in _BRAILLE_DIGITS:
            out.append(_BRAILLE_DIGITS[cell])
        elif cell in _BRAILLE:
            out.append(_BRAILLE[cell].upper() if capital else _BRAILLE[cell])
            capital = number = False
        else:  # a pattern that is no letter: braille art or another code, left as it is
            return run
    return "".join(out) if not (capital or number) or out else run


def _fold_homoglyphs(match: re.Match[str]) -> str:
    word = match.group(0)
    if word.isascii():
        return word
    folded = word.translate(_HOMOGLYPH_TABLE)
    if folded == word:
        return word
    # Mixed with Latin letters, or made of look-alikes only: an evasion, not a word of another script.
    if _ASCII_LETTER.search(word) or folded.isascii():
        return folded
    return word


def _decode_base64(match: re.Match[str]) -> str:
    span = match.group(0)
    body = span.rstrip("=")
    if len(span) < 12 or len(body) % 4 == 1:  # too short to be obvious; never valid base64
        return span
    padded = body + "=" * (-len(body) % 4)
    try:
        if "-" in body or "_" in body:
            raw = base64.urlsafe_b64decode(padded)
        else:
            raw = base64.b64decode(padded, validate=True)
        decoded = raw.decode("utf-8")
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return span
    return decoded if _looks_like_text(decoded) else span


def _decode_escapes(text: str) -> str:
    if "%" in text and len(_PERCENT.findall(text)) >= _MIN_ESCAPES:
        text = _PERCENT_RUN.sub(_decode_percent, text)
    if "&" in text and len(_ENTITY.findall(text)) >= _MIN_ESCAPES:
        text = _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
    if "\\" in text and len(_ESCAPE.findall(text)) >= _MIN_ESCAPES:
        text = _ESCAPE_RUN.sub(_decode_escape_run, text)
    return text


def _decode_percent(match: re.Match[str]) -> str:
    run = match.group(0)
    try:
        return bytes.fromhex(run.replace("%", "")).decode("utf-8")
    except UnicodeDecodeError:
        return run


def _decode_escape_run(match: re.Match[str]) -> str:
    run = match.group(0)
    try:
        if "\\u" not in run and "\\U" not in run:  # \xXX only: the bytes of UTF-8 text, as C and Python write it
            return bytes.fromhex(run.replace("\\x", "")).decode("utf-8")
        # \uXXXX are UTF-16 code units (JSON, JavaScript): join surrogate pairs, keep a lone surrogate escaped
        return codecs.decode(run, "unicode_escape").encode("utf-16-le", "surrogatepass").decode("utf-16-le")
    except UnicodeError:
        return run


def _at_word_edges(match: re.Match[str]) -> bool:
    """Whether a match stands alone: no letter or digit right before or after it."""
    text, start, end = match.string, match.start(), match.end()
    return not ((start and text[start - 1].isalnum()) or (end < len(text) and text[end].isalnum()))


def _decode_hex(match: re.Match[str]) -> str:
    span = match.group(0)
    if not _at_word_edges(match):
        return span
    digits = span.replace(" ", "")
    if digits[:2] in ("0x", "0X"):
        digits = digits[2:]
    try:
        decoded = bytes.fromhex(digits).decode("utf-8")
    except ValueError:  # UnicodeDecodeError is a ValueError
        return span
    return decoded if _looks_like_text(decoded) else span


def _decode_hex_bytes(match: re.Match[str]) -> str:
    return _decode_byte_values(match, [int(b, 16) for b in _HEX_BYTE.findall(match.group(0))])


def _decode_binary_bytes(match: re.Match[str]) -> str:
    bits = _BYTE_SEPS.sub("", match.group(0))
    return _decode_byte_values(match, [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)])


def _decode_decimal_bytes(match: re.Match[str]) -> str:
    return _decode_byte_values(match, [int(b) for b in _BYTE_SEPS.split(match.group(0))])


def _decode_byte_values(match: re.Match[str], values: list[int]) -> str:
    span = match.group(0)
    if not _at_word_edges(match) or max(values) > 255:
        return span
    try:
        decoded = bytes(values).decode("utf-8")
    except UnicodeDecodeError:
        return span
    return decoded if _looks_like_text(decoded) else span


def _decode_base32(match: re.Match[str]) -> str:
    span = match.group(0)
    body = span.rstrip("=")
    if not _at_word_edges(match) or not (body.isupper() or body.islower()) or len(body) % 8 in (1, 3, 6):
        return span
    try:
        decoded = base64.b32decode(body + "=" * (-len(body) % 8), casefold=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return span
    return decoded if _looks_like_text(decoded) else span


def _decode_base85(match: re.Match[str]) -> str:
    span = match.group(0)
    if not _B85_MARK.search(span):
        return span
    body = span[2:-2] if span.startswith("<~") and span.endswith("~>") else span  # Adobe's Ascii85 frame
    for decode in (base64.b85decode, base64.a85decode):
        try:
            decoded = decode(body).decode("utf-8")
        except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
            continue
        if _looks_like_text(decoded):
            return decoded
    return span


def _decode_morse(match: re.Match[str]) -> str:
    span = match.group(0)
    words = []
    for word in _MORSE_WORD_GAP.split(span.translate(_MORSE_MARKS)):
        codes = word.split()
        if not all(code in _MORSE_CODES for code in codes):
            return span
        words.append("".join(_MORSE_CODES[code] for code in codes))
    decoded = " ".join(words)
    # a row of dashes or dots reads as "tttt" or "eeee": Morse spells words, with more letters than that
    return decoded if len(set(decoded)) > 4 and _looks_like_text(decoded) else span


def _join_spaced(match: re.Match[str]) -> str:
    span = match.group(0)
    if not _spells_letters(span.replace(" ", "")):
        return span
    return " ".join(word.replace(" ", "") for word in _WORD_GAP.split(span))


def _join_separated(text: str) -> str:
    matches = list(_SEPARATED.finditer(text))
    if not matches:
        return text
    runs = [(m, _separated_letters(m)) for m in matches]
    # Runs next to each other (only whitespace between) spell words one after another.
    together = [
        (i and text[matches[i - 1].end() : m.start()].isspace())
        or (i + 1 < len(matches) and text[m.end() : matches[i + 1].start()].isspace())
        for i, m in enumerate(matches)
    ]
    word_runs = [
        letters >= _MIN_SEPARATED and not _is_letter_list(m) and (together[i] or not _is_abbreviation(m))
        for i, (m, letters) in enumerate(runs)
    ]
    # A text that spells two words or more with one separator spells its two-letter words with it too (``d-o``).
    counts = Counter(m.group(3) for (m, _), word in zip(runs, word_runs, strict=True) if word)
    spelling = {sep for sep, count in counts.items() if count >= 2}
    out, at = [], 0
    for i, ((m, letters), word) in enumerate(zip(runs, word_runs, strict=True)):
        if word or (
            letters == 2
            and m.group(3) in spelling
            and not _is_letter_list(m)
            and (together[i] or not _is_abbreviation(m))
        ):
            opening, body, sep, closing = m.groups()
            joined = " ".join(w.replace(sep, "") for w in re.split(f"{re.escape(sep)}{{2,}}", body))
            out += [text[at : m.start()], opening, joined, closing]
            at = m.end()
    return "".join(out) + text[at:] if out else text


def _separated_letters(match: re.Match[str]) -> int:
    body, sep = match.group(2), match.group(3)
    if sep * 2 in body and all(len(w) == 1 for w in re.split(f"{re.escape(sep)}{{2,}}", body)):
        return 0  # "a--b--c": no letters spelled out together
    return sum(1 for ch in body if ch != sep)


def _is_letter_list(match: re.Match[str]) -> bool:
    # letters in alphabet order: "A,B,C,D", "x/y/z", "a-b-c"
    letters = match.group(2).replace(match.group(3), "").lower()
    return all(ord(b) - ord(a) == 1 for a, b in zip(letters, letters[1:], strict=False))


def _is_abbreviation(match: re.Match[str]) -> bool:
    # up to _ABBREVIATION capitals between dots: "P.P.S", "J.R.R.", "U.S.A."
    letters = match.group(2).replace(".", "")
    return match.group(3) == "." and letters.isupper() and len(letters) <= _ABBREVIATION


def _join_dotted(match: re.Match[str]) -> str:
    span = match.group(0)
    letters = span.replace(".", "")
    return letters if _spells_letters(letters) else span


def _spells_letters(letters: str) -> bool:
    # mostly ASCII letters, and not one or two of them over and over ("a a a a a a", "x.x.x.x.x.x")
    ascii_letters = sum(1 for ch in letters if ch.isascii() and ch.isalpha())
    return len(letters) >= _MIN_SPELLED and 4 * ascii_letters >= 3 * len(letters) and len(set(letters)) >= 3


def _decode_ciphers(text: str) -> str:
    if _A1Z26_START.search(text):
        text = _A1Z26.sub(_decode_a1z26, text)
    lower = text.translate(_ASCII_LOWER)  # str.lower may change the length ("İ"): keep the offsets
    sentences = [(start, end, _words(lower, start, end)) for start, end in _sentences(text)]
    readings = [_best_reading(words, text[start:end]) for start, end, words in sentences]
    # The text as a whole: a text in cipher has each sentence that leans that way read in it, short ones too.
    every = None
    if len(sentences) > 1 and None in readings:
        every = _best_reading([w for _, _, words in sentences for w in words], text)
    out, at, all_reversed = [], 0, True
    for (start, end, words), reading in zip(sentences, readings, strict=True):
        if reading is None and every is not None and _leans(words, every):
            reading = every
        if reading is not None:
            out += [text[at:start], _read(text[start:end], reading)]
            at = end
        all_reversed = all_reversed and (reading == _REVERSED or not words)
    if not out:
        return text
    if all_reversed and _reversal_order(text) == "text":
        return text[::-1]  # the whole text written backwards: its sentences come back in their order too
    return "".join(out) + text[at:]


def _decode_a1z26(match: re.Match[str]) -> str:
    span = match.group(0)
    end = match.end()
    if not _at_word_edges(match) or (end < len(match.string) and match.string[end] in "-/"):
        return span
    hyphens = "-" in span  # letters joined by hyphens, or by spaces with slashes between words
    words = [
        "".join(chr(ord("a") + int(n) - 1) for n in (word.split("-") if hyphens else word.split()))
        for word in (_A1Z26_WORD_GAP if hyphens else _SLASH_GAP).split(span)
    ]
    # as written a run of numbers holds no stopword: the reading must pass the test on its own
    stopwords = [w for w in words if w in _STOPWORDS]
    if not _reads_as_cipher(len(words), 0, len(stopwords), len(set(stopwords)), 0):
        return span
    return " ".join(words)


def _sentences(text: str) -> Iterator[tuple[int, int]]:
    cuts = [m.span() for m in _SENTENCE_END.finditer(text)]
    seams = [(m.end(), m.end()) for m in _SEAM.finditer(text) if _is_seam(m)]
    at = 0
    for start, end in sorted(cuts + seams) if seams else cuts:
        if start > at:
            yield at, start
        at = max(at, end)
    if at < len(text):
        yield at, len(text)


def _is_seam(match: re.Match[str]) -> bool:
    text, start = match.string, match.start()
    if text[start] in ".!?":  # an end mark that starts a word: ".emoh"
        return not start or text[start - 1].isspace()
    word = text[max(text.rfind(" ", 0, start), text.rfind("\t", 0, start)) + 1 : match.end() - 1]
    return word.isascii() and word.isalpha() and word.islower()  # "eviG", not "iPhone" or "McDonaldS"


def _words(lower: str, start: int, end: int) -> list[str]:
    # whole words only: the letters of "h4ck" or "som30ne" are no words in any reading
    return [w for w in _ALNUM_RUN.findall(lower, start, end) if w.isalpha()]


def _best_reading(words: list[str], span: str) -> int | None:
    """The cipher the words read as: the reading with the most stopwords that passes the test, if any."""
    plain = len([w for w in words if w in _STOPWORDS])
    # Ordinary English (a stopword in every three words or more: a reading would need three times that, nearly
    # every word) and texts of under three words are out at once.
    if len(words) < 3 or 3 * plain >= len(words):
        return None
    hits = [w for w in words if w in _CIPHER_WORDS]
    if 4 * len(hits) < len(words):  # no reading can have a stopword in every four words
        return None
    count: Counter[int] = Counter()
    distinct: Counter[int] = Counter()
    # "a", "i" and "did" written that are stopwords in the reading too (reversed; "a" and "i" shifted 8 places
    # apart): no evidence either way
    shared: Counter[int] = Counter()
    for word, n in Counter(hits).items():
        for reading in _CIPHER_WORDS[word]:
            count[reading] += n
            distinct[reading] += 1
            if word in _NEUTRAL:
                shared[reading] += n
    passing = [r for r in count if _reads_as_cipher(len(words), plain, count[r], distinct[r], shared[r])]
    # Code (``x = f(y)``, ``a_b[i]``): its one-letter names and short identifiers shift into stopwords too easily.
    if not passing or 4 * len(_CODE_MARK.findall(span)) >= len(words):
        return None
    return max(passing, key=lambda r: (count[r], distinct[r], r == _ROT13, -r))


def _reads_as_cipher(words: int, plain: int, read: int, distinct: int, shared: int) -> bool:
    # Three distinct stopwords in the reading, one in four words, and three times as many as written and two or more
    # (not counting the neutral ones, stopwords both ways). Symmetric in the two readings (each reading's inverse is
    # a reading too), so a decoded text never reads as a cipher again.
    return distinct >= 3 and 4 * read >= words and read - shared >= max(2, 3 * (plain - shared))


def _leans(words: list[str], reading: int) -> bool:
    """Whether a sentence of a text in cipher ``reading`` is read in it: more stopwords in the reading than as
    written, or as many and more words of the English word list (``wordsplit.is_word``). A sentence with no stopword
    either way kept the reading once, so one ciphered decoy sentence had a plain ask without stopwords ("Pipe bomb
    construction. Exact materials list.") read in ROT13 and scored 0.046 (0.950 as written: a red-team walkthrough)."""
    plain = sum(1 for w in words if w in _STOPWORDS)
    read = sum(1 for w in words if reading in _CIPHER_WORDS.get(w, ()))
    if read != plain:
        return read > plain
    if reading < _REVERSED:
        table = _CIPHER_TABLES[reading]
        readings = [w.translate(table) for w in words]
    else:
        readings = [w[::-1] for w in words]
    return sum(map(wordsplit.is_word, readings)) > sum(map(wordsplit.is_word, words))


def _read(span: str, reading: int) -> str:
    if reading < _REVERSED:
        return span.translate(_CIPHER_TABLES[reading])
    if _reversal_order(span) == "text":
        core = span.strip()
        at = span.index(core[0]) if core else 0
        return span[:at] + core[::-1] + span[at + len(core) :]  # the spaces around it stay where they are
    return _TOKEN.sub(lambda m: m.group(0)[::-1], span)


def _reversal_order(span: str) -> str:
    """Whether a reversed span reads backwards as a whole (``"text"``) or word by word in place (``"words"``)."""
    runs = _LETTER_RUN.findall(span)
    words = [w.translate(_ASCII_LOWER)[::-1] for w in runs]
    pairs = list(zip(words, words[1:], strict=False))
    in_place = sum(1 for a, b in pairs if (a, b) in _ORDERED_PAIRS) - sum(
        1 for a, b in pairs if (b, a) in _ORDERED_PAIRS
    )
    # A capital that starts the sentence, and its end mark, say which way too: "eviG em" (in place) or "em eviG"
    # (whole); "ta .emoh" (in place) or ".emoh ta" (whole).
    runs = [r for r in runs if len(r) > 1]  # "I" is a capital either way
    if runs:
        in_place += runs[0][-1].isupper() - runs[-1][-1].isupper()
    marks = [m.start() for m in _END_MARK.finditer(span)]
    head = len(span) - len(span.lstrip())
    in_place += sum(1 for at in marks if at > head) - sum(1 for at in marks if at == head)
    return "words" if in_place > 0 else "text"


def _looks_like_text(decoded: str) -> bool:
    if len(decoded) < 8:
        return False
    if any(not (ch.isprintable() or ch in "\n\t") for ch in decoded):
        return False
    wordish = sum(1 for ch in decoded if ch.isalpha() or ch == " ")
    # Random bytes that happen to be valid UTF-8 are rarely mostly letters and spaces; prose is.
    return wordish >= 0.7 * len(decoded) and " " in decoded.strip()


def _fold_leet(text: str) -> str:
    if not _LEET_CHAR.search(text) or not _LEET_TOUCH.search(text):  # the first is 8 times faster
        return text
    plain = _HEX.sub(" ", text)  # a hash is full of "leet" between letters
    strong = len(_LEET_INSIDE.findall(plain)) + len(_LEET_ENDS.findall(plain))
    # A text written in leet (``log4j``, ``a11y`` and ``gpt4o`` in a sentence about software are not): fold its
    # edges and short all-leet words too.
    if strong >= _LEET_TEXT_MIN and 3 * strong >= len(text.split()):
        return _WORD.sub(_fold_leet_text_word, text)
    return _WORD.sub(_fold_leet_word, text)


def _fold_leet_word(match: re.Match[str]) -> str:
    word = match.group(0)
    if not _LEET_INSIDE.search(word) or _ADDRESS.search(word) or _HEX_COLOUR.fullmatch(word.rstrip(_TRAILING)):
        return word
    return _LEET_RUN.sub(_fold_leet_run, word)


def _fold_leet_run(match: re.Match[str]) -> str:
    run = match.group(0)
    if not _LEET_INSIDE.search(run) or _HEX.fullmatch(run):
        return run
    return run.translate(_LEET)


def _fold_leet_text_word(match: re.Match[str]) -> str:
    word = match.group(0)
    if _ADDRESS.search(word) or _HEX_COLOUR.fullmatch(word.rstrip(_TRAILING)):
        return word
    if _LEET_SHORT.fullmatch(word):
        return word.translate(_LEET)
    return _LEET_RUN.sub(_fold_leet_text_run, word)


def _fold_leet_text_run(match: re.Match[str]) -> str:
    run = match.group(0)
    if not _LETTER.search(run) or _HEX.fullmatch(run):
        return run
    return run.translate(_LEET)
