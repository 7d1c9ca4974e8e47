"""An embedded, procedurally generated multi-task dataset in the SuperNI task format.

Why: the real SuperNI collection is large and its generation tasks are hard for a 135M model
trained for minutes on CPU, so tests, tutorials and quick experiments use this small dataset of
short, exactly checkable tasks. The tasks form natural families (string edits, arithmetic,
sorting, counting, extraction, classification), which is what an abstract-task router should
discover; a few family members are held out as the test split for unseen-task evaluation.

The data are written in the official layout (``tasks/*.json``, ``splits/default/*.txt``) and are
read back with the ordinary loader in :mod:`orchmoe.data.superni`; ``--data builtin`` resolves
to :func:`builtin_data_dir`. Generation is deterministic for a seed: each task has its own
``random.Random`` seeded with ``(seed, task name)``, so adding a task never changes the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchmoe.data.core import DataError, cache_root

#: Bump when generated content changes; caches with another version are rewritten.
BUILTIN_VERSION = 1
STAMP_FILE = "VERSION"
N_POSITIVE_EXAMPLES = 3
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


@dataclass(frozen=True)
class BuiltinTaskSpec:
    name: str
    category: str
    definition: str
    generate: Callable[[random.Random], Generated]
    split: str  # "train" or "test" (unseen-task evaluation)


BUILTIN_TASKS: tuple[BuiltinTaskSpec, ...] = (
    BuiltinTaskSpec(
        "builtin_reverse_word",
        "Text Manipulation",
        "Reverse the order of the letters in the given word. Write only the reversed word.",
        gen_reverse_word,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_uppercase",
        "Text Manipulation",
        "Rewrite the given phrase using only uppercase letters.",
        gen_uppercase,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_acronym",
        "Text Manipulation",
        "Form an acronym: write the first letter of each word of the phrase, in uppercase, without spaces.",
        gen_acronym,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_duplicate_word",
        "Text Manipulation",
        "Copy the given word twice, separated by a single space.",
        gen_duplicate_word,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_remove_vowels",
        "Text Manipulation",
        "Remove every vowel (a, e, i, o, u) from the given text and keep all other characters.",
        gen_remove_vowels,
        "test",
    ),
    BuiltinTaskSpec(
        "builtin_add", "Arithmetic", "Add the two numbers and write the sum as a number.", gen_add, "train"
    ),
    BuiltinTaskSpec(
        "builtin_subtract",
        "Arithmetic",
        "Subtract the second number from the first and write the difference as a number.",
        gen_subtract,
        "test",
    ),
    BuiltinTaskSpec(
        "builtin_multiply_small",
        "Arithmetic",
        "Multiply the number by the small integer after the '*' sign and write the product.",
        gen_multiply_small,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_max_number",
        "Arithmetic",
        "Find the largest number in the comma-separated list and write it.",
        gen_max_number,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_sort_numbers",
        "Sorting",
        "Sort the comma-separated numbers in ascending order. Write them separated by a comma and a space.",
        gen_sort_numbers,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_sort_words",
        "Sorting",
        "Sort the given words in alphabetical order. Write them separated by spaces.",
        gen_sort_words,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_count_words",
        "Counting",
        "Count the words in the given sentence and write the count as a number.",
        gen_count_words,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_count_letter",
        "Counting",
        "Count how many times the given letter appears in the given word. Write the count as a number.",
        gen_count_letter,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_extract_city",
        "Information Extraction",
        "Extract the name of the city mentioned in the sentence.",
        gen_extract_city,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_extract_job",
        "Information Extraction",
        "Extract the job (occupation) of the person described in the sentence.",
        gen_extract_job,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_extract_year",
        "Information Extraction",
        "Extract the year mentioned in the sentence.",
        gen_extract_year,
        "test",
    ),
    BuiltinTaskSpec(
        "builtin_sentiment",
        "Sentiment Analysis",
        'Classify the sentiment of the review. Answer "positive" or "negative".',
        gen_sentiment,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_even_odd",
        "Classification",
        'Decide whether the given number is even or odd. Answer "even" or "odd".',
        gen_even_odd,
        "train",
    ),
)


def builtin_task_names(split: str | None = None) -> list[str]:
    """Names of the builtin tasks, all or those of one split part ("train"/"test")."""
    return [t.name for t in BUILTIN_TASKS if split is None or t.split == split]


def _task_rng(seed: int, name: str) -> random.Random:
    return random.Random(f"orchmoe-builtin:{seed}:{name}")


def generate_task(spec: BuiltinTaskSpec, seed: int = 0, n_instances: int = 1200) -> dict:
    """The SuperNI JSON object for one builtin task, with unique inputs.

    The first :data:`N_POSITIVE_EXAMPLES` distinct draws become the demonstrations and are not
    reused as instances, so demonstrations never leak into train/eval.
    """
    if n_instances <= 0:
        raise ValueError(f"n_instances must be positive, got {n_instances}")
    rng = _task_rng(seed, spec.name)
    need = n_instances + N_POSITIVE_EXAMPLES
    drawn: dict[str, Generated] = {}
    attempts, max_attempts = 0, 200 * need
    while len(drawn) < need:
        attempts += 1
        if attempts > max_attempts:
            raise RuntimeError(
                f"builtin task {spec.name!r}: only {len(drawn)} distinct inputs after {max_attempts} draws; "
                f"its input space is too small for n_instances={n_instances}"
            )
        inp, out, expl = spec.generate(rng)
        drawn.setdefault(inp, (inp, out, expl))
    items = list(drawn.values())
    positives, instances = items[:N_POSITIVE_EXAMPLES], items[N_POSITIVE_EXAMPLES:]
    return {
        "Contributors": ["orchmoe"],
        "Source": ["orchmoe builtin"],
        "URL": [""],
        "Categories": [spec.category],
        "Reasoning": [],
        "Definition": [spec.definition],
        "Input_language": ["English"],
        "Output_language": ["English"],
        "Instruction_language": ["English"],
        "Domains": ["Synthetic"],
        "Positive Examples": [{"input": i, "output": o, "explanation": e} for i, o, e in positives],
        "Negative Examples": [],
        "Instance License": ["Apache 2.0"],
        "Instances": [{"id": f"{spec.name}-{k}", "input": i, "output": [o]} for k, (i, o, _) in enumerate(instances)],
    }


# --------------------------------------------------------------------------------------------
# Writing the cache directory


def _stamp(seed: int, n_instances: int) -> dict:
    return {
        "builtin_version": BUILTIN_VERSION,
        "seed": seed,
        "n_instances": n_instances,
        "tasks": builtin_task_names(),
    }


def _read_stamp(dest: Path) -> dict | None:
    try:
        return json.loads((dest / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _stamp_matches(dest: Path, stamp: dict) -> bool:
    found = _read_stamp(dest)
    return found is not None and all(found.get(k) == v for k, v in stamp.items())


def _write_tree(root: Path, seed: int, n_instances: int, stamp: dict) -> None:
    (root / "tasks").mkdir(parents=True)
    (root / "splits" / "default").mkdir(parents=True)
    digest = hashlib.sha256()
    for spec in BUILTIN_TASKS:
        text = json.dumps(generate_task(spec, seed, n_instances), ensure_ascii=False, indent=1)
        digest.update(text.encode("utf-8"))
        (root / "tasks" / f"{spec.name}.json").write_text(text + "\n", encoding="utf-8")
    for part in ("train", "test"):
        (root / "splits" / "default" / f"{part}_tasks.txt").write_text(
            "".join(n + "\n" for n in builtin_task_names(part)), encoding="utf-8"
        )
    # Written last: a directory with a matching stamp is complete.
    (root / STAMP_FILE).write_text(json.dumps({**stamp, "sha256": digest.hexdigest()}, indent=1) + "\n")


def write_builtin(dest_dir: str | Path, seed: int = 0, n_instances: int = 1200) -> Path:
    """Write the builtin dataset to ``dest_dir`` in the official SuperNI layout; return the path.

    Idempotent: if ``dest_dir/VERSION`` already records this version, seed and size, nothing is
    written. Atomic: the data are generated in a temporary sibling directory that is renamed into
    place, so a crash or a concurrent writer (e.g. several DDP ranks) never leaves a half-written
    dataset. An existing non-empty directory that is not a builtin dataset is never overwritten.
    """
    dest = Path(dest_dir).expanduser().resolve()
    stamp = _stamp(seed, n_instances)
    if _stamp_matches(dest, stamp):
        return dest
    if dest.exists():
        if not dest.is_dir():
            raise DataError(f"{dest} exists and is not a directory; refusing to write the builtin dataset there")
        if any(dest.iterdir()) and _read_stamp(dest) is None:
            raise DataError(
                f"{dest} is a non-empty directory without a builtin {STAMP_FILE} file; refusing to overwrite it"
            )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    old: Path | None = None
    try:
        _write_tree(tmp / "data", seed, n_instances, stamp)
        if dest.exists():  # stale version or empty directory: move it aside, then swap in
            old = dest.parent / f".{dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(dest, old)
            except FileNotFoundError:  # another writer moved it first
                old = None
        try:
            os.rename(tmp / "data", dest)
        except OSError:
            if not _stamp_matches(dest, stamp):  # lost a race to a writer of another version
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return dest


def default_cache_root() -> Path:
    """``$ORCHMOE_CACHE`` if set, else ``~/.cache/orchmoe``."""
    return cache_root()


def builtin_data_dir(cache_dir: str | Path | None = None, seed: int = 0, n_instances: int = 1200) -> Path:
    """Directory holding the builtin dataset, written on first use.

    ``cache_dir`` is the cache root (default :func:`default_cache_root`); the data live in
    ``<root>/builtin-v{BUILTIN_VERSION}`` (with a suffix for a non-default seed or size, so that
    different settings do not overwrite each other).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    name = f"builtin-v{BUILTIN_VERSION}"
    if (seed, n_instances) != (0, 1200):
        name += f"-seed{seed}-n{n_instances}"
    return write_builtin(root / name, seed=seed, n_instances=n_instances)
