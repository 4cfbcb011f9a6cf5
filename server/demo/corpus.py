"""Synthetic, seeded data for the demo: a small bilingual world and facts about loraserve.

- Portuguese and English noun phrases and short sentences from one grammar (gender and
  number agreement; adjectives after the noun in Portuguese, before it in English). The base
  model reads both languages separately (never aligned pairs); the `pt-en` and `en-pt`
  adapters learn the translation from aligned pairs. Held-out pairs are combinations of
  words never seen together in training, so a score on them is generalisation, not lookup.
- Questions about loraserve in many phrasings, each answered by one fact; the base model
  reads the facts as documentation, the `support-bot` adapter learns to answer questions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# noun: (portuguese singular, portuguese plural, gender, english singular, english plural)
NOUNS = [
    ("gato", "gatos", "m", "cat", "cats"),
    ("cão", "cães", "m", "dog", "dogs"),
    ("livro", "livros", "m", "book", "books"),
    ("carro", "carros", "m", "car", "cars"),
    ("menino", "meninos", "m", "boy", "boys"),
    ("pássaro", "pássaros", "m", "bird", "birds"),
    ("peixe", "peixes", "m", "fish", "fish"),
    ("barco", "barcos", "m", "boat", "boats"),
    ("rio", "rios", "m", "river", "rivers"),
    ("copo", "copos", "m", "glass", "glasses"),
    ("casa", "casas", "f", "house", "houses"),
    ("mesa", "mesas", "f", "table", "tables"),
    ("flor", "flores", "f", "flower", "flowers"),
    ("menina", "meninas", "f", "girl", "girls"),
    ("cidade", "cidades", "f", "city", "cities"),
    ("janela", "janelas", "f", "window", "windows"),
    ("porta", "portas", "f", "door", "doors"),
    ("maçã", "maçãs", "f", "apple", "apples"),
    ("cadeira", "cadeiras", "f", "chair", "chairs"),
    ("chave", "chaves", "f", "key", "keys"),
]
# adjective: (masculine singular, feminine singular, masculine plural, feminine plural, english)
ADJECTIVES = [
    ("preto", "preta", "pretos", "pretas", "black"),
    ("branco", "branca", "brancos", "brancas", "white"),
    ("vermelho", "vermelha", "vermelhos", "vermelhas", "red"),
    ("pequeno", "pequena", "pequenos", "pequenas", "small"),
    ("novo", "nova", "novos", "novas", "new"),
    ("velho", "velha", "velhos", "velhas", "old"),
    ("bonito", "bonita", "bonitos", "bonitas", "beautiful"),
    ("amarelo", "amarela", "amarelos", "amarelas", "yellow"),
    ("grande", "grande", "grandes", "grandes", "big"),
    ("azul", "azul", "azuis", "azuis", "blue"),
    ("verde", "verde", "verdes", "verdes", "green"),
    ("feliz", "feliz", "felizes", "felizes", "happy"),
]
# determiner: (pt masculine/feminine singular, masculine/feminine plural, english singular, plural)
DETERMINERS = [("o", "a", "os", "as", "the", "the"), ("um", "uma", "uns", "umas", "a", "some")]


@dataclass(frozen=True)
class Phrase:
    portuguese: str
    english: str
    noun: int
    adjective: int


def phrase(noun: int, adjective: int, determiner: int, plural: bool) -> Phrase:
    pt_sg, pt_pl, gender, en_sg, en_pl = NOUNS[noun]
    forms = ADJECTIVES[adjective]
    det = DETERMINERS[determiner]
    index = (2 if plural else 0) + (1 if gender == "f" else 0)
    pt = f"{det[index]} {pt_pl if plural else pt_sg} {forms[index]}"
    english_det = det[5] if plural else det[4]
    en = f"{english_det} {forms[4]} {en_pl if plural else en_sg}"
    if english_det == "a" and forms[4][0] in "aeiou":
        en = f"an {forms[4]} {en_sg}"
    return Phrase(pt, en, noun, adjective)


def all_phrases() -> list[Phrase]:
    return [
        phrase(n, a, d, plural)
        for n in range(len(NOUNS))
        for a in range(len(ADJECTIVES))
        for d in range(len(DETERMINERS))
        for plural in (False, True)
    ]


def translation_split(seed: int = 0, held_out_pairs: int = 40) -> tuple[list[Phrase], list[Phrase]]:
    """Training and held-out phrases; held-out noun-adjective pairs never occur in training."""
    rng = random.Random(seed)
    pairs = [(n, a) for n in range(len(NOUNS)) for a in range(len(ADJECTIVES))]
    rng.shuffle(pairs)
    held = set(pairs[:held_out_pairs])
    phrases = all_phrases()
    train = [p for p in phrases if (p.noun, p.adjective) not in held]
    test = [p for p in phrases if (p.noun, p.adjective) in held]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


# --------------------------------------------------------------------------- support facts
# topic -> (answer, phrasings of the question's subject)
FACTS: dict[str, tuple[str, list[str]]] = {
    "load": (
        "Run loraserve adapters load ID, or call AdapterAdmin.LoadAdapter.",
        ["load an adapter", "load a lora adapter", "hot-load an adapter", "add an adapter to the server"],
    ),
    "unload": (
        "Run loraserve adapters unload ID; requests in flight finish first.",
        ["unload an adapter", "remove an adapter from memory", "retire an adapter", "evict an adapter"],
    ),
    "list": (
        "Run loraserve adapters list to see every adapter and its tier.",
        [
            "list the adapters",
            "see which adapters are loaded",
            "show the loaded adapters",
            "list lora adapters",
        ],
    ),
    "metrics": (
        "Prometheus metrics are on port 9090 at /metrics.",
        ["get the metrics", "scrape the prometheus metrics", "find the metrics port", "see the metrics"],
    ),
    "port": (
        "The gRPC server listens on port 50051.",
        [
            "find the grpc port",
            "connect to the grpc server",
            "reach the server port",
            "find the server address",
        ],
    ),
    "health": (
        "Run loraserve health; it exits 0 when the server is SERVING.",
        [
            "check the server health",
            "know if the server is ready",
            "check that the server is up",
            "run a health check",
        ],
    ),
    "train": (
        "Run loraserve train with --data FILE.jsonl and --adapter-id ID.",
        ["train an adapter", "fine-tune a new adapter", "make my own adapter", "train a lora adapter"],
    ),
    "start": (
        "Run make serve to build the demo and start the server.",
        ["start the server", "run the server", "launch loraserve", "serve the demo model"],
    ),
    "test": (
        "Run make test to run the whole test suite.",
        ["run the tests", "test the project", "run the test suite", "check that the tests pass"],
    ),
    "auth": (
        "Send the metadata authorization: Bearer followed by your API key.",
        ["authenticate", "pass my api key", "send credentials", "use an api key"],
    ),
    "format": (
        "Adapters are PEFT folders with adapter_config.json and adapter_model.safetensors.",
        [
            "package an adapter",
            "format an adapter folder",
            "save an adapter for the server",
            "prepare adapter files",
        ],
    ),
    "quantize": (
        "The base model stays resident in 4-bit NF4 with bitsandbytes.",
        [
            "quantize the base model",
            "save memory on the base model",
            "shrink the base model",
            "run the base model in 4 bits",
        ],
    ),
}
QUESTION_TEMPLATES = [
    "How do I {}?",
    "How can I {}?",
    "What is the way to {}?",
    "Tell me how to {}.",
    "Explain how to {}.",
    "I want to {}. What should I do?",
    "Can you show me how to {}?",
    "What command do I use to {}?",
]


@dataclass(frozen=True)
class QA:
    question: str
    answer: str


def support_split(seed: int = 0) -> tuple[list[QA], list[QA]]:
    """Every (topic phrasing, template) question; held out: one template per phrasing, unseen."""
    rng = random.Random(seed)
    train, test = [], []
    for answer, subjects in FACTS.values():
        for subject in subjects:
            templates = QUESTION_TEMPLATES[:]
            rng.shuffle(templates)
            questions = [QA(t.format(subject), answer) for t in templates]
            test.append(questions[0])
            train.extend(questions[1:])
    rng.shuffle(train)
    return train, test


def documentation() -> list[str]:
    """What the base model reads about loraserve: the facts as plain sentences."""
    lines = []
    for answer, subjects in FACTS.values():
        lines.append(answer)
        lines.extend(f"To {subject}: {answer}" for subject in subjects[:2])
    return lines


def pretraining_corpus(seed: int = 0, repeats: int = 1) -> list[str]:
    """Monolingual lines of both languages and the documentation, shuffled."""
    rng = random.Random(seed)
    phrases = all_phrases()
    lines: list[str] = []
    for _ in range(repeats):
        lines += [p.portuguese for p in phrases] + [p.english for p in phrases] + documentation()
    rng.shuffle(lines)
    return lines
