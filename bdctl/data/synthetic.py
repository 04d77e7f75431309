"""Deterministic synthetic instruction data and a matching pretraining corpus.

Why this exists
---------------
The real experiments distil GPT-2/OPT/Qwen teachers into smaller students on Dolly. On a
CPU-only machine the whole pipeline (pretrain -> SFT teacher -> distil student -> evaluate)
must still run end to end, in minutes, with tiny randomly initialised models. Dolly is far
too hard for a 1-3M parameter model, so every score would sit at the floor and no method
could be told apart from another. This module provides a task distribution that such models
*can* learn, while keeping the shape of the real data: records with `instruction`, `input`
("" when there is none) and `output`, scored with Rouge-L.

Design
------
* Seven task families, each with several instruction templates (some put the data inline,
  some in the `input` field), so a model has to read the prompt instead of memorising one
  surface form, and the same answer shape appears behind different wordings.
* Answers are short sentences of several tokens ("Seven plus twelve is nineteen."), never a
  single token, so that sequence-level distillation objectives have something to act on and
  Rouge-L gives partial credit for partially right answers.
* Every answer is fully determined by the prompt (plus the fixed knowledge base below), so a
  perfect model reaches Rouge-L 100 and the ceiling is known.
* The families differ in what they demand: `letters`, `formatting` and `reversing` are
  mostly copying with a small transformation (easy for any model); `sorting`, `counting`
  and `arithmetic` need a little algorithm; `facts` needs memorisation of a made-up
  knowledge base. Memorisation scales with parameter count, which is what makes a bigger
  teacher visibly better than a smaller student - the gap that distillation tries to close.
  The knowledge base is invented (nonsense names, random attributes drawn from a fixed seed)
  so no pretrained prior can help and nothing can be guessed from the name alone.
* The vocabulary is deliberately small (a few hundred distinct words) and prompts/answers
  are short (instruction+input under 40 words, answers under 25), so a byte-level BPE of
  1-2k tokens covers it compactly and sequences stay under ~96 tokens.
* `synthetic_corpus` writes plain prose in the same language (knowledge-base facts stated
  as sentences, arithmetic statements, sorted lists, spellings) with no instruction format,
  so that language-model pretraining on it helps the instruction tasks afterwards - the
  same role web text plays for the real models.

Determinism
-----------
Everything is drawn from `random.Random(seed)` instances (the knowledge base from a module
constant), never the global RNG, and never from `hash()` or set iteration order, so the
same arguments give identical output on any machine and Python version. Only integer seeds
and `randrange`/`choice`/`shuffle` are used; their sequences have been stable since 3.2.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bdctl.errors import UserError

__all__ = [
    "FAMILIES",
    "KNOWLEDGE_BASE",
    "City",
    "Creature",
    "KnowledgeBase",
    "Person",
    "number_word",
    "synthetic_corpus",
    "synthetic_instructions",
]

Example = dict[str, str]

# --------------------------------------------------------------------------------------------
# Vocabulary. Kept small on purpose (see module docstring). Lists are tuples, never sets, so
# that iteration order - and therefore every draw - is fixed.
# --------------------------------------------------------------------------------------------

ALPHABET = string.ascii_lowercase

# Concrete nouns for the list tasks. None of them is a template word ("list", "order", ...),
# which keeps prompts unambiguous, and several have repeated letters for letter counting.
NOUNS: tuple[str, ...] = (
    "apple", "banana", "basket", "bottle", "bread", "bridge", "button", "candle", "carrot",
    "cherry", "coffee", "coin", "cookie", "cotton", "drum", "feather", "flute", "garden",
    "hammer", "horse", "jacket", "kettle", "kitten", "ladder", "lamp", "lemon", "mirror",
    "moon", "needle", "nest", "paper", "parrot", "pebble", "pencil", "pepper", "pillow",
    "puzzle", "rabbit", "rocket", "rope", "saddle", "shell", "spoon", "stone", "table",
    "tiger", "tomato", "wagon", "window", "balloon",
)  # fmt: skip

# All adjectives start with a consonant so "a {adjective} {noun}" is always grammatical.
ADJECTIVES: tuple[str, ...] = (
    "big", "brave", "bright", "busy", "cold", "happy", "little", "quiet", "round", "sleepy",
    "small", "soft", "tall", "tiny", "warm",
)  # fmt: skip

COLOURS: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "purple", "orange", "white", "black", "brown", "grey",
    "pink", "silver",
)  # fmt: skip
FOODS: tuple[str, ...] = (
    "berries", "fish", "leaves", "seeds", "honey", "moss", "worms", "grass", "nuts", "mushrooms",
)  # fmt: skip
HOMES: tuple[str, ...] = (
    "the forest", "the desert", "the sea", "caves", "the mountains", "rivers", "swamps",
    "the hills",
)  # fmt: skip
LANDMARKS: tuple[str, ...] = (
    "bridges", "markets", "towers", "gardens", "music", "bread", "boats", "lamps",
)  # fmt: skip
# Consonant-initial so "{name} is a {job}." never needs "an".
JOBS: tuple[str, ...] = (
    "baker", "farmer", "painter", "teacher", "singer", "sailor", "doctor", "builder",
    "tailor", "potter",
)  # fmt: skip

_ONES: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen",
)  # fmt: skip
_TENS: tuple[str, ...] = (
    "", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
)  # fmt: skip


def number_word(n: int) -> str:
    """English words for 0..100, hyphenated like "forty-two" (one word, few BPE tokens)."""
    if not 0 <= n <= 100:
        raise ValueError(f"number_word supports 0..100, got {n}")
    if n == 100:
        return "one hundred"
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] if ones == 0 else f"{_TENS[tens]}-{_ONES[ones]}"


def _capitalise(sentence: str) -> str:
    # str.capitalize() would lower-case the rest (proper names); only touch the first char.
    return sentence[:1].upper() + sentence[1:]


def _and_list(items: Sequence[str]) -> str:
    """ "a, b and c" - the natural-language list used in answers."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _times_phrase(k: int) -> str:
    return "once" if k == 1 else f"{number_word(k)} times"


