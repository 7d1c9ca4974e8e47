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

from orchmoe.data import builtin_generators as gen
from orchmoe.data.builtin_generators import Generated
from orchmoe.data.core import DataError
from orchmoe.utils.fileio import cache_root

#: Bump when generated content changes; caches with another version are rewritten.
BUILTIN_VERSION = 1
STAMP_FILE = "VERSION"
N_POSITIVE_EXAMPLES = 3


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
        gen.gen_reverse_word,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_uppercase",
        "Text Manipulation",
        "Rewrite the given phrase using only uppercase letters.",
        gen.gen_uppercase,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_acronym",
        "Text Manipulation",
        "Form an acronym: write the first letter of each word of the phrase, in uppercase, without spaces.",
        gen.gen_acronym,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_duplicate_word",
        "Text Manipulation",
        "Copy the given word twice, separated by a single space.",
        gen.gen_duplicate_word,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_remove_vowels",
        "Text Manipulation",
        "Remove every vowel (a, e, i, o, u) from the given text and keep all other characters.",
        gen.gen_remove_vowels,
        "test",
    ),
    BuiltinTaskSpec(
        "builtin_add", "Arithmetic", "Add the two numbers and write the sum as a number.", gen.gen_add, "train"
    ),
    BuiltinTaskSpec(
        "builtin_subtract",
        "Arithmetic",
        "Subtract the second number from the first and write the difference as a number.",
        gen.gen_subtract,
        "test",
    ),
    BuiltinTaskSpec(
        "builtin_multiply_small",
        "Arithmetic",
        "Multiply the number by the small integer after the '*' sign and write the product.",
        gen.gen_multiply_small,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_max_number",
        "Arithmetic",
        "Find the largest number in the comma-separated list and write it.",
        gen.gen_max_number,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_sort_numbers",
        "Sorting",
        "Sort the comma-separated numbers in ascending order. Write them separated by a comma and a space.",
        gen.gen_sort_numbers,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_sort_words",
        "Sorting",
        "Sort the given words in alphabetical order. Write them separated by spaces.",
        gen.gen_sort_words,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_count_words",
        "Counting",
        "Count the words in the given sentence and write the count as a number.",
        gen.gen_count_words,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_count_letter",
        "Counting",
        "Count how many times the given letter appears in the given word. Write the count as a number.",
        gen.gen_count_letter,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_extract_city",
        "Information Extraction",
        "Extract the name of the city mentioned in the sentence.",
        gen.gen_extract_city,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_extract_job",
        "Information Extraction",
        "Extract the job (occupation) of the person described in the sentence.",
        gen.gen_extract_job,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_extract_year",
        "Information Extraction",
        "Extract the year mentioned in the sentence.",
        gen.gen_extract_year,
        "test",
    ),
    BuiltinTaskSpec(
        "builtin_sentiment",
        "Sentiment Analysis",
        'Classify the sentiment of the review. Answer "positive" or "negative".',
        gen.gen_sentiment,
        "train",
    ),
    BuiltinTaskSpec(
        "builtin_even_odd",
        "Classification",
        'Decide whether the given number is even or odd. Answer "even" or "odd".',
        gen.gen_even_odd,
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
