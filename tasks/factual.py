"""Factual recall, built with the public `Task` API.

"The landmark Eiffel Tower is located in the city of" -> " Paris". Each prompt names a subject
(a landmark or an athlete, always two or more tokens) and a relation (city, country, sport);
the answer is the object of that fact. Answer = the subject's object, wrong = the object the
corrupting subject has for the same relation.

Expected mechanism (Meng et al., 2022; Geva et al., 2023): MLPs at the subject's last token
look the subject up and write its attributes into the residual stream; attention heads at the
last position read the attribute the relation asks for from the subject position.

What the data rules out: the answer never appears in the prompt, so it cannot be copied; every
subject has two attributes and every answer word is the object of many facts, so neither the
subject alone nor the relation alone gives the answer: both must be combined.

Corruption: the subject is replaced by another subject of the same token length whose answer
for the relation is different. `subject_positions` gives the subject's token positions, e.g.
for adding Gaussian noise to the subject embeddings instead.
"""

from __future__ import annotations

import random
from typing import Any

from circuits.errors import TaskError
from circuits.task import Example, Task, TaskSpec, is_single_token, n_tokens

MODEL = "factual-gpt2-4l"

# subject, city, country
LANDMARKS = (
    ("Eiffel Tower", "Paris", "France"),
    ("Louvre Museum", "Paris", "France"),
    ("Notre Dame", "Paris", "France"),
    ("Arc de Triomphe", "Paris", "France"),
    ("Big Ben", "London", "England"),
    ("Buckingham Palace", "London", "England"),
    ("Tower Bridge", "London", "England"),
    ("Westminster Abbey", "London", "England"),
    ("Roman Colosseum", "Rome", "Italy"),
    ("Trevi Fountain", "Rome", "Italy"),
    ("Spanish Steps", "Rome", "Italy"),
    ("Grand Canal", "Venice", "Italy"),
    ("Rialto Bridge", "Venice", "Italy"),
    ("Uffizi Gallery", "Florence", "Italy"),
    ("Brandenburg Gate", "Berlin", "Germany"),
    ("Reichstag Building", "Berlin", "Germany"),
    ("Sagrada Familia", "Barcelona", "Spain"),
    ("Park Guell", "Barcelona", "Spain"),
    ("Prado Museum", "Madrid", "Spain"),
    ("Alhambra Palace", "Granada", "Spain"),
    ("Red Square", "Moscow", "Russia"),
    ("Bolshoi Theatre", "Moscow", "Russia"),
    ("Forbidden City", "Beijing", "China"),
    ("Tiananmen Square", "Beijing", "China"),
    ("Taj Mahal", "Agra", "India"),
    ("Hagia Sophia", "Istanbul", "Turkey"),
    ("Blue Mosque", "Istanbul", "Turkey"),
    ("Charles Bridge", "Prague", "Czechia"),
    ("Anne Frank House", "Amsterdam", "Netherlands"),
    ("Little Mermaid", "Copenhagen", "Denmark"),
    ("Meiji Shrine", "Tokyo", "Japan"),
    ("Shibuya Crossing", "Tokyo", "Japan"),
    ("Fushimi Inari", "Kyoto", "Japan"),
    ("CN Tower", "Toronto", "Canada"),
    ("Parliament Hill", "Ottawa", "Canada"),
    ("Hofburg Palace", "Vienna", "Austria"),
    ("Wailing Wall", "Jerusalem", "Israel"),
    ("Space Needle", "Seattle", "America"),
    ("Lincoln Memorial", "Washington", "America"),
    ("White House", "Washington", "America"),
    ("Great Sphinx", "Giza", "Egypt"),
    ("Parthenon Temple", "Athens", "Greece"),
    ("Grand Place", "Brussels", "Belgium"),
    ("Belem Tower", "Lisbon", "Portugal"),
    ("Royal Mile", "Edinburgh", "Scotland"),
    ("Bondi Beach", "Sydney", "Australia"),
    ("Harbour Bridge", "Sydney", "Australia"),
)

