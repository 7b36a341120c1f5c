"""Synthetic new facts for the mechanism experiment: fictional keys with fictional answers, reproducible by seed.

Name-like keys recombine pieces of real names ("Berga|mo" + "Pasa|dena" → "Bergadena"), so they overlap the model's
stored entities; UUID keys overlap nothing. The paper finds name-like keys cause far more forgetting.
"""

import random
import uuid
from typing import Literal

from datasets import Dataset

# Real place names split into a head and a tail; keys take the head of one and the tail of another
PLACES = (
    "Berga|mo Pasa|dena Vladi|vostok Barce|lona Sala|manca Ando|rra Luxem|bourg Valpa|raiso Cordo|ba Mara|caibo "
    "Tole|do Brati|slava Ljub|ljana Podgo|rica Antana|narivo Ouaga|dougou Tegu|cigalpa Monte|video Ashga|bat "
    "Bish|kek Dushan|be Kath|mandu Colom|bo Manda|lay Palem|bang Sura|baya Hiro|shima Nago|ya Kana|zawa Ade|laide "
    "Bris|bane Wolver|hampton Canter|bury Glou|cester Aber|deen Inver|ness Kil|kenny Gal|way Rotter|dam Eind|hoven "
    "Heidel|berg Augs|burg Salz|burg Inns|bruck Lu|cerne Lau|sanne Gre|noble Mar|seille Bolo|gna Peru|gia Ragu|sa "
    "Thessa|loniki Plov|div Con|stanta Tira|spol Kau|nas Tar|tu Upp|sala Trond|heim Aar|hus Tam|pere Rova|niemi "
    "Reykja|vik Mur|mansk Novo|sibirsk Ir|kutsk Samar|kand Bukha|ra Isfa|han Shi|raz Ta|briz Alep|po Mo|sul "
    "Bas|ra Jed|dah Mom|basa Ki|sumu Aru|sha Do|doma Blan|tyre Bula|wayo Wind|hoek Gabo|rone Dur|ban Sowe|to "
    "Ma|naus Re|cife Curi|tiba Rosa|rio Men|doza Are|quipa Cus|co Guaya|quil Mede|llin Carta|gena Oa|xaca Pue|bla "
    "Monte|rrey Tijua|na Sacra|mento Albu|querque Tuc|son Sa|vannah Charles|ton Winni|peg Saska|toon Hali|fax "
    "Vero|na Sevi|lla Grana|da Mala|ga Pam|plona Bilba|o Valen|cia Nan|tes Tou|louse Bor|deaux Stras|bourg "
    "Dres|den Leip|zig Han|nover Bre|men Nurem|berg Sara|jevo Sko|pje Chisi|nau Odes|sa Khar|kiv"
).split()
FIRST_NAMES = (
    "Amelia Bruno Clara Dmitri Elena Farid Greta Hugo Ingrid Jonas Keiko Lars Mira Nikolai Olga Pablo Quentin Rosa "
    "Stefan Tamsin Ulrich Vera Wilhelm Ximena Yusuf Zofia Anders Beatrix Cyril Dagny Emil Freya Gustav Hana Ivo Jana"
).split()
SURNAMES = (
    "Hart|mann Villa|nueva Kowal|czyk Lind|qvist Ander|sson Bran|dao Okon|kwo Petro|vic Rosse|llini Fitz|gerald "
    "Du|bois Mo|reau Schnei|der Yama|moto Taka|hashi Novot|ny Kuzne|tsov Halvor|sen Gonza|lez Ferrei|ra Marti|nez "
    "Weiss|berg Eck|hardt Lund|gren Berg|strom Naka|mura Iva|nova Caste|llano Monte|verdi Abra|hams Whit|taker"
).split()

# relation → (question template, kind of answer)
RELATIONS = {
    "capital": ("What is the capital of [X]?", "place"),
    "birthplace": ("Where was [X] born?", "place"),
    "author": ("Who is the author of [X]?", "person"),
    "founder": ("Who founded [X]?", "person"),
}


def _recombine(rng: random.Random, pieces: list[str]) -> str:
    """The head of one real name and the tail of another, never a real name itself."""
    real = {piece.replace("|", "") for piece in pieces}
    while True:
        head, tail = rng.sample(pieces, 2)
        name = head.split("|")[0] + tail.split("|")[1]
        if name not in real:
            return name


def _place(rng: random.Random) -> str:
    return _recombine(rng, PLACES)


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {_recombine(rng, SURNAMES)}"


def synthetic_facts(
    n: int,
    *,
    keys: Literal["name", "uuid"] = "name",
    relation: str = "capital",
    seed: int = 0,
) -> Dataset:
    """
    `n` fictional facts of `relation` (one of `RELATIONS`) in the fact format: name-like or UUID keys as subjects,
    fictional places or people as answers. Keys are distinct and never a real name of the piece lists.
    """
    if relation not in RELATIONS:
        raise ValueError(f"Unknown synthetic relation {relation!r}; choose one of {sorted(RELATIONS)}.")
    if keys not in ("name", "uuid"):
        raise ValueError(f"keys={keys!r}: choose 'name' (recombined real names) or 'uuid' (random UUIDs).")
    template, answer_kind = RELATIONS[relation]
    # Stay well below the number of head-tail pairs, so drawing distinct keys stays quick
    limit = len(PLACES) * (len(PLACES) - 1) // 2
    if keys == "name" and n > limit:
        raise ValueError(f"{n} name-like keys are more than the name pieces give ({limit}): use keys='uuid' or less.")
    rng = random.Random(f"{seed}:{keys}:{relation}")
    seen, rows = set(), []
    while len(rows) < n:
        key = _place(rng) if keys == "name" else str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if key in seen:
            continue
        seen.add(key)
        answer = _place(rng) if answer_kind == "place" else _person(rng)
        rows.append(
            {
                "id": f"synthetic-{relation}-{keys}-{seed}-{len(rows)}",
                "question": template.replace("[X]", key),
                "answers": [answer],
                "relation": f"synthetic-{relation}",
                "subject": key,
                "template": template,
            }
        )
    return Dataset.from_list(rows)