# --------------------------------------------------------------------------------------------
# The made-up knowledge base.
# --------------------------------------------------------------------------------------------

# Fixed forever: changing it changes every `facts` answer and invalidates trained checkpoints.
_KB_SEED = 20240607


@dataclass(frozen=True)
class Creature:
    name: str  # lower case, consonant-initial ("a blorp")
    colour: str
    food: str
    home: str


@dataclass(frozen=True)
class City:
    name: str
    country: str
    famous_for: str


@dataclass(frozen=True)
class Person:
    name: str
    job: str
    city: str


@dataclass(frozen=True)
class KnowledgeBase:
    countries: tuple[str, ...]
    cities: tuple[City, ...]
    creatures: tuple[Creature, ...]
    people: tuple[Person, ...]

    def city(self, name: str) -> City:
        for city in self.cities:
            if city.name == name:
                return city
        raise KeyError(name)

    @property
    def n_entities(self) -> int:
        return len(self.countries) + len(self.cities) + len(self.creatures) + len(self.people)


_ONSETS = ("b", "bl", "br", "d", "dr", "f", "fl", "g", "gl", "gr", "k", "kr", "m", "n", "p",
           "pl", "s", "sk", "sn", "sp", "t", "tr", "v", "w", "z")  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "oo", "ee")
_CODAS = ("", "b", "g", "k", "m", "n", "p", "rp", "sh", "x", "z", "nk")


def _syllable(rng: random.Random, coda: bool = True) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + (rng.choice(_CODAS) if coda else "")


def _balanced(rng: random.Random, values: Sequence[str], k: int) -> list[str]:
    """k draws that use every value about equally often, so no attribute value is a good
    blind guess and a model has to actually memorise each entity."""
    pool: list[str] = []
    while len(pool) < k:
        chunk = list(values)
        rng.shuffle(chunk)
        pool.extend(chunk)
    return pool[:k]