# subject, sport, country
ATHLETES = (
    ("Lionel Messi", "football", "Argentina"),
    ("Diego Maradona", "football", "Argentina"),
    ("Cristiano Ronaldo", "football", "Portugal"),
    ("Zinedine Zidane", "football", "France"),
    ("Kylian Mbappe", "football", "France"),
    ("Luka Modric", "football", "Croatia"),
    ("Mohamed Salah", "football", "Egypt"),
    ("Harry Kane", "football", "England"),
    ("Roger Federer", "tennis", "Switzerland"),
    ("Rafael Nadal", "tennis", "Spain"),
    ("Novak Djokovic", "tennis", "Serbia"),
    ("Serena Williams", "tennis", "America"),
    ("Andy Murray", "tennis", "Scotland"),
    ("Maria Sharapova", "tennis", "Russia"),
    ("Boris Becker", "tennis", "Germany"),
    ("Naomi Osaka", "tennis", "Japan"),
    ("Michael Jordan", "basketball", "America"),
    ("LeBron James", "basketball", "America"),
    ("Kobe Bryant", "basketball", "America"),
    ("Dirk Nowitzki", "basketball", "Germany"),
    ("Yao Ming", "basketball", "China"),
    ("Tony Parker", "basketball", "France"),
    ("Tiger Woods", "golf", "America"),
    ("Rory McIlroy", "golf", "Ireland"),
    ("Sachin Tendulkar", "cricket", "India"),
    ("Virat Kohli", "cricket", "India"),
    ("Shane Warne", "cricket", "Australia"),
    ("Wayne Gretzky", "hockey", "Canada"),
    ("Sidney Crosby", "hockey", "Canada"),
    ("Babe Ruth", "baseball", "America"),
    ("Shohei Ohtani", "baseball", "Japan"),
    ("Michael Phelps", "swimming", "America"),
    ("Ian Thorpe", "swimming", "Australia"),
    ("Lewis Hamilton", "racing", "England"),
    ("Michael Schumacher", "racing", "Germany"),
    ("Max Verstappen", "racing", "Netherlands"),
    ("Ayrton Senna", "racing", "Brazil"),
    ("Usain Bolt", "sprinting", "Jamaica"),
    ("Simone Biles", "gymnastics", "America"),
)

# relation -> (templates, {subject: object}); every template ends right before the object.
RELATIONS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "landmark-city": (
        (
            "The landmark {s} is located in the city of",
            "Tourists who visit {s} are staying in the city of",
        ),
        {s: city for s, city, _ in LANDMARKS},
    ),
    "landmark-country": (
        (
            "The landmark {s} is located in the country of",
            "Tourists who visit {s} are staying in the country of",
        ),
        {s: country for s, _, country in LANDMARKS},
    ),
    "athlete-sport": (
        (
            "The athlete {s} is a professional in the sport of",
            "Fans know {s} as a star of the sport of",
        ),
        {s: sport for s, sport, _ in ATHLETES},
    ),
    "athlete-country": (
        (
            "The athlete {s} is a professional from the country of",
            "Fans know {s} as a star from the country of",
        ),
        {s: country for s, _, country in ATHLETES},
    ),
}

DESCRIPTION = "factual recall: 'The landmark Eiffel Tower is located in the city of' -> ' Paris'"


def facts(tokenizer: Any = None) -> list[tuple[str, str, str, int]]:
    """Return the usable facts as ``(relation, subject, object, subject token count)``.

    A fact is usable when its object is a single token and its subject is two or more tokens
    (both with a leading space) for `tokenizer`.

    Parameters
    ----------
    tokenizer : tokenizer, optional
        None keeps every fact and counts words instead of tokens.

    Returns
    -------
    list of tuple
    """
    usable = []
    for relation, (_, table) in RELATIONS.items():
        for subject, obj in table.items():
            if tokenizer is None:
                usable.append((relation, subject, obj, len(subject.split())))
                continue
            length = n_tokens(tokenizer, " " + subject)
            if length >= 2 and is_single_token(tokenizer, " " + obj):
                usable.append((relation, subject, obj, length))
    return usable


