"""The builtin suite's instance generators: short, exactly checkable tasks over a small vocabulary.

Each generator takes its task's own `random.Random` and returns ``(input, output, explanation)``.
"""

from __future__ import annotations

import random

VOWELS = "aeiou"

# --------------------------------------------------------------------------------------------
# Vocabulary (short, common, single-token-ish words keep sequences short for a small model)

WORDS = (
    "apple banana cherry grape lemon mango melon orange peach pear plum berry "
    "river ocean forest desert valley island mountain meadow garden canyon lake beach "
    "table chair window door lamp clock mirror pillow carpet blanket bottle basket "
    "red blue green yellow purple silver golden black white brown pink gray "
    "happy quiet brave gentle clever lucky proud calm eager funny kind wise "
    "dog cat horse tiger rabbit turtle eagle dolphin monkey zebra lion panda "
    "bread cheese honey butter pepper sugar coffee tea soup rice salad pasta "
    "train plane boat truck bicycle rocket wagon ship car bus taxi subway "
    "music paper pencil letter story poem song picture camera button ribbon candle "
    "winter summer autumn spring morning evening night storm cloud thunder rain snow "
    "stone metal glass wood silk cotton wool sand iron copper marble velvet"
).split()
NAMES = (
    "Maria James Aisha Carlos Mei Omar Sofia Lucas Priya Ethan Hana Diego Fatima Noah Elena Ravi "
    "Chloe Kenji Amara Liam Zara Mateo Ingrid Tariq Nina Oscar Leila Hugo Yuki Samuel Grace Ivan "
    "Amelia Felix Rosa Daniel Clara Arjun Emma Tomas"
).split()
CITIES = (
    "Lisbon Paris Berlin Madrid Rome Vienna Prague Dublin Oslo Helsinki Warsaw Athens Cairo "
    "Nairobi Lagos Lima Bogota Quito Santiago Toronto Chicago Boston Denver Seattle Austin "
    "Sydney Melbourne Auckland Tokyo Osaka Seoul Beijing Mumbai Delhi Dubai Istanbul Moscow "
    "Stockholm Zurich Montreal"
).split()
JOBS = (
    "teacher doctor nurse pilot chef baker farmer lawyer painter writer singer dancer engineer "
    "plumber dentist architect journalist librarian carpenter mechanic gardener pharmacist "
    "photographer electrician designer scientist accountant firefighter tailor musician"
).split()
THINGS = (
    "bridge museum library tower castle stadium theater hospital school church factory "
    "lighthouse station market palace harbor"
).split()
SYLLABLES = (
    "ba be bi bo bu da de di do du fa fe fi fo ka ke ki ko ku la le li lo lu ma me mi mo mu "
    "na ne ni no nu pa pe pi po pu ra re ri ro ru sa se si so su ta te ti to tu va vi vo za zo"
).split()
REVIEW_SUBJECTS = (
    "food service room movie book hotel staff music show game phone camera pizza coffee "
    "concert lesson trip app car chair"
).split()
POSITIVE_ADJ = (
    "great wonderful excellent amazing delightful lovely fantastic superb pleasant enjoyable "
    "brilliant charming perfect friendly helpful"
).split()
NEGATIVE_ADJ = (
    "terrible awful horrible boring disappointing dreadful poor bad rude noisy dirty annoying useless broken slow"
).split()
POSITIVE_CLOSINGS = ("I would come back", "highly recommended", "I loved it", "worth every penny", "ten out of ten")
NEGATIVE_CLOSINGS = ("never again", "I want a refund", "not recommended", "a total waste", "I regret it")

# --------------------------------------------------------------------------------------------
# Task generators: each returns (input, output, explanation)

Generated = tuple[str, str, str]


def _pseudo_word(rng: random.Random, lo: int = 2, hi: int = 3) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(lo, hi)))


def _word_or_pseudo(rng: random.Random) -> str:
    return rng.choice(WORDS) if rng.random() < 0.3 else _pseudo_word(rng)


def _an(word: str) -> str:
    """The word with its indefinite article ("an engineer", "a pilot")."""
    return f"an {word}" if word[0].lower() in VOWELS else f"a {word}"


def _distinct_words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def gen_reverse_word(rng: random.Random) -> Generated:
    w = _word_or_pseudo(rng)
    return w, w[::-1], f"Reading '{w}' from its last letter to its first gives '{w[::-1]}'."


def gen_uppercase(rng: random.Random) -> Generated:
    phrase = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
    return phrase, phrase.upper(), "Every letter of the phrase is written as a capital letter."


def gen_acronym(rng: random.Random) -> Generated:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 5))]
    out = "".join(w[0] for w in words).upper()
    return " ".join(words), out, f"The first letters of the {len(words)} words are {', '.join(out)}."


def gen_duplicate_word(rng: random.Random) -> Generated:
    w = _word_or_pseudo(rng)
    return w, f"{w} {w}", f"The word '{w}' is written twice with a space between the copies."