def _build_knowledge_base(seed: int = _KB_SEED) -> KnowledgeBase:
    rng = random.Random(seed)
    # Names must be unique across all categories and never collide with a real vocabulary
    # word, otherwise a prompt could be ambiguous.
    taken: list[str] = [*NOUNS, *ADJECTIVES, *COLOURS, *FOODS, *LANDMARKS, *JOBS]

    def fresh(make: Callable[[], str]) -> str:
        while True:
            name = make()
            if 4 <= len(name) <= 9 and name.lower() not in taken:
                taken.append(name.lower())
                return name

    # Each category gets its own sound (suffixes, syllable count) so names are easy to tell
    # apart, which a tiny tokenizer and model both benefit from.
    def country() -> str:
        stem = _syllable(rng, coda=False)
        return (stem + rng.choice(("ria", "land", "mar", "dor", "via"))).capitalize()

    def city() -> str:
        stem = _syllable(rng)
        return (stem + rng.choice(("ton", "burg", "holm", "port", "ford", "wick"))).capitalize()

    def creature() -> str:  # lower case: used as "a blorp", like a common noun
        if rng.random() < 0.5:
            return _syllable(rng)
        return _syllable(rng, coda=False) + _syllable(rng)

    def person() -> str:
        name = _syllable(rng, coda=False) + _syllable(rng, coda=False)
        return (name + rng.choice(("", "n", "l", "k"))).capitalize()

    countries = tuple(fresh(country) for _ in range(6))
    city_names = [fresh(city) for _ in range(16)]
    cities = tuple(
        City(name, country, famous)
        for name, country, famous in zip(
            city_names,
            _balanced(rng, countries, len(city_names)),
            _balanced(rng, LANDMARKS, len(city_names)),
            strict=True,
        )
    )
    creature_names = [fresh(creature) for _ in range(20)]
    creatures = tuple(
        Creature(name, colour, food, home)
        for name, colour, food, home in zip(
            creature_names,
            _balanced(rng, COLOURS, len(creature_names)),
            _balanced(rng, FOODS, len(creature_names)),
            _balanced(rng, HOMES, len(creature_names)),
            strict=True,
        )
    )
    person_names = [fresh(person) for _ in range(12)]
    people = tuple(
        Person(name, job, city)
        for name, job, city in zip(
            person_names,
            _balanced(rng, JOBS, len(person_names)),
            _balanced(rng, city_names, len(person_names)),
            strict=True,
        )
    )
    return KnowledgeBase(countries, cities, creatures, people)


KNOWLEDGE_BASE: KnowledgeBase = _build_knowledge_base()


# --------------------------------------------------------------------------------------------
# Task families. Each generator takes the sampling RNG and returns one example (without the
# "family" key). For list-like data, inline templates always end with ": <data>." so the
# data can be located unambiguously (the tests rely on that).
# --------------------------------------------------------------------------------------------


def _example(instruction: str, input_: str, output: str) -> Example:
    return {"instruction": instruction, "input": input_, "output": output}


def _inline_or_input(
    rng: random.Random, inline: Sequence[str], with_input: Sequence[str], data: str, **fields: str
) -> tuple[str, str]:
    """Pick a template: inline ones get the data after a colon, the others in `input`."""
    k = rng.randrange(len(inline) + len(with_input))
    if k < len(inline):
        return inline[k].format(data=data, **fields), ""
    return with_input[k - len(inline)].format(**fields), data


def _arithmetic(rng: random.Random) -> Example:
    op = rng.choice(("plus", "minus", "times"))
    if op == "plus":
        a, b = rng.randrange(21), rng.randrange(21)
        c = a + b
        inline: tuple[str, ...] = (
            "What is {a} plus {b}?",
            "Add {a} and {b}.",
            "What is the sum of {a} and {b}?",
            "If you have {a} and get {b} more, how many do you have?",
        )
    elif op == "minus":
        a = rng.randrange(21)
        b = rng.randrange(a + 1)  # results stay non-negative: number words only go up from zero
        c = a - b
        inline = (
            "What is {a} minus {b}?",
            "Subtract {b} from {a}.",
            "Take {b} away from {a}. What is left?",
            "If you have {a} and lose {b}, how many are left?",
        )
    else:
        a, b = rng.randrange(11), rng.randrange(11)
        c = a * b
        inline = ("What is {a} times {b}?", "Multiply {a} by {b}.", "What is the product of {a} and {b}?")
    with_input = (
        "Work out the answer in words.",
        "Solve this and write the answer as a sentence.",
        "Compute the following.",
    )
    wa, wb = number_word(a), number_word(b)
    k = rng.randrange(len(inline) + len(with_input))
    if k < len(inline):
        instruction, input_ = inline[k].format(a=wa, b=wb), ""
    else:
        instruction, input_ = with_input[k - len(inline)], f"{wa} {op} {wb}"
    # One canonical answer shape regardless of wording: the model learns the operation, not
    # which template asked for it.
    return _example(instruction, input_, _capitalise(f"{wa} {op} {wb} is {number_word(c)}."))