def build(tokenizer: Any = None, n: int = 200, seed: int = 0) -> Task:
    """Build `n` factual-recall examples that are valid for `tokenizer`.

    Parameters
    ----------
    tokenizer : tokenizer, optional
        The target model's tokenizer; None keeps every fact.
    n : int
        Number of examples.
    seed : int
        Generator seed.

    Returns
    -------
    Task

    Examples
    --------
    >>> example = build(n=1, seed=0).examples[0]
    >>> example.answers[0] in example.clean
    False
    """
    usable = facts(tokenizer)
    # A fact can be corrupted by another subject of the same relation and token length
    # whose object differs.
    partners = {
        (rel, subj): [
            (s2, o2) for r2, s2, o2, n2 in usable if r2 == rel and n2 == length and o2 != obj
        ]
        for rel, subj, obj, length in usable
    }
    pool = [f for f in usable if partners[(f[0], f[1])]]
    if not pool:
        raise TaskError("no factual prompt pair is valid for this tokenizer: facts need "
                        "single-token objects and subjects of equal token length")
    rng = random.Random(seed)
    examples = []
    while len(examples) < n:
        relation, subject, obj, _ = rng.choice(pool)
        other, other_obj = rng.choice(partners[(relation, subject)])
        template = rng.choice(RELATIONS[relation][0])
        clean, corrupt = template.format(s=subject), template.format(s=other)
        if tokenizer is not None and n_tokens(tokenizer, clean) != n_tokens(tokenizer, corrupt):
            continue  # the subject merged with its neighbours differently
        meta = {"subject": subject, "corrupt_subject": other, "relation": relation}
        examples.append(Example(clean, corrupt, (" " + obj,), (" " + other_obj,), meta))
    return Task("factual", tuple(examples), "logit-diff", DESCRIPTION, MODEL)


def subject_positions(example: Example, tokenizer: Any) -> list[int]:
    """Return the token positions of the subject in the clean prompt.

    Parameters
    ----------
    example : Example
        A factual example: its ``meta["subject"]`` names the subject; without it the subject is
        read off the template the prompt follows (`subject_of`).
    tokenizer : tokenizer
        The model's tokenizer.

    Returns
    -------
    list of int
        Consecutive positions, e.g. ``[2, 3]`` for "The landmark Eiffel Tower ...".

    Raises
    ------
    TaskError
        If the example names no subject that is in the prompt and the prompt follows none of
        the templates (see `subject_of`).
    """
    subject = example.meta.get("subject") or subject_of(example.clean)
    if not subject or subject not in example.clean:
        raise TaskError(f"{example.where()}: meta['subject'] is missing or not in the prompt, "
                        "and the prompt follows none of the factual templates; add \"meta\": "
                        "{\"subject\": \"...\"}")
    start = example.clean.index(subject)
    end = start + len(subject)
    before = n_tokens(tokenizer, example.clean[:start].rstrip(" "))
    return list(range(before, n_tokens(tokenizer, example.clean[:end])))


def subject_of(prompt: str) -> str | None:
    """Return the subject of a prompt written with one of the templates, else None.

    Examples
    --------
    >>> subject_of("Fans know Roger Federer as a star of the sport of")
    'Roger Federer'
    >>> subject_of("An unrelated sentence") is None
    True
    """
    for templates, _ in RELATIONS.values():
        for template in templates:
            before, after = template.split("{s}")
            if prompt.startswith(before) and prompt.endswith(after) \
                    and len(prompt) > len(before) + len(after):
                return prompt[len(before):len(prompt) - len(after)]
    return None


def sentences() -> list[str]:
    """Return every fact as a full sentence, in every template (the training set)."""
    return [
        template.format(s=subject) + " " + obj
        for templates, table in RELATIONS.values()
        for template in templates
        for subject, obj in table.items()
    ]


def fragments() -> list[str]:
    """Return every piece of text the generator can emit (to build a vocabulary)."""
    return sentences()


SPEC = TaskSpec("factual", DESCRIPTION, build, MODEL, default_n=200)