def gen_remove_vowels(rng: random.Random) -> Generated:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 2)))
    out = "".join(c for c in text if c not in VOWELS)
    return text, out, "The letters a, e, i, o and u are deleted; everything else is kept."


def gen_add(rng: random.Random) -> Generated:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a} + {b}", str(a + b), f"{a} plus {b} equals {a + b}."


def gen_subtract(rng: random.Random) -> Generated:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    a, b = max(a, b), min(a, b)
    return f"{a} - {b}", str(a - b), f"{a} minus {b} equals {a - b}."


def gen_multiply_small(rng: random.Random) -> Generated:
    a, b = rng.randint(2, 999), rng.randint(2, 9)
    return f"{a} * {b}", str(a * b), f"{a} times {b} equals {a * b}."


def gen_max_number(rng: random.Random) -> Generated:
    nums = rng.sample(range(100), rng.randint(3, 6))
    return ", ".join(map(str, nums)), str(max(nums)), f"{max(nums)} is larger than every other number in the list."


def gen_sort_numbers(rng: random.Random) -> Generated:
    nums = rng.sample(range(100), rng.randint(3, 6))
    out = ", ".join(map(str, sorted(nums)))
    return ", ".join(map(str, nums)), out, "The same numbers are listed from the smallest to the largest."


def gen_sort_words(rng: random.Random) -> Generated:
    words = _distinct_words(rng, 3, 5)
    return " ".join(words), " ".join(sorted(words)), "The same words are listed in dictionary (alphabetical) order."


def gen_count_words(rng: random.Random) -> Generated:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 12))]
    return " ".join(words), str(len(words)), f"The sentence is made of {len(words)} words separated by spaces."


def gen_count_letter(rng: random.Random) -> Generated:
    w = _word_or_pseudo(rng)
    # Mostly ask about a letter that occurs, sometimes about one that does not (answer 0).
    letter = rng.choice(w) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    n = w.count(letter)
    return f"Word: {w}. Letter: {letter}", str(n), f"The letter '{letter}' appears {n} time(s) in '{w}'."


_PERSON_TEMPLATES = (
    "{name} works as {a_job} in {city}.",
    "{name}, {a_job}, moved to {city} last year.",
    "Last summer {name} the {job} visited {city}.",
    "In {city}, {name} found a job as {a_job}.",
    "The {job} {name} was born in {city}.",
)


def _person_sentence(rng: random.Random) -> tuple[str, str, str]:
    name, job, city = rng.choice(NAMES), rng.choice(JOBS), rng.choice(CITIES)
    return rng.choice(_PERSON_TEMPLATES).format(name=name, job=job, a_job=_an(job), city=city), job, city


def gen_extract_city(rng: random.Random) -> Generated:
    sentence, _, city = _person_sentence(rng)
    return sentence, city, f"{city} is the only city mentioned in the sentence."


def gen_extract_job(rng: random.Random) -> Generated:
    sentence, job, _ = _person_sentence(rng)
    return sentence, job, f"The person in the sentence is a {job}."


_YEAR_TEMPLATES = (
    "The {thing} was built in {year}.",
    "{name} was born in {year} in {city}.",
    "In {year}, {name} moved to {city}.",
    "The old {thing} in {city} opened in {year}.",
    "{name} became {a_job} in {year}.",
)


def gen_extract_year(rng: random.Random) -> Generated:
    year = rng.randint(1800, 2024)
    sentence = rng.choice(_YEAR_TEMPLATES).format(
        thing=rng.choice(THINGS),
        year=year,
        name=rng.choice(NAMES),
        city=rng.choice(CITIES),
        a_job=_an(rng.choice(JOBS)),
    )
    return sentence, str(year), f"{year} is the year mentioned in the sentence."


def gen_sentiment(rng: random.Random) -> Generated:
    positive = rng.random() < 0.5
    adjs = POSITIVE_ADJ if positive else NEGATIVE_ADJ
    closings = POSITIVE_CLOSINGS if positive else NEGATIVE_CLOSINGS
    subject = rng.choice(REVIEW_SUBJECTS)
    a1, a2 = rng.sample(adjs, 2)
    template = rng.randrange(4)
    if template == 0:
        review = f"The {subject} was {a1}."
    elif template == 1:
        review = f"The {subject} was {a1} and {a2}."
    elif template == 2:
        review = f"{_an(a1).capitalize()} {subject}, {rng.choice(closings)}."
    else:
        review = f"I found the {subject} {a1}, {rng.choice(closings)}."
    label = "positive" if positive else "negative"
    return review, label, f"Words such as '{a1}' show that the reviewer's opinion is {label}."


def gen_even_odd(rng: random.Random) -> Generated:
    n = rng.randint(0, 9999)
    label = "even" if n % 2 == 0 else "odd"
    return str(n), label, f"{n} ends in the digit {n % 10}, so it is {label}."