def _sorting(rng: random.Random) -> Example:
    kind = rng.choice(("alphabetical", "ascending", "descending"))
    k = rng.randrange(3, 6)
    if kind == "alphabetical":
        items = rng.sample(NOUNS, k)
        answer = sorted(items)
        inline = (
            "Sort these words in alphabetical order: {data}.",
            "Put the following words in alphabetical order: {data}.",
            "Arrange these words from A to Z: {data}.",
        )
        with_input = ("Sort the words below alphabetically.", "Put these words in alphabetical order.")
        prefix = "In alphabetical order"
    else:
        items = [str(x) for x in rng.sample(range(1, 100), k)]
        answer = sorted(items, key=int, reverse=kind == "descending")
        direction = "smallest to largest" if kind == "ascending" else "largest to smallest"
        inline = (
            f"Sort these numbers from {direction}: {{data}}.",
            f"Order the following numbers from {direction}: {{data}}.",
            f"Arrange from {direction}: {{data}}.",
        )
        with_input = (f"Sort the numbers below from {direction}.", f"Put these numbers in order from {direction}.")
        prefix = _capitalise(f"from {direction}")
    instruction, input_ = _inline_or_input(rng, inline, with_input, ", ".join(items))
    return _example(instruction, input_, f"{prefix}: {', '.join(answer)}.")


def _reversing(rng: random.Random) -> Example:
    items = rng.sample(NOUNS, rng.randrange(3, 6))
    # Space- or comma-separated input: the model must not rely on punctuation to find items.
    data = (" " if rng.random() < 0.5 else ", ").join(items)
    inline = (
        "Reverse the order of these words: {data}.",
        "Write these words backwards, last one first: {data}.",
        "What is the reverse of this list: {data}?",
    )
    with_input = (
        "List the words below in reverse order.",
        "Reverse this list of words.",
        "Write these words in the opposite order.",
    )
    instruction, input_ = _inline_or_input(rng, inline, with_input, data)
    return _example(instruction, input_, f"In reverse order: {', '.join(reversed(items))}.")


def _counting(rng: random.Random) -> Example:
    if rng.random() < 0.5:
        items = rng.sample(NOUNS, rng.randrange(2, 10))
        inline = (
            "How many words are in this list: {data}?",
            "Count the words: {data}.",
            "How many items are there: {data}?",
        )
        with_input = ("How many words are in the list below?", "Count the items in this list.")
        instruction, input_ = _inline_or_input(rng, inline, with_input, ", ".join(items))
        return _example(instruction, input_, f"There are {number_word(len(items))} words in the list.")
    word = rng.choice(NOUNS)
    absent = [c for c in ALPHABET if c not in word]
    # Mostly ask about letters that occur (weighted by frequency); sometimes about one that
    # does not, so "zero" is learnt as a distinct answer.
    letter = rng.choice(absent) if rng.random() < 0.15 else rng.choice(word)
    inline = (
        f"How many times does the letter {letter} appear in the word {word}?",
        f"Count how often the letter {letter} occurs in {word}.",
        f"In the word {word}, how many times do you see the letter {letter}?",
    )
    with_input = (
        f"How many times does the letter {letter} appear in this word?",
        f"Count the letter {letter} in the word below.",
    )
    k = rng.randrange(len(inline) + len(with_input))
    if k < len(inline):
        instruction, input_ = inline[k], ""
    else:
        instruction, input_ = with_input[k - len(inline)], word
    count = word.count(letter)
    if count == 0:
        output = f"The letter {letter} does not appear in {word}."
    else:
        output = f"The letter {letter} appears {_times_phrase(count)} in {word}."
    return _example(instruction, input_, output)


def _phrase(rng: random.Random) -> str:
    a, n1, n2 = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(NOUNS)
    # "a" only ever precedes an adjective (all consonant-initial); nouns get "the".
    return rng.choice(
        (f"the {a} {n1}", f"a {a} {n1}", f"the {n1} and the {n2}", f"{a} {n1} by the {n2}", f"a {a} {n1} on the {n2}")
    )


def _formatting(rng: random.Random) -> Example:
    kind = rng.choice(("upper", "title", "commas", "bullets"))
    if kind == "upper":
        data = _phrase(rng)
        output = data.upper()
        inline = ("Write this phrase in capital letters: {data}.", "Convert to uppercase: {data}.")
        with_input = ("Rewrite the phrase below in capital letters.", "Make this phrase uppercase.")
    elif kind == "title":
        data = _phrase(rng)
        output = " ".join(_capitalise(w) for w in data.split())
        inline = ("Write this phrase in title case: {data}.", "Start every word with a capital letter: {data}.")
        with_input = (
            "Put the phrase below in title case.",
            "Rewrite this so that every word starts with a capital letter.",
        )
    elif kind == "commas":
        items = rng.sample(NOUNS, rng.randrange(3, 6))
        data, output = " ".join(items), ", ".join(items)
        inline = ("Join these words with commas: {data}.", "Separate these words with commas: {data}.")
        with_input = ("Put commas between the words below.", "Join this list with commas.")
    else:
        items = rng.sample(NOUNS, rng.randrange(3, 6))
        data, output = ", ".join(items), "\n".join(f"- {w}" for w in items)
        inline = ("Make a bulleted list from these words: {data}.", "Turn this into a bullet list: {data}.")
        with_input = ("Write the words below as a bulleted list.", "Make a bullet list of these items.")
    instruction, input_ = _inline_or_input(rng, inline, with_input, data)
    return _example(instruction, input_, output)


def _facts(rng: random.Random) -> Example:
    kb = KNOWLEDGE_BASE
    kind = rng.choice(("colour", "food", "home", "country", "famous", "job", "lives", "lives_country"))
    if kind in ("colour", "food", "home"):
        c = rng.choice(kb.creatures)
        if kind == "colour":
            inline: tuple[str, ...] = (
                "What colour is a {x}?",
                "Tell me the colour of a {x}.",
                "Which colour does a {x} have?",
            )
            with_input = "What colour is this creature?"
            output = f"A {c.name} is {c.colour}."
        elif kind == "food":
            inline = (
                "What does a {x} eat?",
                "What is the favourite food of a {x}?",
                "Tell me what a {x} likes to eat.",
            )
            with_input = "What does this creature eat?"
            output = f"A {c.name} eats {c.food}."
        else:
            inline = ("Where does a {x} live?", "Where can you find a {x}?", "Tell me where a {x} lives.")
            with_input = "Where does this creature live?"
            output = f"A {c.name} lives in {c.home}."
        subject = c.name
    elif kind in ("country", "famous"):
        city = rng.choice(kb.cities)
        if kind == "country":
            inline = ("Which country is {x} in?", "In what country can you find {x}?", "Tell me the country of {x}.")
            with_input = "Which country is this city in?"
            output = f"{city.name} is in {city.country}."
        else:
            inline = (
                "What is {x} famous for?",
                "What is {x} known for?",
                "Tell me what the city of {x} is famous for.",
            )
            with_input = "What is this city famous for?"
            output = f"{city.name} is famous for its {city.famous_for}."
        subject = city.name
    else:
        p = rng.choice(kb.people)
        if kind == "job":
            inline = ("What does {x} do for work?", "What is the job of {x}?", "Tell me what job {x} has.")
            with_input = "What is the job of this person?"
            output = f"{p.name} is a {p.job}."
        elif kind == "lives":
            inline = ("Where does {x} live?", "Which city is {x} from?", "Tell me the city where {x} lives.")
            with_input = "Which city does this person live in?"
            output = f"{p.name} lives in {p.city}."
        else:
            # Two-hop question: needs the person's city and that city's country. The answer
            # spells out the intermediate fact, so it stays a short, checkable sentence.
            inline = ("Which country does {x} live in?", "In what country does {x} live?")
            with_input = "Which country does this person live in?"
            output = f"{p.name} lives in {p.city}, which is in {kb.city(p.city).country}."
        subject = p.name
    k = rng.randrange(len(inline) + 1)
    if k < len(inline):
        return _example(inline[k].format(x=subject), "", output)
    return _example(with_input, subject, output)


def _letters(rng: random.Random) -> Example:
    kind = rng.choice(("next", "previous", "next_three", "spell", "first"))
    if kind == "next":
        i = rng.randrange(25)
        letter = ALPHABET[i]
        templates: tuple[str, ...] = (
            f"What letter comes after {letter}?",
            f"Which letter follows {letter} in the alphabet?",
            f"Name the letter that comes right after {letter}.",
        )
        output = f"The letter after {letter} is {ALPHABET[i + 1]}."
        return _example(rng.choice(templates), "", output)
    if kind == "previous":
        i = rng.randrange(1, 26)
        letter = ALPHABET[i]
        templates = (
            f"What letter comes before {letter}?",
            f"Which letter is just before {letter} in the alphabet?",
            f"Name the letter that comes right before {letter}.",
        )
        output = f"The letter before {letter} is {ALPHABET[i - 1]}."
        return _example(rng.choice(templates), "", output)
    if kind == "next_three":
        i = rng.randrange(23)
        letter = ALPHABET[i]
        templates = (
            f"What are the three letters after {letter}?",
            f"Which three letters follow {letter} in the alphabet?",
        )
        output = f"The three letters after {letter} are {_and_list(list(ALPHABET[i + 1 : i + 4]))}."
        return _example(rng.choice(templates), "", output)
    word = rng.choice(NOUNS)
    if kind == "spell":
        inline = (f"Spell the word {word} letter by letter.", f"How do you spell {word}?")
        with_input = "Spell the word below one letter at a time."
        output = f"The word {word} is spelled {', '.join(word)}."
    else:
        inline = (f"What is the first letter of {word}?", f"Which letter does the word {word} start with?")
        with_input = "What is the first letter of this word?"
        output = f"The first letter of {word} is {word[0]}."
    k = rng.randrange(len(inline) + 1)
    if k < len(inline):
        return _example(inline[k], "", output)
    return _example(with_input, word, output)


_GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "arithmetic": _arithmetic,
    "sorting": _sorting,
    "reversing": _reversing,
    "counting": _counting,
    "formatting": _formatting,
    "facts": _facts,
    "letters": _letters,
}

FAMILIES: tuple[str, ...] = tuple(_GENERATORS)


def _check_families(families: Sequence[str] | None) -> list[str]:
    if families is None:
        return list(FAMILIES)
    if isinstance(families, str):  # a lone string would otherwise be read letter by letter
        families = [families]
    chosen: list[str] = []
    for name in families:
        if name not in _GENERATORS:
            raise UserError(f"unknown synthetic task family {name!r}; valid names: {', '.join(FAMILIES)}")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise UserError(f"no synthetic task family selected; valid names: {', '.join(FAMILIES)}")
    return chosen


def synthetic_instructions(n: int, seed: int, families: Sequence[str] | None = None) -> list[dict[str, str]]:
    """`n` instruction examples drawn deterministically from `seed`.

    Each record is {"instruction", "input" ("" when none), "output", "family"}. Families are
    balanced (each gets n // k or n // k + 1 examples) and interleaved in a seeded order.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UserError(f"number of synthetic examples must be a non-negative integer, got {n!r}")
    chosen = _check_families(families)
    rng = random.Random(seed)
    # Balanced round-robin rather than independent draws: small datasets still contain every
    # family, and per-family scores are comparable between runs of different size.
    order = [chosen[i % len(chosen)] for i in range(n)]
    rng.shuffle(order)
    records: list[dict[str, str]] = []
    for family in order:
        record = _GENERATORS[family](rng)
        record["family"] = family
        records.append(record)
    return records


# --------------------------------------------------------------------------------------------
# Pretraining corpus: the same language as prose, without instruction formatting.
# --------------------------------------------------------------------------------------------


def _creature_sentences(rng: random.Random, c: Creature) -> list[str]:
    sentences = [
        rng.choice((f"The {c.name} is a {c.colour} creature.", f"A {c.name} is {c.colour}.")),
        rng.choice((f"A {c.name} eats {c.food}.", f"The favourite food of a {c.name} is {c.food}.")),
        rng.choice((f"A {c.name} lives in {c.home}.", f"You can find a {c.name} in {c.home}.")),
    ]
    rng.shuffle(sentences)
    return sentences


def _city_sentences(rng: random.Random, city: City) -> list[str]:
    sentences = [
        rng.choice((f"{city.name} is a city in {city.country}.", f"{city.name} is in {city.country}.")),
        rng.choice(
            (f"{city.name} is famous for its {city.famous_for}.", f"People know {city.name} for its {city.famous_for}.")
        ),
    ]
    residents = [p for p in KNOWLEDGE_BASE.people if p.city == city.name]
    if residents:
        p = rng.choice(residents)
        sentences.append(f"{p.name} lives in {city.name} and is a {p.job}.")
    rng.shuffle(sentences)
    return sentences


def _person_sentences(rng: random.Random, p: Person) -> list[str]:
    country = KNOWLEDGE_BASE.city(p.city).country
    return [
        f"{p.name} is a {p.job}.",
        rng.choice((f"{p.name} lives in {p.city}.", f"{p.name} lives in {p.city}, which is in {country}.")),
        f"{p.city} is in {country}.",
    ]


def _number_sentence(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randrange(21), rng.randrange(21)
        return _capitalise(f"{number_word(a)} plus {number_word(b)} is {number_word(a + b)}.")
    if kind == 1:
        a = rng.randrange(21)
        b = rng.randrange(a + 1)
        return _capitalise(f"{number_word(a)} minus {number_word(b)} is {number_word(a - b)}.")
    if kind == 2:
        a, b = rng.randrange(11), rng.randrange(11)
        return _capitalise(f"{number_word(a)} times {number_word(b)} is {number_word(a * b)}.")
    if kind == 3:
        a, b = rng.randrange(21), rng.randrange(21)
        return f"If you add {number_word(a)} and {number_word(b)}, you get {number_word(a + b)}."
    start = rng.randrange(17)
    run = ", ".join(number_word(i) for i in range(start, start + 4))
    return f"Counting from {number_word(start)} goes {run}."


def _word_sentence(rng: random.Random) -> str:
    kind = rng.randrange(6)
    items = rng.sample(NOUNS, rng.randrange(3, 6))
    if kind == 0:
        return f"The words {_and_list(items)} in alphabetical order are {', '.join(sorted(items))}."
    if kind == 1:
        nums = sorted(rng.sample(range(1, 100), len(items)))
        return f"From smallest to largest, the numbers are {', '.join(map(str, nums))}."
    if kind == 2:
        return f"The list {', '.join(items)} in reverse order is {', '.join(reversed(items))}."
    if kind == 3:
        return f"The list {', '.join(items)} has {number_word(len(items))} words."
    word = items[0]
    if kind == 4:
        letter = rng.choice(word)
        return f"The letter {letter} appears {_times_phrase(word.count(letter))} in {word}."
    phrase = _phrase(rng)
    return f"In capital letters, {phrase} is written {phrase.upper()}."


def _letter_sentence(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        i = rng.randrange(25)
        return f"The letter after {ALPHABET[i]} is {ALPHABET[i + 1]}."
    if kind == 1:
        i = rng.randrange(1, 26)
        return f"The letter before {ALPHABET[i]} is {ALPHABET[i - 1]}."
    word = rng.choice(NOUNS)
    if kind == 2:
        return f"The word {word} is spelled {', '.join(word)}."
    return f"The first letter of {word} is {word[0]}."


def _document(rng: random.Random) -> str:
    kb = KNOWLEDGE_BASE
    theme = rng.choice(("creatures", "places", "people", "numbers", "words", "letters"))
    sentences: list[str] = []
    # Topic-coherent documents (one or two entities, or one kind of statement) look more like
    # real text than a random bag of sentences, and keep documents a few sentences long.
    if theme == "creatures":
        for c in rng.sample(kb.creatures, rng.randrange(1, 3)):
            sentences += _creature_sentences(rng, c)
    elif theme == "places":
        for city in rng.sample(kb.cities, rng.randrange(1, 3)):
            sentences += _city_sentences(rng, city)
    elif theme == "people":
        for p in rng.sample(kb.people, rng.randrange(1, 3)):
            sentences += _person_sentences(rng, p)
    else:
        make = {"numbers": _number_sentence, "words": _word_sentence, "letters": _letter_sentence}[theme]
        sentences = [make(rng) for _ in range(rng.randrange(3, 7))]
    return " ".join(sentences)


def synthetic_corpus(n_docs: int, seed: int) -> list[str]:
    """`n_docs` plain-text documents (a few sentences each) in the instruction data's language.

    Knowledge-base facts are stated with the same wording as the `facts` answers (and a few
    paraphrases), so pretraining already stores what the instruction tuning later asks for.
    """
    if isinstance(n_docs, bool) or not isinstance(n_docs, int) or n_docs < 0:
        raise UserError(f"number of corpus documents must be a non-negative integer, got {n_docs!r}")
    rng = random.Random(seed)
    return [_document(rng) for _ in range(n_docs)]
